"""`tuneline archive` on a small git + DVC repository with legacy files beside its pipeline.

The pipeline (python scripts as stages): prep (data/raw/ + data/lookup.csv, a symlink to
legacy/lookup_v3.csv) -> train (models/ directory, metrics/train.json) -> evaluate@{a,b}.
Legacy files: two old scripts, an old dataset, a v2 config and an old checkpoint dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from tuneline import archive
from tuneline.errors import InputError, TunelineError
from tuneline.params import ArchiveParams

PY = sys.executable
TUNELINE = str(Path(sys.executable).parent / "tuneline")
LEGACY = {
    "scripts/prep_v2.py",
    "scripts/train_old.py",
    "data/old_dataset.csv",
    "configs/config_v2.yaml",
    "checkpoints/old/weights.bin",
    "checkpoints/old/config.json",
}


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def dvc_repro(root: Path, **kwargs) -> None:
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(str(root)) as repo:
        repo.reproduce(all_pipelines=True, **kwargs)


PIPELINE = f"""
stages:
  prep:
    cmd: {PY} src/prep.py
    deps: [src/prep.py, data/raw, data/lookup.csv]
    params: [prep.scale]
    outs: [data/prepared.csv]
  train:
    cmd: {PY} src/train.py
    deps: [src/train.py, data/prepared.csv]
    outs: [models]
    metrics:
      - metrics/train.json:
          cache: false
  evaluate:
    foreach: ${{models}}
    do:
      cmd: {PY} src/evaluate.py ${{item}}
      deps: [src/evaluate.py, models]
      outs:
        - reports/${{item}}.txt:
            cache: false
