"""DAG-verified archiving: plan, apply, restore and purge legacy files.

A file is an archive candidate when nothing in the DVC pipeline refers to it and it is not
in the keep set:

- no stage (``foreach``/``matrix`` items included) declares it as a dep, out, params file,
  metric or plot, directly or through a declared directory or a symlink chain;
- no ``.dvc`` file tracks it, and it is not a ``dvc.yaml``/``dvc.lock``/``.dvc`` file or a
  file DVC reads to resolve ``${...}`` values;
- it does not match ``archive.keep`` in params.yaml (.gitignore-style patterns);
- the install or CI does not need it: ``pyproject.toml``, ``Makefile``, ``constraints*.txt``,
  ``requirements*.txt``, ``.ci/``, ``.github/``, README, LICENSE and the like, and every
  file or directory their text names (transitively);
- git sees it (tracked, or untracked and not ignored): ignored build junk is left alone.

The DAG is read through DVC (``Repo.index``), never by parsing dvc.yaml by hand.

``apply`` records every move in ``archive/<id>/MANIFEST.json`` before it happens, moves the
files to ``archive/<id>/files/<same relative path>``, appends each completed move to
``archive/<id>/JOURNAL.jsonl``, then proves the pipeline still resolves, against the DAG
rather than against a run: DVC builds the graph, every stage's dep exists or is the out of
another stage (so a fresh clone, or one where only some stages ran, resolves), and
``dvc status`` reports no newly deleted dep. If any check fails, every move of that apply is
undone. ``restore`` works from the manifest and
what is on disk, so it also rolls back an apply that was killed half way.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from tuneline.errors import InputError, TunelineError
from tuneline.provenance import sha256_file
from tuneline.records import read_json, write_json

ARCHIVE_DIR = "archive"
MANIFEST = "MANIFEST.json"
JOURNAL = "JOURNAL.jsonl"
FILES = "files"
ID_PATTERN = re.compile(r"^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$")


# ---------------------------------------------------------------------------------------
# Reading the DAG through DVC


@dataclass(frozen=True)
class StageDecl:
    """One (expanded) pipeline stage as DVC resolves it; paths are repo-relative POSIX."""

    name: str
    dvcfile: str
    wdir: str
    cmd: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    persist_outs: tuple[str, ...]
    params_files: tuple[str, ...]
    external_deps: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dag:
    root: Path
    stages: tuple[StageDecl, ...]
    # repo-relative path -> why the DAG needs it ("dep of stage 'x'", ".dvc file", ...)
    declared: dict[str, tuple[str, ...]]

    def stage(self, name: str) -> StageDecl:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise InputError(f"no stage named {name!r} (stages: {', '.join(s.name for s in self.stages)})")

    def needs(self, rel: str) -> tuple[str, ...]:
        """Why the DAG needs ``rel`` (itself or a declared directory above it); () if not."""
        for candidate in _self_and_parents(rel):
            if candidate in self.declared:
                return self.declared[candidate]
        return ()

    @property
    def outs(self) -> set[str]:
        return {out for stage in self.stages for out in stage.outs}


def _self_and_parents(rel: str) -> Iterator[str]:
    parts = rel.split("/")
    for end in range(len(parts), 0, -1):
        yield "/".join(parts[:end])
    yield "."


@contextlib.contextmanager
def open_dvc_repo(root: Path) -> Iterator[Any]:
    """``dvc.repo.Repo`` at ``root``, with DVC failures turned into TunelineError.

    DVC resolves default targets and stage-cache paths against the working directory, so
    the block runs with ``root`` as the current directory.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    dvc_logger = logging.getLogger("dvc")
    level = dvc_logger.level
    dvc_logger.setLevel(logging.WARNING)  # no per-stage chatter from dry runs
    with contextlib.chdir(root):
        try:
            repo = Repo(str(root))
        except DvcException as exc:
            raise TunelineError(f"{root}: not a usable DVC repository: {exc}") from exc
        try:
            yield repo
        finally:
            repo.close()
            dvc_logger.setLevel(level)


