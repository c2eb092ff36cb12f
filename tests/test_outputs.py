"""A stage's outputs are swapped in together or not at all, and every non-success of the
command line exits non-zero.

- an interrupt (a real SIGINT) mid-stage exits 130 and leaves every output as it was;
- a stage that fails on its last output (here: ``metrics`` is a file, so
  ``metrics/generate.json`` cannot be written) leaves the data it had already written
  unpublished;
- ``typer.Exit(code)`` raised inside a command (a multi-GPU launch whose workers failed)
  leaves with that code;
- a written file keeps the permissions of the one it replaces; a new one gets the umask's.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline_e2e import TINY_OVERRIDES, make_project
from tuneline.records import atomic_dir, staged_outputs, write_json, write_jsonl

GENERATE_OUTPUTS = ["data/generated/sft.jsonl", "data/generated/preferences.jsonl", "metrics/generate.json"]
# A child that runs the CLI and sends itself SIGINT when the stage opens the temporary file
# of its N-th output: the outputs before it are written, the rest are not.
SIGINT_AT_OUTPUT = r"""
import os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a background job ignores it)
count, target = 0, int(sys.argv[1])
def hook(event, args):
    global count
    if event == "open" and str(args[0]).endswith(".tmp") and args[1] and "w" in str(args[1]):
        count += 1
        if count == target:
            os.kill(os.getpid(), signal.SIGINT)
sys.addaudithook(hook)
sys.argv = ["tuneline", *sys.argv[2:]]
from tuneline.cli import main
main()
"""


def _env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}


def _tuneline(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tuneline", *args], cwd=project, env=_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def generated(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = make_project(tmp_path_factory.mktemp("outputs"), tiny_model_dir, TINY_OVERRIDES)
    for stage in ["base", "generate"]:
        proc = _tuneline(project, stage)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return project


@pytest.fixture
def project(generated: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(generated, copy, symlinks=True)
    for rel in GENERATE_OUTPUTS:  # outputs a re-run would visibly replace
        (copy / rel).write_text('{"id": "old"}\n')
    return copy


def _snapshot(project: Path) -> dict[str, bytes]:
    return {rel: (project / rel).read_bytes() for rel in GENERATE_OUTPUTS}


def _leftovers(project: Path) -> list[Path]:
    return [p for rel in GENERATE_OUTPUTS for p in (project / rel).parent.glob(".*.tmp")]


def test_sigint_mid_stage_exits_130_and_publishes_nothing(project: Path) -> None:
    before = _snapshot(project)
    proc = subprocess.run(
        [sys.executable, "-c", SIGINT_AT_OUTPUT, "2", "generate"],
        cwd=project, env=_env(), capture_output=True, text=True,
    )
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "aborted" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(project) == before, "an interrupted stage replaced some of its outputs"
    assert _leftovers(project) == []


def test_a_failing_last_output_leaves_every_earlier_output_as_it_was(project: Path) -> None:
    before = _snapshot(project)
    shutil.rmtree(project / "metrics")
    (project / "metrics").write_text("not a directory\n")
    proc = _tuneline(project, "generate")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "metrics/generate.json" in proc.stderr and "could not write" in proc.stderr
    assert "Traceback" not in proc.stderr
    for rel in GENERATE_OUTPUTS[:2]:
        assert (project / rel).read_bytes() == before[rel], f"{rel} was replaced by a failed stage"
    assert _leftovers(project) == []


def test_typer_exit_inside_a_command_leaves_with_its_code() -> None:
    script = (
        "import sys, typer\n"
        "from tuneline import cli\n"
        "@cli.app.command('workers-failed')\n"
        "def failed() -> None:\n"
        "    raise typer.Exit(3)\n"
        "sys.argv = ['tuneline', 'workers-failed']\n"
        "cli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-3000:]


def test_staged_outputs_swap_in_together_or_not_at_all(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "sub" / "b.json"
    write_jsonl(a, [{"id": "old"}])
    with pytest.raises(RuntimeError), staged_outputs():
        write_jsonl(a, [{"id": "new"}])
        assert a.read_text() == '{"id":"old"}\n'  # not visible before the stage returns
        raise RuntimeError("the stage failed")
    assert a.read_text() == '{"id":"old"}\n' and not b.exists()
    with staged_outputs():
        write_jsonl(a, [{"id": "new"}])
        write_json(b, {"n": 1})
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_bytes(b"w")
    assert a.read_text() == '{"id":"new"}\n' and b.exists() and (tmp_path / "model/weights").exists()
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_written_files_keep_the_permissions_a_user_expects(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.json"
        write_json(fresh, {"a": 1})
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        shared = tmp_path / "shared.jsonl"
        shared.write_text("")
        shared.chmod(0o664)
        write_jsonl(shared, [{"id": "x"}])
        assert stat.S_IMODE(shared.stat().st_mode) == 0o664
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_bytes(b"w")
        assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    finally:
        os.umask(mask)


def test_files_written_into_a_directory_being_built_land_in_it(tmp_path: Path) -> None:
    """A model directory is one staged output: what is written into it (provenance, a
    rewritten config) is inside it when it is swapped in."""
    with staged_outputs():
        with atomic_dir(tmp_path / "model") as tmp:
            write_json(tmp / "provenance.json", {"a": 1})
            write_json(tmp / "provenance.json", {"a": 2})
            assert json.loads((tmp / "provenance.json").read_text()) == {"a": 2}  # read back at once
        assert not (tmp_path / "model").exists()
    assert json.loads((tmp_path / "model/provenance.json").read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_dirty_means_code_or_inputs_not_the_pipelines_own_outputs(tmp_path: Path) -> None:
    """A full repro from a clean checkout rewrites tracked metrics and dvc.lock as it goes;
    the stages after the first must still stamp dirty: false. An edited input is dirty."""
    from tuneline.provenance import git_info

    (tmp_path / "params.yaml").write_text("paths:\n  metrics: metrics\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  probe:\n    foreach: [a, b]\n    do:\n      cmd: x\n"
        "      metrics:\n        - ${paths.metrics}/probe/${key}.json:\n            cache: false\n"
    )
    for rel, text in {"metrics/probe/a.json": "{}\n", "dvc.lock": "x\n", "src.py": "x = 1\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=tmp_path, check=True)
    (tmp_path / "metrics/probe/a.json").write_text('{"n": 1}\n')
    (tmp_path / "dvc.lock").write_text("y\n")
    assert git_info(str(tmp_path))["dirty"] is False
    (tmp_path / "src.py").write_text("x = 2  # edited\n")
    git_info.cache_clear()  # one answer per process; a new stage is a new process
    assert git_info(str(tmp_path))["dirty"] is True
