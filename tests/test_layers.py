"""The layering rules of docs/ARCHITECTURE.md, checked on the source by its imports.

- A stage (``tuneline/stages/<name>.py``) never imports another stage: stages share
  library modules, never each other.
- A tool or library module (anything in ``tuneline`` outside ``stages/``) never imports a
  stage; ``cli.py`` is the one dispatcher allowed to.
- A benchmark (``bench/**/*.py``) imports no stage and no private name (``_name``) of
  ``tuneline``: it measures the public library.

Every import counts, at module level or inside a function, absolute or relative, and so
does ``importlib.import_module("tuneline.stages...")`` with a literal name.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "tuneline"
STAGES = f"{PACKAGE}.stages"
DISPATCHERS = frozenset({f"{PACKAGE}.cli"})


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve_relative(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(tree: ast.AST, importer: str = "", is_package: bool = False) -> Iterator[tuple[int, str]]:
    """(line, dotted target) for every import; ``from m import x`` gives ``m.x``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            module = _resolve_relative(node, importer, is_package) if node.level else (node.module or "")
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}" if alias.name != "*" else module
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func) and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value
            elif isinstance(first, ast.JoinedStr) and first.values:
                head = first.values[0]
                if isinstance(head, ast.Constant) and isinstance(head.value, str):
                    yield node.lineno, head.value.rstrip(".")


def _is_dynamic_import(func: ast.expr) -> bool:
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
    return name in {"import_module", "__import__"}


def _under(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def _stage_of(target: str) -> str | None:
    """``tuneline.stages.probe.generate`` -> ``probe``; None outside the stages or for the package."""
    parts = target.split(".")
    return parts[2] if _under(target, STAGES) and len(parts) > 2 else None


def _private(target: str) -> bool:
    return any(p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in target.split("."))


def source_violations(src: Path) -> list[str]:
    """Stage -> stage and tool -> stage imports under ``src/tuneline``."""
    found = []
    for path in sorted((src / PACKAGE).rglob("*.py")):
        importer = module_name(path, src)
        own_stage = _stage_of(importer)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(src.parent)
        for line, target in imports(tree, importer, path.name == "__init__.py"):
            if _under(importer, STAGES):
                other = _stage_of(target)
                if other is not None and other != own_stage:
                    found.append(f"{where}:{line}: stage {importer} imports stage {target} (stage -> stage)")
            elif importer not in DISPATCHERS and _under(target, STAGES):
                found.append(f"{where}:{line}: {importer} imports {target} (tool/library -> stage)")
    return found


def bench_violations(bench: Path) -> list[str]:
    """Benchmark imports of a stage or of a private tuneline name, and ``mod._name`` uses."""
    found = []
    for path in sorted(bench.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(bench.parent)
        bound: set[str] = set()  # local names that hold tuneline modules or objects
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                for alias in node.names:
                    full = f"{module}.{alias.name}" if module else alias.name
                    if _under(full, PACKAGE):
                        bound.add(alias.asname or alias.name.split(".")[0])
        for line, target in imports(tree):
            if not _under(target, PACKAGE):
                continue
            if _under(target, STAGES):
                found.append(f"{where}:{line}: benchmark imports {target} (bench -> stage)")
            elif _private(target):
                found.append(f"{where}:{line}: benchmark imports private {target} (bench -> private name)")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
                and _private(node.attr)
            ):
                found.append(
                    f"{where}:{node.lineno}: benchmark uses private {node.value.id}.{node.attr} (bench -> private name)"
                )
    return found


def test_no_stage_imports_another_stage_and_no_tool_or_benchmark_imports_a_stage():
    violations = source_violations(REPO / "src") + bench_violations(REPO / "bench")
    assert violations == [], "layering violations (see docs/ARCHITECTURE.md):\n" + "\n".join(violations)


# -- the checker itself, on a small made-up tree ----------------------------------------


def write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_checker_finds_every_kind_of_violation(tmp_path):
    src, bench = tmp_path / "src", tmp_path / "bench"
    write(src, "tuneline/__init__.py", "")
    write(src, "tuneline/stages/__init__.py", "")
    write(src, "tuneline/stages/probe.py", "from tuneline.reporting import output_paths\nimport tuneline.stages.probe\n")
    write(src, "tuneline/stages/compare.py", "from tuneline.stages.probe import output_paths\n")
    write(src, "tuneline/stages/dpo.py", "def f():\n    from . import sft\n")
    write(src, "tuneline/stages/pairs.py", "from .clean import x\nfrom ..stages import sft\n")
    write(src, "tuneline/diff.py", "from tuneline.stages.compare import ProbeRun\n")
    write(src, "tuneline/doctor.py", "def f():\n    from tuneline.stages import base\n")
    write(src, "tuneline/export.py", "import importlib\nm = importlib.import_module(f'tuneline.stages.{1}')\n")
    write(src, "tuneline/tasks/travel.py", "from ..stages.pairs import negatives\n")
    write(src, "tuneline/cli.py", "import importlib\nfrom tuneline.stages import probe\n")
    write(src, "tuneline/reporting.py", "from tuneline import stats\n")
    write(bench, "probe_throughput.py", "def main():\n    from tuneline.stages.probe import generate\n")
    write(bench, "sft.py", "from tuneline.training import _process_group\nfrom tuneline import modeling\n"
                           "modeling._private()\nmodeling.load()\nx.__class__\n")
    write(bench, "gpucap/sitecustomize.py", "import tuneline._internal\n")

    found = source_violations(src)
    assert [v.split(":")[0] + ":" + v.split(":")[1] for v in found] == [
        "src/tuneline/diff.py:1",
        "src/tuneline/doctor.py:2",
        "src/tuneline/export.py:2",
        "src/tuneline/stages/compare.py:1",
        "src/tuneline/stages/dpo.py:2",
        "src/tuneline/stages/pairs.py:1",
        "src/tuneline/stages/pairs.py:2",
        "src/tuneline/tasks/travel.py:1",
    ]
    assert "stage tuneline.stages.compare imports stage tuneline.stages.probe.output_paths" in found[3]
    assert "tuneline.stages.dpo imports stage tuneline.stages.sft" in found[4]
    assert "tuneline.stages.pairs imports stage tuneline.stages.clean.x" in found[5]
    assert "tuneline.tasks.travel imports tuneline.stages.pairs.negatives (tool/library -> stage)" in found[7]

    in_bench = bench_violations(bench)
    assert [v.split(" (")[0] for v in in_bench] == [
        "bench/gpucap/sitecustomize.py:1: benchmark imports private tuneline._internal",
        "bench/probe_throughput.py:2: benchmark imports tuneline.stages.probe.generate",
        "bench/sft.py:1: benchmark imports private tuneline.training._process_group",
        "bench/sft.py:3: benchmark uses private modeling._private",
    ]
