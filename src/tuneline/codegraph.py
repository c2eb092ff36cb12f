"""The import closure of a stage, computed from the source.

A stage whose ``cmd`` is ``tuneline <stage> ...`` runs ``tuneline/stages/<stage>.py``
through the entry point ``tuneline/cli.py``; ``closure`` walks the syntax trees of those
two and of every package module they import (lazy imports inside functions included, a
module's parent packages' ``__init__.py`` too; in the entry point only what the stage
path runs). ``tuneline.dag`` compares it with dvc.yaml's code deps; the training run
fingerprint (``training.checkpoints``) hashes the same files, so both name the same code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

from tuneline.errors import InputError

PACKAGE = "tuneline"
ENTRY = "cli.py"
ENTRY_FUNCTIONS = ("main", "run_stage")
DISPATCH = "run_stage"


def package_dir(root: Path) -> Path:
    """The package's source directory in the project (src layout or flat)."""
    for candidate in (root / "src" / PACKAGE, root / PACKAGE):
        if (candidate / "__init__.py").is_file():
            return candidate
    raise InputError(f"{root}: no {PACKAGE} package (looked for src/{PACKAGE}/__init__.py and {PACKAGE}/__init__.py)")


# ---------------------------------------------------------------------------------------
# The import closure


def module_file(pkg: Path, module: str) -> Path | None:
    """The file of a ``tuneline.x.y`` module (``x/y.py`` or ``x/y/__init__.py``), or None."""
    parts = module.split(".")
    if parts[0] != PACKAGE or not all(parts):
        return None
    base = pkg.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py") if parts[1:] else (pkg / "__init__.py",):
        if candidate.is_file():
            return candidate
    return None


def _package_of(pkg: Path, path: Path) -> list[str]:
    """The package a module file belongs to (its directory), for relative imports."""
    return [PACKAGE, *path.parent.relative_to(pkg).parts]


def _imported_modules(pkg: Path, path: Path, nodes: Iterable[ast.AST]) -> Iterator[tuple[str, int]]:
    """(module name, line) for every name the import nodes may load."""
    package = _package_of(pkg, path)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                for end in range(1, len(parts) + 1):  # `import a.b.c` runs a, a.b and a.b.c
                    yield ".".join(parts[:end]), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            parts = base.split(".")
            for end in range(1, len(parts) + 1):
                yield ".".join(parts[:end]), node.lineno
            for alias in node.names:  # `from pkg import module`
                yield f"{base}.{alias.name}", node.lineno


def _walk_skipping_functions(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes of ``node`` outside any function body (class bodies are entered, methods not)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        yield child
        yield from _walk_skipping_functions(child)


def _names_used(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)
    }


def entry_import_nodes(tree: ast.Module) -> list[ast.AST]:
    """The import statements of the entry point that a stage command runs."""
    functions = {
        n.name: n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    used = {name: _names_used(fn) for name, fn in functions.items()}
    todo = [n for n in ENTRY_FUNCTIONS if n in functions]
    todo += [name for name, names in used.items() if DISPATCH in names and name != DISPATCH]
    reached: set[str] = set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        todo.extend(n for n in used[name] if n in functions and n not in reached)
    nodes = [n for n in _walk_skipping_functions(tree) if isinstance(n, ast.Import | ast.ImportFrom)]
    for name in sorted(reached):
        nodes += [n for n in ast.walk(functions[name]) if isinstance(n, ast.Import | ast.ImportFrom)]
    return nodes


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise InputError(f"{path}:{exc.lineno}: cannot parse: {exc.msg}") from exc


def closure(pkg: Path, start: Path, entry: Path | None = None) -> dict[Path, str]:
    """Every package file that running ``start`` (through ``entry``) may execute, each with
    why: ``start``, ``entry``, ``imported by X:line`` or ``parent package of X``."""
    shown = pkg.parent.parent if pkg.parent.name == "src" else pkg.parent
    why: dict[Path, str] = {}
    todo: list[tuple[Path, str]] = [(start, "the stage's module")]
    if entry is not None:
        todo.append((entry, "the entry point"))
    while todo:
        path, reason = todo.pop()
        if path in why:
            continue
        why[path] = reason
        tree = _parse(path)
        nodes = entry_import_nodes(tree) if path == entry else [
            n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
        ]
        rel = path.relative_to(shown).as_posix()
        for module, line in _imported_modules(pkg, path, nodes):
            found = module_file(pkg, module)
            if found is not None and found not in why:
                todo.append((found, f"imported by {rel}:{line}"))
        for parent in path.parents:
            if parent == pkg.parent:
                break
            init = parent / "__init__.py"
            if init.is_file() and init != path and init not in why:
                todo.append((init, f"parent package of {rel}"))
    return why


def compress(pkg: Path, files: Iterable[Path]) -> list[Path]:
    """The files, with a directory in place of its files when every ``.py`` file under it
    is among them."""
    wanted = set(files)

    def walk(directory: Path) -> list[Path]:
        py = [p for p in directory.rglob("*.py") if "__pycache__" not in p.parts]
        if py and all(p in wanted for p in py):
            return [directory]
        out = sorted(p for p in wanted if p.parent == directory)
        for sub in sorted(p for p in directory.iterdir() if p.is_dir() and p.name != "__pycache__"):
            out += walk(sub)
        return out

    return walk(pkg)
