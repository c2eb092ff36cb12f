"""Where a CPU sft step's time goes, and sft steps/s with and without
``sft.completion_logits_only``, on the sft stage's own trainer (``build_trainer``) with
the pipeline's params (LoRA r16 all-linear, batch 2, ``model.dtype`` as in params.yaml).

Variants are trained in turns in one process (A B A B ...: the machine is shared, so
its load hits every variant alike) and reported as the median step time of each;
``--profile N`` first runs torch.profiler over N steps of each variant and prints the
self CPU time per step by class (LM head matmuls, the log-softmax/entropy/top-1 over the
vocabulary, attention, LoRA and base matmuls, optimizer, the rest).

    python bench/cpu_sft_step.py --model /work/final/models/base \
        --data /work/final/data/clean/train.jsonl --rounds 4 --steps 6 --profile 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import load_records, print_table, write_result


def _upper_layers(first: int, layers: int = 30) -> dict[str, Any]:
    """sft.lora with the default rank on every linear layer of blocks ``first`` and above."""
    return {"r": 16, "alpha": 32, "dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "extra": {"layers_to_transform": list(range(first, layers))}}


# name -> sft param overrides
VARIANTS: dict[str, dict[str, Any]] = {
    "reference": {"completion_logits_only": False},
    "completion-logits": {"completion_logits_only": True},
    "reference-syncfree": {"completion_logits_only": False, "sync_free_metrics": True},
    "completion-logits-syncfree": {"completion_logits_only": True, "sync_free_metrics": True},
    "completion-logits-fused": {"completion_logits_only": True, "fused_lora": True},
    "completion-logits-fused-syncfree": {"completion_logits_only": True, "fused_lora": True, "sync_free_metrics": True},
    # LoRA on the upper layers only (of SmolLM2-135M's 30): backward stops below the lowest
    # adapted layer. peft takes layers_to_transform only with a list of modules.
    "completion-logits-upper-half": {"completion_logits_only": True, "lora": _upper_layers(15)},
    "completion-logits-upper-third": {"completion_logits_only": True, "lora": _upper_layers(20)},
}
VOCAB_CHUNKS = {32768, 16384}  # TRL's vocabulary tiles of the 49,152-token head


class StepTimes:
    """A TrainerCallback recording each optimizer step's wall time and input tokens."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        times = self
        self.steps: list[tuple[float, int]] = []
        self.t0 = 0.0
        self.tokens0 = 0

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):  # noqa: ANN001
                times.t0, times.tokens0 = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
                times.steps.append((time.perf_counter() - times.t0, state.num_input_tokens_seen - times.tokens0))

        self.callback = _Callback()


def _classify(ev: Any, vocab: int) -> str:
    chain = []
    node = ev
    while node is not None:
        chain.append(node.name)
        node = node.cpu_parent
    joined = " ".join(chain)
    shapes = {d for s in (ev.input_shapes or []) for d in (s or []) if isinstance(d, int)}
    mm = ev.name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::matmul", "aten::linear")
    if "Optimizer." in joined:
        return "optimizer"
    if "ChunkedLogProbFunction" in joined or "CompletionLogProbs" in joined:
        return "LM head matmul" if mm else "log-softmax/entropy/top-1 over vocab"
    if shapes & ({vocab} | VOCAB_CHUNKS):
        return "LM head matmul" if mm else "log-softmax/entropy/top-1 over vocab"
    if "scaled_dot_product" in joined or "attention" in ev.name:
        return "attention"
    if mm:
        return "LoRA matmuls" if 16 in shapes else "base matmuls"
    return "other (norms, activations, casts, autograd, data)"


def profile(trainer: Any, steps: int, vocab: int) -> dict[str, Any]:
    import torch

    trainer.args.max_steps = 1  # warm-up
    trainer.train()
    trainer.args.max_steps = steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True,
                                with_stack=False) as prof:
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0
    by_class: dict[str, float] = {}
    by_op: dict[tuple[str, str], float] = {}
    for ev in prof.events():
        if ev.device_type.name != "CPU":
            continue
        cls = _classify(ev, vocab)
        us = ev.self_cpu_time_total
        by_class[cls] = by_class.get(cls, 0.0) + us
        by_op[(cls, ev.name)] = by_op.get((cls, ev.name), 0.0) + us
    total = sum(by_class.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:14]
    return {
        "steps": steps, "wall_ms_per_step": round(1e3 * wall / steps, 1),
        "self_cpu_ms_per_step": round(total / 1e3 / steps, 1),
        "by_class_ms_per_step": {k: round(v / 1e3 / steps, 1) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "by_class_share": {k: round(v / total, 3) for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"class": c, "op": n, "ms_per_step": round(v / 1e3 / steps, 1)} for (c, n), v in top],
    }