def find_root(start: str | Path | None = None) -> Path:
    """The DVC repository root containing ``start`` (default: the current directory)."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    where = Path(start or os.getcwd()).resolve()
    try:
        return Path(Repo.find_root(str(where))).resolve()
    except NotDvcRepoError as exc:
        raise InputError(f"{where}: not inside a DVC repository (run `dvc init` or cd into the project)") from exc


def _rel(root: Path, path: str | Path) -> str | None:
    """``path`` relative to ``root`` as POSIX, or None when it lies outside."""
    absolute = os.path.normpath(os.path.join(root, path))
    rel = os.path.relpath(absolute, root)
    if rel == ".":
        return "."
    if rel == ".." or rel.startswith("../"):
        return None
    return Path(rel).as_posix()


def load_dag(root: Path) -> Dag:
    """Every stage with its deps and outs, and every path the DAG needs, as DVC sees them."""
    from dvc.dependency.param import ParamsDependency
    from dvc.dvcfile import LOCK_FILE, ProjectFile
    from dvc.exceptions import DvcException

    root = Path(root).resolve()
    stages: list[StageDecl] = []
    declared: dict[str, list[str]] = {}

    def declare(path: str | None, why: str) -> None:
        if path is not None:
            declared.setdefault(path, [])
            if why not in declared[path]:
                declared[path].append(why)

    with open_dvc_repo(root) as repo:
        try:
            dvc_stages = list(repo.index.stages)
        except DvcException as exc:
            raise TunelineError(f"DVC cannot read the pipeline: {exc}") from exc
        dvcfiles: dict[str, Any] = {}
        for st in dvc_stages:
            dvcfile_rel = _rel(root, st.path)
            declare(dvcfile_rel, "pipeline file")
            if isinstance(st.dvcfile, ProjectFile):
                dvcfiles[st.path] = st.dvcfile
                declare(_rel(root, os.path.join(os.path.dirname(st.path), LOCK_FILE)), "pipeline lock file")
            deps, params_files, external = [], [], []
            for dep in st.deps:
                rel = _rel(root, dep.fs_path) if dep.is_in_repo else None
                if rel is None:
                    external.append(str(dep))
                    continue
                deps.append(rel)
                if isinstance(dep, ParamsDependency):
                    params_files.append(rel)
                    declare(rel, f"params file of stage {st.addressing!r}")
                else:
                    declare(rel, f"dep of stage {st.addressing!r}")
            outs, persist = [], []
            for out in st.outs:
                rel = _rel(root, out.fs_path) if out.is_in_repo else None
                if rel is None:
                    continue
                outs.append(rel)
                if out.persist:
                    persist.append(rel)
                kind = "metrics" if out.metric else "plots" if out.plot else "out"
                declare(rel, f"{kind} of stage {st.addressing!r}" if st.cmd else f"tracked by {dvcfile_rel}")
            for vars_file in getattr(st, "tracked_vars", {}) or {}:
                declare(_rel(root, os.path.join(st.wdir, vars_file)), f"values file of stage {st.addressing!r}")
            cmd = st.cmd if isinstance(st.cmd, list) else [st.cmd] if st.cmd else []
            stages.append(
                StageDecl(
                    name=st.addressing,
                    dvcfile=dvcfile_rel or st.path,
                    wdir=_rel(root, st.wdir) or ".",
                    cmd=tuple(cmd),
                    deps=tuple(deps),
                    outs=tuple(outs),
                    persist_outs=tuple(persist),
                    params_files=tuple(params_files),
                    external_deps=tuple(external),
                )
            )
        for path, dvcfile in dvcfiles.items():
            _declare_top_level(root, Path(path).parent, dvcfile, declare)
    declare_symlink_targets(root, declared)
    return Dag(root=root, stages=tuple(stages), declared={k: tuple(v) for k, v in declared.items()})


def _declare_top_level(root: Path, base: Path, dvcfile: Any, declare: Any) -> None:
    """Top-level ``metrics``, ``params``, ``plots`` and ``vars`` files of one dvc.yaml."""
    where = _rel(root, base / "dvc.yaml")
    for item in dvcfile.metrics or []:
        declare(_rel(root, base / item), f"metrics of {where}")
    for item in dvcfile.params or []:
        declare(_rel(root, base / item), f"params of {where}")
    for item in dvcfile.plots or []:
        for name in _plot_files(item):
            declare(_rel(root, base / name), f"plots of {where}")
    for item in (dvcfile.contents or {}).get("vars", []) or []:
        if isinstance(item, str):
            declare(_rel(root, base / item.split(":")[0]), f"vars of {where}")


def _plot_files(item: Any) -> list[str]:
    """File names in one top-level ``plots`` entry (a path, or an id with x/y file maps)."""
    if isinstance(item, str):
        return [item]
    files: list[str] = []
    if isinstance(item, dict):
        for plot_id, props in item.items():
            axes = [props.get(axis) for axis in ("x", "y")] if isinstance(props, dict) else []
            mapped = [name for axis in axes if isinstance(axis, dict) for name in axis]
            files.extend(mapped or [plot_id])
    return files


def declare_symlink_targets(root: Path, declared: dict[str, list[str]]) -> None:
    """A declared path reached through symlinks needs every hop; so do links inside a
    declared directory."""
    for rel, why in list(declared.items()):
        parts = rel.split("/")
        for end in range(1, len(parts)):
            ancestor = "/".join(parts[:end])
            if (root / ancestor).is_symlink():
                declared.setdefault(ancestor, []).append(f"symlinked directory on the way to {rel} ({why[0]})")
        for hop in _link_hops(root, root / rel):
            declared.setdefault(hop, []).append(f"symlink target of {rel} ({why[0]})")
        path = root / rel
        if path.is_dir() and not path.is_symlink():
            for dirpath, dirnames, filenames in os.walk(path):
                for name in dirnames + filenames:
                    entry = Path(dirpath) / name
                    if entry.is_symlink():
                        inner = _rel(root, entry)
                        for hop in _link_hops(root, entry):
                            declared.setdefault(hop, []).append(f"symlink target of {inner} ({why[0]})")


def _link_hops(root: Path, path: Path) -> list[str]:
    """Repo-relative paths a symlinked ``path`` passes through (parents included)."""
    hops: list[str] = []
    real = os.path.realpath(path)
    literal = os.path.normpath(os.path.abspath(path))
    if real == literal:
        return hops
    current = literal
    for _ in range(40):
        parent_real = os.path.realpath(os.path.dirname(current))
        here = os.path.join(parent_real, os.path.basename(current))
        rel_here = _rel(root, here)
        if rel_here is not None and here != literal:
            hops.append(rel_here)
        if not os.path.islink(here):
            break
        current = os.path.normpath(os.path.join(parent_real, os.readlink(here)))
    rel_real = _rel(root, real)
    if rel_real is not None and rel_real not in hops:
        hops.append(rel_real)
    return hops


# ---------------------------------------------------------------------------------------
# The keep set and the files git sees


def keep_patterns(root: Path) -> list[str]:
    """``archive.keep`` from the project's params.yaml (defaults when absent), validated."""
    from tuneline.params import parse_params

    params_file = root / "params.yaml"
    section: Any = {}
    if params_file.exists():
        try:
            data = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{params_file}:{mark.line + 1}" if mark else str(params_file)
            raise InputError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
        if isinstance(data, dict):
            section = data.get("archive", {})
    return list(parse_params({"archive": section}, str(params_file)).archive.keep)


