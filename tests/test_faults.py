"""Faults under `dvc repro` in a temporary project with the tiny model (all slow).

- the whole `dvc repro` process group SIGKILLed during sft: the re-run needs no lock
  cleanup, skips the finished stages, resumes from the last complete checkpoint and ends
  with the adapter and metrics of an uninterrupted run;
- a second `dvc repro` while one runs fails fast on DVC's lock and corrupts nothing;
- a non-finite loss stops sft with the step number and DVC records nothing;
- with ``HF_TOKEN`` set, the token appears in no file the pipeline writes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_pipeline_e2e import TINY_OVERRIDES, _merge, make_project, ran_stages
from tuneline.training import MARKER

pytestmark = pytest.mark.slow

# Built at run time so this source file, copied into the project, does not hold it.
TOKEN = "hf_" + "tuneline" + "SecretMarker" + str(sum(range(10**4)))
# 8 records, batch 2: four optimizer steps, a complete checkpoint after each.
OVERRIDES = _merge(
    TINY_OVERRIDES,
    {"sft": {"max_records": 8, "eval_each_epoch": False, "trainer": {"per_device_train_batch_size": 2, "save_steps": 1}}},
)


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
        "HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN,
    }


def _dvc(project: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["dvc", *args], cwd=project, env=_env(), capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _complete_checkpoints(project: Path) -> list[Path]:
    return sorted((project / "models/checkpoints/sft").glob(f"checkpoint-*/{MARKER}"))


def _writing(project: Path, out: str) -> bool:
    """Whether a running stage holds DVC's write lock on ``out`` (``.dvc/tmp/rwlock``)."""
    try:
        locks = json.loads((project / ".dvc/tmp/rwlock").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return any(Path(path).as_posix().endswith(out) for path in locks.get("write", {}))


@pytest.fixture(scope="module")
def prepared(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with base, generate and clean reproduced."""
    project = make_project(tmp_path_factory.mktemp("faults"), tiny_model_dir, OVERRIDES)
    _dvc(project, "repro", "clean")
    return project


@pytest.fixture(scope="module")
def killed_then_resumed(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kill")
    killed = _copy(prepared, root / "killed")
    straight = _copy(prepared, root / "straight")

    proc = subprocess.Popen(
        ["dvc", "repro", "sft"], cwd=killed, env=_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not _complete_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "sft finished before a checkpoint could be interrupted"
    assert _complete_checkpoints(killed), "no complete checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "models/sft").exists()
    resumed = _dvc(killed, "repro", "sft")  # no lock cleanup in between

    # The uninterrupted run; a second `dvc repro` started meanwhile must fail on the lock.
    first = subprocess.Popen(
        ["dvc", "repro", "sft"], cwd=straight, env=_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # From the moment sft holds DVC's write lock on its output: the whole stage is the window.
    while not _writing(straight, "models/sft") and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, "the first repro ended before its sft stage was seen running"
    started = time.monotonic()
    second = _dvc(straight, "repro", ok=False)
    second_seconds = time.monotonic() - started
    first_out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, first_out[-3000:]
    return {
        "killed": killed, "straight": straight, "resumed": resumed, "second": second,
        "second_seconds": second_seconds, "first_running_when_second_ended": first_out,
    }


def test_sigkilled_repro_resumes_sft_and_matches_an_uninterrupted_run(killed_then_resumed: dict) -> None:
    killed, straight = killed_then_resumed["killed"], killed_then_resumed["straight"]
    resumed = killed_then_resumed["resumed"]
    assert ran_stages(resumed.stdout) == {"sft"}, resumed.stdout  # base, generate, clean skipped
    a = json.loads((killed / "reports/provenance/sft.json").read_text())["run"]
    b = json.loads((straight / "reports/provenance/sft.json").read_text())["run"]
    # the DVCLive log of the resumed run is the uninterrupted run's, step for step
    log = "metrics/sft/plots/metrics/loss.tsv"
    steps_a = [r.split("\t")[0] for r in (killed / log).read_text().splitlines()]
    assert steps_a == [r.split("\t")[0] for r in (straight / log).read_text().splitlines()]
    assert a["resumed_from_step"] and a["resumed_from_step"] >= 1 and b["resumed_from_step"] is None
    assert a["steps"] == b["steps"] == 4 and a["plan"] == b["plan"]
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
    # train_loss is the Trainer's mean over the steps this process ran, so after a resume
    # it covers only the resumed steps (a transformers limitation; see docs/RELIABILITY.md).
    wa = load_file(killed / "models/sft/adapter_model.safetensors")
    wb = load_file(straight / "models/sft/adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key
    assert "up to date" in _dvc(killed, "status", "sft").stdout
    assert not list((killed / "models/checkpoints/sft").glob("checkpoint-*"))


def test_concurrent_repro_fails_fast_on_the_lock_and_corrupts_nothing(killed_then_resumed: dict) -> None:
    second = killed_then_resumed["second"]
    assert second.returncode != 0
    # DVC refuses either on its repository lock or on the stage's read/write lock.
    text = " ".join((second.stdout + second.stderr).split())
    assert "Unable to acquire lock" in text or "is busy, it is being blocked by" in text, text
    assert killed_then_resumed["second_seconds"] < 60
    assert "Running stage" not in second.stdout
    straight = killed_then_resumed["straight"]
    status = _dvc(straight, "status", "sft")
    assert "up to date" in status.stdout, status.stdout
    assert yaml.safe_load((straight / "dvc.lock").read_text())["stages"]["sft"]


def test_non_finite_loss_under_dvc_records_nothing(prepared: Path, tmp_path: Path) -> None:
    project = _copy(prepared, tmp_path / "nan")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sft"]["trainer"].update(learning_rate=1e38, max_grad_norm=1e38)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _dvc(project, "repro", "sft", ok=False)
    assert proc.returncode != 0
    text = " ".join((proc.stdout + proc.stderr).split())
    assert "at step" in text and "no adapter" in text, text[-3000:]
    assert "sft" not in yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert not (project / "models/sft").exists()
    assert "Traceback" not in proc.stderr


def test_hf_token_is_written_nowhere(killed_then_resumed: dict) -> None:
    project = killed_then_resumed["killed"]
    proc = _dvc(project, "repro")  # the rest of the pipeline: pairs, dpo, probes, compare
    assert {"pairs", "dpo", "compare"} <= ran_stages(proc.stdout), proc.stdout
    leaks = [
        str(path.relative_to(project))
        for path in project.rglob("*")
        if path.is_file() and not path.is_symlink() and TOKEN.encode() in path.read_bytes()
    ]
    assert leaks == []
    assert (project / "models/dpo/provenance.json").is_file() and (project / "metrics/compare.json").is_file()
