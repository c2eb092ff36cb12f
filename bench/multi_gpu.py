"""multi-GPU scaling: `tuneline sft` (and `tuneline dpo`) on 1 GPU vs N GPUs, from params alone.

Each run is the real command, `python -m tuneline.cli <stage> --params <file>`, with
`compute.num_processes` set to 1 or N (`compute.distributed`: ddp, or fsdp);
N > 1 re-runs itself under `accelerate launch`. The base is a random-initialized model of
a public shape saved to local disk with the embedded model's tokenizer; data is the
pipeline's clean records. The per-device batch is the same in every run, so N GPUs take
N times the examples per optimizer step (data parallel). Scaling is the ratio of the
stages' steady-state throughput (``steady_tokens_per_s``: tokens over the optimizer steps
after the third, so start-up and the first steps are left out); the whole-run figure
(``tokens_per_s``, warm-up included) is reported beside it.

``--fsdp-shape`` adds a model that does not fit one GPU: every process's GPU memory is
capped at ``--fsdp-cap-gb`` (``bench/gpucap/sitecustomize.py``, emulating a smaller GPU);
the 1-GPU run of that model is expected to fail for memory and the FSDP run over N GPUs
to finish, with each process's peak GPU memory recorded.

    python bench/multi_gpu.py --shape qwen2.5-1.5b --tokenizer models/base \
        --data data/clean/train.jsonl --gpus 2 --stages sft,dpo \
        --fsdp-shape qwen2.5-7b --fsdp-cap-gb 12 --out bench/results
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
    import gc

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    # initialised on the GPU (fast), saved from there
    model = build_random_model(shape, tokenizer, torch.bfloat16, "cuda" if torch.cuda.is_available() else "cpu")
    count = n_params(model)
    model.save_pretrained(str(out), safe_serialization=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    tokenizer.save_pretrained(str(out))
    # A stable content id, so each run does not hash the whole checkpoint.
    (out / "provenance.json").write_text(json.dumps({"content_sha256": f"random-{shape}-seed0"}))
    return count


def params_for(work: Path, base: Path, name: str, args: argparse.Namespace, processes: int, distributed: str,
               sft_model: Path | None = None, big: bool = False) -> Path:
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
        "reports": str(run / "reports"),
    }
    trainer = {"save_strategy": "no", "logging_steps": 10, "warmup_steps": 0.05,
               **({"ddp_broadcast_buffers": False} if distributed == "ddp" else {})}
    common = {"min_optimizer_steps": 0, "lora": {"dropout": args.lora_dropout}}
    sft = {**common, "max_seq_len": 1024, "eval_each_epoch": False, "max_records": None,
           "padding_free": args.attn == "sdpa_varlen",
           "trainer": {**trainer, "per_device_train_batch_size": args.batch, "num_train_epochs": args.epochs}}
    if big:
        sft.update(max_records=args.fsdp_records)
        sft["trainer"].update(per_device_train_batch_size=args.fsdp_batch, num_train_epochs=1.0,
                              gradient_checkpointing=True)
    data = {
        "paths": paths,
        "model": {"device": "cuda", "format": "completion", "attn_implementation": args.attn},
        "compute": {"num_processes": processes, "distributed": distributed},
        "sft": sft,
        "dpo": {**common, "max_length": 1024, "max_pairs": None, "trainer": {
            **trainer, "per_device_train_batch_size": args.dpo_batch, "num_train_epochs": args.dpo_epochs}},
    }
    run.mkdir(parents=True, exist_ok=True)
    path = run / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_stage(stage: str, params_path: Path, timeout: int, env_extra: dict[str, str] | None = None,
              expect_failure: bool = False) -> tuple[dict[str, Any] | None, float, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env_extra or {})}
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "tuneline.cli", stage, "--params", str(params_path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"{stage} ({params_path}) timed out after {timeout}s", flush=True)
        return None, time.perf_counter() - started, "timeout"
    wall = time.perf_counter() - started
    if done.returncode != 0:
        tail = done.stderr[-3000:]
        if not expect_failure:
            sys.stderr.write(tail)
        print(f"{stage} ({params_path}) exited {done.returncode}", flush=True)
        return None, wall, tail
    record = json.loads((params_path.parent / "reports" / "provenance" / f"{stage}.json").read_text())["run"]
    metrics = {**record, **json.loads((params_path.parent / "metrics" / f"{stage}.json").read_text())}
    return metrics, wall, ""


def row(stage: str, processes: int, distributed: str, metrics: dict[str, Any], wall: float) -> dict[str, Any]:
    plan = metrics["plan"]
    return {
        "stage": stage, "gpus": processes, "mode": distributed if processes > 1 else "single",
        "effective_batch": plan["effective_batch"], "steps": metrics["steps"], "tokens": metrics["tokens_seen"],
        "train_s": metrics["runtime_s"], "tokens_per_s": metrics["tokens_per_s"],
        "steady_steps": metrics.get("steady_steps"), "steady_tokens_per_s": metrics.get("steady_tokens_per_s"),
        "wall_s": round(wall, 1), "train_loss": metrics["train_loss"],
    }


def oom_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "out of memory" in ln.lower() or "OutOfMemoryError" in ln]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "")[:300]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--data", default="data/clean/train.jsonl")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--stages", default="sft,dpo")
    ap.add_argument("--fsdp", action="store_true", help="also run sft of --shape with compute.distributed: fsdp")
    ap.add_argument("--attn", default="sdpa_varlen", help="model.attn_implementation (sdpa_varlen: sft padding-free)")
    ap.add_argument("--lora-dropout", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=32, help="sft per-device batch")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--dpo-batch", type=int, default=8)
    ap.add_argument("--dpo-epochs", type=float, default=1.0)
    ap.add_argument("--fsdp-shape", default=None, help="a model to train with FSDP under --fsdp-cap-gb per GPU")
    ap.add_argument("--fsdp-cap-gb", type=float, default=12.0)
    ap.add_argument("--fsdp-batch", type=int, default=4)
    ap.add_argument("--fsdp-records", type=int, default=128)
    ap.add_argument("--timeout", type=int, default=300, help="seconds per stage run")
    ap.add_argument("--deadline-s", type=float, default=1e9, help="start no run after this many seconds")
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs; {torch.cuda.device_count()} visible")
    began = time.perf_counter()

    def late(what: str) -> bool:
        if time.perf_counter() - began > args.deadline_s:
            print(f"skipping {what}: past --deadline-s", flush=True)
            return True
        return False

    work = Path(args.work or tempfile.mkdtemp(prefix="tuneline-multi-gpu-"))
    base = work / "base"
    stages = args.stages.split(",")
    count = make_base(args.shape, args.tokenizer, base) if {"sft", "dpo"} & set(stages) else 0
    (work / "data/clean").mkdir(parents=True, exist_ok=True)
    shutil.copy(args.data, work / "data/clean/train.jsonl")
    rows: list[dict[str, Any]] = []
    setup = {**vars(args), "n_params": count, "records": Path(args.data).read_text(encoding="utf-8").count("\n"),
             "lora": f"r=16 alpha=32 dropout={args.lora_dropout} all-linear", "dtype": "bfloat16",
             "gpu_names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
             "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft", "accelerate")}}

    def save() -> None:
        for r in rows:
            single = next((x for x in rows if x["stage"] == r["stage"] and x["gpus"] == 1
                           and x.get("shape") == r.get("shape") and "error" not in x), None)
            if single is None or "error" in r:
                continue
            if r.get("steady_tokens_per_s") and single.get("steady_tokens_per_s"):
                r["scaling"] = round(r["steady_tokens_per_s"] / single["steady_tokens_per_s"], 3)
                r["efficiency"] = round(r["scaling"] / r["gpus"], 3)
            r["scaling_whole_run"] = round(r["tokens_per_s"] / single["tokens_per_s"], 3)
        write_result(f"multi_gpu_{args.shape}{args.tag}", rows, setup, args.out)

    runs = [(1, "ddp"), (args.gpus, "ddp")] + ([(args.gpus, "fsdp")] if args.fsdp else [])
    for processes, distributed in runs if "sft" in stages else []:
        if late(f"sft {processes} {distributed}"):
            continue
        name = f"sft-{processes}-{distributed}"
        metrics, wall, err = run_stage("sft", params_for(work, base, name, args, processes, distributed), args.timeout)
        if metrics is None:
            rows.append({"stage": "sft", "gpus": processes, "mode": distributed, "error": err[-300:]})
        else:
            rows.append({**row("sft", processes, distributed, metrics, wall), "shape": args.shape})
        print(json.dumps(rows[-1]), flush=True)
        save()

    if "dpo" in stages and not late("dpo"):
        sft_model = work / "sft-1-ddp/models/sft"
        pairs_params = params_for(work, base, "pairs", args, 1, "ddp", sft_model)
        run_stage("pairs", pairs_params, args.timeout)
        for processes, distributed in runs[:2]:
            if late(f"dpo {processes}"):
                continue
            name = f"dpo-{processes}-{distributed}"
            path = params_for(work, base, name, args, processes, distributed, sft_model)
            metrics, wall, err = run_stage("dpo", path, args.timeout)
            if metrics is None:
                rows.append({"stage": "dpo", "gpus": processes, "mode": distributed, "error": err[-300:]})
            else:
                rows.append({**row("dpo", processes, distributed, metrics, wall), "shape": args.shape})
            print(json.dumps(rows[-1]), flush=True)
            save()

    if args.fsdp_shape and not late("fsdp"):
        big = work / "big"
        big_count = make_base(args.fsdp_shape, args.tokenizer, big)
        setup["fsdp_n_params"] = big_count
        hook = str(REPO / "bench" / "gpucap")
        for processes, distributed in ((1, "ddp"), (args.gpus, "fsdp")):
            if late(f"fsdp {processes}"):
                continue
            name = f"big-sft-{processes}-{distributed}"
            peaks = work / name / "peaks"
            peaks.mkdir(parents=True, exist_ok=True)
            env = {"BENCH_GPU_CAP_GB": str(args.fsdp_cap_gb), "BENCH_PEAK_DIR": str(peaks),
                   "PYTHONPATH": hook + os.pathsep + os.environ.get("PYTHONPATH", "")}
            if processes == 1:
                env["CUDA_VISIBLE_DEVICES"] = "0"
            path = params_for(work, big, name, args, processes, distributed, big=True)
            metrics, wall, err = run_stage("sft", path, args.timeout, env, expect_failure=processes == 1)
            found = [json.loads(p.read_text()) for p in sorted(peaks.glob("peak-*.json"))]
            peak = {f"rank{p['rank']}": p["peak_gb"] for p in found if p.get("rank") is not None}
            if processes == 1:
                peak = {"rank0": max((p["peak_gb"] for p in found), default=None)}
            base_row = {"stage": "sft", "gpus": processes, "mode": distributed if processes > 1 else "single",
                        "shape": args.fsdp_shape, "cap_gb_per_gpu": args.fsdp_cap_gb, "peak_gb": peak}
            if metrics is None:
                rows.append({**base_row, "wall_s": round(wall, 1), "error": oom_line(err)})
            else:
                from safetensors.torch import load_file

                adapter = load_file(str(work / name / "models/sft/adapter_model.safetensors"))
                base_row["adapter_tensors"] = len(adapter)
                base_row["adapter_lora_b_max"] = max(
                    (float(t.abs().max()) for k, t in adapter.items() if "lora_B" in k), default=0.0)
                rows.append({**row("sft", processes, distributed, metrics, wall), **base_row})
            print(json.dumps(rows[-1]), flush=True)
            save()

    save()
    print_table(f"multi-GPU, {args.shape} ({count / 1e6:.0f}M params), {torch.cuda.get_device_name(0)}",
                [{k: v for k, v in r.items() if k not in ("error", "peak_gb")} for r in rows])


if __name__ == "__main__":
    main()
