"""DAG checks: does each stage read only what it declares, and does it reproduce its lock?

``verify dag`` runs stages one at a time in a scratch copy of the project: the files git
sees (tracked, or untracked and not ignored) plus the stage's declared deps copied from the
workspace — so DVC outputs the stage does not declare are absent, as on a fresh clone that
ran only the upstream stages. The stage's ``cmd`` runs there with a ``sitecustomize.py`` on
``PYTHONPATH`` that installs a Python audit hook (``sys.addaudithook``) in every Python
process the command starts, logging each ``open`` (with its mode), rename, remove and link.
Reads done by native code (Rust tokenizers, safetensors, C parsers) never reach the hook,
so every copied file is also given an access time older than its modification time before
the run; a file whose access time moved was read, by whatever code.

Reported as undeclared:

- reads of project files the stage does not declare as deps (its own outs are fine) that
  existed before the run — in the scratch copy, or in the workspace when the copy lacked
  them (the read failed there, which is the point). Imports count as reads, the project's
  own package included: the stage runs the copy's source (its ``src/`` directories come
  first on ``PYTHONPATH``), so a module it imports without declaring it is reported, as is
  a script run as ``python x.py``.
- files created, modified or deleted in the scratch copy that are not declared outs
  (temp files removed again, or ``os.replace``-d into a declared out, leave no trace);
- any write that lands in the real workspace instead of the scratch copy.

Ignored: everything outside the project (interpreter, site-packages, caches, /proc, /dev,
temp dirs, the HF cache), ``.git``, ``.dvc``, ``__pycache__`` and git/DVC metadata files.

``verify determinism`` runs a stage the same way and compares its outputs with the hashes
recorded in dvc.lock, computed by DVC itself (per file inside directory outputs, using the
directory listing in the DVC cache).
"""

from __future__ import annotations

import difflib
import graphlib
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuneline.archive import (
    ARCHIVE_DIR,
    Dag,
    StageDecl,
    declare_symlink_targets,
    find_root,
    load_dag,
    open_dvc_repo,
    repo_files,
)
from tuneline.errors import InputError, TunelineError

LOG_ENV = "TUNELINE_AUDIT_LOG"
# Files of the repository and of the pipeline itself: a stage may read them (provenance
# reads dvc.yaml to tell its own tracked outputs from edited code) without declaring them.
METADATA_NAMES = {".gitignore", ".gitattributes", ".gitmodules", ".dvcignore", ".gitkeep", "dvc.yaml"}
METADATA_DIRS = {".git", ".dvc", "__pycache__"}
ATIME_SHIFT_NS = 1_000_000_000


def _audit_hook_main() -> None:
    """Installed in every audited Python process through the generated sitecustomize.py.

    Self-contained (standard library only, imports inside): the stage may run another
    interpreter than tuneline's.
    """
    import json as _json
    import os as _os
    import sys as _sys

    log_path = _os.environ.get("TUNELINE_AUDIT_LOG")
    if not log_path:
        return
    fd = _os.open(log_path, _os.O_WRONLY | _os.O_APPEND | _os.O_CREAT | _os.O_CLOEXEC, 0o600)
    skip = tuple(p for p in {_sys.prefix, _sys.base_prefix, _sys.exec_prefix} if p)
    access = _os.O_WRONLY | _os.O_RDWR

    def absolute(path: object) -> str | None:
        if isinstance(path, int):
            return None
        try:
            path = _os.fsdecode(_os.fspath(path))
            return _os.path.normpath(path if _os.path.isabs(path) else _os.path.join(_os.getcwd(), path))
        except (OSError, TypeError, ValueError):
            return None

    def from_import() -> bool:
        # The frame that made the audited call: the import system's own loader, or not.
        try:
            caller = _sys._getframe(2)
        except ValueError:  # no Python caller: the interpreter opening the main script
            return False
        return caller.f_code.co_filename.startswith("<frozen importlib")

    def emit(record: dict[str, object]) -> None:
        try:
            _os.write(fd, (_json.dumps(record) + "\n").encode("utf-8", "surrogateescape"))
        except (OSError, ValueError):
            return

    def hook(event: str, args: tuple[object, ...]) -> None:
        if event == "open":
            path = absolute(args[0])
            if path is None or path.startswith(skip):
                return
            mode, flags = args[1], args[2] or 0
            if isinstance(mode, str):
                write = any(c in mode for c in "wax+")
                read = "r" in mode or "+" in mode
            else:
                write = bool(flags & access)
                read = (flags & access) != _os.O_WRONLY
            emit({"e": "open", "p": path, "r": read, "w": write, "i": read and from_import()})
        elif event in ("os.rename", "os.link", "os.symlink"):
            src, dst = absolute(args[0]), absolute(args[1])
            if dst is not None:
                emit({"e": event, "p": dst, "src": src})
        elif event == "os.remove":
            path = absolute(args[0])
            if path is not None:
                emit({"e": event, "p": path})

    _sys.addaudithook(hook)


