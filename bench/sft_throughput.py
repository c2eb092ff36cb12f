"""sft throughput and MFU: tuneline's sft path in several GPU settings vs a plain TRL
SFTTrainer script with its defaults.

Same model shape, data, LoRA rank and max length in every variant. Reports steady-state
non-padding tokens/s (steps after a warm-up), MFU (LoRA = 4N + attention FLOPs per token,
N without the input embedding, against the device's measured bf16 matmul peak), peak
memory and the per-step training loss, side by side in one process. Variants that train
on the same batches in the same order are compared by their loss curves (mean and largest
absolute difference per step against the first such variant). ``--check`` first compares
the logits of padded SDPA with packed ``sdpa_varlen`` rows on the same sequences.

    python bench/sft_throughput.py --shape qwen2.5-1.5b --tokenizer models/base \
        --data data/clean/train.jsonl --steps 30 --out bench/results
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

from common import (
    build_random_model,
    load_records,
    lora_train_flops_per_token,
    n_params,
    peak_tflops,
    print_table,
    write_result,
)

D0 = {"lora": {"dropout": 0.0}}
VL64 = {**D0, "padding_free": True}
FAST = {"fused_lora": True, "sync_free_metrics": True}
COMPILE = {"trainer": {"torch_compile": True}}
D01 = {"lora": {"dropout": 0.1}}  # the plain script's and the earlier GPU profile's LoRA dropout
# name -> (sft param overrides or None for plain TRL, attention, data variant, batch)
VARIANTS: dict[str, tuple[dict[str, Any] | None, str, str, int]] = {
    "plain": (None, "sdpa", "records", 8),
    # a tuned plain TRL script: gradient checkpointing off, Liger on, LoRA dropout 0, batch 64
    "plain-tuned": ({"plain_tuned": True}, "sdpa", "records", 64),
    "plain-tuned-b128": ({"plain_tuned": True}, "sdpa", "records", 128),
    "plain-tuned-b256": ({"plain_tuned": True}, "sdpa", "records", 256),
    "padded-d0-b64": (D0, "sdpa", "records", 64),
    "varlen-d0-b128-fast-compile": ({**VL64, **FAST, **COMPILE}, "sdpa_varlen", "records", 128),
    "varlen-d0-b64-fused": ({**VL64, "fused_lora": True}, "sdpa_varlen", "records", 64),
    "varlen-d0-b64-syncfree": ({**VL64, "sync_free_metrics": True}, "sdpa_varlen", "records", 64),
    "varlen-d0-b64-fast": ({**VL64, **FAST}, "sdpa_varlen", "records", 64),
    "varlen-d0-b64-fast-compile": ({**VL64, **FAST, **COMPILE}, "sdpa_varlen", "records", 64),
    "varlen-d0-b128-fast": ({**VL64, **FAST}, "sdpa_varlen", "records", 128),
    "varlen-d0-b256-fast": ({**VL64, **FAST}, "sdpa_varlen", "records", 256),
    "long-varlen-d0-b16-fast-compile": ({**VL64, **FAST, **COMPILE}, "sdpa_varlen", "long", 16),
    "padded": (D01, "sdpa", "records", 32),
    "padded-d0": (D0, "sdpa", "records", 32),
    "varlen-d0": ({**D0, "padding_free": True}, "sdpa_varlen", "records", 32),
    "varlen-d0-b64": ({**D0, "padding_free": True}, "sdpa_varlen", "records", 64),
    "varlen-d0-compile": ({**D0, "padding_free": True, "trainer": {"torch_compile": True}}, "sdpa_varlen",
                          "records", 32),
    "long-varlen-d0": ({**D0, "padding_free": True}, "sdpa_varlen", "long", 4),
    "long-varlen-d0-b8": ({**D0, "padding_free": True}, "sdpa_varlen", "long", 8),
    "long-varlen-d0-compile": ({**D0, "padding_free": True, "trainer": {"torch_compile": True}}, "sdpa_varlen",
                               "long", 8),
    "varlen-d0-b64-compile": ({**D0, "padding_free": True, "trainer": {"torch_compile": True}}, "sdpa_varlen",
                              "records", 64),
    "long-varlen-d0-b16": ({**D0, "padding_free": True}, "sdpa_varlen", "long", 16),
    "long-varlen-d0-b16-compile": ({**D0, "padding_free": True, "trainer": {"torch_compile": True}},
                                   "sdpa_varlen", "long", 16),
}
DEFAULT = ("plain,padded,padded-d0,varlen-d0,varlen-d0-b64,varlen-d0-compile,long-varlen-d0,long-varlen-d0-b8,"
           "long-varlen-d0-compile")


class StepClock:
    """A TrainerCallback that times optimizer steps after a warm-up."""

    def __init__(self, warmup: int):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                import torch

                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if state.global_step == warmup:
                    clock.t0, clock.tokens0 = time.perf_counter(), state.num_input_tokens_seen
                clock.t1, clock.tokens1 = time.perf_counter(), state.num_input_tokens_seen

        self.callback = _Callback()
        self.t0 = self.t1 = 0.0
        self.tokens0 = self.tokens1 = 0

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens1 - self.tokens0) / max(self.t1 - self.t0, 1e-9)


class StepProfile:
    """torch.profiler over ``steps`` optimizer steps after ``start``: where a step's time
    goes (GPU busy vs wall, kernel launches, kernel classes, host syncs)."""

    def __init__(self, start: int, steps: int):
        from transformers import TrainerCallback

        prof = self
        self.start, self.steps, self.prof, self.wall = start, steps, None, 0.0

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                import torch

                if state.global_step == prof.start and prof.prof is None:
                    torch.cuda.synchronize()
                    prof.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                                   torch.profiler.ProfilerActivity.CUDA])
                    prof.prof.start()
                    prof.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                import torch

                if state.global_step == prof.start + prof.steps and prof.prof is not None and not prof.wall:
                    torch.cuda.synchronize()
                    prof.wall = time.perf_counter() - prof.t0
                    prof.prof.stop()

        self.callback = _Callback()

    def summary(self) -> dict[str, Any]:
        if self.prof is None or not self.wall:
            return {"error": "the profiled window was not reached"}
        n = self.steps
        classes = {"gemm (cuBLAS/CUTLASS)": ("gemm", "cutlass", "nvjet", "sm90_", "xmma", "cublas"),
                   "attention (flash/varlen)": ("flash", "fmha", "attention"),
                   "triton (Liger, compiled)": ("triton",), "optimizer (multi-tensor)": ("multi_tensor",),
                   "copies/memset": ("memcpy", "memset", "copy_"), "reductions": ("reduce",),
                   "elementwise": ("elementwise", "vectorized", "unrolled")}
        kernels: dict[str, list[float]] = {}
        busy = 0.0
        launches = 0
        host: dict[str, int] = {}
        for ev in self.prof.events():
            if ev.device_type.name == "CUDA":
                dt = ev.device_time_total / 1e6 if hasattr(ev, "device_time_total") else ev.cuda_time_total / 1e6
                busy += dt
                launches += 1
                k = kernels.setdefault(ev.name, [0.0, 0])
                k[0] += dt
                k[1] += 1
            elif ev.name in ("aten::_local_scalar_dense", "cudaStreamSynchronize", "cudaDeviceSynchronize",
                             "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"):
                host[ev.name] = host.get(ev.name, 0) + 1
        by_class: dict[str, float] = {}
        for name, (t, _) in kernels.items():
            low = name.lower()
            cls = next((c for c, keys in classes.items() if any(k in low for k in keys)), "other")
            by_class[cls] = by_class.get(cls, 0.0) + t
        top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:15]
        return {
            "steps": n, "wall_ms_per_step": round(1e3 * self.wall / n, 1),
            "gpu_busy_ms_per_step": round(1e3 * busy / n, 1), "gpu_busy_fraction": round(busy / self.wall, 3),
            "kernels_per_step": round(launches / n), "host_events_per_step": {k: round(v / n, 1) for k, v in host.items()},
            "gpu_ms_per_step_by_class": {k: round(1e3 * v / n, 1) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top_kernels": [{"name": name[:90], "ms_per_step": round(1e3 * t / n, 2), "calls_per_step": round(c / n, 1)}
                            for name, (t, c) in top],
        }


def long_records(records: list[dict[str, Any]], join: int) -> list[dict[str, Any]]:
    """The longer-sequence variant: ``join`` consecutive records as one example (the first
    prompt, then the completions and later prompts as one completion)."""
    out = []
    for i in range(0, len(records) - join + 1, join):
        group = records[i:i + join]
        text = group[0]["completion"] + "".join("\n\n" + r["prompt"] + r["completion"] for r in group[1:])
        out.append({"prompt": group[0]["prompt"], "completion": text})
    return out


def losses(history: list[dict[str, Any]]) -> list[float]:
    return [float(e["loss"]) for e in history if "loss" in e and "step" in e]


def run_plain_trl(model: Any, tokenizer: Any, records: list[dict[str, Any]], steps: int, batch: int, lora: Any,
                  warmup: int, tuned: bool = False, profile: Any = None) -> dict:
    """What a user gets from a hand-written TRL script: SFTConfig defaults + LoRA, or
    (``tuned``) the same script with gradient checkpointing off and Liger kernels on (the
    LoRA config then has dropout 0)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    clock = StepClock(warmup)
    tuned_args = {"gradient_checkpointing": False, "use_liger_kernel": True} if tuned else {}
    config = SFTConfig(
        output_dir="/tmp/bench-plain", max_steps=steps, per_device_train_batch_size=batch,
        bf16=True, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        include_num_input_tokens_seen="non_padding", **tuned_args,
    )
    data = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in records])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=lora, callbacks=[clock.callback, *([profile.callback] if profile else [])])
    trainer.train()
    return {"tokens_per_s": clock.tokens_per_s, "losses": losses(trainer.state.log_history)}


