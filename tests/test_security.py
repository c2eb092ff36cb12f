"""Unsafe model inputs: pickle checkpoints, custom code, trust_remote_code."""

from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import pytest

from tuneline import modeling
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.stages import base

SRC = Path(__file__).resolve().parents[1] / "src"


class _Payload:
    """Unpickling this runs a command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _pickle_only_checkpoint(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "hostile"
    directory.mkdir()
    shutil.copy(tiny_model_dir / "config.json", directory / "config.json")
    marker = tmp_path / "PWNED"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    return directory, marker


def test_pickle_only_checkpoint_refused_and_payload_never_runs(tiny_model_dir, tmp_path):
    directory, marker = _pickle_only_checkpoint(tiny_model_dir, tmp_path)
    with pytest.raises(InputError, match="pickle"):
        modeling.load(directory)
    params = parse_params({"base": {"source": str(directory)}, "paths": {"base_model": str(tmp_path / "out")}})
    with pytest.raises(InputError, match="pickle"):
        base.run(params)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_pickle_adapter_refused(tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    marker = tmp_path / "PWNED"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    loaded = modeling.load(tiny_model_dir)
    with pytest.raises(InputError, match="pickle"):
        loaded.attach_adapter(adapter, "evil")
    assert not marker.exists()


def test_custom_code_config_refused_by_base_stage(tiny_model_dir, tmp_path):
    hostile = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, hostile)
    (hostile / "config.json").write_text(
        (hostile / "config.json").read_text().replace("{", '{"auto_map": {"AutoModel": "x.Y"},', 1)
    )
    params = parse_params({"base": {"source": str(hostile)}, "paths": {"base_model": str(tmp_path / "out")}})
    with pytest.raises(InputError, match="custom model code"):
        base.run(params)


def test_trust_remote_code_is_never_passed():
    offenders = []
    for file in sorted(SRC.rglob("*.py")):
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
                offenders.append(f"{file}:{node.value.lineno}")
            if isinstance(node, ast.Dict):
                for key in node.keys:
                    if isinstance(key, ast.Constant) and key.value == "trust_remote_code":
                        offenders.append(f"{file}:{key.lineno}")
    assert offenders == []
    assert list(SRC.rglob("*.py")), "source tree not found"
