"""Checkpoints and resume.

``MarkerCallback`` (callbacks.py) writes ``tuneline-complete.json`` into a checkpoint
after the trainer has saved it (files, sizes and hashes, plus the run fingerprint);
``resume_checkpoint`` picks the newest complete checkpoint of the same run;
``finish_checkpoints`` drops them after a successful run.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneline import codegraph
from tuneline.errors import TunelineError
from tuneline.provenance import library_versions, sha256_file
from tuneline.records import read_json, write_json
from tuneline.training.distributed import is_main_process, wait_for_everyone

MARKER = "tuneline-complete.json"
FINISHED = "finished.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
console = Console(stderr=True)


def code_identity(stage: str) -> dict[str, Any]:
    """The code a run trains with: a hash of the stage's import closure inside tuneline
    (the files ``dvc.yaml`` declares as its code deps, computed by ``tuneline.codegraph``
    from the source, so it does not depend on what else this process happened to
    import) and the library versions. A checkpoint left by other code is never resumed
    (its steps would not be the steps this code takes)."""
    package = Path(__file__).resolve().parents[1]
    module = codegraph.module_file(package, f"{codegraph.PACKAGE}.stages.{stage}")
    if module is None:
        raise TunelineError(f"no stage module tuneline/stages/{stage}.py to fingerprint")
    entry = package / codegraph.ENTRY
    digest = hashlib.sha256()
    for source in sorted(codegraph.closure(package, module, entry if entry.is_file() else None)):
        digest.update(source.relative_to(package).as_posix().encode("utf-8") + b"\0")
        digest.update(source.read_bytes())
    return {"tuneline_sources": digest.hexdigest(), "libraries": library_versions()}


def fingerprint(stage: str, **parts: Any) -> str:
    """A hash of what determines a run of ``stage`` (params, data and base hashes, the
    code): checkpoints of a different run are never resumed."""
    text = json.dumps({**parts, "stage": stage, "code": code_identity(stage)}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def manifest(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file of a checkpoint but its marker."""
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def write_marker(directory: Path, run_fingerprint: str, step: int) -> None:
    write_json(
        directory / MARKER, {"fingerprint": run_fingerprint, "step": step, "files": manifest(directory)},
        write_now=True,  # a checkpoint is complete the moment it is marked, whatever the stage does next
    )


def checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` under ``directory``, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def _corrupt(checkpoint: Path, marker: dict[str, Any]) -> str | None:
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "the marker lists no files"
    for rel, info in files.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != info.get("size") or sha256_file(path) != info.get("sha256"):
            return f"{rel} differs from the marker's size/hash"
    return None


def resume_checkpoint(directory: Path, run_fingerprint: str, stage: str) -> Path | None:
    """The newest complete checkpoint of this run, or None to start fresh.

    Checkpoints without a marker (interrupted while saving) and checkpoints of another
    run (different params, data or base) are ignored and removed. A marked checkpoint
    whose files do not match its marker is skipped for an earlier one; if none is left,
    the run fails naming it rather than silently starting over.

    In a distributed run the main process removes and reports; the other ranks wait for
    it, then read the same markers and pick the same checkpoint.
    """
    if is_main_process():
        chosen = pick_checkpoint(directory, run_fingerprint, stage, main=True)
        wait_for_everyone()
        return chosen
    wait_for_everyone()
    return pick_checkpoint(directory, run_fingerprint, stage, main=False)


def pick_checkpoint(directory: Path, run_fingerprint: str, stage: str, *, main: bool = True) -> Path | None:
    """The choice ``resume_checkpoint`` makes; ``main`` also removes and reports."""

    def say(text: str) -> None:
        if main:
            console.print(text, highlight=False)

    corrupt: list[str] = []
    for _, checkpoint in checkpoints(directory):
        marker_path = checkpoint / MARKER
        if not marker_path.is_file():
            say(f"{stage}: ignoring incomplete checkpoint {checkpoint} (no {MARKER})")
            if main:
                shutil.rmtree(checkpoint)
            continue
        marker = read_json(marker_path)
        if marker.get("fingerprint") != run_fingerprint:
            say(f"{stage}: removing checkpoint {checkpoint} of a different run")
            if main:
                shutil.rmtree(checkpoint)
            continue
        problem = _corrupt(checkpoint, marker)
        if problem:
            say(f"[bold red]WARNING[/] {stage}: checkpoint {checkpoint} is corrupt: {problem}")
            corrupt.append(f"{checkpoint} ({problem})")
            continue
        say(f"{stage}: resuming from {checkpoint}")
        return checkpoint
    if corrupt:
        raise TunelineError(
            f"{stage}: the only complete checkpoint(s) are corrupt: {'; '.join(corrupt)}; "
            f"delete {directory} to start over"
        )
    return None


def train_with_checkpoints(trainer: Any, resume: Path | None, directory: Path, stage: str) -> Any:
    """``trainer.train``, with a checkpoint that cannot be written (disk full, file-size
    limit, permissions) reported as one error naming the directory. The partial checkpoint
    has no marker, so a later run ignores it."""
    from safetensors import SafetensorError

    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (OSError, SafetensorError) as exc:
        problem = exc
    except RuntimeError as exc:  # torch.save reports a failed write as a RuntimeError
        if "PytorchStreamWriter" not in str(exc):
            raise
        problem = exc
    raise TunelineError(
        f"{stage}: writing a checkpoint under {directory} failed: {' '.join(str(problem).split())}; "
        "free space (or raise the limit) and re-run: training resumes from the last complete checkpoint"
    ) from problem


def finish_checkpoints(directory: Path, run_fingerprint: str, step: int) -> None:
    """After a successful run: drop the checkpoints (DVC will not re-run a finished stage)
    and every other file the trainer left there (TRL's model card, whose tag order follows
    the hash seed), and leave a small record of the run so the directory, a persistent DVC
    out, exists and holds only what the run determines."""
    for _, checkpoint in checkpoints(directory):
        shutil.rmtree(checkpoint)
    for leftover in sorted(directory.iterdir()) if directory.is_dir() else []:
        if leftover.is_file() and leftover.name != FINISHED:
            leftover.unlink()
    write_json(directory / FINISHED, {"fingerprint": run_fingerprint, "steps": step})
