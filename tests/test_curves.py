"""The training logs' metric TSVs are read in one place (tuneline.curves)."""

from __future__ import annotations

import pytest

from tuneline.curves import read_curve
from tuneline.errors import InputError


def test_read_curve_reads_rows_and_names_a_bad_line(tmp_path):
    path = tmp_path / "loss.tsv"
    assert read_curve(path) == []  # not logged: no curve
    path.write_text("step\tloss\n0\t3.5\n84\t0.75\n", encoding="utf-8")
    assert read_curve(path) == [(0.0, 3.5), (84.0, 0.75)]
    path.write_text("step\tloss\n0\t3.5\n84\tnan?\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"loss\.tsv:3: expected step<TAB>value, got '84\\tnan\?'"):
        read_curve(path)
