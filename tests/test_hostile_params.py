"""Params that used to pass ``params check`` and fail (or destroy data) later: output paths,
TRL-valued choices, duplicate keys, empty files, booleans as numbers, non-finite numbers,
and params files that are not UTF-8 YAML text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneline.errors import InputError
from tuneline.params import ParamsError, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def _project(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ParamsError) as info:
        load_params(path)
    assert info.value.exit_code == 2
    return info.value.problems


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tuneline.cli", *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )


# -- 1. output paths -----------------------------------------------------------------


def test_output_path_over_the_data_directory_is_refused(tmp_path):
    problems = _problems(_project(tmp_path, "paths:\n  base_model: data\n"))
    assert (
        "paths.base_model: 'data' is paths.seed_dir ('data/seed') or a directory above it, which its stage would "
        "overwrite (allowed: a non-empty relative path inside the project, apart from every other output and input)"
    ) in problems
    assert any(p.startswith("paths.base_model: 'data' and paths.generated: 'data/generated' are nested") for p in problems)


@pytest.mark.parametrize(
    ("paths", "expected"),
    [
        ({"generated": ""}, ["paths.generated: '' is empty"]),
        ({"clean": "data/generated"}, ["paths.clean: 'data/generated' is the same directory as paths.generated"]),
        ({"checkpoints": "models/sft/ckpt"}, ["paths.checkpoints: 'models/sft/ckpt' and paths.sft_model"]),
        ({"metrics": "."}, ["paths.metrics: '.' is the project directory"]),
        ({"reports": "src"}, ["paths.reports: 'src' would replace the source directory"]),
        ({"pairs": "../elsewhere"}, ["paths.pairs: '../elsewhere' is outside the project"]),
        ({"sft_model": "/tmp/sft"}, ["paths.sft_model: '/tmp/sft' is outside the project"]),
        ({"dpo_model": "data/seed/probe_suite.jsonl"},
         ["paths.dpo_model: 'data/seed/probe_suite.jsonl' is probe.suites.heldout.path"]),
        ({"pairs": "data/seed/dev_suite.jsonl"}, ["paths.pairs: 'data/seed/dev_suite.jsonl' is paths.dev_suite"]),
        ({"generated": "data/seed"}, ["paths.generated: 'data/seed' is paths.seed_dir"]),
    ],
)
def test_each_bad_output_path_is_named(tmp_path, paths, expected):
    problems = _problems(_project(tmp_path, yaml.safe_dump({"paths": paths})))
    assert len(problems) >= len(expected), problems
    for text in expected:
        assert any(p.startswith(text) for p in problems), (text, problems)
    assert all("allowed:" in p for p in problems)


def test_import_file_and_local_base_source_are_inputs(tmp_path):
    (tmp_path / "ext" / "m").mkdir(parents=True)
    problems = _problems(_project(tmp_path, yaml.safe_dump({
        "base": {"source": "ext/m"},
        "paths": {"base_model": "ext", "generated": "imports"},
        "generate": {"sources": {"import": {"enabled": True, "path": "imports/a.jsonl"}}},
    })))
    assert any(p.startswith("paths.base_model: 'ext' is base.source ('ext/m')") for p in problems), problems
    assert any(p.startswith("paths.generated: 'imports' is generate.sources.import.path") for p in problems), problems


def test_all_path_problems_in_one_report_via_cli(tmp_path):
    _project(tmp_path, yaml.safe_dump({"paths": {"base_model": "data", "generated": "", "metrics": "/x"}}))
    proc = _cli(tmp_path, "params", "check")
    assert proc.returncode == 2, proc.stderr
    text = " ".join(proc.stderr.split())
    for name in ("paths.base_model: 'data'", "paths.generated: ''", "paths.metrics: '/x'"):
        assert name in text
    assert "Traceback" not in proc.stderr


def test_committed_params_paths_pass():
    assert load_params(REPO / "params.yaml").paths.base_model == "models/base"


# -- 2. values that fail later --------------------------------------------------------


def test_values_that_failed_after_loading_the_model_are_refused_together(tmp_path):
    path = _project(tmp_path, (
        "seed: true\n"
        "sft:\n  trainer:\n    num_train_epochs: .inf\n    lr_scheduler_type: cosine_wrong\n"
        "  lora:\n    dropout: .nan\n    r: true\n"
        "dpo:\n  loss_type: sigmod\n  beta: -.inf\n"
        "probe:\n  max_new_tokens: false\n"
    ))
    problems = _problems(path)
    text = "\n".join(problems)
    assert "seed: True is a boolean, not an integer" in text
    assert "sft.trainer.num_train_epochs: inf is not a finite number" in text
    assert "sft.lora.dropout: nan is not a finite number" in text
    assert "sft.lora.r: True is a boolean" in text
    assert "dpo.beta: -inf is not a finite number" in text
    assert "probe.max_new_tokens: False is a boolean" in text
    # TRL's and transformers' own lists (checked once the rest is valid)
    fixed = path.read_text().replace("seed: true", "seed: 0").replace(".inf\n", "1.0\n", 1)
    fixed = fixed.replace(".nan", "0.0").replace("r: true", "r: 4").replace("-.inf", "0.1").replace("false", "2000")
    path.write_text(fixed)
    problems = _problems(path)
    assert problems[0].startswith("dpo.loss_type: 'sigmod' is not a TRL DPO loss type (allowed: sigmoid, hinge, ipo")
    assert problems[1].startswith("sft.trainer.lr_scheduler_type: 'cosine_wrong' is not a transformers scheduler")
    assert "cosine_with_restarts" in problems[1] and len(problems) == 2


def test_other_trl_values_pass():
    params = parse_params({"dpo": {"loss_type": "ipo", "trainer": {"lr_scheduler_type": "constant_with_warmup"}}})
    assert params.dpo.loss_type == "ipo"


def test_duplicate_keys_at_any_depth_name_both_lines(tmp_path):
    path = _project(tmp_path, (
        "seed: 0\n"
        "sft:\n  max_seq_len: 384\n  lora:\n    r: 8\n    r: 4\n"
        "pairs: {}\n"
        "sft:\n  max_records: 10\n"
    ))
    problems = _problems(path)
    assert problems == [
        f"{path}:6: duplicate key 'r' (first at {path}:5); each key may appear once per mapping",
        f"{path}:8: duplicate key 'sft' (first at {path}:2); each key may appear once per mapping",
    ]


def test_empty_params_file_is_refused(tmp_path):
    for text in ("", "# only a comment\n", "---\n"):
        with pytest.raises(InputError, match="params file is empty"):
            load_params(_project(tmp_path, text))
    assert load_params(_project(tmp_path, "{}\n")) == parse_params({})


# -- 3. files that are not UTF-8 YAML --------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("utf16", "UTF-16 encoded; save it as UTF-8"),
        ("binary", "not UTF-8 text"),
        ("nul", "NUL bytes"),
        ("directory", "is a directory, not a params file"),
    ],
)
def test_unreadable_params_file_is_a_clear_error(tmp_path, kind, message):
    path = tmp_path / "params.yaml"
    if kind == "utf16":
        path.write_text("seed: 0\n", encoding="utf-16")
    elif kind == "binary":
        path.write_bytes(bytes(range(128, 256)) * 4)
    elif kind == "nul":
        path.write_bytes(b"seed: 0\n\x00\x01\x02")
    else:
        path.mkdir()
    with pytest.raises(InputError, match=message) as info:
        load_params(path)
    assert str(path) in str(info.value) and info.value.exit_code == 2


@pytest.mark.parametrize("command", [("params", "check"), ("doctor",)])
def test_cli_params_check_and_doctor_exit_2_without_traceback(tmp_path, command):
    (tmp_path / "params.yaml").write_text("seed: 0\n", encoding="utf-16")
    proc = _cli(tmp_path, *command)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "params.yaml: the params file is UTF-16 encoded" in " ".join(proc.stderr.split())
