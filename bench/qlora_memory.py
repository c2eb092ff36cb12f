"""QLoRA: nf4 vs bf16 LoRA tokens/s and peak memory on a 7B-shaped model, through the
real loader (a random 7B-shaped checkpoint is written to local disk first), and the
projected peak for a 32B base.

    python bench/qlora_memory.py --shape qwen2.5-7b --tokenizer models/base --data data/clean/train.jsonl
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from common import SHAPES, build_random_model, load_records, n_params, print_table, write_result


def train_steps(model_dir: Path, quantization: str, records: list[dict], steps: int, batch: int,
                warmup: int = 3) -> dict:
    import torch

    from tuneline.modeling import load_for_training
    from tuneline.params import parse_params
    from tuneline.training import ThroughputCallback
    from tuneline.training.sft import build_trainer, tokenize

    params = parse_params({
        "paths": {"base_model": str(model_dir)},
        "model": {"quantization": quantization},
        "sft": {"eval_each_epoch": False, "trainer": {
            "per_device_train_batch_size": batch, "gradient_checkpointing": True, "max_steps": steps,
            "save_strategy": "no"}},
    })
    torch.cuda.reset_peak_memory_stats()
    loaded = load_for_training(params, gradient_checkpointing=True)
    weights_gb = torch.cuda.memory_allocated() / 2**30
    rows, stats = tokenize(loaded, [dict(r, _line=i) for i, r in enumerate(records, 1)], 1024, Path("bench"))
    trainer = build_trainer(params, loaded, rows, [], Path(f"/tmp/bench-qlora-{quantization}"))
    steady = ThroughputCallback(skip=warmup)
    trainer.add_callback(steady)
    torch.cuda.synchronize()
    began = time.perf_counter()
    trainer.train()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - began
    tokens = trainer.state.num_input_tokens_seen
    result = {"variant": f"{quantization} LoRA" if quantization == "nf4" else "bf16 LoRA",
              "tokens_per_s": tokens / seconds, **steady.summary(tokens / steps), "weights_gb": weights_gb,
              "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
    del trainer, loaded
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--data", default="data/clean/train.jsonl")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the steady-state rate")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--workdir", default="/tmp/bench-7b")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model_dir = Path(args.workdir)
    model = build_random_model(args.shape, tokenizer, torch.bfloat16, "cuda")
    n_base = n_params(model)
    model.save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    records = load_records(args.data, limit=args.batch * args.steps)
    rows = [train_steps(model_dir, q, records, args.steps, args.batch, args.warmup) for q in ("none", "nf4")]
    rows[1]["speed_vs_bf16"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    rows[0]["speed_vs_bf16"] = 1.0
    if rows[0]["steady_tokens_per_s"] and rows[1]["steady_tokens_per_s"]:
        rows[1]["steady_speed_vs_bf16"] = rows[1]["steady_tokens_per_s"] / rows[0]["steady_tokens_per_s"]
        rows[0]["steady_speed_vs_bf16"] = 1.0
    # Projection to 32B: nf4 weights scale with the parameter count; the rest (LoRA weights,
    # optimizer state, activations with checkpointing) with layers x hidden.
    big, small = SHAPES["qwen2.5-32b"], SHAPES[args.shape]
    n_32b = 32.8e9
    weight_part = rows[1]["weights_gb"] * n_32b / n_base
    rest = max(rows[1]["peak_gb"] - rows[1]["weights_gb"], 0.0)
    rest_32b = rest * (big["num_hidden_layers"] * big["hidden_size"]) / (small["num_hidden_layers"] * small["hidden_size"])
    projection = {"projected_32b_peak_gb": weight_part + rest_32b, "weights_part_gb": weight_part,
                  "activations_and_state_gb": rest_32b, "base_params_measured": n_base}
    print_table(f"QLoRA vs bf16 LoRA, {args.shape}", rows)
    print(projection)
    write_result(f"qlora_{args.shape}{args.tag}", rows, {**vars(args), **projection}, args.out)


if __name__ == "__main__":
    main()
