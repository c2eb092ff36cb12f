"""Code deps and params of the pipeline, computed from the code itself.

A stage whose ``cmd`` is ``tuneline <stage> ...`` runs ``tuneline/stages/<stage>.py``
through the entry point ``tuneline/cli.py``. Its code deps are the package files those two
import, transitively, found by walking their syntax trees (``import`` statements anywhere,
lazy imports inside functions included; a module's parent packages' ``__init__.py`` too):

- in a module of the package every import counts;
- in the entry point only what the stage path runs: module-level imports, and imports
  inside the functions reachable from ``main``, ``run_stage`` and the commands that call
  ``run_stage``. Other commands' lazy imports (``doctor``, ``diff``, ...) are not deps.

``tuneline dag sync`` rewrites the code part of each such stage's ``deps`` in dvc.yaml (the
entries under the package directory; data deps, comments and order are kept) to exactly
that list, a directory standing for its files when every ``.py`` file under it is imported.
``tuneline dag check`` exits 1 listing every missing or extra code dep.

Params: which params a stage reads is traced at run time (``trace_params``: every field
of the frozen params object the stage reads, as a dotted path) and compared with what
dvc.yaml declares (``undeclared_params``); tests/test_dag.py runs every stage that way.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from tuneline.codegraph import ENTRY, PACKAGE, closure, compress, module_file, package_dir
from tuneline.errors import InputError, TunelineError
from tuneline.records import write_text

DVC_YAML = "dvc.yaml"


# ---------------------------------------------------------------------------------------
# Stages in dvc.yaml


@dataclass
class StageCode:
    key: str  # the stage's name in dvc.yaml (a foreach group's name for foreach stages)
    command: str  # the tuneline command it runs
    declared: list[str]  # its deps under the package directory, as written
    expected: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # expected path -> why it is needed
    problem: str | None = None

    @property
    def missing(self) -> list[str]:
        return [p for p in self.expected if p not in self.declared]

    @property
    def extra(self) -> list[str]:
        return [p for p in self.declared if p not in self.expected]


def _dep_path(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and len(item) == 1:
        (key,) = item
        return str(key)
    return None


def _is_code(path: str, pkg_rel: str) -> bool:
    path = path.rstrip("/")
    return path == pkg_rel or path.startswith(pkg_rel + "/")


def _load_yaml(root: Path) -> tuple[Any, Any]:
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = root / DVC_YAML
    if not path.is_file():
        raise InputError(f"{path}: no such file (run in the project root)")
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.indent(mapping=2, sequence=4, offset=2)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("stages"), dict):
        raise InputError(f"{path}: no `stages:` mapping")
    return yaml, data


def _body(stage: Any) -> Any:
    return stage.get("do", stage) if isinstance(stage, dict) else None


def stage_code(root: Path, data: Any | None = None) -> list[StageCode]:
    """Declared and expected code deps of every ``tuneline <stage>`` stage in dvc.yaml."""
    root = Path(root).resolve()
    if data is None:
        _, data = _load_yaml(root)
    pkg = package_dir(root)
    pkg_rel = pkg.relative_to(root).as_posix()
    entry = pkg / ENTRY
    found = []
    for key, stage in data["stages"].items():
        body = _body(stage)
        if body is None:
            continue
        cmd = body.get("cmd")
        cmd = cmd[0] if isinstance(cmd, list) and cmd else cmd
        words = str(cmd or "").split()
        if words[:1] != [PACKAGE] or len(words) < 2:
            continue
        deps = [_dep_path(d) for d in body.get("deps") or []]
        info = StageCode(key=str(key), command=words[1], declared=[d for d in deps if d and _is_code(d, pkg_rel)])
        module = module_file(pkg, f"{PACKAGE}.stages.{words[1]}")
        if module is None:
            info.problem = f"runs `{PACKAGE} {words[1]}` but {pkg_rel}/stages/{words[1]}.py does not exist"
            found.append(info)
            continue
        why = closure(pkg, module, entry if entry.is_file() else None)
        listed = compress(pkg, why)

        def order(path: Path, module: Path = module) -> tuple[int, str]:
            return (0 if module == path or path in module.parents else 1 if path == entry else 2, path.as_posix())

        for path in sorted(listed, key=order):
            rel = path.relative_to(root).as_posix()
            info.expected.append(rel)
            info.why[rel] = why.get(path, "every .py file in it is imported")
        found.append(info)
    return found


def check(root: Path) -> list[str]:
    """One line per missing or extra code dep (or stage that names no module); [] if exact."""
    problems = []
    for info in stage_code(root):
        if info.problem:
            problems.append(f"{info.key}: {info.problem}")
            continue
        for path in info.missing:
            problems.append(f"{info.key}: missing code dep {path} ({info.why[path]})")
        for path in info.extra:
            problems.append(f"{info.key}: extra code dep {path} (the stage does not import it)")
    return problems


def sync(root: Path) -> list[str]:
    """Rewrite the code deps of every ``tuneline <stage>`` stage; the stages changed."""
    root = Path(root).resolve()
    yaml, data = _load_yaml(root)
    pkg_rel = package_dir(root).relative_to(root).as_posix()
    changed = []
    for info in stage_code(root, data):
        if info.problem:
            raise InputError(f"{root / DVC_YAML}: stage {info.key!r}: {info.problem}")
        if info.declared == info.expected:
            continue
        body = _body(data["stages"][info.key])
        deps = body.get("deps")
        if deps is None:
            from ruamel.yaml.comments import CommentedSeq

            body["deps"] = deps = CommentedSeq()
        positions = [i for i, d in enumerate(deps) if (p := _dep_path(d)) and _is_code(p, pkg_rel)]
        at = positions[0] if positions else 0
        for i in reversed(positions):
            del deps[i]
        for offset, path in enumerate(info.expected):
            deps.insert(at + offset, path)
        changed.append(info.key)
    if changed:
        buffer = io.StringIO()
        yaml.dump(data, buffer)
        write_text(root / DVC_YAML, buffer.getvalue())
    return changed


# ---------------------------------------------------------------------------------------
# Params a stage reads


class _ReadDict(dict):  # type: ignore[type-arg]
    """A dict field's value that records which keys are read."""

    def __init__(self, data: dict[Any, Any], path: str, reads: set[str]) -> None:
        super().__init__(data)
        self._path, self._reads = path, reads

    def __getitem__(self, key: Any) -> Any:
        self._reads.add(f"{self._path}.{key}")
        return super().__getitem__(key)

    def get(self, key: Any, default: Any = None) -> Any:
        self._reads.add(f"{self._path}.{key}")
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self._reads.add(f"{self._path}.{key}")
        return super().__contains__(key)

    def _whole(self) -> None:
        self._reads.add(self._path)

    def __iter__(self) -> Iterator[Any]:
        self._whole()
        return super().__iter__()

    def __len__(self) -> int:
        self._whole()
        return super().__len__()

    def keys(self) -> Any:
        self._whole()
        return super().keys()

    def values(self) -> Any:
        self._whole()
        return super().values()

    def items(self) -> Any:
        self._whole()
        return super().items()