SITECUSTOMIZE = (
    '"""Written by `tuneline verify`: log file accesses of this process (see tuneline.verify)."""\n'
    "from __future__ import annotations\n\n\n"
    + textwrap.dedent(inspect.getsource(_audit_hook_main))
    + textwrap.dedent(
        """

        _audit_hook_main()


        def _chain() -> None:
            # Run the sitecustomize this file shadows (e.g. a distribution's own), if any.
            import importlib.machinery
            import os
            import sys

            here = os.path.dirname(os.path.abspath(__file__))
            path = [p for p in sys.path if os.path.abspath(p or ".") != here]
            spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "get_code"):
                exec(spec.loader.get_code("sitecustomize"), {"__name__": "sitecustomize", "__file__": spec.origin})


        _chain()
        """
    )
)


# ---------------------------------------------------------------------------------------
# Findings


@dataclass
class Finding:
    path: str
    how: str


@dataclass
class StageReport:
    stage: str
    exit_code: int | None = None
    undeclared_reads: list[Finding] = field(default_factory=list)
    undeclared_writes: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    output_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.undeclared_reads and not self.undeclared_writes

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


# ---------------------------------------------------------------------------------------
# The scratch copy


def _covered(rel: str, paths: Sequence[str]) -> bool:
    return any(p in (".", rel) or rel.startswith(p + "/") for p in paths)


_SELF = "src/tuneline/verify.py"


def _is_metadata(rel: str) -> bool:
    parts = rel.split("/")
    return parts[-1] in METADATA_NAMES or any(part in METADATA_DIRS for part in parts[:-1]) or parts[0] in METADATA_DIRS


