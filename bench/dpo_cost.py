"""DPO cost: seconds per token of dpo vs sft on the same model and data, with and without
precomputed reference log-probs (the reference is the model with the adapter disabled).

    python bench/dpo_cost.py --shape qwen2.5-0.5b --tokenizer models/base --data data/clean/train.jsonl
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from common import build_random_model, load_records, print_table, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--data", default="data/clean/train.jsonl")
    ap.add_argument("--schema", default="data/seed/contract.schema.json")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lora-dropout", type=float, default=0.1)
    ap.add_argument("--sft-varlen", action="store_true",
                    help="also time sft padding-free with model.attn_implementation sdpa_varlen")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tuneline import tasks
    from tuneline.contract import load_contract
    from tuneline.modeling import Loaded
    from tuneline.negatives import negatives
    from tuneline.params import parse_params
    from tuneline.training import dpo as dpo_training
    from tuneline.training import sft as sft_training

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.chat_template = None
    records = [dict(r, _line=i) for i, r in enumerate(load_records(args.data, args.n), 1)]
    strategies = ["drop_field", "array_root", "truncate", "invalid_json", "off_topic", "wrong_payload_type"]
    pairs, _ = negatives(records, load_contract(args.schema), strategies, 1, 0, Path(args.data), tasks.get("travel"))
    for i, p in enumerate(pairs, 1):
        p["_line"] = i
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = {"min_optimizer_steps": 0, "lora": {"dropout": args.lora_dropout}, "trainer": {
        "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1, "num_train_epochs": 1,
        "warmup_steps": 0.0}}
    rows = []

    def fresh(attn: str = "sdpa") -> Loaded:
        model = build_random_model(args.shape, tokenizer, torch.bfloat16 if device == "cuda" else torch.float32, device,
                                   attn)
        return Loaded(model=model, tokenizer=tokenizer, provenance={"model": args.shape}, format="completion",
                      device=device)

    # warm-up (CUDA context, kernels) so that the first measured variant is not penalised
    warm = parse_params({"sft": {**common, "max_seq_len": 1024, "eval_each_epoch": False,
                                 "trainer": {"save_strategy": "no", "max_steps": 3}}})
    loaded = fresh()
    sft_rows, _ = sft_training.tokenize(loaded, records, 1024, Path(args.data))
    sft_training.build_trainer(warm, loaded, sft_rows, [], Path("/tmp/bench-dpo-warm")).train()
    del loaded
    gc.collect()

    # sft on the chosen completions of the same prompts; timed from trainer construction,
    # as dpo is (TRL may compute reference log-probs there)
    variants = [("sft (chosen only)", "sdpa", False)]
    if args.sft_varlen:
        from tuneline.attention import register

        register()
        variants.append(("sft (chosen only), padding-free sdpa_varlen", "sdpa_varlen", True))
    for name, attn, padding_free in variants:
        params = parse_params({"sft": {**common, "max_seq_len": 1024, "eval_each_epoch": False,
                                       "padding_free": padding_free, "trainer": {"save_strategy": "no"}}})
        loaded = fresh(attn)
        began = time.perf_counter()
        trainer = sft_training.build_trainer(params, loaded, sft_rows, [], Path("/tmp/bench-dpo-sft"))
        trainer.train()
        seconds = time.perf_counter() - began
        tokens = sum(len(r["input_ids"]) for r in sft_rows)
        rows.append({"variant": name, "examples": len(sft_rows), "tokens": tokens, "seconds": round(seconds, 2),
                     "us_per_token": 1e6 * seconds / tokens})
        print(rows[-1], flush=True)
        del trainer, loaded
        gc.collect()

    for precompute in (False, True):
        params = parse_params({"dpo": {**common, "max_length": 1024, "precompute_ref_log_probs": precompute,
                                       "trainer": {"save_strategy": "no"}}})
        loaded = fresh()
        dpo_rows = dpo_training.to_rows(loaded, pairs, Path("pairs"))
        began = time.perf_counter()
        trainer = dpo_training.build_trainer(params, loaded, dpo_rows, Path(f"/tmp/bench-dpo-{precompute}"))
        trainer.train()  # with construction: includes the reference pass when precomputing
        seconds = time.perf_counter() - began
        # tokens a pair carries: the prompt once + chosen + rejected completions
        tokens = sum(len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"])
                     for r in trainer.train_dataset)
        rows.append({"variant": f"dpo, precompute_ref_log_probs={precompute}", "examples": len(dpo_rows),
                     "tokens": tokens, "seconds": round(seconds, 2), "us_per_token": 1e6 * seconds / tokens})
        print(rows[-1], flush=True)
        del trainer, loaded
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row["vs_sft"] = row["us_per_token"] / rows[0]["us_per_token"]
        if args.sft_varlen:
            row["vs_sft_varlen"] = row["us_per_token"] / rows[1]["us_per_token"]
    print_table(f"DPO cost per token, {args.shape} on {device}", rows)
    setup = {**vars(args), "versions": {m: __import__(m).__version__ for m in ("torch", "transformers", "trl", "peft")}}
    write_result(f"dpo_cost_{args.shape}", rows, setup, args.out)


if __name__ == "__main__":
    main()