WHOLE = "*"
_WHOLE_READS = {"model_dump", "model_dump_json", "__eq__", "__iter__", "__repr__", "__str__"}


@contextlib.contextmanager
def trace_params(params: Any) -> Iterator[set[str]]:
    """Record, as dotted paths (``sft.lora.r``, ``probe.models.sft``), every param read
    from ``params`` (a frozen pydantic model) inside the block. Reading a whole section
    (``model_dump``) records the section's path; the whole object, ``*``. A ``model_copy``
    of a section is traced as the section, its ``update`` keys excepted."""
    from pydantic import BaseModel

    reads: set[str] = set()
    known: dict[int, tuple[Any, str, frozenset[str]]] = {}
    classes: set[type] = set()

    def register(obj: BaseModel, path: str, skip: frozenset[str] = frozenset()) -> None:
        known[id(obj)] = (obj, path, skip)
        classes.add(type(obj))
        for name in type(obj).model_fields:
            value = obj.__dict__.get(name)
            sub = f"{path}.{name}" if path else name
            if isinstance(value, BaseModel):
                register(value, sub)
            elif isinstance(value, dict):
                for key, item in value.items():
                    if isinstance(item, BaseModel):
                        register(item, f"{sub}.{key}")

    register(params, "")

    def hook(self: Any, name: str) -> Any:
        value = object.__getattribute__(self, name)
        entry = known.get(id(self))
        if entry is None or entry[0] is not self:
            return value
        _, path, skip = entry
        if name in type(self).model_fields:
            sub = f"{path}.{name}" if path else name
            if isinstance(value, BaseModel) or name in skip:
                return value
            if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
                return value  # named sections (``probe.suites``): each one's reads are recorded
            if isinstance(value, dict) and not any(isinstance(v, BaseModel) for v in value.values()):
                return _ReadDict(value, sub, reads)
            reads.add(sub)
        elif name in _WHOLE_READS:
            reads.add(path or WHOLE)
        elif name == "model_copy":
            def copy(*args: Any, update: dict[str, Any] | None = None, **kwargs: Any) -> Any:
                new = value(*args, update=update, **kwargs)
                register(new, path, skip | frozenset(update or ()))
                return new

            return copy
        return value

    saved = {cls: cls.__dict__.get("__getattribute__") for cls in classes}
    for cls in classes:
        cls.__getattribute__ = hook  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        for cls, old in saved.items():
            if old is None:
                delattr(cls, "__getattribute__")
            else:
                cls.__getattribute__ = old  # type: ignore[method-assign]