def _copy_entry(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_symlink() or src.is_file():
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        elif os.path.lexists(dst):
            dst.unlink()
        shutil.copy2(src, dst, follow_symlinks=False)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _git_quiet(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)


def _mirror_git(root: Path, project: Path) -> None:
    """A git repository in the copy at the workspace's commit (objects shared, read-only),
    so stages that stamp the git commit see the same one as in the workspace."""
    head = _git_quiet(root, "rev-parse", "--verify", "-q", "HEAD")
    if head.returncode != 0:
        return
    objects = _git_quiet(root, "rev-parse", "--git-path", "objects").stdout.strip()
    objects_abs = (root / objects).resolve()
    _git_quiet(project, "init", "-q")
    (project / ".git" / "objects" / "info" / "alternates").write_text(f"{objects_abs}\n")
    _git_quiet(project, "config", "core.trustctime", "false")
    _git_quiet(project, "update-ref", "HEAD", head.stdout.strip())
    _git_quiet(project, "read-tree", "HEAD")
    _git_quiet(project, "update-index", "-q", "--refresh")


def _walk_files(project: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(project):
        if Path(dirpath) == project:
            dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames:
            path = Path(dirpath) / name
            yield path.relative_to(project).as_posix(), path


def _snapshot(project: Path) -> dict[str, tuple[int, int, int, int]]:
    snap = {}
    for rel, path in _walk_files(project):
        st = path.lstat()
        snap[rel] = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_atime_ns)
    return snap


def _age_atimes(project: Path) -> bool:
    """Set every file's atime just before its mtime; True when a read then moves it."""
    for _, path in _walk_files(project):
        if not path.is_symlink():
            st = path.stat()
            os.utime(path, ns=(st.st_mtime_ns - ATIME_SHIFT_NS, st.st_mtime_ns))
    probe = project.parent / "atime-probe"
    probe.write_bytes(b"x")
    st = probe.stat()
    os.utime(probe, ns=(st.st_mtime_ns - ATIME_SHIFT_NS, st.st_mtime_ns))
    probe.read_bytes()
    moved = probe.stat().st_atime_ns > st.st_mtime_ns - ATIME_SHIFT_NS
    probe.unlink()
    return moved


def declared_with_links(project: Path, stage: StageDecl) -> list[str]:
    """The stage's deps and outs plus every path their symlinks lead to inside the copy."""
    declared: dict[str, list[str]] = {p: [f"declared by {stage.name}"] for p in (*stage.deps, *stage.outs)}
    declare_symlink_targets(project, declared)
    return sorted(declared)


@dataclass
class Scratch:
    base: Path
    project: Path
    hooks: Path
    log: Path
    atime_works: bool = False
    before: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    declared: list[str] = field(default_factory=list)  # deps, outs and their symlink targets
    sources: list[Path] = field(default_factory=list)  # the copy's package source directories


@contextmanager
def scratch_copy(root: Path, stage: StageDecl, *, keep: bool = False) -> Iterator[Scratch]:
    """The project as git sees it, plus the stage's declared deps, minus its outs."""
    base = Path(tempfile.mkdtemp(prefix="tuneline-verify-"))
    scratch = Scratch(base=base, project=base / "project", hooks=base / "hooks", log=base / "audit.jsonl")
    try:
        scratch.project.mkdir()
        for rel in repo_files(root):
            if rel.split("/")[0] != ARCHIVE_DIR:
                _copy_entry(root / rel, scratch.project / rel)
        missing = [dep for dep in stage.deps if not os.path.exists(root / dep)]
        if missing:
            raise TunelineError(
                f"stage {stage.name!r}: declared dep(s) missing in the workspace: {', '.join(missing)}; "
                "run `dvc repro` (or `dvc pull`) for the stages that produce them first"
            )
        for dep in stage.deps:
            _copy_entry(root / dep, scratch.project / dep)
        for out in stage.outs:
            if out not in stage.persist_outs:
                _remove(scratch.project / out)
        _mirror_git(root, scratch.project)
        scratch.sources = source_dirs(scratch.project)  # read before access times are aged
        scratch.atime_works = _age_atimes(scratch.project)
        scratch.hooks.mkdir()
        (scratch.hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
        scratch.before = _snapshot(scratch.project)
        scratch.declared = declared_with_links(scratch.project, stage)
        yield scratch
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


def source_dirs(project: Path) -> list[Path]:
    """Directories of the project's own Python packages (``tool.setuptools.packages.find
    .where`` in pyproject.toml, else ``src`` when it holds a package): the copy's code is
    the code that runs, not an installed version of it."""
    import tomllib

    where: list[str] = []
    pyproject = project / "pyproject.toml"
    if pyproject.is_file():
        try:
            config = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"{pyproject}: invalid TOML: {exc}") from exc
        find = config.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
        where = [w for w in find.get("where", []) if isinstance(w, str)]
    if not where and any((project / "src").glob("*/__init__.py")):
        where = ["src"]
    return [project / w for w in where if (project / w).is_dir()]


def run_stage(scratch: Scratch, stage: StageDecl, *, audit: bool = True) -> tuple[int, str]:
    """Run the stage's command(s) in the copy; (exit code, last lines of output)."""
    env = dict(os.environ)
    python_bin = os.path.dirname(sys.executable)
    env["PATH"] = python_bin + os.pathsep + env.get("PATH", "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["GIT_OPTIONAL_LOCKS"] = "0"
    sources = [str(p) for p in scratch.sources]
    if audit:
        env[LOG_ENV] = str(scratch.log)
        sources.insert(0, str(scratch.hooks))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (*sources, env.get("PYTHONPATH")) if p)
    output = scratch.base / "output.log"
    cwd = scratch.project / stage.wdir
    with open(output, "wb") as sink:
        for cmd in stage.cmd:
            proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT, check=False)
            if proc.returncode != 0:
                break
    tail = output.read_text(encoding="utf-8", errors="replace")[-3000:]
    return proc.returncode, tail


# ---------------------------------------------------------------------------------------
# Analysis


def _ignored_prefixes() -> tuple[str, ...]:
    return tuple({os.path.normpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})