def keep_spec(patterns: Sequence[str]) -> Any:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(patterns)


# What installing the project or running its CI needs, whatever archive.keep says.
INSTALL_PATTERNS = (
    "/pyproject.toml", "/setup.py", "/setup.cfg", "/MANIFEST.in", "/Makefile", "/makefile", "/GNUmakefile",
    "/tox.ini", "/noxfile.py", "/constraints*.txt", "/requirements*.txt", "/requirements/**", "/.ci/**",
    "/.github/**", "/.gitlab-ci.yml", "/.pre-commit-config.yaml", "/.python-version",
    "/README*", "/LICENSE*", "/LICENCE*", "/COPYING*", "/NOTICE*",
)
_PATH_TOKEN = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*")
_NOT_SCANNED = (".md", ".rst", ".txt.gz")
# The pipeline's own files: what they name is kept by the DAG (deps, outs, params), so a
# Makefile that reads params.yaml does not make every path in it an install need.
_PIPELINE_FILES = ("params.yaml", "dvc.yaml", "dvc.lock")


def install_needs(root: Path, files: Sequence[str]) -> dict[str, str]:
    """Files the install or CI needs -> why: the install/CI files themselves and every repo
    file or directory their text names; a named file is scanned in turn, except
    documentation (README, LICENSE, ``*.md``), the pipeline's own files (params.yaml,
    dvc.yaml, dvc.lock: the DAG keeps what they name) and files reached through a named
    directory."""
    spec = keep_spec(INSTALL_PATTERNS)
    known = set(files)
    dirs: dict[str, list[str]] = {}
    for rel in files:
        parts = rel.split("/")
        for end in range(1, len(parts)):
            dirs.setdefault("/".join(parts[:end]), []).append(rel)
    needs = {rel: "the install or CI uses it" for rel in files if spec.match_file(rel)}
    todo = list(needs)
    while todo:
        rel = todo.pop()
        name = Path(rel).name
        if (
            name.upper().startswith(("README", "LICENSE", "LICENCE", "COPYING", "NOTICE"))
            or name.endswith(_NOT_SCANNED)
            or name in _PIPELINE_FILES
        ):
            continue
        path = root / rel
        try:
            if path.is_symlink() or path.stat().st_size > 1 << 20:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for token in sorted(set(_PATH_TOKEN.findall(text))):
            for base in (os.path.dirname(rel), ""):
                target = _rel(root, os.path.join(base, token.rstrip("/")))
                if target in (None, "."):
                    continue
                if target in known and target not in needs:
                    needs[target] = f"the install or CI uses it (named in {rel})"
                    todo.append(target)
                for hit in dirs.get(target, []):  # a named directory: its files, not scanned
                    needs.setdefault(hit, f"the install or CI uses it ({target}/, named in {rel})")
    return needs


def _git(root: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise TunelineError(f"cannot run git: {exc}") from exc
    if proc.returncode != 0:
        raise TunelineError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip()}")
    return proc.stdout


def repo_files(root: Path) -> list[str]:
    """Tracked and untracked-but-not-ignored files that exist, repo-relative, sorted."""
    _git(root, "rev-parse", "--git-dir")
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    files = set()
    for rel in out.split("\0"):
        if rel and os.path.lexists(root / rel) and (os.path.islink(root / rel) or os.path.isfile(root / rel)):
            files.add(rel)
    return sorted(files)


