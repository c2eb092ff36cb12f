"""A DVC remote carries the pipeline's results between machines, and the cloud task runs it.

`make run` works without a remote (everything runs) and with one (what the remote holds is
pulled first, and `dvc repro` runs nothing): a tiny project is run and pushed to a
local-directory remote, cloned afresh, and `tuneline diff` and `tuneline export` work in
the clone without re-running a stage. cloud/sky.yaml is a SkyPilot task whose run command
is the README's experiment command, parsed by SkyPilot where it is installed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from test_pipeline_e2e import TINY_OVERRIDES, make_project, ran_stages

REPO = Path(__file__).resolve().parents[1]
SKY = REPO / "cloud" / "sky.yaml"
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


# -- the cloud task ---------------------------------------------------------------------


def test_sky_task_parses_with_skypilot() -> None:
    sky = pytest.importorskip("sky", reason="SkyPilot is an optional extra (pip install -e '.[cloud]')")
    task = sky.Task.from_yaml(str(SKY))
    assert task.num_nodes == 1 and task.run and task.setup


def test_sky_task_runs_the_readme_commands() -> None:
    task = yaml.safe_load(SKY.read_text())
    readme = (REPO / "README.md").read_text()
    assert {"num_nodes", "resources", "envs", "setup", "run"} <= task.keys()
    assert task["resources"]["accelerators"]
    assert {"COMMIT", "OVERRIDES", "REPO", "EXP_NAME", "CKPT_BUCKET"} <= task["envs"].keys()
    # setup: the commit, then the README's GPU install
    setup = task["setup"]
    assert 'git checkout --quiet --detach "$COMMIT"' in setup
    gpu_spec = re.search(r'make run TORCH_SPEC="([^"]+)" EXTRAS=dev,gpu', readme)
    assert gpu_spec, "README lost its GPU install command"
    assert task["envs"]["TORCH_SPEC"] == gpu_spec.group(1)
    assert 'make setup TORCH_SPEC="$TORCH_SPEC" EXTRAS=dev,gpu' in setup
    # run: pull, the README's experiment command with the overrides, push the experiment and its data
    run = task["run"]
    assert "dvc exp run -n" in readme
    steps = [run.index(s) for s in ("dvc pull", 'dvc exp run -n "$EXP_NAME" $OVERRIDES', "dvc exp push origin", "dvc push\n")]
    assert steps == sorted(steps)
    # several nodes: the workers join the training stages and never push
    worker = run[run.index("else"):]
    assert "tuneline sft" in worker and "tuneline dpo" in worker and "dvc push" not in worker


# -- a DVC remote round trip ------------------------------------------------------------


def _make_run(project: Path) -> subprocess.CompletedProcess[str]:
    """`make run` with this environment's tools (the venv install step is skipped)."""
    venv = Path(os.environ.get("VIRTUAL_ENV") or Path(os.sys.executable).parents[1])
    done = subprocess.run(
        ["make", "-s", "-o", str(venv / ".tuneline-installed"), "run", f"VENV={venv}"],
        cwd=project, capture_output=True, text=True, timeout=1200, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _git(project: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=project, check=True, capture_output=True, text=True)


@pytest.mark.slow
def test_results_travel_through_a_dvc_remote(tiny_model_dir: Path, tmp_path: Path) -> None:
    project = make_project(tmp_path, tiny_model_dir, TINY_OVERRIDES)
    first = _make_run(project)  # no remote: everything runs here
    assert {"base", "sft", "dpo", "compare"} <= ran_stages(first.stdout)

    remote = tmp_path / "remote"
    subprocess.run(["dvc", "remote", "add", "-d", "store", str(remote)], cwd=project, check=True)
    _git(project, "add", "-A")
    _git(project, "commit", "-qm", "results")
    subprocess.run(["dvc", "push"], cwd=project, check=True, capture_output=True)
    assert any(remote.rglob("*")), "nothing was pushed"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
    assert not (clone / "models").exists()
    second = _make_run(clone)  # a remote: pulled, nothing re-runs
    assert ran_stages(second.stdout) == set(), second.stdout
    for rel in ("models/sft/adapter_model.safetensors", "models/dpo/adapter_model.safetensors", "data/clean/train.jsonl"):
        assert (clone / rel).is_file(), rel
    status = subprocess.run(["dvc", "status"], cwd=clone, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout

    exported = subprocess.run(
        ["tuneline", "export", "dpo", "--out", str(tmp_path / "merged")],
        cwd=clone, capture_output=True, text=True, timeout=600, check=False,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert any((tmp_path / "merged").glob("*.safetensors"))
    diff = subprocess.run(
        ["tuneline", "diff", "HEAD", "workspace", "--json"],
        cwd=clone, capture_output=True, text=True, timeout=600, check=False,
    )
    assert diff.returncode == 0, diff.stderr[-3000:]
    assert diff.stdout.strip().startswith("{")
