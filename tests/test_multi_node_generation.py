"""Data-parallel generation: `tuneline probe` / `tuneline generate` (teacher) with
compute.num_processes 2 run under accelerate launch on CPU (gloo), each process generating
a share of the prompts; rank 0 writes the same bytes as a single-process run, greedy or
sampled (each prompt's samples are seeded from its index in the full list)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tuneline import parallel

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "data" / "seed"
TYPES = ["itinerary", "checklist", "budget"]
CITIES = ["Lisbon", "Tokyo", "Paris"]


def test_shares_cover_the_prompts_in_order() -> None:
    for count in (0, 1, 5, 7, 8):
        for size in (1, 2, 3, 4):
            shares = [parallel.share(count, rank, size) for rank in range(size)]
            assert [i for s in shares for i in s] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _run(directory: Path, args: list[str], launch_cpu: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    if launch_cpu:
        env["TUNELINE_LAUNCH_CPU"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", *args, "--params", "params.yaml"],
        cwd=directory, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _files(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def _probe_project(directory: Path, model_dir: Path, processes: int) -> Path:
    directory.mkdir(parents=True)
    shutil.copytree(model_dir, directory / "models/base")
    lines = [
        {
            "id": f"p{i:02d}",
            "instruction": "Plan a trip. " * (1 + (i * 5) % 7) + f"Make a {TYPES[i % 3]} for {CITIES[i % 3]}.",
            "expect": {"payload_type": TYPES[i % 3], "payload.destination": CITIES[i % 3]},
        }
        for i in range(7)  # odd: the shares differ in size
    ]
    (directory / "suite.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    params = {
        "paths": {"seed_dir": str(SEED), "schema_file": str(SEED / "contract.schema.json"), "dev_suite": None},
        "model": {"device": "cpu", "dtype": "float32"},
        "compute": {"num_processes": processes},
        "probe": {"models": {"base": "models/base"}, "suites": {"heldout": {"path": "suite.jsonl"}}, "batch_size": 3,
                  "max_new_tokens": 8},
        "compare": {"pairs": []},
    }
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return directory


@pytest.mark.slow
def test_probe_on_two_cpu_processes_writes_the_single_process_bytes(tmp_path: Path, noisy_model_dir: Path) -> None:
    one = _probe_project(tmp_path / "one", noisy_model_dir, 1)
    two = _probe_project(tmp_path / "two", noisy_model_dir, 2)
    _run(one, ["probe", "base"], launch_cpu=True)
    done = _run(two, ["probe", "base"], launch_cpu=True)
    assert "accelerate.commands.launch" in done.stderr and "--num_processes 2" in done.stderr
    assert "rank 1/2" in done.stderr  # the second process generated its share
    assert done.stdout.count("\"contract_sha256\":") == 1  # the result, printed by rank 0 only
    samples = "reports/probe/heldout/base.samples.jsonl"
    texts = [json.loads(line)["output"] for line in (one / samples).read_text().splitlines()]
    assert len(set(texts)) > 3  # the outputs depend on the prompt
    for name in (samples, "reports/probe/heldout/base.failures.jsonl"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert _files(one) == _files(two)
    m1, m2 = (json.loads((d / "metrics/probe/heldout/base.json").read_text()) for d in (one, two))
    timing = {"tokens_per_s", "generation_s"}
    assert {k: v for k, v in m1.items() if k not in timing} == {k: v for k, v in m2.items() if k not in timing}


def _teacher_project(
    directory: Path, model_dir: Path, processes: int, temperature: float = 0.0, n_samples: int = 1
) -> Path:
    directory.mkdir(parents=True)
    params = {
        "paths": {
            "seed_dir": str(SEED), "schema_file": str(SEED / "contract.schema.json"),
        },
        "model": {"device": "cpu", "dtype": "float32"},
        "compute": {"num_processes": processes},
        "generate": {"sources": {
            "template": {"enabled": False},
            "teacher": {
                "enabled": True, "model": str(model_dir), "shots": 1, "n_samples": n_samples, "temperature": temperature,
                "max_prompts": 5, "max_new_tokens": 8, "batch_size": 2,
            },
        }},
    }
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return directory


@pytest.mark.slow
def test_teacher_on_two_cpu_processes_writes_the_single_process_bytes(tmp_path: Path, noisy_model_dir: Path) -> None:
    one = _teacher_project(tmp_path / "one", noisy_model_dir, 1)
    two = _teacher_project(tmp_path / "two", noisy_model_dir, 2)
    _run(one, ["generate"], launch_cpu=False)
    done = _run(two, ["generate"], launch_cpu=True)
    assert "accelerate.commands.launch" in done.stderr and "rank 1/2" in done.stderr
    out = "data/generated/sft.jsonl"
    records = [json.loads(line) for line in (one / out).read_text().splitlines()]
    assert len(records) == 5 and len({r["completion"] for r in records}) > 2
    assert (one / out).read_bytes() == (two / out).read_bytes()
    assert _files(one) == _files(two)


@pytest.mark.slow
def test_sampled_teacher_on_two_cpu_processes_writes_the_single_process_bytes(
    tmp_path: Path, noisy_model_dir: Path
) -> None:
    """Sampling (temperature 1, two samples a prompt): rank 1's prompts get the seeds they
    get in a one-process run, so the bytes are the same."""
    one = _teacher_project(tmp_path / "one", noisy_model_dir, 1, temperature=1.0, n_samples=2)
    two = _teacher_project(tmp_path / "two", noisy_model_dir, 2, temperature=1.0, n_samples=2)
    _run(one, ["generate"], launch_cpu=False)
    done = _run(two, ["generate"], launch_cpu=True)
    assert "accelerate.commands.launch" in done.stderr and "rank 1/2" in done.stderr
    out = "data/generated/sft.jsonl"
    records = [json.loads(line) for line in (one / out).read_text().splitlines()]
    assert len(records) == 10
    assert len({r["completion"] for r in records}) > 5  # sampled: the two samples of a prompt differ
    assert (one / out).read_bytes() == (two / out).read_bytes()
    assert _files(one) == _files(two)
