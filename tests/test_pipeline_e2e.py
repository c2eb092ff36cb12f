"""The whole pipeline under `dvc repro` in a temporary git repo, with the tiny model.

Checks: every stage runs and writes its outputs; a second `dvc repro` runs nothing;
changing one probe param (a suite's limit) re-runs only the probe stages and compare.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY_OVERRIDES = {
    "generate": {"sources": {"template": {"max_records": 48}}},
    "clean": {"min_kept": 10, "max_rejected_fraction": 0.9},
    "sft": {
        "max_seq_len": 2048, "max_records": 12, "min_optimizer_steps": 0, "lora": {"r": 4, "alpha": 8},
        "trainer": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "logging_steps": 1, "save_steps": 2},
    },
    "pairs": {"max_records": 8},
    "dpo": {
        "max_length": 2048, "max_pairs": 8, "min_optimizer_steps": 0, "lora": {"r": 4, "alpha": 8},
        "trainer": {
            "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "logging_steps": 1, "save_steps": 2,
        },
    },
    "probe": {"suites": {"heldout": {"limit": 5}, "natural": {"limit": 3}}, "max_new_tokens": 8, "batch_size": 5},
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def make_project(tmp: Path, tiny_model_dir: Path, overrides: dict) -> Path:
    """A copy of this project's tracked files in a fresh git repo, with tiny params."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    project = tmp / "project"
    for rel in files:
        src = REPO / rel
        if rel.startswith(("metrics/", "reports/")) or rel == "dvc.lock" or not src.is_file():
            continue
        dst = project / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params = _merge(params, {"base": {"source": str(tiny_model_dir)}, **overrides})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], project)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A"], project)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"], project)
    return project


def ran_stages(output: str) -> set[str]:
    return {
        line.split("'")[1]
        for line in output.splitlines()
        if line.startswith("Running stage '")
    }


def test_dvc_repro_end_to_end(tiny_model_dir, tmp_path):
    project = make_project(tmp_path, tiny_model_dir, TINY_OVERRIDES)
    first = _run(["dvc", "repro"], project)
    stages = ran_stages(first.stdout)
    assert {"base", "generate", "clean", "sft", "pairs", "dpo", "compare"} <= stages, first.stdout
    assert {"probe@base", "probe@sft", "probe@dpo", "probe@dpo+guided"} <= stages
    for rel in ["metrics/clean.json", "metrics/sft.json", "metrics/dpo.json", "metrics/compare.json",
                "reports/compare.md", "reports/probe/heldout/dpo.samples.jsonl",
                "reports/probe/natural/dpo.samples.jsonl", "metrics/probe/natural/dpo+guided.json"]:
        assert (project / rel).is_file(), rel
    assert sum(1 for _ in open(project / "reports/probe/natural/base.samples.jsonl")) == 3
    compare = json.loads((project / "metrics/compare.json").read_text())
    assert set(compare) == {"heldout", "natural"}, "compare reports every suite"
    shown = json.loads(subprocess.run(["dvc", "metrics", "show", "--json"], cwd=project, capture_output=True,
                                      text=True, check=True).stdout)
    files = {f for rev in shown.values() for f in (rev.get("data") or {})}
    assert {"metrics/probe/heldout/sft.json", "metrics/probe/natural/sft.json"} <= files, files

    second = _run(["dvc", "repro"], project)
    assert ran_stages(second.stdout) == set(), second.stdout

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["probe"]["suites"]["natural"]["limit"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(["dvc", "repro"], project)
    assert ran_stages(third.stdout) == {"probe@base", "probe@sft", "probe@dpo", "probe@dpo+guided", "compare"}, third.stdout
    assert sum(1 for _ in open(project / "reports/probe/natural/base.samples.jsonl")) == 4
