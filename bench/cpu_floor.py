"""The default run's compute floor on this CPU: each stage's matmul work against its time.

Counts the matrix-multiply FLOPs of the committed default run from its own records (the
sft and dpo run records' token counts, every probe sample's prompt and generated tokens,
the base model's config.json) and measures this CPU's float32 matmul throughput with
torch at the model's shapes and at a large square. The floor of a stage is its FLOPs at
the best measured throughput: the time it would take if every matmul ran at that rate and
nothing else (attention softmax, norms, activations, Python, loading) took any time.
Stages that do no model matmuls (generate, clean, pairs, compare) and the learning-curve
points (their outputs are not kept) are reported as measured only.

    python bench/cpu_floor.py --run /work/final --out bench/results

FLOPs per token, with P the matmul weights of the 30 blocks (q, k, v, o, gate, up, down)
and H the LM head (hidden x vocab):
- sft: forward 2P, backward 2P (the base is frozen: the input gradient only), LoRA
  forward 2R and backward 4R (R the adapter weights), the head 4H at completion tokens
  only (``sft.completion_logits_only``), attention 4 n d per layer forward and twice that
  backward (n the mean sequence length, d the hidden size).
- dpo: the reference forward 2(P + H) and the policy forward and backward 4(P + H) at every
  token of chosen and rejected (TRL scores every position).
- probe: prompt tokens 2P (the head at the last position only), each generated token
  2(P + H) and 4 c d per layer of attention over its context c.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

from common import print_table, write_result


def weights(config: dict[str, Any], lora_r: int) -> dict[str, int]:
    d, ff, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or d // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config["num_key_value_heads"] * head_dim
    shapes = [(d, q), (d, kv), (d, kv), (q, d), (d, ff), (d, ff), (ff, d)]
    return {
        "P": layers * sum(i * o for i, o in shapes),
        "R": layers * sum(lora_r * (i + o) for i, o in shapes),
        "H": d * config["vocab_size"],
        "d": d,
        "layers": layers,
    }


def sgemm_gflops(shapes: list[tuple[int, int, int]], seconds: float = 2.0) -> dict[str, float]:
    import torch

    out = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            a @ b
            runs += 1
        out[f"{m}x{k}x{n}"] = round(2 * m * k * n * runs / (time.perf_counter() - start) / 1e9, 1)
    return out


def probe_flops(run: Path, model: str, w: dict[str, int], tokenizer: Any) -> tuple[float, int, int]:
    prompt_tokens = generated = 0
    flops = 0.0
    for samples in sorted((run / "reports" / "probe").glob(f"*/{model}.samples.jsonl")):
        for line in samples.read_text().splitlines():
            s = json.loads(line)
            p = len(tokenizer(s["prompt"], add_special_tokens=False)["input_ids"])
            g = s["n_tokens"]
            prompt_tokens += p
            generated += g
            flops += 2 * w["P"] * p + 2 * w["H"]
            # each generated token: the whole model, and attention over its context
            flops += g * 2 * (w["P"] + w["H"]) + w["layers"] * 4 * w["d"] * (g * p + g * (g + 1) / 2)
    return flops, prompt_tokens, generated


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=Path("."), help="a workspace holding the default run's outputs")
    ap.add_argument("--times", type=Path, default=Path("bench/results/pipeline_cpu.tsv"))
    ap.add_argument("--target-min", type=float, default=15.0)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    config = json.loads((args.run / "models" / "base" / "config.json").read_text())
    sft = json.loads((args.run / "reports" / "provenance" / "sft.json").read_text())["run"]
    dpo = json.loads((args.run / "reports" / "provenance" / "dpo.json").read_text())["run"]
    lora_r = json.loads((args.run / "models" / "sft" / "adapter_config.json").read_text())["r"]
    w = weights(config, lora_r)
    tokenizer = AutoTokenizer.from_pretrained(args.run / "models" / "base")
    with args.times.open() as fh:
        measured = {row["stage"]: float(row["seconds"]) for row in csv.DictReader(fh, delimiter="\t")}

    plan = sft["plan"]
    t, c, records = plan["tokens_per_epoch"], plan["completion_tokens_per_epoch"], plan["records"]
    n = t / records
    flops = {
        "sft": t * (4 * w["P"] + 6 * w["R"]) + c * 4 * w["H"] + t * w["layers"] * 3 * 4 * n * w["d"],
        "dpo": dpo["plan"]["tokens_per_epoch"] * 6 * (w["P"] + w["H"]),
    }
    tokens = {"sft": t, "dpo": dpo["plan"]["tokens_per_epoch"]}
    for stage in measured:
        if stage.startswith("probe@"):
            flops[stage], p, g = probe_flops(args.run, stage.split("@", 1)[1], w, tokenizer)
            tokens[stage] = p + g

    d, ff, v = w["d"], config["intermediate_size"], config["vocab_size"]
    shapes = [(4096, 4096, 4096), (448, d, ff), (448, ff, d), (448, d, v), (90, d, ff), (90, ff, d), (90, d, v)]
    passes = [sgemm_gflops(shapes) for _ in range(3)]  # the best of three: the machine may be shared
    gflops = {shape: max(p[shape] for p in passes) for shape in passes[0]}
    peak = max(gflops.values())

    curve_s = {"sft": sft.get("curve_s", 0.0), "dpo": dpo.get("curve_s", 0.0)}
    blank = {"curve_s": "", "tokens": "", "tflop": "", "floor_s": "", "efficiency": ""}
    rows, floor_total, modelled_work = [], 0.0, 0.0
    for stage, seconds in measured.items():
        if stage in ("total", "no-op repro"):
            continue
        row: dict[str, Any] = {"stage": stage, "measured_s": seconds, **blank}
        if stage in flops:
            work = seconds - curve_s.get(stage, 0.0)
            floor = flops[stage] / (peak * 1e9)
            row.update({
                "curve_s": curve_s.get(stage) or "",
                "tokens": tokens[stage],
                "tflop": round(flops[stage] / 1e12, 2),
                "floor_s": round(floor, 1),
                "efficiency": round(floor / work, 2),
            })
            floor_total += floor
            modelled_work += work
        rows.append(row)
    total, target = measured["total"], args.target_min * 60
    curves = sum(curve_s.values())
    rest = total - modelled_work - curves  # the stages without model matmuls

    def needed(fixed: float) -> float | None:
        return round(floor_total / (target - fixed), 2) if target > fixed else None

    summary = {
        "peak_gflops": peak,
        "measured_min": round(total / 60, 1),
        "matmul_floor_min": round(floor_total / 60, 1),
        "curve_min": round(curves / 60, 1),
        "other_stages_min": round(rest / 60, 1),
        "efficiency_now": round(floor_total / modelled_work, 2),
        "efficiency_needed_for_target": needed(rest + curves),
        "efficiency_needed_if_the_curve_were_free": needed(rest),
    }
    print_table(f"Default run on this CPU against its float32 matmul floor ({peak} GFLOPS)", rows)
    print(json.dumps(summary, indent=1))
    setup = {
        "run": str(args.run), "times": str(args.times), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "sgemm_gflops": gflops, "weights": w, "summary": summary,
        "note": "floor = matmul FLOPs at the best measured sgemm rate; curve points, loading and the "
                "non-model stages are unmodelled (measured only)",
    }
    print("wrote", write_result("cpu_floor", rows, setup, args.out))


if __name__ == "__main__":
    main()
