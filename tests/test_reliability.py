"""Faults and hostile inputs through the real command line, in a temporary project.

- a stage killed with SIGKILL at one of its output writes leaves every output either as
  it was or complete, and a re-run gives the bytes of a clean run;
- a full disk (a file-size limit on the child) names the path and keeps the old outputs;
- bad JSONL and bad params exit 2 with ``path:line`` / the param path before a model loads;
- a pickle-only model given through params is refused with exit 2 and never unpickled;
- randomly corrupted JSONL yields only ``RecordError`` with a line number.

The slow end-to-end faults under ``dvc repro`` (kill during sft, concurrent runs, secrets)
are in test_faults.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from test_pipeline_e2e import TINY_OVERRIDES, make_project
from tuneline.cli import run_stage
from tuneline.records import RecordError, read_jsonl, write_jsonl

PARAMS = Path("params.yaml")
# A child that runs the CLI and SIGKILLs itself at the N-th os.replace of a temp file onto
# an output (the moment the new file would become visible), i.e. mid-way through a stage.
KILL_AT_RENAME = r"""
import os, signal, sys
count, target = 0, int(sys.argv[1])
def hook(event, args):
    global count
    if event == "os.rename" and str(args[0]).endswith(".tmp"):
        count += 1
        if count == target:
            with open("killed_at", "w") as f:
                f.write(str(args[1]))
            os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(hook)
sys.argv = ["tuneline", *sys.argv[2:]]
from tuneline.cli import main
main()
"""
STAGE_OUTPUTS = {
    "generate": ["data/generated/sft.jsonl", "data/generated/preferences.jsonl", "metrics/generate.json"],
    "clean": [
        "data/clean/train.jsonl", "data/clean/val.jsonl", "data/clean/rejected.jsonl",
        "data/clean/lengths.jsonl", "data/clean/preferences.jsonl", "metrics/clean.json",
    ],
    "pairs": ["data/pairs/train.jsonl", "metrics/pairs.json"],
    "probe": [
        *(f"{kind}/probe/{suite}/base.{ext}" for suite in ("heldout", "natural")
          for kind, ext in (("reports", "samples.jsonl"), ("reports", "failures.jsonl"), ("metrics", "json"))),
        "reports/provenance/probe/base.json",
    ],
}
# Outputs that hold timings (the probe's run record); every other output must be
# byte-identical across runs.
TIMED = {"reports/provenance/probe/base.json"}


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def _stage_args(stage: str) -> list[str]:
    return ["probe", "base"] if stage == "probe" else [stage]


def _run_in_process(project: Path, stage: str) -> None:
    with contextlib.chdir(project):
        if stage == "probe":
            run_stage("probe", PARAMS, model="base")
        else:
            run_stage(stage, PARAMS)


@pytest.fixture(scope="module")
def data_project(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, generate, clean, pairs and probe@base run once; their outputs are the reference."""
    project = make_project(tmp_path_factory.mktemp("rel"), tiny_model_dir, TINY_OVERRIDES)
    for stage in ["base", "generate", "clean", "pairs", "probe"]:
        _run_in_process(project, stage)
    return project


@pytest.fixture
def project(data_project: Path, tmp_path: Path) -> Path:
    """A private copy of the prepared project."""
    copy = tmp_path / "project"
    shutil.copytree(data_project, copy, symlinks=True)
    return copy


def _snapshot(project: Path, rels: list[str]) -> dict[str, bytes | None]:
    return {rel: (project / rel).read_bytes() if (project / rel).is_file() else None for rel in rels}


def _leftovers(project: Path, rels: list[str]) -> list[str]:
    dirs = {(project / rel).parent for rel in rels}
    return sorted(str(p.relative_to(project)) for d in dirs for p in d.glob(".*.tmp"))