def _locate(path: str, scratch: Scratch, root: Path, ignored: tuple[str, ...]) -> tuple[str, bool] | None:
    """(project-relative path, whether it is in the real workspace), or None if outside."""
    for base, in_workspace in ((scratch.project, False), (root, True)):
        prefix = str(base) + os.sep
        if path.startswith(prefix) and not path.startswith(ignored):
            return path[len(prefix):], in_workspace
    return None


def analyse(scratch: Scratch, root: Path, stage: StageDecl) -> tuple[list[Finding], list[Finding]]:
    """Undeclared reads and writes of one run, from the audit log and the copy's state."""
    ignored = _ignored_prefixes()
    declared = scratch.declared
    reads: dict[str, str] = {}
    writes: dict[str, str] = {}
    written: set[str] = set()
    seen: set[str] = set()
    events = []
    if scratch.log.exists():
        for line in scratch.log.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            if line.strip():
                events.append(json.loads(line))
    for event in events:
        located = _locate(event["p"], scratch, root, ignored)
        if located is None:
            continue
        rel, in_workspace = located
        if _is_metadata(rel):
            continue
        seen.add(rel)
        is_write = event["e"] != "open" or event["w"]
        if is_write:
            written.add(rel)
            if in_workspace:
                writes[rel] = "written into the real workspace, not the scratch copy"
            continue
        if rel in written or _covered(rel, declared):
            continue
        if rel == _SELF:  # the audit hook reading its own module
            continue
        existed = rel in scratch.before or (root / rel).is_file()
        if not existed or os.path.isdir(event["p"]):
            continue
        if in_workspace:
            how = "read from the real workspace"
        elif rel in scratch.before:
            how = "imported" if event["i"] else "opened for reading"
        else:
            how = "opened for reading, but absent from the copy (not a declared dep)"
        reads.setdefault(rel, how)
    after = _snapshot(scratch.project)
    for rel, (size, mtime, ino, atime) in after.items():
        if _is_metadata(rel) or _covered(rel, stage.outs):
            continue
        old = scratch.before.get(rel)
        if old is None:
            writes.setdefault(rel, "created")
        elif (size, mtime, ino) != old[:3]:
            writes.setdefault(rel, "modified")
        elif scratch.atime_works and atime > old[3] and rel not in seen and not _covered(rel, declared):
            reads.setdefault(rel, "read outside Python's audit hook (native code)")
    for rel in scratch.before:
        if rel not in after and not _is_metadata(rel) and not _covered(rel, stage.outs):
            writes.setdefault(rel, "deleted")
    return (
        [Finding(p, h) for p, h in sorted(reads.items())],
        [Finding(p, h) for p, h in sorted(writes.items())],
    )


def mentioned_undeclared(text: str, root: Path, scratch: Scratch) -> list[str]:
    """Workspace paths a failed stage's output names that the copy lacks (a dep the stage
    only stat-ed, e.g. ``os.path.isdir``, leaves no open event)."""
    ignored = _ignored_prefixes()
    found: list[str] = []
    for token in re.findall(r"[\w./-]+", text):
        token = token.rstrip(".")
        if os.path.isabs(token):
            located = _locate(os.path.normpath(token), scratch, root, ignored)
            rel = located[0] if located else ""
        else:
            rel = os.path.normpath(token)
        if not rel or rel in found or rel.startswith(("..", "/")) or _is_metadata(rel) or rel == ".":
            continue
        if os.path.lexists(root / rel) and not os.path.lexists(scratch.project / rel):
            found.append(rel)
    return found


# ---------------------------------------------------------------------------------------
# Stage selection


def ordered_stages(dag: Dag, names: Sequence[str] = ()) -> list[StageDecl]:
    """Stages with a command, upstream first; ``names`` may name a foreach group."""
    runnable = [s for s in dag.stages if s.cmd]
    if names:
        chosen: list[StageDecl] = []
        for name in names:
            match = [s for s in runnable if s.name == name or s.name.split("@")[0] == name]
            if not match:
                known = ", ".join(s.name for s in runnable)
                raise InputError(f"stage {name!r}: no such stage with a command (stages: {known})")
            chosen.extend(s for s in match if s not in chosen)
        runnable = chosen
    producers = {out: s.name for s in dag.stages for out in s.outs}
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for stage in runnable:
        upstream = {
            producer for dep in stage.deps for out, producer in producers.items()
            if producer != stage.name and (dep == out or dep.startswith(out + "/") or out.startswith(dep + "/"))
        }
        sorter.add(stage.name, *upstream)
    order = {name: i for i, name in enumerate(sorter.static_order())}
    return sorted(runnable, key=lambda s: order[s.name])


