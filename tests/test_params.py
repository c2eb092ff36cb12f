from pathlib import Path

import pytest
import yaml

from tuneline.errors import InputError
from tuneline.params import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_project_params_file_is_valid():
    params = load_params(REPO / "params.yaml")
    assert params.paths.base_model == "models/base"
    assert params.sft.lora.r == 16


def test_every_problem_reported_at_once():
    with pytest.raises(ParamsError) as info:
        parse_params(
            {
                "sft": {"lora": {"r": -4}, "learning_rte": 1e-4, "num_epochs": "many"},
                "model": {"dtype": "float8"},
            },
            "params.yaml",
        )
    text = str(info.value)
    assert len(info.value.problems) == 4, text
    assert "sft.lora.r: -4 is not a positive integer" in text
    assert "sft.learning_rte: unknown key (allowed:" in text and "learning_rate" in text
    assert "sft.num_epochs: 'many'" in text
    assert "model.dtype: 'float8'" in text and "'float32'" in text
    assert info.value.exit_code == 2


def test_inconsistent_combinations():
    with pytest.raises(ParamsError) as info:
        parse_params({"model": {"quantization": "nf4", "device": "cpu"}})
    assert "nf4" in str(info.value) and "CUDA" in str(info.value)
    with pytest.raises(ParamsError) as info:
        parse_params({"compare": {"baseline": "v9"}})
    assert "compare.baseline: 'v9' is not a probe model" in str(info.value)


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises ValidationError on assignment
        params.seed = 3  # type: ignore[misc]


def test_passthrough_names_checked_against_trl_and_peft():
    with pytest.raises(ParamsError) as info:
        parse_params({"sft": {"trainer": {"not_a_field": 1}, "lora": {"extra": {"use_rslora": True}}}})
    assert info.value.problems == ["sft.trainer.not_a_field: not a field of trl.SFTConfig"]


def test_bad_yaml_names_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 1\nsft: [unclosed\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"params.yaml:\d+: invalid YAML"):
        load_params(path)


def test_cli_params_check_exit_2_before_loading_models(tmp_path):
    import subprocess

    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sft": {"lora": {"r": 0}}, "seed": -1}))
    proc = subprocess.run(["tuneline", "params", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "sft.lora.r: 0 is not a positive integer" in proc.stderr
    assert "seed: -1" in proc.stderr


def test_cli_usage_error_is_exit_2(tmp_path):
    import subprocess

    proc = subprocess.run(["tuneline", "probe"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Missing" in proc.stderr and "model" in proc.stderr.lower()