def tuneline_rows(tokenizer: Any, model: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    from tuneline.modeling import Loaded
    from tuneline.training.sft import tokenize

    loaded = Loaded(model=model, tokenizer=tokenizer, provenance={"model": "random"}, format="completion",
                    device="cuda")
    for i, r in enumerate(records, 1):
        r["_line"] = i
    rows, _ = tokenize(loaded, records, 4096, Path("bench-data"))
    return rows


def run_tuneline(model: Any, tokenizer: Any, records: list[dict[str, Any]], steps: int, batch: int,
                 overrides: dict[str, Any], warmup: int, profile: Any = None) -> dict:
    from tuneline.modeling import Loaded
    from tuneline.params import parse_params
    from tuneline.training.sft import build_trainer

    trainer_over = {"max_steps": steps, "save_strategy": "no", "per_device_train_batch_size": batch,
                    "logging_steps": 1, **overrides.get("trainer", {})}
    params = parse_params({"model": {"format": "completion"}, "sft": {
        **overrides, "max_seq_len": 4096, "eval_each_epoch": False, "trainer": trainer_over}})
    loaded = Loaded(model=model, tokenizer=tokenizer, provenance={"model": "random"}, format="completion",
                    device="cuda")
    rows = tuneline_rows(tokenizer, model, records)
    clock = StepClock(warmup)
    trainer = build_trainer(params, loaded, rows, [], Path("/tmp/bench-tuneline"))
    trainer.add_callback(clock.callback)
    if profile is not None:
        trainer.add_callback(profile.callback)
    trainer.train()
    return {"tokens_per_s": clock.tokens_per_s, "losses": losses(trainer.state.log_history)}


def check_varlen(shape: str, tokenizer: Any, records: list[dict[str, Any]], n: int = 16) -> dict[str, float]:
    """Logits of the same sequences: padded batch through SDPA vs one packed row through
    sdpa_varlen (and, as a control, the packed row with no sequence boundaries)."""
    import torch

    from tuneline.attention import register

    register()
    model = build_random_model(shape, tokenizer, torch.bfloat16, "cuda")
    rows = tuneline_rows(tokenizer, model, [dict(r) for r in records[:n]])
    ids = [torch.tensor(r["input_ids"]) for r in rows]
    lengths = [len(x) for x in ids]
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id).cuda()
    mask = (torch.arange(padded.shape[1])[None] < torch.tensor(lengths)[:, None]).long().cuda()
    packed = torch.cat(ids)[None].cuda()
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).cuda()
    with torch.no_grad():
        model.config._attn_implementation = "sdpa"
        ref = model(padded, attention_mask=mask, use_cache=False).logits.float()
        ref = torch.cat([ref[i, :n] for i, n in enumerate(lengths)])
        model.config._attn_implementation = "sdpa_varlen"
        out = model(packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                    max_length_k=max(lengths), use_cache=False).logits[0].float()
        model.config._attn_implementation = "sdpa"
        leak = model(packed, use_cache=False).logits[0].float()  # one causal row: sequences see each other
    rel = float((out - ref).norm() / ref.norm())
    rel_leak = float((leak - ref).norm() / ref.norm())
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"sequences": n, "tokens": sum(lengths), "rel_err_varlen_vs_padded_sdpa": rel,
            "rel_err_control_no_boundaries": rel_leak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-1.5b")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--data", default="data/clean/train.jsonl")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--join", type=int, default=8, help="records per example in the longer-sequence variant")
    ap.add_argument("--variants", default=DEFAULT, help=f"comma-separated, of: {', '.join(VARIANTS)}; NAME@profile "
                    "runs NAME for warm-up + 4 steps under torch.profiler (3 steps after the warm-up), untimed")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining variants after this many seconds")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from tuneline.attention import register
    from tuneline.params import LoraParams
    from tuneline.training import liger_available, lora_config

    began = time.perf_counter()
    register()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    tokenizer.chat_template = None
    records = load_records(args.data)
    data = {"records": records, "long": long_records(records, args.join)}
    mean_seq = {name: sum(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in recs) / len(recs)
                for name, recs in data.items()}
    setup: dict[str, Any] = {**vars(args), "mean_seq": mean_seq, "examples": {k: len(v) for k, v in data.items()},
                             "liger": liger_available(), "lora": "r=16 alpha=32 all-linear",
                             "versions": {m: __import__(m).__version__ for m in
                                          ("torch", "transformers", "trl", "peft", "accelerate")}}
    if args.check:
        setup["check"] = check_varlen(args.shape, tokenizer, records)
        print(json.dumps(setup["check"]), flush=True)

    rows: list[dict[str, Any]] = []
    curves: dict[str, list[float]] = {}
    profiles: dict[str, Any] = {}
    for entry in args.variants.split(","):
        name, _, how = entry.partition("@")
        profiled_now = how == "profile"
        if time.perf_counter() - began > args.budget_s:
            print(f"skipping {entry}: over the time budget", flush=True)
            continue
        overrides, attn, data_name, batch = VARIANTS[name]
        model = build_random_model(args.shape, tokenizer, torch.bfloat16, "cuda", attn)
        n_base = n_params(model) - model.get_input_embeddings().weight.numel()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            recs = [dict(r) for r in data[data_name]]
            profile = StepProfile(args.warmup, 3) if profiled_now else None
            steps = args.warmup + 4 if profile else args.steps
            tuned = bool(overrides and overrides.get("plain_tuned"))
            if overrides is None or tuned:
                lora = lora_config(LoraParams(dropout=0.0 if tuned else 0.1))
                result = run_plain_trl(model, tokenizer, recs, steps, batch, lora, args.warmup, tuned, profile)
            else:
                result = run_tuneline(model, tokenizer, recs, steps, batch, overrides, args.warmup, profile)
            if profile is not None:
                profiles[name] = profile.summary()
                print(f"profile {name}: {json.dumps(profiles[name])}", flush=True)
                result = None
        except Exception as exc:  # noqa: BLE001 - one failed variant must not lose the others
            print(f"{name} failed: {type(exc).__name__}: {exc}", flush=True)
            rows.append({"variant": name, "error": f"{type(exc).__name__}: {exc}"[:500]})
            result = None
        wall = time.perf_counter() - started
        if result is not None:
            seq = mean_seq[data_name]
            flops = lora_train_flops_per_token(model.config, n_base, seq)
            causal = flops - 6.0 * model.config.num_hidden_layers * model.config.hidden_size * seq
            peak, sheet = peak_tflops(), peak_tflops(datasheet=True)
            tps = result["tokens_per_s"]
            rows.append({"variant": name, "attn": attn, "data": data_name, "batch": batch, "mean_seq": round(seq, 1),
                         "tokens_per_s": round(tps),
                         "mfu_989": tps * flops / (sheet * 1e12) if sheet else None,
                         "mfu_causal_989": tps * causal / (sheet * 1e12) if sheet else None,
                         "mfu_790": tps * flops / (peak * 1e12) if peak else None,
                         "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1), "wall_s": round(wall, 1),
                         "first_loss": result["losses"][0] if result["losses"] else None,
                         "last_loss": result["losses"][-1] if result["losses"] else None})
            curves[name] = result["losses"]
            print(json.dumps(rows[-1]), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        write_result(f"sft_throughput_{args.shape}{args.tag}", rows,
                     {**setup, "loss_curves": curves, "profiles": profiles}, args.out)

    ok = [r for r in rows if "tokens_per_s" in r]
    base = next((r for r in ok if r["variant"] == "plain"), None)
    for row in ok:
        row["vs_plain"] = round(row["tokens_per_s"] / base["tokens_per_s"], 2) if base else None
        # against the tuned plain script at the same batch size
        tuned = next((r for r in ok if r["variant"].startswith("plain-tuned") and r["batch"] == row["batch"]), None)
        row["vs_tuned"] = round(row["tokens_per_s"] / tuned["tokens_per_s"], 2) if tuned else None
    # loss curves of variants that see the same batches (same data and batch; plain TRL shuffles alike)
    def same_batches(row: dict[str, Any]) -> tuple:
        overrides = VARIANTS[row["variant"]][0]
        plain = overrides is None or "plain_tuned" in overrides
        dropout = 0.0 if plain and overrides else (overrides or D01)["lora"]["dropout"]
        return row["data"], row["batch"], dropout, plain

    for row in ok:
        ref = next(r for r in ok if same_batches(r) == same_batches(row))
        a, b = curves[row["variant"]], curves[ref["variant"]]
        k = min(len(a), len(b))
        diffs = [abs(x - y) for x, y in zip(a[:k], b[:k], strict=True)]
        row["loss_vs"] = ref["variant"]
        row["loss_mean_abs_diff"] = round(sum(diffs) / k, 4) if k else None
        row["loss_max_abs_diff"] = round(max(diffs), 4) if k else None
    print_table(f"sft throughput, {args.shape}", [{k: v for k, v in r.items() if k not in ("wall_s", "attn")}
                                                   for r in rows])
    write_result(f"sft_throughput_{args.shape}{args.tag}", rows,
                 {**setup, "loss_curves": curves, "profiles": profiles}, args.out)


if __name__ == "__main__":
    main()
