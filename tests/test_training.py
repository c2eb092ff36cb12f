"""The training package: plan arithmetic, checkpoint picking, guards, the one loop
(train_adapter) on the tiny model, and model directories that depend on content only."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training_data import tiny_params, write_clean
from tuneline.errors import InputError, TunelineError
from tuneline.training import (
    MARKER,
    GuardCallback,
    Job,
    announce_plan,
    check_weights_changed,
    make_plan,
    manifest,
    pick_checkpoint,
    train_adapter,
)
from tuneline.training import sft as sft_method
from tuneline.training.data import read_sample
from tuneline.training.outputs import sort_adapter_config

REPO = Path(__file__).resolve().parents[1]

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


def _plan(records: int, batch: int = 4, accumulation: int = 1, processes: int = 1, epochs: float = 1.0,
          warmup: float = 0.0):
    return make_plan(
        records=records, eval_records=0, tokens_per_epoch=100 * records, completion_tokens_per_epoch=50 * records,
        truncated=0, max_seq_len=512, per_device_batch_size=batch, gradient_accumulation_steps=accumulation,
        num_processes=processes, epochs=epochs, warmup=warmup,
    )


def test_plan_arithmetic_follows_the_trainer() -> None:
    assert _plan(10).steps_per_epoch == 3  # a last, short batch is a step
    assert _plan(10, accumulation=2).steps_per_epoch == 2  # 3 batches, the last window short
    assert _plan(10, processes=2).steps_per_epoch == 2 and _plan(10, processes=2).effective_batch == 8
    assert _plan(3, batch=8).steps_per_epoch == 1
    half = _plan(10, epochs=1.5)
    assert half.optimizer_steps == math.ceil(1.5 * 3) == 5 and half.tokens_total == 1500
    assert _plan(100, warmup=0.05).warmup_steps == math.ceil(25 * 0.05) == 2
    assert _plan(100, warmup=3).warmup_steps == 3  # 1 and above: a step count


def test_plan_warnings_and_strict() -> None:
    warnings = announce_plan(_plan(8, warmup=2), "sft", min_steps=30, strict=False, show=False)
    assert any("only 2 optimizer steps" in w for w in warnings)
    assert any(w.startswith("sft.trainer.warmup_steps: warmup takes 2 of 2") for w in warnings)
    with pytest.raises(InputError, match=r"dpo.min_optimizer_steps: .*strict_plan is true"):
        announce_plan(_plan(8), "dpo", min_steps=30, strict=True, show=False)


def _checkpoint(root: Path, step: int, run_id: str, marked: bool = True) -> Path:
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights %d" % step)
    if marked:
        (ckpt / MARKER).write_text(json.dumps({"fingerprint": run_id, "step": step, "files": manifest(ckpt)}))
    return ckpt


def test_checkpoint_picking(tmp_path: Path) -> None:
    old = _checkpoint(tmp_path, 2, "run")
    corrupt = _checkpoint(tmp_path, 5, "run")
    (corrupt / "adapter_model.safetensors").write_bytes(b"weights 9")  # same size, other bytes
    unmarked = _checkpoint(tmp_path, 7, "run", marked=False)
    foreign = _checkpoint(tmp_path, 9, "other")
    # checkpoint-10 sorts before checkpoint-9 as text: steps are compared as numbers
    newest = _checkpoint(tmp_path, 10, "run")
    assert pick_checkpoint(tmp_path, "run", "sft") == newest
    newest.joinpath(MARKER).unlink()
    assert pick_checkpoint(tmp_path, "run", "sft") == old
    assert not unmarked.exists() and not foreign.exists() and not newest.exists() and corrupt.exists()


def test_guards_name_the_step_and_refuse_unchanged_weights() -> None:
    class State:
        global_step = 7

    with pytest.raises(TunelineError, match=r"dpo: loss is nan at step 7.*dpo.trainer.learning_rate"):
        GuardCallback("dpo").on_log(None, State(), None, logs={"loss": float("nan")})
    GuardCallback("dpo").on_log(None, State(), None, logs={"loss": 0.5})
    model = torch.nn.Linear(2, 2)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(TunelineError, match="identical to their initial values"):
        check_weights_changed(model, before, "sft")
    with torch.no_grad():
        model.weight.add_(0.5)
    assert check_weights_changed(model, before, "sft") == pytest.approx(0.5)
    with pytest.raises(TunelineError, match="no trainable parameters"):
        check_weights_changed(model, {}, "sft")


def _sft_pieces(params):
    from tuneline.modeling import load_for_training

    records = read_sample(Path(params.paths.clean) / "train.jsonl", sft_method.RECORD_FIELDS, None, 0)
    loaded = load_for_training(params, False)
    rows, stats = sft_method.tokenize(loaded, records, 2048, Path("train.jsonl"))
    trainer = sft_method.build_trainer(params, loaded, rows, [], Path(params.paths.checkpoints) / "sft")
    return loaded, trainer, sft_method.plan_for(params, trainer, stats, 0)


def _job(params, **extra) -> Job:
    fields = {
        "stage": "sft", "title": "test adapter", "out_dir": Path(params.paths.sft_model), "run_id": "run",
        "provenance": {"stage": "sft", "base": {"path": "b", "content_sha256": "0" * 64}, "parent": None},
        "plot_keys": ("loss",),
    }
    return Job(**{**fields, **extra})


def test_train_adapter_runs_the_plan_and_writes_what_the_job_adds(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = tiny_params(tmp_path, tiny_model_dir)
    write_clean(params)
    loaded, trainer, plan = _sft_pieces(params)
    job = _job(
        params,
        results=lambda history: {"logged": len(history)},
        add_files=lambda tmp: (tmp / "extra.txt").write_text("x"),
    )
    metrics = train_adapter(params, job, trainer, loaded, plan)
    out = Path(params.paths.sft_model)
    assert (out / "extra.txt").read_text() == "x" and (out / "adapter_model.safetensors").is_file()
    assert metrics["steps"] == plan.optimizer_steps == 2 and metrics["logged"] > 0
    # tokens_seen is the plan's (padding left out), the Trainer's own count agrees
    assert metrics["tokens_seen"] == plan.tokens_total == trainer.state.num_input_tokens_seen
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["results"]["tokens_seen"] == plan.tokens_total and "git" not in prov
    # the metrics file: train_loss and what the job's results add; the rest is the run record's
    assert json.loads(Path(params.paths.metrics, "sft.json").read_text()).keys() == {"train_loss", "logged"}
    assert json.loads(Path(params.paths.reports, "provenance", "sft.json").read_text())["run"]["steps"] == 2


def test_train_adapter_refuses_a_step_count_off_the_plan(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 6 records, batch 4: the plan says 2 steps; max_steps makes the Trainer stop at 1.
    params = tiny_params(tmp_path, tiny_model_dir, {"sft": {"trainer": {"max_steps": 1}}})
    write_clean(params)
    loaded, trainer, plan = _sft_pieces(params)
    with pytest.raises(TunelineError, match="ran 1 optimizer steps but the plan said 2"):
        train_adapter(params, _job(params), trainer, loaded, plan)
    assert not Path(params.paths.sft_model).exists()


def test_adapter_config_is_written_sorted(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["v_proj", "q_proj", "k_proj"]}))
    sort_adapter_config(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["k_proj", "q_proj", "v_proj"]


TRAIN_SFT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from training_data import tiny_params, write_clean
from tuneline.stages import sft
params = tiny_params(Path("."), Path(sys.argv[2]))
write_clean(params)
sft.run(params)
"""


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_sft_model_dir_is_the_same_bytes_under_any_hash_seed(tmp_path: Path, tiny_model_dir: Path) -> None:
    runs = []
    for seed in ("1", "2"):
        root = tmp_path / f"seed{seed}"
        root.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(SRC)}
        runs.append((root, subprocess.Popen(
            [sys.executable, "-c", TRAIN_SFT, str(TESTS), str(tiny_model_dir)], cwd=root, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )))
    for _, proc in runs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    a, b = (_files(root / "models/sft") for root, _ in runs)
    assert a.keys() == b.keys() and "adapter_config.json" in a
    assert [name for name in a if a[name] != b[name]] == []