def git_status(root: Path) -> dict[str, str]:
    """Porcelain XY code per changed path; untracked files are '??'."""
    out = _git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all")
    codes: dict[str, str] = {}
    fields = iter(out.split("\0"))
    for entry in fields:
        if not entry:
            continue
        code, path = entry[:2], entry[3:]
        codes[path] = code
        if code[0] in "RC":
            next(fields, None)
    return codes


def describe_git_status(code: str | None) -> str:
    if code is None:
        return "clean"
    if code == "??":
        return "untracked"
    return f"changed ({code.strip() or code})"


def last_commit(root: Path, rel: str) -> str | None:
    out = _git(root, "log", "-1", "--format=%h %cs", "--", rel).strip()
    return out or None


# ---------------------------------------------------------------------------------------
# Path safety


def symlink_escapes(root: Path, path: Path) -> str | None:
    """The target when ``path`` is a symlink whose target resolves outside ``root``."""
    if not path.is_symlink():
        return None
    real = os.path.realpath(path)
    return None if _rel(root, real) is not None else os.readlink(path)


def real_outside(root: Path, path: Path) -> str | None:
    """Where ``path`` would really be written, when that is outside ``root``: its parent
    directory resolved through every symlink (an archived path whose parent has since
    become a symlink to elsewhere), or its own target when it is a symlink."""
    real_parent = os.path.realpath(path.parent)
    if _rel(root, real_parent) is None:
        return real_parent
    if path.is_symlink() and _rel(root, os.path.realpath(path)) is None:
        return os.path.realpath(path)
    return None


def safe_rel(root: Path, user_path: str | Path, *, cwd: Path | None = None) -> str:
    """A user-given path (relative to ``cwd``, default the repo root) as repo-relative
    POSIX; refuses anything that escapes the repository."""
    text = str(user_path)
    if not text or "\0" in text:
        raise InputError(f"path {text!r}: empty or contains a NUL byte")
    base = Path(cwd or root)
    absolute = os.path.normpath(text if os.path.isabs(text) else os.path.join(base, text))
    rel = _rel(root, absolute)
    if rel is None or rel == ".":
        raise InputError(f"path {text!r}: escapes the repository {root} (allowed: paths inside it)")
    parent_real = os.path.realpath(os.path.dirname(absolute))
    if _rel(root, parent_real) is None:
        raise InputError(f"path {text!r}: reaches outside the repository through a symlinked directory")
    return rel


# ---------------------------------------------------------------------------------------
# Plan


@dataclass
class Candidate:
    path: str
    size: int
    kind: str  # "file" or "symlink"
    git_status: str
    reason: str
    last_commit: str | None = None
    needs_force: bool = False


@dataclass
class Plan:
    root: str
    keep: list[str]
    candidates: list[Candidate] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    scanned: int = 0
    declared: int = 0
    kept: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(c.size for c in self.candidates)

    def to_json(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "keep": self.keep,
            "candidates": [asdict(c) for c in self.candidates],
            "skipped": self.skipped,
            "totals": {
                "scanned": self.scanned,
                "declared_by_dag": self.declared,
                "kept": self.kept,
                "candidates": len(self.candidates),
                "candidate_bytes": self.total_bytes,
            },
        }


def _reason(rel: str, declared_by_name: dict[str, str]) -> str:
    text = "no stage or .dvc file uses it"
    name = Path(rel).name
    close = difflib.get_close_matches(name, list(declared_by_name), n=1, cutoff=0.75)
    if close and declared_by_name[close[0]] != rel:
        text += f"; looks like an older version of {declared_by_name[close[0]]}"
    return text


def make_plan(root: Path, *, with_history: bool = True, dag: Dag | None = None) -> Plan:
    """Every file git sees that the DAG does not need and the keep set does not hold."""
    root = Path(root).resolve()
    patterns = keep_patterns(root)
    dag = dag or load_dag(root)
    spec = keep_spec(patterns)
    codes = git_status(root)
    plan = Plan(root=str(root), keep=patterns)
    declared_by_name = {Path(p).name: p for p in sorted(dag.declared, reverse=True) if p != "."}
    files = repo_files(root)
    install = install_needs(root, files)
    for rel in files:
        plan.scanned += 1
        if spec.match_file(rel) or rel.split("/")[0] == ARCHIVE_DIR or rel in install:
            plan.kept += 1
            continue
        if dag.needs(rel):
            plan.declared += 1
            continue
        path = root / rel
        outside = symlink_escapes(root, path)
        if outside is not None:
            plan.skipped.append({"path": rel, "reason": f"symlink to {outside!r} outside the repository: never moved"})
            continue
        code = codes.get(rel)
        status = describe_git_status(code)
        plan.candidates.append(
            Candidate(
                path=rel,
                size=path.lstat().st_size,
                kind="symlink" if path.is_symlink() else "file",
                git_status=status,
                reason=_reason(rel, declared_by_name),
                last_commit=last_commit(root, rel) if with_history and code != "??" else None,
                needs_force=code not in (None, "??"),
            )
        )
    return plan