def _under(path: str, other: str) -> bool:
    return path == other or path.startswith(other.rstrip("/") + "/")


def undeclared_params(
    reads: Iterable[str], declared: Iterable[str], files: Iterable[str], params: Any
) -> list[str]:
    """The reads no declared param covers (``sft`` covers ``sft.*``). A ``paths.X`` read is
    also covered when its value is, contains or lies in one of the stage's deps/outs."""
    declared = list(declared)
    files = [f.rstrip("/") for f in files]
    missing = []
    for read in sorted(reads):
        if any(read == d or read.startswith(d + ".") for d in declared) or WHOLE in declared:
            continue
        if read.startswith("paths."):
            value = getattr(params.paths, read.split(".", 1)[1], None)
            if isinstance(value, str | Path):
                value = Path(value).as_posix().rstrip("/")
                if any(_under(f, value) or _under(value, f) for f in files):
                    continue
        missing.append(read)
    return missing


def declared_params(root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per stage (as DVC names it, ``probe@sft``): (declared params keys, deps and outs)."""
    from dvc.dependency.param import ParamsDependency

    from tuneline.archive import load_dag, open_dvc_repo

    dag = {s.name: s for s in load_dag(root).stages}
    found = {}
    with open_dvc_repo(Path(root).resolve()) as repo:
        for stage in repo.index.stages:
            keys = [k for d in stage.deps if isinstance(d, ParamsDependency) for k in (d.params or [WHOLE])]
            decl = dag.get(stage.addressing)
            files = [*decl.deps, *decl.outs] if decl else []
            found[stage.addressing] = (keys, files)
    return found


# ---------------------------------------------------------------------------------------
# Command line: `tuneline dag ...`

app = typer.Typer(help="Keep dvc.yaml's code deps equal to the code each stage imports.", no_args_is_help=True)


def _root(path: Path | None) -> Path:
    from tuneline.archive import find_root

    return find_root(path)


RootOption = Annotated[Path | None, typer.Option("--repo", help="project root (default: the one around the current directory)")]


@app.command("check")
def check_command(repo: RootOption = None) -> None:
    """List every code dep dvc.yaml lacks or has too many; exit 1 if any."""
    problems = check(_root(repo))
    for line in problems:
        typer.echo(line)
    if problems:
        raise TunelineError(f"{len(problems)} code dep(s) in dvc.yaml differ from the imports; run `tuneline dag sync`")
    typer.echo("dvc.yaml: every tuneline stage declares exactly the code it imports")


@app.command("sync")
def sync_command(repo: RootOption = None) -> None:
    """Rewrite the code deps of every tuneline stage in dvc.yaml to the code it imports."""
    changed = sync(_root(repo))
    typer.echo(f"dvc.yaml: updated {', '.join(changed)}" if changed else "dvc.yaml: already exact")
