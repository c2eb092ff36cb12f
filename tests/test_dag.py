"""dvc.yaml declares exactly the code each stage runs and every param it reads.

Code deps: `tuneline dag check` / `sync` on a copy of this project, with undeclared imports
planted (module level and lazy), and `tuneline verify dag` catching an undeclared import of
the package's own module at run time. Params: every stage runs on the tiny model with its
params object traced (`dag.trace_params`) and must read only what dvc.yaml declares.
Early cutoff: a change to a stage's code that leaves its outputs as they were re-runs that
stage and nothing after it.
"""

from __future__ import annotations

import importlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from test_archive import tuneline
from test_pipeline_e2e import TINY_OVERRIDES, make_project, ran_stages
from tuneline import dag

CODE = "src/tuneline"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return make_project(tmp_path, tiny_model_dir, TINY_OVERRIDES)


def append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_this_projects_dvc_yaml_declares_exactly_the_code_each_stage_imports():
    root = Path(__file__).resolve().parents[1]
    assert dag.check(root) == []


def test_check_lists_undeclared_and_extra_code_deps_and_sync_fixes_them(project: Path):
    dvc_yaml = project / "dvc.yaml"
    original = dvc_yaml.read_text()
    ok = tuneline(project, "dag", "check")
    assert ok.returncode == 0, ok.stdout + ok.stderr

    # clean starts importing a module it does not declare (at module level), pairs lazily
    # inside a function, and base stops needing one it declares
    append(project / CODE / "stages/clean.py", "\nfrom tuneline import stats  # noqa: E402,F401\n")
    append(project / CODE / "stages/pairs.py", "\n\ndef _later():\n    import tuneline.diff  # noqa: F401\n")
    dvc_yaml.write_text(original.replace(
        "      - src/tuneline/stages/base.py\n", "      - src/tuneline/stages/base.py\n      - src/tuneline/export.py\n", 1
    ))
    caught = tuneline(project, "dag", "check")
    assert caught.returncode == 1, caught.stdout + caught.stderr
    lines = set(caught.stdout.splitlines())
    clean_lines = len((project / CODE / "stages/clean.py").read_text().splitlines())
    assert f"clean: missing code dep src/tuneline/stats.py (imported by src/tuneline/stages/clean.py:{clean_lines})" in lines
    assert any(line.startswith("pairs: missing code dep src/tuneline/diff.py (imported by src/tuneline/stages/pairs.py:") for line in lines)
    assert "base: extra code dep src/tuneline/export.py (the stage does not import it)" in lines
    assert "tuneline dag sync" in caught.stderr

    synced = tuneline(project, "dag", "sync")
    assert synced.returncode == 0, synced.stderr
    assert "updated base, clean, pairs" in synced.stdout
    assert tuneline(project, "dag", "check").returncode == 0
    text = dvc_yaml.read_text()
    # only the code deps changed: comments, data deps and everything else are as they were
    assert [line for line in text.splitlines() if CODE not in line] == [
        line for line in original.splitlines() if CODE not in line
    ]
    assert "src/tuneline/export.py" not in text
    declared = {s.key: s.declared for s in dag.stage_code(project)}
    assert f"{CODE}/stats.py" in declared["clean"] and f"{CODE}/diff.py" in declared["pairs"]

    # the entry point: a module-level import is a dep of every stage; a lazy import in a
    # command that does not run a stage (doctor) is not
    cli = project / CODE / "cli.py"
    cli.write_text(cli.read_text().replace("import typer\n", "import typer\n\nfrom tuneline import export  # noqa: F401\n", 1))
    codes = {s.key: s for s in dag.stage_code(project)}
    assert all(f"{CODE}/export.py" in s.missing for s in codes.values()), {k: s.missing for k, s in codes.items()}
    assert all(f"{CODE}/doctor.py" not in s.expected for s in codes.values())


def test_a_directory_stands_for_its_files_only_when_all_are_imported(project: Path):
    pkg = project / CODE
    (pkg / "extra").mkdir()
    (pkg / "extra/__init__.py").write_text("")
    (pkg / "extra/one.py").write_text("VALUE = 1\n")
    append(pkg / "stages/base.py", "\nfrom tuneline.extra import one  # noqa: E402,F401\n")
    (base,) = [s for s in dag.stage_code(project) if s.key == "base"]
    assert f"{CODE}/extra" in base.missing and f"{CODE}/extra/one.py" not in base.expected
    (pkg / "extra/two.py").write_text("VALUE = 2\n")
    (base,) = [s for s in dag.stage_code(project) if s.key == "base"]
    assert {f"{CODE}/extra/__init__.py", f"{CODE}/extra/one.py"} <= set(base.missing)
    assert f"{CODE}/extra" not in base.expected