"""


def build_repo(root: Path) -> Path:
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "dev@example.com")
    git(root, "config", "user.name", "dev")
    subprocess.run([PY, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    subprocess.run([PY, "-m", "dvc", "config", "core.analytics", "false"], cwd=root, check=True)
    write(root, "params.yaml", "prep:\n  scale: 2\nmodels: [a, b]\n")
    write(root, "data/raw/input.csv", "x\n1\n2\n3\n")
    write(root, "legacy/lookup_v3.csv", "x,label\n2,two\n")
    os.symlink("../legacy/lookup_v3.csv", root / "data/lookup.csv")
    write(root, "src/prep.py", """
        import yaml
        scale = yaml.safe_load(open("params.yaml"))["prep"]["scale"]
        rows = open("data/raw/input.csv").read().split()[1:]
        open("data/lookup.csv").read()
        with open("data/prepared.csv", "w") as f:
            f.write("x\\n" + "\\n".join(str(int(r) * scale) for r in rows) + "\\n")
    """)
    write(root, "src/train.py", """
        import json, os
        rows = [int(r) for r in open("data/prepared.csv").read().split()[1:]]
        os.makedirs("models", exist_ok=True)
        tmp = "models/.model.json.tmp"
        with open(tmp, "w") as f:
            json.dump({"mean": sum(rows) / len(rows)}, f)
        os.replace(tmp, "models/model.json")
        os.makedirs("metrics", exist_ok=True)
        json.dump({"n": len(rows)}, open("metrics/train.json", "w"))
    """)
    write(root, "src/evaluate.py", """
        import json, os, sys
        name = sys.argv[1]
        model = json.load(open("models/model.json"))
        os.makedirs("reports", exist_ok=True)
        open(f"reports/{name}.txt", "w").write(f"{name} {model['mean']}\\n")
    """)
    write(root, "dvc.yaml", PIPELINE)
    write(root, "README.md", "demo\n")
    write(root, "scripts/prep_v2.py", "print('old prep')\n")
    write(root, "scripts/train_old.py", "print('old train')\n")
    write(root, "data/old_dataset.csv", "x\n9\n")
    write(root, "configs/config_v2.yaml", "lr: 0.1\n")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "pipeline and legacy files")
    (root / "checkpoints/old").mkdir(parents=True)
    (root / "checkpoints/old/weights.bin").write_bytes(bytes(range(256)) * 4)
    write(root, "checkpoints/old/config.json", "{}\n")
    dvc_repro(root)
    git(root, "add", "dvc.lock", "metrics", "reports", ".gitignore", "data/.gitignore")
    git(root, "commit", "-qm", "run pipeline")
    return root


def copy_of_template(factory: pytest.TempPathFactory, target: Path) -> Path:
    """A fresh copy of the legacy repository (git, DVC cache and outputs included); the
    template is built once per test session and shared by the test modules using it."""
    template = factory.getbasetemp() / "legacy-template"
    if not (template / "dvc.lock").exists():
        shutil.rmtree(template, ignore_errors=True)
        build_repo(template)
    shutil.copytree(template, target, symlinks=True)
    return target


@pytest.fixture
def repo(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    return copy_of_template(tmp_path_factory, tmp_path / "repo")


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file outside .git/.dvc/archive (symlinks by their target text)."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in {".git", ".dvc", "archive"}]
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            data = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            digest[rel] = hashlib.sha256(data).hexdigest()
    return digest


def tuneline(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([TUNELINE, *args], cwd=root, capture_output=True, text=True, env=env)


def test_plan_lists_exactly_the_legacy_files(repo: Path):
    proc = tuneline(repo, "archive", "plan", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert {c["path"] for c in plan["candidates"]} == LEGACY
    by_path = {c["path"]: c for c in plan["candidates"]}
    assert by_path["scripts/prep_v2.py"]["git_status"] == "clean"
    assert by_path["scripts/prep_v2.py"]["last_commit"]  # "<hash> <date>" of the commit that added it
    assert "older version of src/prep.py" in by_path["scripts/prep_v2.py"]["reason"]
    assert by_path["checkpoints/old/weights.bin"] | {"git_status": "untracked", "size": 1024, "last_commit": None} == (
        by_path["checkpoints/old/weights.bin"]
    )
    assert plan["totals"]["candidates"] == len(LEGACY)
    assert plan["totals"]["candidate_bytes"] == sum(c["size"] for c in plan["candidates"])
    # legacy/lookup_v3.csv is reached through data/lookup.csv, a declared dep (a symlink).
    assert "legacy/lookup_v3.csv" not in by_path

    table = tuneline(repo, "archive", "plan")
    assert table.returncode == 0, table.stderr
    assert "6 candidate(s)" in table.stdout and "configs/config_v2.yaml" in table.stdout


def test_keep_set_comes_from_params(repo: Path):
    params = repo / "params.yaml"
    keep = [*ArchiveParams().keep, "configs/**", "scripts/*.py"]
    params.write_text(params.read_text() + yaml.safe_dump({"archive": {"keep": keep}}))
    plan = archive.make_plan(repo)
    assert {c.path for c in plan.candidates} == LEGACY - {"configs/config_v2.yaml", "scripts/prep_v2.py", "scripts/train_old.py"}
    params.write_text("prep:\n  scale: 2\nmodels: [a, b]\narchive:\n  keep: 3\n  kept: []\n")
    with pytest.raises(InputError) as info:
        archive.make_plan(repo)
    assert "archive.keep" in str(info.value) and "archive.kept: unknown key" in str(info.value)


def test_apply_then_restore_round_trips_byte_for_byte(repo: Path):
    before = tree_digest(repo)
    dvc_yaml_sha = hashlib.sha256((repo / "dvc.yaml").read_bytes()).hexdigest()
    manifest = archive.apply(repo)
    assert manifest["state"] == "applied" and manifest["verification"]["ok"]
    assert manifest["dvc_yaml_sha256"] == dvc_yaml_sha
    archived = repo / "archive" / manifest["id"]
    for entry in manifest["entries"]:
        assert not os.path.lexists(repo / entry["path"]), entry["path"]
        moved = archived / "files" / entry["path"]
        assert hashlib.sha256(moved.read_bytes()).hexdigest() == entry["sha256"] == before[entry["path"]]
        assert entry["size"] == moved.stat().st_size and entry["reason"] and manifest["time"]
    assert {e["path"] for e in manifest["entries"]} == LEGACY
    statuses = {e["path"]: e["git_status"] for e in manifest["entries"]}
    assert statuses["data/old_dataset.csv"] == "clean" and statuses["checkpoints/old/config.json"] == "untracked"
    journal = [json.loads(line) for line in (archived / "JOURNAL.jsonl").read_text().splitlines()]
    assert [j["path"] for j in journal] == [e["path"] for e in manifest["entries"]]
    assert not (repo / "checkpoints").exists()  # emptied directories go too
    assert " D scripts/prep_v2.py" in git(repo, "status", "--porcelain")

    # restore one file, then the rest, through the command line
    proc = tuneline(repo, "archive", "restore", manifest["id"], "configs/config_v2.yaml")
    assert proc.returncode == 0, proc.stderr
    assert (repo / "configs/config_v2.yaml").read_text() == "lr: 0.1\n"
    assert archive.load_manifest(repo, manifest["id"])["state"] == "partially_restored"
    proc = tuneline(repo, "archive", "restore", manifest["id"])
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(repo) == before
    assert git(repo, "status", "--porcelain", "--untracked-files=no") == ""
    assert archive.load_manifest(repo, manifest["id"])["state"] == "restored"
    assert not (archived / "files").exists()


def test_restore_refuses_to_overwrite_a_different_file(repo: Path):
    manifest = archive.apply(repo, ["configs", "data/old_dataset.csv"])
    assert {e["path"] for e in manifest["entries"]} == {"configs/config_v2.yaml", "data/old_dataset.csv"}
    write(repo, "configs/config_v2.yaml", "lr: 0.5\n")
    with pytest.raises(TunelineError, match="different file exists there"):
        archive.restore(repo, manifest["id"])
    # nothing moved: the refusal comes before any move
    assert (repo / "configs/config_v2.yaml").read_text() == "lr: 0.5\n"
    assert not (repo / "data/old_dataset.csv").exists()
    # a tampered archive copy is refused too
    archived = repo / "archive" / manifest["id"] / "files" / "data/old_dataset.csv"
    archived.write_text("x\n10\n")
    with pytest.raises(TunelineError, match="does not match the manifest"):
        archive.restore(repo, manifest["id"], ["data/old_dataset.csv"])
    with pytest.raises(InputError, match="not in archive"):
        archive.restore(repo, manifest["id"], ["scripts/prep_v2.py"])


def test_restore_and_purge_refuse_a_parent_that_became_a_symlink_to_elsewhere(repo: Path, tmp_path: Path):
    manifest = archive.apply(repo, ["configs"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (repo / "configs").symlink_to(elsewhere, target_is_directory=True)
    proc = tuneline(repo, "archive", "restore", manifest["id"])
    assert proc.returncode != 0 and "outside the repository" in proc.stderr, proc.stderr
    assert list(elsewhere.iterdir()) == []  # nothing written through the link
    assert (repo / "archive" / manifest["id"] / "files/configs/config_v2.yaml").is_file()
    # the archive's own files directory swapped for a link elsewhere: purge refuses to delete through it
    files = repo / "archive" / manifest["id"] / "files"
    shutil.move(files, tmp_path / "moved-files")
    files.symlink_to(tmp_path / "moved-files", target_is_directory=True)
    assert archive.real_outside(repo.resolve(), files / "configs" / "config_v2.yaml") is not None


def test_apply_that_breaks_the_dag_restores_everything(repo: Path):
    stale = archive.make_plan(repo)  # planned before the pipeline started to read the old dataset
    dvc_yaml = repo / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "deps: [src/prep.py, data/raw, data/lookup.csv]", "deps: [src/prep.py, data/raw, data/lookup.csv, data/old_dataset.csv]"
    ))
    before = tree_digest(repo)
    with pytest.raises(TunelineError) as info:
        archive.execute(repo, stale.candidates)
    message = str(info.value)
    assert "stage 'prep' needs data/old_dataset.csv (missing, and no stage produces it)" in message
    assert tree_digest(repo) == before
    (archive_id,) = archive.list_archives(repo)
    manifest = archive.load_manifest(repo, archive_id)
    assert manifest["state"] == "rolled_back" and not manifest["verification"]["ok"]


def test_interrupted_apply_is_rolled_back_by_restore(repo: Path):
    before = tree_digest(repo)
    killer = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from tuneline import archive
        real_rename, calls = os.rename, []
        def rename(src, dst):
            calls.append(src)
            if len(calls) == 3:
                os._exit(137)  # killed half way: no cleanup runs
            real_rename(src, dst)
        os.rename = rename
        archive.apply(Path(sys.argv[1]))
    """)
    proc = subprocess.run([PY, "-c", killer, str(repo)], capture_output=True, text=True)
    assert proc.returncode == 137, proc.stderr
    (archive_id,) = archive.list_archives(repo)
    manifest = archive.load_manifest(repo, archive_id)
    assert manifest["state"] == "applying" and {e["path"] for e in manifest["entries"]} == LEGACY
    assert tree_digest(repo) != before  # two files were moved before the kill
    with pytest.raises(InputError, match="interrupted"):
        archive.purge(repo, archive_id, yes=True)
    result = archive.restore(repo, archive_id)
    assert set(result["restored"]) == LEGACY
    assert tree_digest(repo) == before


