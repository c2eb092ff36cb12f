"""multi-GPU scaling: `tuneline sft` (and `tuneline dpo`) on 1 GPU vs N GPUs, from params alone.

Each run is the real command, `python -m tuneline.cli <stage> --params <file>`, with
`compute.num_processes` set to 1 or N (`compute.distributed`: ddp, or fsdp with
--fsdp); N > 1 re-runs itself under `accelerate launch`. The base is a random-initialized
model of a public shape saved to local disk with the embedded model's tokenizer; data is
the pipeline's clean records. The per-device batch is the same in every run, so N GPUs
take N times the examples per optimizer step (data parallel), and tokens/s is the
stage's own figure: non-padding tokens seen (sft; dpo: the plan's tokens) over the
seconds of `trainer.train()`, warm-up included.

    python bench/multi_gpu.py --shape qwen2.5-0.5b --tokenizer models/base \
        --data data/clean/train.jsonl --gpus 2 --stages sft,dpo --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from common import build_random_model, n_params, print_table, write_result

REPO = Path(__file__).resolve().parents[1]


def make_base(shape: str, tokenizer_dir: str, out: Path) -> int:
    """A random model of ``shape`` with the tokenizer, saved as a tuneline base directory."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = build_random_model(shape, tokenizer, torch.bfloat16, "cpu")
    count = n_params(model)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    # A stable content id, so each run does not hash the whole checkpoint.
    (out / "provenance.json").write_text(json.dumps({"content_sha256": f"random-{shape}-seed0"}))
    return count


def params_for(work: Path, base: Path, name: str, args: argparse.Namespace, processes: int, distributed: str,
               sft_model: Path | None = None) -> Path:
    run = work / name
    paths = {
        "schema_file": str(REPO / "data/seed/contract.schema.json"),
        "clean": str(work / "data/clean"),
        "generated": str(work / "data/generated"),
        "pairs": str(work / "data/pairs"),
        "base_model": str(base),
        "sft_model": str(sft_model or run / "models/sft"),
        "dpo_model": str(run / "models/dpo"),
        "checkpoints": str(run / "models/checkpoints"),
        "metrics": str(run / "metrics"),
    }
    common = {"min_optimizer_steps": 0, "logging_steps": 10, "warmup_ratio": 0.05, "trainer": {"save_strategy": "no"}}
    data = {
        "paths": paths,
        "model": {"device": "cuda", "format": "completion"},
        "compute": {"num_processes": processes, "distributed": distributed},
        "sft": {**common, "per_device_batch_size": args.batch, "max_seq_len": 1024, "num_epochs": args.epochs,
                "eval_each_epoch": False, "max_records": None},
        "dpo": {**common, "per_device_batch_size": args.dpo_batch, "max_length": 1024,
                "num_epochs": args.dpo_epochs, "max_pairs": None},
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_stage(stage: str, params_path: Path, timeout: int) -> tuple[dict[str, Any], float]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tuneline.cli", stage, "--params", str(params_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-6000:])
        raise SystemExit(f"{stage} ({params_path}) exited {done.returncode}")
    metrics = json.loads((params_path.parent / "metrics" / f"{stage}.json").read_text())
    return metrics, wall


def row(stage: str, processes: int, distributed: str, metrics: dict[str, Any], wall: float) -> dict[str, Any]:
    plan = metrics["plan"]
    return {
        "stage": stage, "gpus": processes, "mode": distributed if processes > 1 else "single",
        "effective_batch": plan["effective_batch"], "steps": metrics["steps"], "tokens": metrics["tokens_seen"],
        "train_s": metrics["runtime_s"], "tokens_per_s": metrics["tokens_per_s"], "wall_s": round(wall, 1),
        "train_loss": metrics["train_loss"],
    }


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--data", default="data/clean/train.jsonl")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--fsdp", action="store_true", help="also run sft with compute.distributed: fsdp")
    ap.add_argument("--batch", type=int, default=16, help="sft per-device batch")
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--dpo-batch", type=int, default=8)
    ap.add_argument("--dpo-epochs", type=float, default=1.0)
    ap.add_argument("--timeout", type=int, default=400, help="seconds per stage run")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs; {torch.cuda.device_count()} visible")

    work = Path(args.work or tempfile.mkdtemp(prefix="tuneline-multi-gpu-"))
    base = work / "base"
    count = make_base(args.shape, args.tokenizer, base)
    (work / "data/clean").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.data, work / "data/clean/train.jsonl")
    stages = args.stages.split(",")
    rows: list[dict[str, Any]] = []
    runs = [(1, "ddp"), (args.gpus, "ddp")] + ([(args.gpus, "fsdp")] if args.fsdp else [])

    for processes, distributed in runs:
        name = f"sft-{processes}-{distributed}"
        metrics, wall = run_stage("sft", params_for(work, base, name, args, processes, distributed), args.timeout)
        rows.append(row("sft", processes, distributed, metrics, wall))
        print(json.dumps(rows[-1]), flush=True)

    if "dpo" in stages:
        sft_model = work / "sft-1-ddp/models/sft"
        pairs_params = params_for(work, base, "pairs", args, 1, "ddp", sft_model)
        run_stage("pairs", pairs_params, args.timeout)
        for processes, distributed in runs[:2]:
            name = f"dpo-{processes}-{distributed}"
            path = params_for(work, base, name, args, processes, distributed, sft_model)
            metrics, wall = run_stage("dpo", path, args.timeout)
            rows.append(row("dpo", processes, distributed, metrics, wall))
            print(json.dumps(rows[-1]), flush=True)

    for r in rows:
        single = next(x for x in rows if x["stage"] == r["stage"] and x["gpus"] == 1)
        r["scaling"] = round(r["tokens_per_s"] / single["tokens_per_s"], 3)
        r["efficiency"] = round(r["scaling"] / r["gpus"], 3)
    print_table(f"multi-GPU scaling, {args.shape} ({count / 1e6:.0f}M params), {torch.cuda.get_device_name(0)}", rows)
    setup = {**vars(args), "n_params": count, "records": Path(args.data).read_text(encoding="utf-8").count("\n"),
             "lora": "r=16 alpha=32 dropout=0.1 all-linear", "dtype": "bfloat16", "attention": "sdpa",
             "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
             "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "accelerate")}}
    write_result(f"multi_gpu_{args.shape}", rows, setup, args.out)


if __name__ == "__main__":
    main()