# ---------------------------------------------------------------------------------------
# verify dag


def verify_dag(root: Path, names: Sequence[str] = (), *, keep_scratch: bool = False) -> list[StageReport]:
    root = Path(root).resolve()
    dag = load_dag(root)
    reports = []
    for stage in ordered_stages(dag, names):
        report = StageReport(stage=stage.name)
        with scratch_copy(root, stage, keep=keep_scratch) as scratch:
            report.exit_code, tail = run_stage(scratch, stage)
            report.undeclared_reads, report.undeclared_writes = analyse(scratch, root, stage)
            if report.exit_code != 0:
                report.output_tail = tail
                for rel in mentioned_undeclared(tail, root, scratch):
                    report.notes.append(
                        f"its output names {rel}, which exists in the workspace but not in the copy: "
                        "an undeclared dep checked without being opened?"
                    )
            if not scratch.atime_works:
                report.notes.append("this filesystem does not update access times: reads by native code are not seen")
            if keep_scratch:
                report.notes.append(f"scratch copy kept at {scratch.base}")
        reports.append(report)
    return reports


# ---------------------------------------------------------------------------------------
# verify determinism


@dataclass
class OutputCheck:
    path: str
    lock: str | None
    fresh: str | None
    files: list[dict[str, Any]] = field(default_factory=list)
    diff: list[str] = field(default_factory=list)
    only_run_facts: bool = False

    @property
    def same(self) -> bool:
        return self.lock == self.fresh or self.only_run_facts

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["same"] = self.same
        return data


def _text_diff(workspace: Path, fresh: Path, lock_md5: str | None, limit: int = 40) -> list[str]:
    """The first lines of a unified diff, when the workspace still holds the locked version
    of a small text file (outputs with ``cache: false`` exist nowhere else)."""
    if not (workspace.is_file() and fresh.is_file()) or max(workspace.stat().st_size, fresh.stat().st_size) > 1 << 20:
        return []
    old_bytes = workspace.read_bytes()
    if hashlib.md5(old_bytes).hexdigest() != lock_md5:
        return []
    try:
        old, new = old_bytes.decode("utf-8"), fresh.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    lines = difflib.unified_diff(old.splitlines(), new.splitlines(), "dvc.lock version", "re-run", lineterm="", n=1)
    return list(itertools.islice(lines, limit))


TIMING = re.compile(r"(^|_)(s|per_s)$")  # runtime_s, generation_s, tokens_per_s: seconds and rates


def _without_run_facts(value: Any, timings: bool) -> Any:
    """``value`` without what names the run rather than its result: the git stamp and,
    in a metrics file, wall-clock timings and throughputs."""
    if isinstance(value, dict):
        return {
            k: _without_run_facts(v, timings)
            for k, v in value.items()
            if k != "git" and not (timings and TIMING.search(k))
        }
    if isinstance(value, list):
        return [_without_run_facts(v, timings) for v in value]
    return value


def _differs_only_in_run_facts(workspace: Path, fresh: Path, lock_md5: str | None, *, metric: bool = False) -> bool:
    """Outputs carry the commit they were made at (``provenance.git``) and metrics carry
    timings (``runtime_s``, ``tokens_per_s``); a re-run differs there (a later commit, a
    busier machine) and nowhere else, which is not a determinism failure."""
    if not (workspace.suffix == ".json" and workspace.is_file() and fresh.is_file()):
        return False
    old_bytes = workspace.read_bytes()
    if hashlib.md5(old_bytes).hexdigest() != lock_md5:
        return False
    try:
        old, new = json.loads(old_bytes), json.loads(fresh.read_bytes())
    except ValueError:
        return False
    return _without_run_facts(old, metric) == _without_run_facts(new, metric)


def _tree_files(tree: Any) -> dict[str, str]:
    return {"/".join(key): hash_info.value for key, _, hash_info in tree}