def test_unsafe_paths_are_refused(repo: Path, tmp_path: Path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    os.symlink(outside / "secret.txt", repo / "data/secret_link.txt")
    os.symlink(outside, repo / "external")
    plan = archive.make_plan(repo)
    assert "data/secret_link.txt" not in {c.path for c in plan.candidates}
    assert any(s["path"] == "data/secret_link.txt" and "outside" in s["reason"] for s in plan.skipped)
    refusals = {
        "../outside/secret.txt": "escapes the repository",
        str(outside / "secret.txt"): "escapes the repository",
        "data/../../outside/secret.txt": "escapes the repository",
        "external/secret.txt": "symlinked directory",
        "data/secret_link.txt": "symlink to",
        "data/prepared.csv": "the pipeline needs it: out of stage 'prep'",
        "data/raw/input.csv": "the pipeline needs it: dep of stage 'prep'",
        "legacy/lookup_v3.csv": "symlink target of data/lookup.csv",
        "metrics/train.json": "metrics of stage 'train'",
        "src/train.py": "the pipeline needs it",
        "README.md": "keep set",
        "nonexistent.txt": "does not exist",
    }
    for path, reason in refusals.items():
        with pytest.raises(InputError) as info:
            archive.apply(repo, [path], cwd=repo)
        assert reason in str(info.value), (path, str(info.value))
    assert (outside / "secret.txt").read_text() == "secret\n"
    assert archive.list_archives(repo) == []
    with pytest.raises(InputError, match="not an archive id"):
        archive.restore(repo, "../../etc")

    # a tracked file with uncommitted changes needs --force
    write(repo, "scripts/prep_v2.py", "print('edited')\n")
    with pytest.raises(InputError, match="uncommitted changes"):
        archive.apply(repo, ["scripts"])
    manifest = archive.apply(repo, ["scripts"], force=True)
    assert {e["path"] for e in manifest["entries"]} == {"scripts/prep_v2.py", "scripts/train_old.py"}


def test_purge_waits_for_a_full_repro(repo: Path):
    manifest = archive.apply(repo)
    proc = tuneline(repo, "archive", "purge", manifest["id"], "--yes")
    assert proc.returncode == 1
    assert "refusing to purge" in proc.stderr and "dvc repro --force" in proc.stderr
    assert (repo / "archive" / manifest["id"] / "files").is_dir()

    dvc_repro(repo, force=True)
    with pytest.raises(InputError, match="--yes"):
        archive.purge(repo, manifest["id"], yes=False)
    proc = tuneline(repo, "archive", "purge", manifest["id"], "--yes")
    assert proc.returncode == 0, proc.stderr
    assert not (repo / "archive" / manifest["id"] / "files").exists()
    assert archive.load_manifest(repo, manifest["id"])["state"] == "purged"
    with pytest.raises(InputError, match="purged"):
        archive.restore(repo, manifest["id"])


def test_plan_never_offers_what_the_install_or_ci_needs(repo: Path):
    write(repo, "pyproject.toml", '[project]\nname = "demo"\nreadme = "README.md"\nlicense-files = ["LICENSE"]\n')
    write(repo, "Makefile", "setup:\n\tpip install -c constraints.txt -r tools/requirements.txt\n\tsh tools/bootstrap.sh\n")
    write(repo, "constraints.txt", "pyyaml==6.0.2\n")
    write(repo, "tools/requirements.txt", "pyyaml\n")
    write(repo, "tools/bootstrap.sh", "cp tools/fixtures/seed.csv data/raw/\n")
    write(repo, "tools/fixtures/seed.csv", "x\n")
    write(repo, "tools/old_helper.sh", "echo old\n")
    write(repo, ".ci/run", "make setup\n")
    write(repo, "LICENSE", "MIT\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "install and CI files")
    plan = archive.make_plan(repo)
    assert {c.path for c in plan.candidates} == LEGACY | {"tools/old_helper.sh"}
    for path, reason in {
        "constraints.txt": "the install or CI uses it",
        "tools/fixtures/seed.csv": "named in tools/bootstrap.sh",
        "tools/fixtures": "named in tools/bootstrap.sh",
        "tools/requirements.txt": "named in Makefile",
    }.items():
        with pytest.raises(InputError) as info:
            archive.apply(repo, [path], cwd=repo)
        assert reason in str(info.value), (path, str(info.value))


def test_apply_on_a_fresh_clone_resolves_against_the_dag(repo: Path, tmp_path: Path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo), str(clone))
    assert not (clone / "data/prepared.csv").exists() and not (clone / "models").exists()
    assert archive.resolution_problems(clone) == []
    stale = archive.make_plan(clone)
    tracked_legacy = {p for p in LEGACY if not p.startswith("checkpoints/")}
    assert {c.path for c in stale.candidates} == tracked_legacy
    manifest = archive.apply(clone, ["configs"])
    assert manifest["state"] == "applied" and manifest["verification"]["ok"]
    archive.restore(clone, manifest["id"])

    # a stage that has not run yet starts to need a candidate: the apply is refused and undone
    dvc_yaml = clone / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "deps: [src/train.py, data/prepared.csv]", "deps: [src/train.py, data/prepared.csv, data/old_dataset.csv]"
    ))
    before = tree_digest(clone)
    with pytest.raises(TunelineError) as info:
        archive.execute(clone, stale.candidates)
    assert "stage 'train' needs data/old_dataset.csv (missing, and no stage produces it)" in str(info.value)
    assert tree_digest(clone) == before

    # a dep that nothing produces makes the pipeline unresolved before any move
    dvc_yaml.write_text(dvc_yaml.read_text().replace("data/old_dataset.csv]", "data/never_made.csv]"))
    with pytest.raises(TunelineError, match="does not resolve even before archiving"):
        archive.apply(clone, ["configs"])


