"""sft throughput: tuneline's sft path vs a plain TRL SFTTrainer script with its defaults.

Same model shape, data, LoRA config, max length and effective batch (in examples). Reports
non-padding tokens/s, MFU (LoRA = 4N + attention FLOPs per token, against the device's
measured bf16 matmul peak) and peak memory, side by side in one process.

    python bench/sft_throughput.py --shape qwen2.5-1.5b --tokenizer models/base \
        --data data/clean/train.jsonl --steps 30 --out bench/results
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

from common import (
    Timer,
    build_random_model,
    load_records,
    lora_train_flops_per_token,
    n_params,
    peak_tflops,
    print_table,
    write_result,
)


class StepClock:
    """A TrainerCallback that times optimizer steps after a warm-up."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                import torch

                if state.global_step == warmup:
                    torch.cuda.synchronize() if torch.cuda.is_available() else None
                    clock.t0, clock.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                clock.t1, clock.tokens1 = time.perf_counter(), state.num_input_tokens_seen

        self.callback = _Callback()
        self.t0 = self.t1 = 0.0
        self.tokens0 = self.tokens1 = 0

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens1 - self.tokens0) / max(self.t1 - self.t0, 1e-9)


def mean_len(rows: list[dict[str, Any]]) -> float:
    return sum(len(r["input_ids"]) for r in rows) / len(rows)


def run_plain_trl(model: Any, tokenizer: Any, records: list[dict[str, Any]], steps: int, batch: int, lora: Any) -> dict:
    """What a user gets from a hand-written TRL script: SFTConfig defaults + LoRA."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    clock = StepClock(warmup=min(5, steps // 3))
    config = SFTConfig(
        output_dir="/tmp/bench-plain", max_steps=steps, per_device_train_batch_size=batch,
        bf16=True, report_to="none", save_strategy="no", logging_steps=1000, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock.callback])
    trainer.train()
    return {"tokens_per_s": clock.tokens_per_s, "settings": "TRL defaults (grad ckpt on, padded batch)"}


def run_tuneline(model: Any, tokenizer: Any, records: list[dict[str, Any]], steps: int, batch: int,
                 overrides: dict[str, Any]) -> tuple[dict, float]:
    from tuneline.modeling import Loaded
    from tuneline.params import parse_params
    from tuneline.stages.sft import build_trainer, tokenize

    params = parse_params({"model": {"format": "completion"}, "sft": {
        "per_device_batch_size": batch, "max_seq_len": 1024, "eval_each_epoch": False,
        "trainer": {"max_steps": steps, "save_strategy": "no"}, **overrides}})
    loaded = Loaded(model=model, tokenizer=tokenizer, provenance={"model": "random"}, format="completion",
                    device="cuda")
    for i, r in enumerate(records, 1):
        r["_line"] = i
    rows, _ = tokenize(loaded, records, 1024, Path("bench-data"))
    clock = StepClock(warmup=min(5, steps // 3))
    trainer = build_trainer(params, loaded, rows, [], Path("/tmp/bench-tuneline"))
    trainer.add_callback(clock.callback)
    trainer.train()
    return {"tokens_per_s": clock.tokens_per_s, "settings": str(overrides)}, mean_len(rows)


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from tuneline.params import LoraParams
    from tuneline.training import lora_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--data", default="data/clean/train.jsonl")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tuneline-batch", type=int, default=32)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.chat_template = None
    records = load_records(args.data)
    lora = lora_config(LoraParams())
    seq = sum(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in records) / len(records)
    rows = []
    variants: list[tuple[str, dict[str, Any] | None, int]] = [
        ("plain TRL defaults", None, args.batch),
        ("tuneline (GPU profile, padded)", {"per_device_batch_size": args.tuneline_batch}, args.tuneline_batch),
        ("tuneline (GPU profile, padding-free)", {"padding_free": True}, args.tuneline_batch),
    ]
    for name, overrides, batch in variants:
        model = build_random_model(args.shape, tokenizer, torch.bfloat16, "cuda")
        n_base = n_params(model)
        torch.cuda.reset_peak_memory_stats()
        with Timer():
            if overrides is None:
                result = run_plain_trl(model, tokenizer, [dict(r) for r in records], args.steps, batch, lora)
            else:
                result, _ = run_tuneline(model, tokenizer, [dict(r) for r in records], args.steps, batch, overrides)
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
        flops = lora_train_flops_per_token(model.config, n_base, seq)
        peak = peak_tflops()
        mfu = result["tokens_per_s"] * flops / (peak * 1e12) if peak else None
        rows.append({"variant": name, "batch": batch, "tokens_per_s": result["tokens_per_s"],
                     "mfu": mfu, "peak_gb": peak_gb, "mean_seq": seq})
        del model
        gc.collect()
        torch.cuda.empty_cache()
    base_tps = rows[0]["tokens_per_s"]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base_tps
    print_table(f"sft throughput, {args.shape}", rows)
    write_result(f"sft_throughput_{args.shape}", rows, vars(args), args.out)


if __name__ == "__main__":
    main()