def _cached_listing(out: Any) -> dict[str, str] | None:
    """Per-file hashes of a directory output from the local DVC cache (never a remote)."""
    from dvc_data.hashfile import load
    from dvc_data.hashfile.tree import Tree
    from dvc_objects.errors import ObjectFormatError

    try:
        tree = load(out.cache, out.hash_info)
    except (FileNotFoundError, ObjectFormatError):
        return None
    return _tree_files(tree) if isinstance(tree, Tree) else None


def _lock_hashes(root: Path, name: str) -> dict[str, tuple[str | None, dict[str, str] | None]]:
    """Out path -> (hash recorded in dvc.lock, per-file hashes when it is a directory)."""
    from dvc.exceptions import DvcException

    with open_dvc_repo(root) as repo:
        try:
            stage = next(s for s in repo.index.stages if s.addressing == name)
        except (StopIteration, DvcException) as exc:
            raise InputError(f"stage {name!r}: not found in the pipeline") from exc
        recorded: dict[str, tuple[str | None, dict[str, str] | None]] = {}
        for out in stage.outs:
            rel = Path(os.path.relpath(out.fs_path, root)).as_posix()
            value = out.hash_info.value if out.hash_info else None
            files = None
            if out.hash_info and out.hash_info.isdir:
                files = _cached_listing(out)
            recorded[rel] = (value, files)
    return recorded


def _is_run_record(path: str) -> bool:
    """A run record (``<reports>/provenance/...``): commit, versions and timings of a run."""
    return "provenance" in Path(path).parts[:-1]


def _metric_outputs(root: Path, name: str) -> set[str]:
    """The stage's outputs that are DVC metrics (where timings are expected to differ)."""
    with open_dvc_repo(root) as repo:
        stage = next(s for s in repo.index.stages if s.addressing == name)
        return {Path(os.path.relpath(out.fs_path, root)).as_posix() for out in stage.outs if out.metric}


def _fresh_hashes(project: Path, name: str) -> dict[str, tuple[str | None, dict[str, str] | None]]:
    from dvc_data.hashfile.build import build

    fresh: dict[str, tuple[str | None, dict[str, str] | None]] = {}
    with open_dvc_repo(project) as repo:
        stage = next(s for s in repo.index.stages if s.addressing == name)
        for out in stage.outs:
            rel = Path(os.path.relpath(out.fs_path, project)).as_posix()
            if not out.exists:
                fresh[rel] = (None, None)
                continue
            odb = out.cache if out.use_cache else out.local_cache
            _, _, obj = build(odb, out.fs_path, out.fs, out.hash_name, ignore=out.dvcignore, dry_run=True)
            files = _tree_files(obj) if obj.hash_info.isdir else None
            fresh[rel] = (obj.hash_info.value, files)
    return fresh


def verify_determinism(root: Path, name: str, *, keep_scratch: bool = False) -> tuple[list[OutputCheck], int, str]:
    """Re-run one stage in a scratch copy; compare each output's DVC hash with dvc.lock."""
    root = Path(root).resolve()
    dag = load_dag(root)
    stages = ordered_stages(dag, [name])
    if len(stages) != 1:
        raise InputError(f"stage {name!r}: names {len(stages)} stages; name one ({', '.join(s.name for s in stages)})")
    stage = stages[0]
    recorded = _lock_hashes(root, stage.name)
    metrics = _metric_outputs(root, stage.name)
    unrecorded = [path for path, (value, _) in recorded.items() if value is None]
    if unrecorded:
        raise InputError(
            f"stage {stage.name!r}: dvc.lock has no hash for {', '.join(unrecorded)}; run `dvc repro {stage.name}` first"
        )
    with scratch_copy(root, stage, keep=keep_scratch) as scratch:
        code, tail = run_stage(scratch, stage, audit=False)
        if code != 0:
            return [], code, tail
        fresh = _fresh_hashes(scratch.project, stage.name)
        checks = []
        for path, (lock_value, lock_files) in recorded.items():
            fresh_value, fresh_files = fresh.get(path, (None, None))
            check = OutputCheck(path=path, lock=lock_value, fresh=fresh_value)
            if not check.same and lock_files is not None and fresh_files is not None:
                for name_ in sorted(set(lock_files) | set(fresh_files)):
                    a, b = lock_files.get(name_), fresh_files.get(name_)
                    if a != b:
                        rel = f"{path}/{name_}"
                        diff = _text_diff(root / rel, scratch.project / rel, a)
                        check.files.append({"path": rel, "lock": a, "fresh": b, "diff": diff})
            elif not check.same and lock_files is None:
                check.only_run_facts = _differs_only_in_run_facts(
                    root / path, scratch.project / path, lock_value, metric=path in metrics or _is_run_record(path)
                )
                if not check.only_run_facts:
                    check.diff = _text_diff(root / path, scratch.project / path, lock_value)
            checks.append(check)
    return checks, 0, ""