def test_apply_on_the_project_after_only_clean_ran(tiny_model_dir: Path, tmp_path: Path):
    from test_pipeline_e2e import TINY_OVERRIDES, make_project

    project = make_project(tmp_path, tiny_model_dir, TINY_OVERRIDES)
    write(project, "scripts/train_v2.py", "print('old')\n")
    write(project, "data/extra.jsonl", "{}\n")
    git(project, "add", "-A")
    git(project, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "legacy")
    proc = subprocess.run(["dvc", "repro", "clean"], cwd=project, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (project / "data/clean").is_dir() and not (project / "models/sft").exists()

    plan = archive.make_plan(project)
    assert {c.path for c in plan.candidates} == {"scripts/train_v2.py", "data/extra.jsonl"}
    manifest = archive.apply(project, ["scripts"])
    assert manifest["state"] == "applied" and not (project / "scripts").exists()

    dvc_yaml = project / "dvc.yaml"
    dvc_yaml.write_text(dvc_yaml.read_text().replace(
        "      - ${paths.clean}/val.jsonl\n", "      - ${paths.clean}/val.jsonl\n      - data/extra.jsonl\n", 1
    ))
    with pytest.raises(TunelineError) as info:
        archive.execute(project, [c for c in plan.candidates if c.path == "data/extra.jsonl"])
    assert "stage 'sft' needs data/extra.jsonl (missing, and no stage produces it)" in str(info.value)
    assert (project / "data/extra.jsonl").is_file()