# -- SIGKILL mid-stage -------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(STAGE_OUTPUTS))
def test_sigkill_at_an_output_write_leaves_old_or_complete_files(project: Path, stage: str) -> None:
    rels = STAGE_OUTPUTS[stage]
    reference = _snapshot(project, rels)
    old = {rel: (b'{"id": "old"}\n' if rel.endswith(".jsonl") else b'{"old": true}\n') for rel in rels}
    for rel, data in old.items():
        (project / rel).write_bytes(data)
    # A random-ish write of the stage, seeded by its name so a failure reproduces.
    target = random.Random(stage).randint(1, len(rels))
    proc = subprocess.run(
        [sys.executable, "-c", KILL_AT_RENAME, str(target), *_stage_args(stage)],
        cwd=project, env=_env(), capture_output=True, text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    killed_at = Path((project / "killed_at").read_text()).resolve()
    for rel in rels:
        now = (project / rel).read_bytes()
        if (project / rel).resolve() == killed_at:
            assert now == old[rel], f"{rel} changed although the process died before replacing it"
        elif rel in TIMED:
            assert now == old[rel] or json.loads(now)["model"] == "base"
        else:
            assert now in (old[rel], reference[rel]), f"{rel} is neither the old nor a complete new file"
    assert _leftovers(project, rels), "the killed writer should have left its temporary file behind"

    _run_in_process(project, stage)
    after = _snapshot(project, rels)
    for rel in rels:
        if rel in TIMED:
            assert json.loads(after[rel])["model"] == "base"
        else:
            assert after[rel] == reference[rel], f"{rel} differs from a clean run"
    assert _leftovers(project, rels) == []  # the re-run swept the killed writer's temporary


# -- disk full ---------------------------------------------------------------------------


def _limit_file_size(limit: int):
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


def test_disk_full_while_writing_data_names_the_path_and_keeps_old_outputs(project: Path) -> None:
    rels = STAGE_OUTPUTS["clean"]
    before = _snapshot(project, rels)
    assert len(before["data/clean/train.jsonl"]) > 8192
    proc = subprocess.run(
        ["tuneline", "clean"], cwd=project, env=_env(), capture_output=True, text=True,
        preexec_fn=_limit_file_size(8192),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "data/clean/train.jsonl: could not write" in proc.stderr and "File too large" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _snapshot(project, rels) == before
    assert _leftovers(project, rels) == []


def test_disk_full_while_saving_a_checkpoint_names_the_directory_and_keeps_old_outputs(project: Path) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft"].update(max_records=4, eval_each_epoch=False)
    params["sft"]["trainer"].update(per_device_train_batch_size=2, save_steps=1)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    previous = project / "models/sft"
    previous.mkdir(parents=True)
    (previous / "adapter_model.safetensors").write_bytes(b"the previous adapter")
    clean = _snapshot(project, STAGE_OUTPUTS["clean"])
    proc = subprocess.run(
        ["tuneline", "sft"], cwd=project, env=_env(), capture_output=True, text=True,
        preexec_fn=_limit_file_size(20_000),
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    text = " ".join(proc.stderr.split())
    assert "sft: writing a checkpoint under models/checkpoints/sft failed" in text and "File too large" in text
    assert "Traceback" not in proc.stderr
    assert [p.name for p in previous.iterdir()] == ["adapter_model.safetensors"]
    assert (previous / "adapter_model.safetensors").read_bytes() == b"the previous adapter"
    assert _snapshot(project, STAGE_OUTPUTS["clean"]) == clean
    checkpoints = list((project / "models/checkpoints/sft").glob("checkpoint-*"))
    assert checkpoints and not any((c / "tuneline-complete.json").exists() for c in checkpoints)


# -- bad input through the CLI -----------------------------------------------------------


def _corrupt_line(path: Path, number: int, new: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[number - 1] = new
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize(
    ("stage", "rel", "line", "bad", "message"),
    [
        ("sft", "data/clean/train.jsonl", 3, b'{"id": "x", "prompt": "\xff"}', "invalid UTF-8"),
        ("sft", "data/clean/val.jsonl", 2, b'{"id": "y", "prompt": "p", "completion": 7}', "field 'completion' is int"),
        ("pairs", "data/clean/train.jsonl", 4, b'{"id": "z", "prompt": "p", "completion": NaN}', "NaN is not valid"),
    ],
)
def test_bad_jsonl_exits_2_with_path_line_before_any_model_loads(
    project: Path, stage: str, rel: str, line: int, bad: bytes, message: str
) -> None:
    _corrupt_line(project / rel, line, bad)
    proc = subprocess.run(["tuneline", stage], cwd=project, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{rel}:{line}: " in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Loading weights" not in proc.stderr + proc.stdout
    assert not (project / "models/sft").exists()


def test_bad_params_list_every_error_and_exit_2_before_any_model_loads(project: Path) -> None:
    shutil.copy(project / "params.yaml", project.parent / "params.yaml.orig")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft"]["learning_rte"] = 1e-4  # unknown key
    params["sft"]["max_seq_len"] = "many"  # wrong type
    params["sft"]["lora"]["r"] = 0  # out of range
    params["model"]["quantization"] = "nf4"  # inconsistent with device cpu
    params["model"]["device"] = "cpu"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["tuneline", "sft"], cwd=project, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    text = " ".join(proc.stderr.split())
    assert "5 invalid param(s)" in text
    for fragment in ["sft.learning_rte: unknown key", "sft.max_seq_len: 'many'", "sft.lora.r: 0", "nf4"]:
        assert fragment in text, fragment
    assert "Traceback" not in proc.stderr and "Loading weights" not in proc.stderr + proc.stdout
    assert not (project / "models/sft").exists() and not (project / "metrics/sft.json").exists()

    # Checks across sections run once every section is valid: a probe model that does not exist.
    params = yaml.safe_load((project.parent / "params.yaml.orig").read_text())
    params["compare"] = {**params.get("compare", {}), "baseline": "v9"}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["tuneline", "sft"], cwd=project, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "compare.baseline: 'v9' is not a probe model" in " ".join(proc.stderr.split())


def test_unknown_probe_model_on_the_command_line_exits_2(project: Path) -> None:
    proc = subprocess.run(["tuneline", "probe", "v9"], cwd=project, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "probe model 'v9': not in probe.models" in " ".join(proc.stderr.split())


# -- unsafe model inputs through params ----------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["base.source", "probe.models"])
def test_pickle_only_model_in_params_is_refused_by_the_cli(project: Path, tiny_model_dir: Path, where: str) -> None:
    hostile = project.parent / "hostile"
    hostile.mkdir()
    marker = project.parent / "PWNED"
    if where == "base.source":
        shutil.copy(tiny_model_dir / "config.json", hostile / "config.json")
        (hostile / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    else:
        (hostile / "adapter_config.json").write_text("{}")
        (hostile / "adapter_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    params = yaml.safe_load((project / "params.yaml").read_text())
    if where == "base.source":
        params["base"]["source"] = str(hostile)
        params["paths"]["base_model"] = "models/hostile-base"
        args = ["base"]
    else:
        params["probe"]["models"]["evil"] = str(hostile)
        args = ["probe", "evil"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.run(["tuneline", *args], cwd=project, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pickle" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not (project / "models/hostile-base").exists() and not (project / "metrics/probe/evil.json").exists()


# -- fuzz --------------------------------------------------------------------------------

SAMPLE = [
    {"id": "a", "prompt": "### Instruction\nPlan 2 days in Lisbon\n\n### Response\n", "completion": '{"x": [1, 2.5]}'},
    {"id": 7, "prompt": "é ✓ \u0001 tab\t", "completion": "", "meta": {"n": None, "ok": True}},
    {"id": "c", "prompt": "p", "completion": "q", "nested": [[{"k": -1e-3}]]},
]
FIELDS = {"prompt": str, "completion": str}

mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "duplicate_line"]), st.integers(0, 10**6), st.binary(min_size=1, max_size=4))


def _mutate(data: bytes, mutations: list[tuple[str, int, bytes]]) -> bytes:
    for kind, where, blob in mutations:
        if not data:
            data = blob
            continue
        i = where % len(data)
        if kind == "flip":
            data = data[:i] + bytes([data[i] ^ (blob[0] or 1)]) + data[i + 1:]
        elif kind == "insert":
            data = data[:i] + blob + data[i:]
        elif kind == "delete":
            data = data[:i] + data[i + len(blob):]
        else:
            lines = data.split(b"\n")
            data = b"\n".join([*lines, lines[where % len(lines)]])
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(mutation, min_size=1, max_size=4))
@example([("insert", 0, b"[" * 4)])
def test_corrupted_jsonl_raises_only_record_error_with_a_line(tmp_path: Path, mutations) -> None:  # noqa: ANN001
    good = tmp_path / "good.jsonl"
    write_jsonl(good, SAMPLE)
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_mutate(good.read_bytes(), mutations))
    try:
        records = read_jsonl(path, required=FIELDS)
    except RecordError as exc:
        assert exc.line >= 1 and str(exc).startswith(f"{path}:{exc.line}: ")
        assert exc.exit_code == 2
        return
    # Whatever the reader accepts, the writer can write back and read again unchanged.
    again = tmp_path / "again.jsonl"
    write_jsonl(again, records)
    assert read_jsonl(again, required=FIELDS) == records


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b'{"id": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nesting is too deep"),
        (b'{"id": 1, "x": "\\ud800"}', "lone surrogate"),
        (b'{"id": 1, "x": "\\udfff and more"}', "lone surrogate"),
    ],
)
def test_hostile_lines_the_json_module_accepts_or_crashes_on(tmp_path: Path, line: bytes, fragment: str) -> None:
    path = tmp_path / "h.jsonl"
    path.write_bytes(b'{"id": 0}\n' + line + b"\n")
    with pytest.raises(RecordError, match=rf"h.jsonl:2: invalid JSON: .*{fragment}"):
        read_jsonl(path)
    path.write_bytes(b'{"id": 0, "x": "\\ud83d\\ude00 is a valid pair"}\n')
    assert read_jsonl(path)[0]["x"].startswith("\U0001f600")