# ---------------------------------------------------------------------------------------
# Command line: `tuneline verify ...`

app = typer.Typer(help="Check the DVC pipeline: undeclared reads/writes, determinism.", no_args_is_help=True)
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
KeepOption = Annotated[bool, typer.Option("--keep-scratch", help="keep the scratch copy for inspection")]


@app.command("dag")
def dag_command(
    stages: Annotated[list[str] | None, typer.Argument(help="stages (or foreach groups); default: all")] = None,
    as_json: JsonOption = False,
    keep_scratch: KeepOption = False,
) -> None:
    """Run stages in a scratch copy under an audit hook; exit 1 on undeclared reads or writes."""
    reports = verify_dag(find_root(), stages or (), keep_scratch=keep_scratch)
    if as_json:
        typer.echo(json.dumps([r.to_json() for r in reports], indent=2, sort_keys=True))
    else:
        console = Console()
        table = Table(title="verify dag")
        for column in ("stage", "kind", "path", "how"):
            table.add_column(column, overflow="fold")
        for report in reports:
            rows = [("undeclared read", f) for f in report.undeclared_reads]
            rows += [("undeclared write", f) for f in report.undeclared_writes]
            if report.exit_code != 0:
                rows.append(("failed", Finding("", f"exit code {report.exit_code}")))
            if not rows:
                table.add_row(report.stage, "ok", "", "")
            for kind, finding in rows:
                table.add_row(report.stage, kind, finding.path, finding.how)
        console.print(table)
        for report in reports:
            for note in report.notes:
                console.print(f"{report.stage}: {note}", highlight=False)
            if report.output_tail:
                console.print(f"[bold]{report.stage} output (tail):[/]\n{report.output_tail}", highlight=False, markup=True)
    bad = [r.stage for r in reports if not r.ok]
    if bad:
        raise TunelineError(
            f"{len(bad)} stage(s) read or write what dvc.yaml does not declare, or failed: {', '.join(bad)}"
        )


@app.command("determinism")
def determinism_command(
    stage: Annotated[str, typer.Argument(help="the stage to re-run")],
    as_json: JsonOption = False,
    keep_scratch: KeepOption = False,
) -> None:
    """Re-run a stage in a scratch copy and compare its outputs with dvc.lock; exit 1 on a difference."""
    checks, code, tail = verify_determinism(find_root(), stage, keep_scratch=keep_scratch)
    if code != 0:
        raise TunelineError(f"stage {stage!r} failed in the scratch copy (exit code {code}):\n{tail}")
    if as_json:
        typer.echo(json.dumps([c.to_json() for c in checks], indent=2, sort_keys=True))
    else:
        table = Table(title=f"verify determinism {stage}")
        for column in ("output", "dvc.lock", "re-run", "same"):
            table.add_column(column, overflow="fold")
        diffs = []
        for check in checks:
            table.add_row(check.path, str(check.lock), str(check.fresh), "yes" if check.same else "NO")
            diffs.append((check.path, check.diff))
            for item in check.files:
                table.add_row(f"  {item['path']}", str(item["lock"]), str(item["fresh"]), "NO")
                diffs.append((item["path"], item["diff"]))
        console = Console()
        console.print(table)
        for path, lines in diffs:
            if lines:
                console.print(f"[bold]{path}[/]", markup=True, highlight=False)
                console.print("\n".join(lines), markup=False, highlight=False)
    differ = [c.path for c in checks if not c.same]
    if differ:
        raise TunelineError(f"stage {stage!r} is not deterministic: {', '.join(differ)} differ from dvc.lock")