def head_bench(trainer: Any, reps: int) -> list[dict[str, Any]]:
    """The LM head and loss alone, forward + backward, under bf16 autocast, on the
    trainer's real batches (backbone output computed once): TRL's CPU fold over every
    position vs ``completion_log_probs``, interleaved, medians."""
    import torch
    from trl.trainer.utils import _ChunkedLogProbFunction

    from tuneline.training.cpu_loss import completion_log_probs

    base = trainer.model.get_base_model()
    lm_head = base.get_output_embeddings()
    loader = trainer.get_train_dataloader()
    batches = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _, batch in zip(range(4), loader, strict=False):
            inputs = trainer._prepare_inputs(batch)
            kw = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
            hidden = base.base_model(**kw).last_hidden_state[:, :-1].detach()
            batches.append((hidden, inputs["labels"][:, 1:]))
    outputs = ("log_probs", "entropy", "is_top1")

    def trl_head(hidden: Any, labels: Any) -> Any:
        mask = labels != -100
        flat = hidden.reshape(-1, hidden.size(-1))
        lp, _, _, _, _ = _ChunkedLogProbFunction.apply(flat, lm_head.weight, None, labels.clamp(min=0).reshape(-1),
                                                        1.0, 32768, None, 1.0, outputs)
        return lp.view(mask.shape).masked_fill(~mask, 0), mask

    def ours(hidden: Any, labels: Any) -> Any:
        lp, _, _, mask = completion_log_probs(hidden, labels, lm_head)
        return lp, mask

    times: dict[str, list[float]] = {"trl-fused-head (every position)": [], "completion_log_probs": []}
    fns = dict(zip(times, (trl_head, ours), strict=True))
    for _ in range(reps):
        for name, fn in fns.items():
            for hidden, labels in batches:
                h = hidden.clone().requires_grad_(True)
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    lp, mask = fn(h, labels)
                    loss = -lp.sum() / mask.sum()
                loss.backward()
                times[name].append(time.perf_counter() - t0)
    share = [float((labels != -100).float().mean()) for _, labels in batches]
    base_t = statistics.median(times["trl-fused-head (every position)"])
    return [{"variant": n, "median_ms": round(1e3 * statistics.median(v), 1),
             "speedup": round(base_t / statistics.median(v), 2), "calls": len(v),
             "completion_share": round(sum(share) / len(share), 3)} for n, v in times.items()]


def build(model_dir: str, records: list[dict[str, Any]], overrides: dict[str, Any], batch: int, workdir: Path) -> Any:
    from tuneline.modeling import load_for_training
    from tuneline.params import load_params, parse_params
    from tuneline.training.sft import build_trainer, tokenize

    raw = load_params("params.yaml").model_dump()
    raw["paths"]["base_model"] = model_dir
    raw["model"]["device"] = "cpu"
    raw["sft"].update(overrides)
    raw["sft"]["trainer"].update({"max_steps": 1, "save_strategy": "no", "per_device_train_batch_size": batch,
                                  "report_to": "none"})
    raw["sft"]["eval_each_epoch"] = False
    params = parse_params(raw)
    loaded = load_for_training(params, False)
    for n, r in enumerate(records, start=1):
        r.setdefault("_line", n)
    rows, _ = tokenize(loaded, records, params.sft.max_seq_len, Path("train.jsonl"))
    return build_trainer(params, loaded, rows, [], workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/final/models/base")
    ap.add_argument("--data", default="/work/final/data/clean/train.jsonl")
    ap.add_argument("--variants", default="reference,completion-logits")
    ap.add_argument("--records", type=int, default=96)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per variant per round (the first is dropped)")
    ap.add_argument("--profile", type=int, default=0, help="profile this many steps of each variant first")
    ap.add_argument("--head", type=int, default=0, help="time the LM head + loss alone this many rounds first")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default). On a shared machine 1 thread avoids the stalls of a "
                         "2-thread parallel region whose second thread is descheduled, which dominate step times")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    records = load_records(args.data, args.records)
    work = Path(tempfile.mkdtemp(prefix="cpu-sft-step-"))
    trainers, clocks = {}, {}
    for name in names:
        trainers[name] = build(args.model, [dict(r) for r in records], VARIANTS[name], args.batch, work / name)
        clocks[name] = StepTimes()
        trainers[name].add_callback(clocks[name].callback)
    vocab = trainers[names[0]].model.get_output_embeddings().weight.shape[0]
    setup = {"model": args.model, "data": args.data, "batch": args.batch, "rounds": args.rounds,
             "steps_per_round": args.steps, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
             "load_before": os.getloadavg()}

    head = []
    if args.head:
        head = head_bench(trainers[names[0]], args.head)
        print_table("LM head + loss, forward + backward (interleaved, medians)", head)
        setup["head"] = head

    profiles = {}
    if args.profile:
        for name in names:
            profiles[name] = profile(trainers[name], args.profile, vocab)
            print(f"\n== profile {name}\n" + json.dumps(profiles[name], indent=1))
            clocks[name].steps.clear()

    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:  # A B A B: both see the same machine load
            clocks[name].steps.clear()
            trainers[name].args.max_steps = args.steps
            trainers[name].train()
            timed = clocks[name].steps[1:]
            per_round[name] += [t for t, _ in timed]
            tokens = sum(k for _, k in timed)
            print(f"round {r} {name}: median step {1e3 * statistics.median(t for t, _ in timed):.0f} ms, "
                  f"{tokens / sum(t for t, _ in timed):.0f} tokens/s, load {os.getloadavg()[0]:.1f}")
    setup["load_after"] = os.getloadavg()
    if not args.rounds:
        return
    base = statistics.median(per_round[names[0]])
    rows = [{"variant": n, "median_step_ms": round(1e3 * statistics.median(v), 1),
             "steps_per_s": round(1 / statistics.median(v), 3), "speedup": round(base / statistics.median(v), 2),
             "timed_steps": len(v)} for n, v in per_round.items()]
    print_table("CPU sft step (interleaved, medians)", rows)
    write_result("cpu_sft_step", rows, {**setup, "profiles": profiles}, args.out)


if __name__ == "__main__":
    main()