def why_not_candidate(root: Path, rel: str, dag: Dag, spec: Any, files: set[str]) -> str:
    """Why a named path cannot be archived (for error messages)."""
    path = root / rel
    if not os.path.lexists(path):
        return "does not exist"
    needs = dag.needs(rel)
    if needs:
        return f"the pipeline needs it: {needs[0]}"
    if spec.match_file(rel):
        return "it is in the keep set (archive.keep in params.yaml)"
    install = install_needs(root, sorted(files))
    under = [p for p in install if p == rel or p.startswith(rel + "/")]
    if under:
        return f"{install[under[0]]}" + (f": {under[0]}" if under[0] != rel else "")
    target = symlink_escapes(root, path)
    if target is not None:
        return f"it is a symlink to {target!r} outside the repository"
    if rel not in files:
        return "git ignores it (only files git sees are archived)"
    return "it is not a candidate"


# ---------------------------------------------------------------------------------------
# Manifest and journal


def now_utc() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def archive_dir(root: Path, archive_id: str) -> Path:
    if not ID_PATTERN.match(archive_id):
        raise InputError(f"archive id {archive_id!r}: not an archive id (expected e.g. 20250101T120000Z)")
    return root / ARCHIVE_DIR / archive_id


def _new_id(root: Path, moment: datetime) -> str:
    base = moment.strftime("%Y%m%dT%H%M%SZ")
    candidate, n = base, 1
    while (root / ARCHIVE_DIR / candidate).exists():
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def load_manifest(root: Path, archive_id: str) -> dict[str, Any]:
    path = archive_dir(root, archive_id) / MANIFEST
    if not path.exists():
        known = list_archives(root)
        raise InputError(f"archive {archive_id!r}: no {path} (archives: {', '.join(known) or 'none'})")
    return read_json(path)


def list_archives(root: Path) -> list[str]:
    base = root / ARCHIVE_DIR
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if ID_PATTERN.match(p.name) and (p / MANIFEST).exists())


def _save_manifest(root: Path, manifest: dict[str, Any]) -> None:
    write_json(archive_dir(root, manifest["id"]) / MANIFEST, manifest)


def _journal(root: Path, archive_id: str, event: str, path: str) -> None:
    line = json.dumps({"time": _iso(now_utc()), "event": event, "path": path}, sort_keys=True)
    with open(archive_dir(root, archive_id) / JOURNAL, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def content_hash(path: Path) -> str:
    """sha256 of a file, or of a symlink's target text (links are moved, never followed)."""
    if path.is_symlink():
        import hashlib

        return hashlib.sha256(os.readlink(path).encode("utf-8", "surrogateescape")).hexdigest()
    return sha256_file(path)


def _sha_or_none(path: str | None) -> str | None:
    return sha256_file(path) if path and os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------
# Verification that the pipeline still resolves


def _deleted_deps(status: dict[str, Any]) -> set[tuple[str, str]]:
    """(stage, path) for every dep that `dvc status` reports deleted."""
    found = set()
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, dict):
                for path, state in (change.get("changed deps") or {}).items():
                    if state == "deleted":
                        found.add((stage, path))
    return found


def dvc_status(root: Path) -> dict[str, Any]:
    from dvc.exceptions import DvcException

    with open_dvc_repo(root) as repo:
        try:
            return repo.status()
        except DvcException as exc:
            raise TunelineError(f"dvc status failed: {exc}") from exc


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/") or "." in (a, b)


def resolution_problems(root: Path) -> list[str]:
    """What stops the DAG from resolving, with no stage run: DVC cannot build the graph, or
    a stage's dep neither exists nor is (in, or a directory of) another stage's out. []
    when it resolves: a fresh clone, or one where only some stages ran, does."""
    from dvc.exceptions import DvcException

    try:
        dag = load_dag(root)
        with open_dvc_repo(root) as repo:
            repo.index.check_graph()
    except (TunelineError, DvcException) as exc:
        return [f"the pipeline does not load: {exc}"]
    problems: list[str] = []
    for stage in dag.stages:
        for dep in stage.deps:
            if os.path.lexists(root / dep):
                continue
            if any(_overlaps(dep, out) for other in dag.stages if other.name != stage.name for out in other.outs):
                continue
            problems.append(f"stage {stage.name!r} needs {dep} (missing, and no stage produces it)")
    return problems


def pipeline_problems(root: Path) -> list[str]:
    """``resolution_problems`` plus deps that `dvc status` reports deleted (on a workspace
    where some stages never ran, their deps are reported too: compare with a list taken
    before)."""
    from dvc.exceptions import DvcException

    problems = resolution_problems(root)
    if problems and problems[0].startswith("the pipeline does not load"):
        return problems
    with open_dvc_repo(root) as repo:
        try:
            for stage, path in sorted(_deleted_deps(repo.status())):
                problems.append(f"stage {stage!r}: dvc status reports dep {path} deleted")
        except DvcException as exc:
            problems.append(f"dvc status failed: {exc}")
    return problems


# ---------------------------------------------------------------------------------------
# Apply


