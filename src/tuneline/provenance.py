"""Provenance: git state, library versions and content hashes stamped on every output.

Hashed model directories (DVC outs that later stages depend on) hold content provenance
only: sources and content hashes. What names a run rather than its content (the git
commit, the dirty flag, library versions, local paths) goes to a sidecar,
``paths.reports``/provenance/<stage>.json (:func:`write_run_provenance`), so a new commit
that changes nothing a model is made from leaves the model's bytes, and DVC's hash of
them, unchanged.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "dvc", "accelerate", "tuneline")
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of one file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | Path) -> str:
    """sha256 of a file, or of a directory as its sorted (relative path, file hash) list.

    Hidden temp files (``.*.tmp``) are skipped so that a hash taken while a stage writes
    beside its outputs is the hash of the finished files only.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or directory")
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        if file.name.startswith(".") and file.name.endswith(".tmp"):
            continue
        digest.update(rel.encode("utf-8") + b"\0" + sha256_file(file).encode("ascii") + b"\n")
    return digest.hexdigest()


@functools.cache
def git_info(cwd: str | None = None) -> dict[str, Any]:
    """The git commit and whether the code and inputs differ from it (None outside a repo).

    ``dirty`` ignores what the pipeline itself writes into git-tracked files (``dvc.lock``
    and every stage output, metric and plot ``dvc.yaml`` declares, e.g. ``metrics/``), so a
    full ``dvc repro`` from a clean checkout stamps ``dirty: false`` on every stage, not
    just the first."""
    where = cwd or os.getcwd()
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "-z"],
            cwd=where, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    changed = [entry[3:] for entry in status.split("\0") if len(entry) > 3]
    written = pipeline_outputs(Path(where))
    return {"sha": sha, "dirty": any(not _is_output(path, written) for path in changed)}


def pipeline_outputs(root: Path) -> list[str]:
    """``dvc.lock`` and the outs, metrics and plots of ``dvc.yaml``'s stages as patterns
    (``${paths.*}`` from params.yaml; a ``foreach`` stage's ``${key}``/``${item}`` as ``*``)."""
    import re

    import yaml

    try:
        stages = (yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages", {})
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return ["dvc.lock"]

    def value(match: re.Match[str]) -> str:
        node: Any = params
        for key in match.group(1).split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return str(node) if isinstance(node, str | int | float) else "*"

    patterns = ["dvc.lock"]
    for stage in stages.values():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for kind in ("outs", "metrics", "plots"):
            for entry in body.get(kind) or []:
                for path in entry if isinstance(entry, dict) else [entry]:
                    patterns.append(re.sub(r"\$\{([^}]+)\}", value, str(path)).rstrip("/"))
    return patterns


def _is_output(path: str, patterns: list[str]) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p + "/*") for p in patterns)


@functools.cache
def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def stamp(**extra: Any) -> dict[str, Any]:
    """The provenance block every stage adds to what it writes.

    No timestamps: outputs must be byte-identical when inputs are, so DVC sees no change.
    """
    return {"git": git_info(), "versions": library_versions(), **extra}


def project_path(path: str | Path, sha256: str, root: str | Path | None = None) -> tuple[str, bool]:
    """How a local path is recorded in git-tracked files: relative to the project
    (``root``, the working directory by default) when inside it, else its basename
    with its content hash, never an absolute path. Returns ``(text, inside)``."""
    base = Path(root or os.getcwd()).resolve()
    resolved = Path(path).resolve()
    try:
        return resolved.relative_to(base).as_posix() or ".", True
    except ValueError:
        return f"{resolved.name} (outside the project; sha256 {sha256})", False


def run_provenance_path(reports: str | Path, stage: str) -> Path:
    return Path(reports) / "provenance" / f"{stage}.json"


def write_run_provenance(params: Any, stage: str, content: dict[str, Any]) -> Path:
    """Write the sidecar naming the run that made ``stage``'s model (git, versions)."""
    return write_provenance(run_provenance_path(params.paths.reports, stage), {"stage": stage, **content})


def write_provenance(path: str | Path, content: dict[str, Any]) -> Path:
    """A run record under ``paths.reports``/provenance/: ``content`` (what the run read
    and recorded beside its metrics) with the commit and library versions (``stamp``).

    The DVC metrics files hold only the numbers a user compares between versions; what
    names a run (commit, versions, hashes, paths, decoding, timings) is here, in files that
    are stage outputs but not metrics."""
    from tuneline.records import write_json

    write_json(path, {**content, **stamp()})
    return Path(path)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