def _git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=project, check=True, capture_output=True,
        text=True,
    ).stdout.strip()


def test_base_is_byte_identical_after_a_commit_that_changes_only_readme(tmp_path: Path, tiny_model_dir: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("v1\n")
    (project / "params.yaml").write_text(json.dumps({"base": {"source": str(tiny_model_dir)}}))
    _git(project, "init", "-q")
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "one")
    env = {**os.environ, "PYTHONPATH": str(SRC)}

    def base() -> tuple[dict[str, bytes], dict]:
        proc = subprocess.run([sys.executable, "-m", "tuneline.cli", "base"], cwd=project, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = json.loads((project / "reports/provenance/base.json").read_text())
        return _files(project / "models/base"), run

    first, run1 = base()
    (project / "README.md").write_text("v2\n")
    _git(project, "commit", "-qam", "two")
    second, run2 = base()
    assert run1["git"]["sha"] != run2["git"]["sha"] == _git(project, "rev-parse", "HEAD")
    assert first == second
    prov = json.loads(first["provenance.json"])
    assert "git" not in prov and "versions" not in prov and str(tiny_model_dir) not in first["provenance.json"].decode()


def test_a_checkpoint_left_by_other_code_is_never_resumed(monkeypatch):
    """The run fingerprint covers the code: a checkpoint from other library versions or
    other tuneline sources would not continue the steps this code takes."""
    from tuneline.training import checkpoints

    same = checkpoints.fingerprint("sft", params={"lr": 1}, data="abc")
    assert checkpoints.fingerprint("sft", params={"lr": 1}, data="abc") == same
    assert checkpoints.fingerprint("dpo", params={"lr": 1}, data="abc") != same
    identity = checkpoints.code_identity("sft")
    monkeypatch.setattr(checkpoints, "code_identity", lambda stage: {**identity, "libraries": {"torch": "0.0"}})
    assert checkpoints.fingerprint("sft", params={"lr": 1}, data="abc") != same
    monkeypatch.setattr(checkpoints, "code_identity", lambda stage: {**identity, "tuneline_sources": "0" * 64})
    assert checkpoints.fingerprint("sft", params={"lr": 1}, data="abc") != same


_FINGERPRINT = (
    "import sys, importlib\n"
    "for name in sys.argv[1:]: importlib.import_module(name)\n"
    "from tuneline.training.checkpoints import fingerprint\n"
    "print(fingerprint('dpo', params={'lr': 1}))\n"
)


def _fingerprint_in(src: Path, *imports: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-c", _FINGERPRINT, *imports], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_the_code_fingerprint_is_the_stages_declared_code_not_what_the_process_imported(tmp_path):
    """The same stage code gives the same fingerprint however the process got there (a
    CLI that imported more, a verify run that imported less), so a re-run of the same
    commit leaves the same checkpoint record; an edit to a file of the stage's import
    closure changes it, an edit to a file outside it does not."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "src" / "tuneline", src / "tuneline", ignore=shutil.ignore_patterns("__pycache__"))
    plain = _fingerprint_in(src)
    assert _fingerprint_in(src, "tuneline.export", "tuneline.reporting", "tuneline.stages.probe") == plain
    with (src / "tuneline" / "export.py").open("a") as handle:
        handle.write("\n# not the dpo stage's code\n")
    assert _fingerprint_in(src) == plain
    with (src / "tuneline" / "training" / "loop.py").open("a") as handle:
        handle.write("\n# the dpo stage's code\n")
    assert _fingerprint_in(src) != plain