def apply(root: Path, paths: Sequence[str] = (), *, force: bool = False, cwd: Path | None = None) -> dict[str, Any]:
    """Archive all candidates (or those under ``paths``), then verify; see module docstring."""
    root = Path(root).resolve()
    dag = load_dag(root)
    plan = make_plan(root, with_history=False, dag=dag)
    by_path = {c.path: c for c in plan.candidates}
    if paths:
        files = set(repo_files(root))
        spec = keep_spec(plan.keep)
        chosen: dict[str, Candidate] = {}
        problems = []
        for user_path in paths:
            rel = safe_rel(root, user_path, cwd=cwd)
            under = [c for p, c in by_path.items() if p == rel or p.startswith(rel + "/")]
            if not under:
                problems.append(f"{user_path}: cannot be archived: {why_not_candidate(root, rel, dag, spec, files)}")
            for candidate in under:
                chosen[candidate.path] = candidate
        if problems:
            raise InputError("\n".join(problems))
        selected = [chosen[p] for p in sorted(chosen)]
    else:
        selected = plan.candidates
    if not selected:
        raise InputError("nothing to archive: every file is needed by the pipeline or in the keep set")
    dirty = [c for c in selected if c.needs_force]
    if dirty and not force:
        listing = "\n".join(f"  {c.path}: {c.git_status}" for c in dirty)
        raise InputError(f"{len(dirty)} file(s) have uncommitted changes (commit them, or pass --force):\n{listing}")
    return execute(root, selected)


def execute(root: Path, selected: Sequence[Candidate]) -> dict[str, Any]:
    """Record, move, verify; undo every move when the pipeline no longer resolves."""
    root = Path(root).resolve()
    base = root / ARCHIVE_DIR
    if base.is_symlink():
        raise TunelineError(f"{base} is a symlink; the archive must live inside the repository")
    broken = resolution_problems(root)
    if broken:
        raise TunelineError(
            "the pipeline does not resolve even before archiving; fix it first:\n" + "\n".join(f"  {p}" for p in broken)
        )
    before = pipeline_problems(root)
    started = now_utc()
    archive_id = _new_id(root, started)
    head = _git(root, "rev-parse", "--verify", "-q", "HEAD").strip() if _has_head(root) else None
    entries = []
    for candidate in selected:
        path = root / candidate.path
        target = base / archive_id / FILES / candidate.path
        if symlink_escapes(root, path) is not None or real_outside(root, path) or real_outside(root, target):
            raise TunelineError(f"{candidate.path}: refusing to move a path that leads outside the repository")
        entries.append(
            {
                "path": candidate.path,
                "archived_as": f"{FILES}/{candidate.path}",
                "kind": "symlink" if path.is_symlink() else "file",
                "sha256": content_hash(path),
                "size": path.lstat().st_size,
                "git_status": candidate.git_status,
                "reason": candidate.reason,
            }
        )
    manifest: dict[str, Any] = {
        "id": archive_id,
        "state": "applying",
        "time": _iso(started),
        "git_commit": head,
        "dvc_yaml_sha256": _sha_or_none(str(root / "dvc.yaml")),
        "dvc_lock_sha256": _sha_or_none(str(root / "dvc.lock")),
        "entries": entries,
        "verification": None,
    }
    (base / archive_id).mkdir(parents=True)
    _save_manifest(root, manifest)  # every move is on disk before the first one happens
    moved: list[dict[str, Any]] = []
    try:
        for entry in entries:
            src = root / entry["path"]
            dst = base / archive_id / entry["archived_as"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            moved.append(entry)
            _remove_empty_parents(src.parent, root)
            _journal(root, archive_id, "moved", entry["path"])
    except OSError as exc:
        _restore_entries(root, manifest, moved)
        manifest["state"] = "rolled_back"
        manifest["verification"] = {"ok": False, "problems": [f"move failed: {exc}"], "time": _iso(now_utc())}
        _save_manifest(root, manifest)
        raise TunelineError(f"archive {archive_id}: a move failed ({exc}); restored the {len(moved)} moved file(s)") from exc
    problems = [p for p in pipeline_problems(root) if p not in before]
    if problems:
        restored = _restore_entries(root, manifest, moved)
        manifest["state"] = "rolled_back"
        manifest["verification"] = {"ok": False, "problems": problems, "time": _iso(now_utc())}
        _save_manifest(root, manifest)
        raise TunelineError(
            f"archive {archive_id}: the pipeline no longer resolves without these files; "
            f"restored all {len(restored)} moved file(s):\n" + "\n".join(f"  {p}" for p in problems)
        )
    manifest["state"] = "applied"
    manifest["applied_at"] = _iso(now_utc())
    manifest["verification"] = {
        "ok": True,
        "checks": [
            "DVC builds the graph",
            "every stage's deps exist or are another stage's outs",
            "dvc status: no newly deleted deps",
        ],
        "time": manifest["applied_at"],
    }
    _save_manifest(root, manifest)
    return manifest


def _has_head(root: Path) -> bool:
    proc = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=root, capture_output=True, check=False)
    return proc.returncode == 0


