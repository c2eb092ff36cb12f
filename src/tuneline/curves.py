"""Reading the per-step metric files the training stages log through DVCLive.

Each logged key is a TSV under ``<metrics>/<stage>/plots/metrics/`` (``loss.tsv``,
``eval/loss.tsv``, ``curve/schema_valid_rate.tsv``, ...): a header ``step<TAB>name`` and one
``step<TAB>value`` row per logged step. The compare stage's report and the development sweep
(``bench/dev_sweep.py``) read them here.
"""

from __future__ import annotations

from pathlib import Path

from tuneline.errors import InputError


def read_curve(path: Path) -> list[tuple[float, float]]:
    """``(step, value)`` rows of a DVCLive metric TSV (header ``step<TAB>name``); [] if absent."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()[1:], start=2):
        try:
            step, value = line.split("\t")[:2]
            rows.append((float(step), float(value)))
        except ValueError as exc:
            raise InputError(f"{path}:{number}: expected step<TAB>value, got {line!r}") from exc
    return rows
