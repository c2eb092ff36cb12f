"""`tuneline verify dag` and `tuneline verify determinism` on the legacy repository of
test_archive (python scripts as stages), and on this project's own pipeline (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_archive import LEGACY, copy_of_template, dvc_repro, tuneline, write
from tuneline import archive, verify


@pytest.fixture
def repo(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_of_template(tmp_path_factory, tmp_path / "repo")


def test_planted_undeclared_read_is_caught_then_kept_once_declared(repo):
    clean = tuneline(repo, "verify", "dag")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    for stage in ("prep", "train", "evaluate@a", "evaluate@b"):
        assert stage in clean.stdout

    # train starts reading a "legacy" config without declaring it: the plan cannot know
    train = repo / "src/train.py"
    train.write_text(train.read_text() + 'open("configs/config_v2.yaml").read()\n')
    assert "configs/config_v2.yaml" in {c.path for c in archive.make_plan(repo).candidates}
    caught = tuneline(repo, "verify", "dag", "train", "--json")
    assert caught.returncode == 1, caught.stderr
    (report,) = json.loads(caught.stdout)
    assert report["undeclared_reads"] == [{"path": "configs/config_v2.yaml", "how": "opened for reading"}]
    assert report["undeclared_writes"] == [] and report["exit_code"] == 0
    assert "train" in caught.stderr

    dvc_yaml = repo / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "deps: [src/train.py, data/prepared.csv]", "deps: [src/train.py, data/prepared.csv, configs/config_v2.yaml]"
    ))
    assert tuneline(repo, "verify", "dag", "train").returncode == 0
    assert {c.path for c in archive.make_plan(repo).candidates} == LEGACY - {"configs/config_v2.yaml"}


def test_dag_check_sees_native_reads_imports_writes_and_missing_outputs(repo):
    write(repo, "scripts/helper_old.py", "VALUE = 1\n")
    train = repo / "src/train.py"
    train.write_text(train.read_text() + (
        "import subprocess, sys\n"
        "subprocess.run('cat data/old_dataset.csv > /dev/null', shell=True, check=True)\n"
        "sys.path.insert(0, 'scripts')\n"
        "import helper_old\n"
        "open('train.log', 'w').write('done')\n"
        "open(sys.argv[1] + '/stray.txt', 'w').write('x')\n"
    ))
    dvc_yaml = repo / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace("src/train.py\n", f"src/train.py {repo}\n", 1))
    evaluate = repo / "src/evaluate.py"
    evaluate.write_text(evaluate.read_text().replace("name = sys.argv[1]", "name = sys.argv[1]\nopen('data/prepared.csv')"))

    reports = {r.stage: r for r in verify.verify_dag(repo, ["train", "evaluate"])}
    train_report = reports["train"]
    reads = {f.path: f.how for f in train_report.undeclared_reads}
    assert reads == {
        "data/old_dataset.csv": "read outside Python's audit hook (native code)",
        "scripts/helper_old.py": "imported",
    }
    writes = {f.path: f.how for f in train_report.undeclared_writes}
    assert writes == {"train.log": "created", "stray.txt": "written into the real workspace, not the scratch copy"}
    assert train_report.exit_code == 0 and not train_report.ok
    # evaluate reads prep's output without declaring it: absent from the copy, so it fails
    for name in ("evaluate@a", "evaluate@b"):
        assert reports[name].exit_code != 0 and "FileNotFoundError" in reports[name].output_tail
        assert [(f.path, f.how) for f in reports[name].undeclared_reads] == [
            ("data/prepared.csv", "opened for reading, but absent from the copy (not a declared dep)")
        ]
    assert (repo / "stray.txt").exists()  # the one write the copy cannot contain


def test_determinism_passes_then_names_the_differing_file(repo):
    proc = tuneline(repo, "verify", "determinism", "train")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "models" in proc.stdout and "metrics/train.json" in proc.stdout

    train = repo / "src/train.py"
    train.write_text(train.read_text() + "open('models/run_id.txt', 'w').write(os.urandom(8).hex())\n")
    dvc_repro(repo)
    checks, code, _ = verify.verify_determinism(repo, "train")
    assert code == 0
    by_path = {c.path: c for c in checks}
    assert by_path["metrics/train.json"].same
    models = by_path["models"]
    assert not models.same and models.lock.endswith(".dir") and models.fresh.endswith(".dir")
    (changed,) = models.files
    assert changed["path"] == "models/run_id.txt"
    assert changed["diff"][:2] == ["--- dvc.lock version", "+++ re-run"]
    assert [line[0] for line in changed["diff"][3:]] == ["-", "+"]
    proc = tuneline(repo, "verify", "determinism", "train")
    assert proc.returncode == 1 and "not deterministic" in proc.stderr


def test_failures_name_the_missing_path(repo):
    # a dep the stage only stat-s leaves no open event; the failed output still names it
    evaluate = repo / "src/evaluate.py"
    evaluate.write_text(evaluate.read_text().replace(
        "name = sys.argv[1]", "name = sys.argv[1]\nif not os.path.isfile('data/prepared.csv'): sys.exit('data/prepared.csv: missing')"
    ))
    (report,) = verify.verify_dag(repo, ["evaluate@a"])
    assert report.exit_code == 1 and not report.ok
    assert any(note.startswith("its output names data/prepared.csv") for note in report.notes), report.notes

    proc = tuneline(repo, "verify", "dag", "nope")
    assert proc.returncode == 2 and "stage 'nope'" in proc.stderr and "evaluate@a" in proc.stderr
    (repo / "data/prepared.csv").unlink()
    proc = tuneline(repo, "verify", "dag", "train")
    assert proc.returncode == 1 and "data/prepared.csv" in proc.stderr and "dvc repro" in proc.stderr


@pytest.mark.slow
def test_project_pipeline_reads_and_writes_only_what_it_declares(tiny_model_dir, tmp_path):
    from test_pipeline_e2e import TINY_OVERRIDES, make_project

    project = make_project(tmp_path, tiny_model_dir, TINY_OVERRIDES)
    # Outputs stamp the git commit they were made at (provenance), so the checks run at
    # the commit that wrote dvc.lock.
    dvc_repro(project)
    determinism = tuneline(project, "verify", "determinism", "clean")
    assert determinism.returncode == 0, determinism.stdout + determinism.stderr
    dag = tuneline(project, "verify", "dag", "--json")
    reports = json.loads(dag.stdout)
    problems = [r for r in reports if not r["ok"]]
    assert dag.returncode == 0 and not problems, json.dumps(problems, indent=1) + dag.stderr
    assert {r["stage"] for r in reports} >= {"base", "generate", "clean", "sft", "pairs", "dpo", "compare"}


def test_outputs_differing_only_in_git_stamp_or_metric_timings_count_as_deterministic(tmp_path):
    import hashlib
    import json

    from tuneline.verify import _differs_only_in_run_facts

    old = tmp_path / "old.json"
    new = tmp_path / "new.json"
    old.write_text(json.dumps({"kept": 5, "runtime_s": 1.5, "tokens_per_s": 9.0, "provenance": {"git": {"sha": "a"}, "seed": 0}}))
    md5 = hashlib.md5(old.read_bytes()).hexdigest()
    new.write_text(json.dumps({"kept": 5, "runtime_s": 2.5, "tokens_per_s": 7.0, "provenance": {"git": {"sha": "b"}, "seed": 0}}))
    assert _differs_only_in_run_facts(old, new, md5, metric=True)
    assert not _differs_only_in_run_facts(old, new, md5, metric=False)  # timings count outside metrics
    new.write_text(json.dumps({"kept": 6, "runtime_s": 1.5, "tokens_per_s": 9.0, "provenance": {"git": {"sha": "b"}, "seed": 0}}))
    assert not _differs_only_in_run_facts(old, new, md5, metric=True)
    new.write_text(json.dumps({"kept": 5, "runtime_s": 1.5, "tokens": 10, "provenance": {"git": {"sha": "a"}, "seed": 0}}))
    assert not _differs_only_in_run_facts(old, new, md5, metric=True)