def _remove_empty_parents(directory: Path, stop: Path) -> None:
    while directory != stop and stop in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


# ---------------------------------------------------------------------------------------
# Restore and purge


def _restore_entries(root: Path, manifest: dict[str, Any], entries: Iterable[dict[str, Any]]) -> list[str]:
    """Move entries back, checking hashes; refuse (before moving anything) on a conflict."""
    base = archive_dir(root, manifest["id"])
    actions: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    for entry in entries:
        src = base / entry["archived_as"]
        dst = root / entry["path"]
        if _rel(root, dst) is None or _rel(base, src) is None:
            problems.append(f"{entry['path']}: manifest path escapes the repository")
            continue
        escape = real_outside(root, dst) or real_outside(root, src)
        if escape is not None:
            problems.append(f"{entry['path']}: would be written or read at {escape}, outside the repository (a symlinked directory)")
            continue
        in_archive = os.path.lexists(src)
        at_home = os.path.lexists(dst)
        if in_archive and content_hash(src) != entry["sha256"]:
            problems.append(f"{entry['path']}: archived copy {src} does not match the manifest sha256")
        elif in_archive and at_home:
            if content_hash(dst) == entry["sha256"]:
                actions.append(("drop-archived", entry))
            else:
                problems.append(f"{entry['path']}: a different file exists there; refusing to overwrite it")
        elif in_archive:
            actions.append(("move", entry))
        elif at_home and content_hash(dst) == entry["sha256"]:
            actions.append(("in-place", entry))
        elif at_home:
            problems.append(f"{entry['path']}: not in the archive, and the file there differs from the manifest")
        else:
            problems.append(f"{entry['path']}: missing from both the archive and the repository")
    if problems:
        raise TunelineError(f"archive {manifest['id']}: cannot restore:\n" + "\n".join(f"  {p}" for p in problems))
    restored = []
    for action, entry in actions:
        src = base / entry["archived_as"]
        dst = root / entry["path"]
        if action == "move":
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            _remove_empty_parents(src.parent, base)
        elif action == "drop-archived":
            src.unlink()
            _remove_empty_parents(src.parent, base)
        _journal(root, manifest["id"], "restored", entry["path"])
        restored.append(entry["path"])
    return restored


def restore(root: Path, archive_id: str, paths: Sequence[str] = (), *, cwd: Path | None = None) -> dict[str, Any]:
    """Move archived files back (all, or those under ``paths``), hash-checked."""
    root = Path(root).resolve()
    manifest = load_manifest(root, archive_id)
    if manifest.get("state") == "purged":
        raise InputError(f"archive {archive_id}: purged on {manifest.get('purged_at')}; nothing to restore")
    entries = manifest["entries"]
    if paths:
        wanted = []
        for user_path in paths:
            rel = safe_rel(root, user_path, cwd=cwd)
            match = [e for e in entries if e["path"] == rel or e["path"].startswith(rel + "/")]
            if not match:
                raise InputError(f"{user_path}: not in archive {archive_id}")
            wanted.extend(e for e in match if e not in wanted)
        entries = wanted
    restored = _restore_entries(root, manifest, entries)
    remaining = [e for e in manifest["entries"] if os.path.lexists(archive_dir(root, archive_id) / e["archived_as"])]
    manifest["state"] = "restored" if not remaining else "partially_restored"
    manifest.setdefault("restores", []).append({"time": _iso(now_utc()), "paths": restored})
    _save_manifest(root, manifest)
    return {"id": archive_id, "restored": restored, "remaining": [e["path"] for e in remaining]}


def purge(root: Path, archive_id: str, *, yes: bool) -> dict[str, Any]:
    """Delete an archive's files, only once a full ``dvc repro`` ran after it was applied."""
    root = Path(root).resolve()
    manifest = load_manifest(root, archive_id)
    state = manifest.get("state")
    if state != "applied":
        hint = {
            "applying": "the apply was interrupted: run `tuneline archive restore {id}` and apply again",
            "rolled_back": "its apply was rolled back; nothing is archived",
            "restored": "every file was restored; nothing is archived",
            "partially_restored": "some files were restored; restore the rest or apply again",
            "purged": "it was purged already",
        }.get(str(state), f"unknown state {state!r}")
        raise InputError(f"archive {archive_id}: state is {state!r}; {hint.format(id=archive_id)}")
    applied = _parse_iso(manifest["applied_at"])
    lock = root / "dvc.lock"
    must = "run `dvc repro --force` (the full pipeline, without the archived files) and commit dvc.lock"
    if not lock.exists():
        raise TunelineError(f"archive {archive_id}: refusing to purge: no dvc.lock; {must}")
    lock_time = datetime.fromtimestamp(lock.stat().st_mtime, UTC)
    if lock_time <= applied:
        raise TunelineError(
            f"archive {archive_id}: refusing to purge: dvc.lock ({_iso(lock_time)}) is not newer than the apply "
            f"({manifest['applied_at']}); {must}"
        )
    status = dvc_status(root)
    if status:
        raise TunelineError(
            f"archive {archive_id}: refusing to purge: dvc status is not clean "
            f"(changed: {', '.join(sorted(status))}); run `dvc repro` until `dvc status` is clean"
        )
    if not yes:
        raise InputError(f"archive {archive_id}: purge deletes its files for good; pass --yes to confirm")
    files_dir = archive_dir(root, archive_id) / FILES
    if files_dir.is_symlink() or real_outside(root, files_dir):
        raise TunelineError(f"archive {archive_id}: refusing to purge {files_dir}: it leads outside the repository")
    if files_dir.exists():
        shutil.rmtree(files_dir)
    manifest["state"] = "purged"
    manifest["purged_at"] = _iso(now_utc())
    _save_manifest(root, manifest)
    _journal(root, archive_id, "purged", FILES)
    return {"id": archive_id, "purged": len(manifest["entries"]), "bytes": sum(e["size"] for e in manifest["entries"])}


