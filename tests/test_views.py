"""What DVC shows of the committed results: `dvc metrics show` fits in 250 columns and
prints only numbers (one row per suite and model: two suites, four probe rows), `dvc exp
show --only-changed` after a one-param experiment stays under 64 columns (eight metric
columns per changed suite and model), and `dvc plots show` draws the declared plots (the custom rates template).

These run the real `dvc` on the repository's committed metrics (and, for `exp show`, on a
scratch git repository holding them, with a lock file and an experiment commit made from
the pipeline's own graph)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def dvc(*args: str, cwd: Path) -> str:
    done = subprocess.run([*DVC, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def declared_metrics(root: Path) -> list[Path]:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return sorted(Path(out.fs_path) for stage in repo.index.stages for out in stage.outs if out.metric)


def test_metrics_show_prints_only_numbers_in_250_columns() -> None:
    shown = dvc("metrics", "show", cwd=REPO)
    lines = shown.rstrip("\n").splitlines()
    assert max(map(len, lines)) <= 250, "\n" + shown
    for path in declared_metrics(REPO):
        data = json.loads(path.read_text(encoding="utf-8"))

        def leaves(value):  # noqa: ANN001, ANN202
            if isinstance(value, dict):
                for v in value.values():
                    yield from leaves(v)
            else:
                yield value

        # numbers only; null is a rate with nothing to score (facts accuracy of a model whose
        # outputs state no checkable fact), never text
        assert all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in leaves(data)), path
        assert any(v is not None for v in leaves(data)), path
        assert "provenance" not in data and "failure_causes" not in data, path
    assert "sha256" not in shown and "git" not in shown and "versions" not in shown


def _downstream(repo, name: str) -> set[str]:  # noqa: ANN001
    import networkx as nx

    graph = repo.index.graph
    start = next(s for s in graph if s.name == name)
    # edges point from a stage to the stages it depends on
    return {s.name for s in nx.ancestors(graph, start)} | {name}


def _lock(repo, root: Path, changed: set[str], marker: str) -> dict:  # noqa: ANN001
    """A dvc.lock for every stage: deps and outs that the experiment changes get ``marker``
    as their hash, all others a fixed one."""
    changed_outs = [
        Path(out.fs_path) for stage in repo.index.stages if stage.name in changed for out in stage.outs
    ]

    def entry(item) -> dict:  # noqa: ANN001
        path = Path(item.fs_path)
        # a directory dep changes with any changed out inside it, an out inside a changed dir too
        moved = any(path == out or out in path.parents or path in out.parents for out in changed_outs)
        return {"path": path.relative_to(root).as_posix(), "md5": (marker if moved else "0") * 32, "size": 1}

    stages = {}
    for stage in repo.index.stages:
        stages[stage.name] = {
            "cmd": stage.cmd,
            "deps": [entry(d) for d in stage.deps if not d.def_path.startswith("params")],
            "outs": [entry(o) for o in stage.outs],
        }
    return {"schema": "2.0", "stages": stages}


def test_exp_show_only_changed_after_one_param_stays_under_64_columns(tmp_path: Path) -> None:
    """A one-param sft experiment changes every number of sft and everything after it
    (the worst case); `dvc exp show --only-changed` still fits in under 64 columns."""
    from dvc.repo import Repo

    work = tmp_path / "repo"
    work.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, work / name)
    shutil.copytree(REPO / ".dvc", work / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for path in declared_metrics(REPO):
        target = work / path.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=work, check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "t@example.invalid")
    git("config", "user.name", "t")
    with Repo(str(work)) as repo:
        changed = _downstream(repo, "sft")
        before, after = _lock(repo, work, changed, "0"), _lock(repo, work, changed, "1")
        changed_metrics = [
            Path(out.fs_path) for stage in repo.index.stages if stage.name in changed
            for out in stage.outs if out.metric
        ]
    (work / "dvc.lock").write_text(yaml.safe_dump(before, sort_keys=False), encoding="utf-8")
    git("add", "-A")
    git("commit", "-qm", "baseline")

    params = yaml.safe_load((work / "params.yaml").read_text(encoding="utf-8"))
    params["sft"]["trainer"]["learning_rate"] = 1e-4
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for path in changed_metrics:
        data = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({k: (v if k == "n" else v + 0.01) for k, v in data.items()}), encoding="utf-8")
    (work / "dvc.lock").write_text(yaml.safe_dump(after, sort_keys=False), encoding="utf-8")
    git("add", "-A")
    git("commit", "-qm", "experiment")

    shown = dvc("exp", "show", "--only-changed", "-n", "2", "--csv", cwd=work)
    header = next(csv.reader(io.StringIO(shown)))
    assert "sft.trainer.learning_rate" in header and "train_loss" in " ".join(header)
    assert len(header) < 64, header


def test_plots_show_draws_losses_and_rates_with_the_custom_template(tmp_path: Path) -> None:
    shown = json.loads(dvc("plots", "show", "--json", "-o", str(tmp_path / "plots"), cwd=REPO))["data"]
    assert {"sft_loss", "dpo_loss", "compare_rates"} <= set(shown)
    sft = shown["sft_loss"][0]["content"]["data"]["values"]
    assert {row["filename"] for row in sft} == {"loss.tsv", "eval/loss.tsv"}  # train and eval on one chart
    rates = shown["compare_rates"][0]["content"]
    assert rates["facet"]["column"]["field"] == "outcome"  # .dvc/plots/rates_interval.json, not a default
    rows = rates["data"]["values"]
    assert rows and all({"model", "outcome", "rate", "ci_low", "ci_high", "rev"} <= set(row) for row in rows)
    assert all(row["ci_low"] <= row["rate"] <= row["ci_high"] for row in rows)


def test_readme_exp_show_drop_regex_drops_what_it_names() -> None:
    """The README's `dvc exp show --drop` pattern drops the dependency hash columns and
    Created and nothing else: every params and metrics column stays (DVC matches the
    pattern at the start of each column name)."""
    from dvc.repo import Repo

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("dvc exp show") and "--drop" in line)
    pattern = line.split("--drop", 1)[1].split("'")[1]
    full = next(csv.reader(io.StringIO(dvc("exp", "show", "-n", "1", "--csv", cwd=REPO))))
    kept = next(csv.reader(io.StringIO(dvc("exp", "show", "-n", "1", "--csv", "--drop", pattern, cwd=REPO))))
    with Repo(str(REPO)) as repo:
        deps = {Path(d.fs_path).relative_to(REPO).as_posix() for s in repo.index.stages for d in s.deps
                if not d.def_path.startswith("params")}
    dropped = set(full) - set(kept)
    assert dropped == {c for c in full if c in deps or c == "Created"}, sorted(dropped ^ {c for c in full if c in deps})
    assert "Created" in dropped and any("train_loss" in c for c in kept) and "sft.trainer.learning_rate" in kept