def test_verify_dag_reports_an_undeclared_import_of_the_package(project: Path):
    ok = tuneline(project, "verify", "dag", "base", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    append(project / CODE / "stages/base.py", "\nimport tuneline.stats  # noqa: E402,F401\n")
    caught = tuneline(project, "verify", "dag", "base", "--json")
    assert caught.returncode == 1, caught.stdout + caught.stderr
    (report,) = json.loads(caught.stdout)
    assert report["exit_code"] == 0
    assert report["undeclared_reads"] == [{"path": f"{CODE}/stats.py", "how": "imported"}]


# ---------------------------------------------------------------------------------------
# Params


def trace_stages(project: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, set[str]]:
    """Run every `tuneline <stage> [ARGS]` stage of dvc.yaml in this process, upstream
    first, on traced params."""
    from tuneline import cli
    from tuneline.archive import load_dag
    from tuneline.verify import ordered_stages

    monkeypatch.chdir(project)
    reads: dict[str, set[str]] = {}
    for stage in ordered_stages(load_dag(project)):
        words = stage.cmd[0].split()
        if words[0] != "tuneline":
            continue
        module = importlib.import_module(f"tuneline.stages.{words[1]}")
        params = cli.stage_params(Path("params.yaml"))
        with dag.trace_params(params) as seen:
            module.run(params, *words[2:])
        reads[stage.name] = set(seen)
    return reads


def undeclared(project: Path, reads: dict[str, set[str]]) -> dict[str, list[str]]:
    from tuneline.params import load_params

    params = load_params(project / "params.yaml")
    declared = dag.declared_params(project)
    assert set(reads) == set(declared), (sorted(reads), sorted(declared))
    found = {}
    for stage, seen in reads.items():
        keys, files = declared[stage]
        missing = dag.undeclared_params(seen, keys, files, params)
        if missing:
            found[stage] = missing
    return found


def test_every_stage_reads_only_the_params_dvc_yaml_declares(project: Path, monkeypatch: pytest.MonkeyPatch):
    from tuneline.stages import clean

    real_run = clean.run

    def run_reading_dpo_beta(params):  # a planted read of a param clean does not declare
        assert params.dpo.beta is not None
        return real_run(params)

    monkeypatch.setattr(clean, "run", run_reading_dpo_beta)
    reads = trace_stages(project, monkeypatch)
    assert "probe.merge_adapter" in reads["probe@sft"] and "sft.lora.r" in reads["sft"]
    assert "probe.models.sft" in reads["probe@sft"] and "probe.models.dpo" not in reads["probe@sft"]
    # clean reads each suite's path (training must not see it), never a limit (a limit re-runs no training)
    assert {"probe.suites.heldout.path", "probe.suites.natural.path", "paths.dev_suite"} <= reads["clean"]
    assert not {r for r in reads["clean"] if r.endswith(".limit")}
    assert "probe.suites.natural.limit" in reads["probe@sft"]
    assert undeclared(project, reads) == {"clean": ["dpo.beta"]}

    # a declaration removed from dvc.yaml is caught too
    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("        - probe.merge_adapter\n", ""))
    found = undeclared(project, reads)
    assert {stage: found[stage] for stage in found if stage.startswith("probe")} == {
        f"probe@{m}": ["probe.merge_adapter"] for m in ("base", "sft", "dpo", "dpo+guided")
    }


def test_trace_params_records_fields_sections_and_copies():
    from tuneline.params import parse_params

    params = parse_params({}, "params.yaml")
    with dag.trace_params(params) as reads:
        assert params.seed == 0
        assert params.sft.lora.r > 0
        assert params.probe.models["sft"]
        copy = params.model.model_copy(update={"format": "completion"})
        assert copy.format == "completion" and copy.dtype
        params.dpo.model_dump()
        assert [suite.path for suite in params.probe.suites.values()]  # named sections: each one's reads
    assert reads == {"seed", "sft.lora.r", "probe.models.sft", "model.dtype", "dpo", "probe.suites.heldout.path",
                     "probe.suites.natural.path"}
    assert params.seed == 0 and "__getattribute__" not in type(params).__dict__
    files = ["models/base", "metrics/clean.json"]
    assert dag.undeclared_params(
        {"paths.base_model", "paths.metrics", "paths.pairs", "sft.lora.r", "model.dtype"}, ["sft", "model.device"], files, params
    ) == ["model.dtype", "paths.pairs"]


# ---------------------------------------------------------------------------------------
# Early cutoff


def test_a_code_change_that_keeps_the_outputs_reruns_only_that_stage(project: Path):
    def repro(*targets: str) -> str:
        proc = subprocess.run(["dvc", "repro", *targets], cwd=project, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert {"generate", "clean", "sft"} <= ran_stages(repro("sft"))
    lock = (project / "dvc.lock").read_text()
    append(project / CODE / "stages/clean.py", "\n# a comment changes the code, not what it writes\n")
    again = repro("sft")
    assert ran_stages(again) == {"clean"}, again
    assert "Stage 'sft' didn't change, skipping" in again
    old, new = (yaml.safe_load(text)["stages"] for text in (lock, (project / "dvc.lock").read_text()))
    assert old["clean"]["deps"] != new["clean"]["deps"]  # clean's code dep hash moved ...
    data = [[o for o in lock["clean"]["outs"] if o["path"] == "data/clean"] for lock in (old, new)]
    assert data[0] and data[0] == data[1]  # ... its data output's hash did not (metrics stamp git state)
    assert old["sft"] == new["sft"]


def test_dvc_yaml_declares_every_suite_of_the_params():
    """Each suite of probe.suites is a dep of clean and of every probe stage, and every
    probe stage writes its metrics, samples and failures; the development suite is a dep
    of clean. dvc.yaml lists suites by name, so a suite added to params.yaml needs it."""
    from dvc.repo import Repo

    from tuneline.params import load_params

    params = load_params(REPO / "params.yaml")
    with Repo(str(REPO)) as repo:
        stages = {s.addressing.split(":")[-1]: s for s in repo.index.stages}
    paths = lambda entries: {Path(e.def_path).as_posix() for e in entries}  # noqa: E731
    assert params.paths.dev_suite in paths(stages["clean"].deps)
    for name, suite in params.probe.suites.items():
        assert suite.path in paths(stages["clean"].deps), name
        for model in params.probe.models:
            stage = stages[f"probe@{model}"]
            assert suite.path in paths(stage.deps), (model, name)
            assert {f"metrics/probe/{name}/{model}.json", f"reports/probe/{name}/{model}.samples.jsonl",
                    f"reports/probe/{name}/{model}.failures.jsonl"} <= paths(stage.outs), (model, name)