# ---------------------------------------------------------------------------------------
# Command line: `tuneline archive ...`

app = typer.Typer(help="Archive what the DVC pipeline does not use, verified by the DAG.", no_args_is_help=True)
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def render_plan(plan: Plan, console: Console) -> None:
    table = Table(title=f"archive candidates in {plan.root}", show_lines=False)
    for column in ("path", "size", "last commit", "git", "why"):
        table.add_column(column, overflow="fold")
    for c in plan.candidates:
        git = c.git_status + (" (needs --force)" if c.needs_force else "")
        table.add_row(c.path, human_size(c.size), c.last_commit or "-", git, c.reason)
    console.print(table)
    for item in plan.skipped:
        console.print(f"[yellow]skipped[/] {item['path']}: {item['reason']}", highlight=False)
    console.print(
        f"{len(plan.candidates)} candidate(s), {human_size(plan.total_bytes)}; scanned {plan.scanned} file(s): "
        f"{plan.declared} needed by the pipeline, {plan.kept} in the keep set",
        highlight=False,
    )


@app.command("plan")
def plan_command(as_json: JsonOption = False) -> None:
    """List files no stage or .dvc file uses and the keep set does not hold."""
    plan = make_plan(find_root())
    if as_json:
        _print_json(plan.to_json())
    else:
        render_plan(plan, Console())


@app.command("apply")
def apply_command(
    paths: Annotated[list[str] | None, typer.Argument(help="candidates (files or directories); default: all")] = None,
    force: Annotated[bool, typer.Option("--force", help="also move tracked files with uncommitted changes")] = False,
    as_json: JsonOption = False,
) -> None:
    """Move candidates into archive/<id>/, then prove the pipeline still resolves (or undo)."""
    manifest = apply(find_root(), paths or (), force=force, cwd=Path.cwd())
    if as_json:
        _print_json(manifest)
        return
    size = sum(e["size"] for e in manifest["entries"])
    typer.echo(
        f"archive {manifest['id']}: moved {len(manifest['entries'])} file(s), {human_size(size)}; "
        "the pipeline still resolves (graph, every dep present or produced upstream, dvc status).\n"
        f"Next: `dvc repro --force`, then `tuneline archive purge {manifest['id']} --yes`; "
        f"or `tuneline archive restore {manifest['id']} [PATHS]`."
    )


@app.command("restore")
def restore_command(
    archive_id: Annotated[str, typer.Argument(help="archive id (see `tuneline archive list`)")],
    paths: Annotated[list[str] | None, typer.Argument(help="files or directories to restore; default: all")] = None,
    as_json: JsonOption = False,
) -> None:
    """Move archived files back, checking their sha256 against the manifest."""
    result = restore(find_root(), archive_id, paths or (), cwd=Path.cwd())
    if as_json:
        _print_json(result)
        return
    typer.echo(f"archive {archive_id}: restored {len(result['restored'])} file(s), {len(result['remaining'])} still archived")


@app.command("purge")
def purge_command(
    archive_id: Annotated[str, typer.Argument(help="archive id")],
    yes: Annotated[bool, typer.Option("--yes", help="confirm deleting the archived files")] = False,
) -> None:
    """Delete an archive's files, only after a full `dvc repro` succeeded without them."""
    result = purge(find_root(), archive_id, yes=yes)
    typer.echo(f"archive {archive_id}: deleted {result['purged']} file(s), {human_size(result['bytes'])}; manifest kept")


@app.command("list")
def list_command(as_json: JsonOption = False) -> None:
    """Every archive with its state and size."""
    root = find_root()
    rows = []
    for archive_id in list_archives(root):
        manifest = load_manifest(root, archive_id)
        rows.append({
            "id": archive_id,
            "state": manifest.get("state"),
            "files": len(manifest["entries"]),
            "bytes": sum(e["size"] for e in manifest["entries"]),
            "time": manifest.get("time"),
        })
    if as_json:
        _print_json(rows)
        return
    table = Table(title="archives")
    for column in ("id", "state", "files", "size", "time"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["id"], str(row["state"]), str(row["files"]), human_size(row["bytes"]), str(row["time"]))
    Console().print(table)
