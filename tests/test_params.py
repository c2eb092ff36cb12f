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
                "sft": {"lora": {"r": -4}, "learning_rte": 1e-4, "max_seq_len": "many"},
                "model": {"dtype": "float8"},
            },
            "params.yaml",
        )
    text = str(info.value)
    assert len(info.value.problems) == 4, text
    assert "sft.lora.r: -4 is not a positive integer" in text
    assert "sft.learning_rte: unknown key (allowed:" in text and "max_seq_len" in text
    assert "sft.max_seq_len: 'many'" in text
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
    with pytest.raises(ParamsError) as info:  # a trainer setting is not a LoRA setting
        parse_params({"dpo": {"lora": {"extra": {"logging_steps": 2}}}})
    assert info.value.problems == ["dpo.lora.extra.logging_steps: not a field of peft.LoraConfig"]


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


def test_code_defaults_are_the_committed_params():
    # One source of defaults: an empty params file is the documented default run.
    assert parse_params({}) == load_params(REPO / "params.yaml")
    assert parse_params({}).sft.trainer["learning_rate"] == 0.002 and parse_params({}).probe.batch_size == 90


def test_trainer_settings_lay_over_the_defaults_and_are_checked():
    params = parse_params({"sft": {"trainer": {"learning_rate": 1e-3, "torch_compile": True}}})
    assert params.sft.trainer["learning_rate"] == 1e-3 and params.sft.trainer["torch_compile"] is True
    assert params.sft.trainer["per_device_train_batch_size"] == 2  # the default kept
    with pytest.raises(ParamsError) as info:
        parse_params({
            "sft": {"learning_rate": 1e-3, "trainer": {"per_device_train_batch_size": 0}},
            "dpo": {"trainer": {"learning_rate": "fast", "num_train_epochs": True}},
        })
    assert sorted(info.value.problems) == [
        "dpo.trainer.learning_rate: 'fast' is not a number",
        "dpo.trainer.num_train_epochs: True is not a number",
        "sft.learning_rate: moved to sft.trainer.learning_rate (TRL's name for it)",
        "sft.trainer.per_device_train_batch_size: 0 must be > 0",
    ]


def test_params_check_imports_no_torch_or_trl():
    import subprocess
    import sys

    code = (
        "import sys; from tuneline.params import load_params; load_params(sys.argv[1]); "
        "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "params.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_params_check_command_imports_no_torch():
    """`tuneline params check` as the CLI runs it (the runtime checks included) on CPU params."""
    import subprocess
    import sys

    code = (
        "import sys, atexit; "
        "atexit.register(lambda: print('torch' in sys.modules, file=sys.stderr)); "
        "from tuneline.cli import main; sys.argv = ['tuneline', 'params', 'check', '--params', sys.argv[1]]; main()"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(REPO / "params.yaml")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and proc.stderr.strip().splitlines()[-1] == "False", proc.stderr
