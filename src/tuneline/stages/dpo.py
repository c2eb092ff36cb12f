"""dpo: preference tuning of the SFT model, with the SFT model as the reference.

Reads:  ``paths.pairs``/train.jsonl, ``paths.base_model``, ``paths.sft_model``.
Writes: ``paths.dpo_model``/ (adapter safetensors, tokenizer, provenance.json naming the
        SFT adapter as its parent, README.md), ``paths.metrics``/dpo.json (plan, losses,
        reward accuracy/margins), ``paths.metrics``/dpo/*.tsv (per-step plots),
        ``paths.checkpoints``/dpo/ (resumable checkpoints while training).
Params: ``dpo``, ``model``, ``seed``, ``compute.num_processes``.

With ``compute.num_processes > 1`` the command runs under ``accelerate launch`` (one
process per GPU); the main process alone prints the plan and writes the outputs.

The SFT adapter is merged into the base and a fresh LoRA adapter is trained on top, so
TRL's reference (the model with adapters disabled) is exactly the SFT model: at step 0
the chosen and rejected rewards are zero. The DPO adapter therefore applies to
base + merged SFT; ``provenance.json`` records ``"parent"`` and ``"stack"`` and
``tuneline.training.load_for_eval`` loads it that way.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import Loaded
from tuneline.params import Params
from tuneline.provenance import sha256_path
from tuneline.records import atomic_dir, read_json, read_jsonl, write_json
from tuneline.training import (
    GuardCallback,
    MarkerCallback,
    ThroughputCallback,
    announce_plan,
    base_provenance,
    check_weights_changed,
    data_hashes,
    drop_shared_dataset,
    fingerprint,
    finish_checkpoints,
    last_logged,
    load_for_training,
    lora_config,
    make_plan,
    match_adapter_dtype,
    model_card,
    resume_checkpoint,
    shared_dataset,
    train_with_checkpoints,
    trainable_snapshot,
    trained_model,
    trainer_args,
    wait_for_everyone,
    write_model_dir,
    write_plots,
)

SHARED_DATASET = "shared-dataset"
PAIR_FIELDS = {"prompt": (str, list), "chosen": str, "rejected": str}
PLOT_KEYS = (
    "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
)


def read_pairs(path: Path, limit: int | None, seed: int) -> list[dict[str, Any]]:
    pairs = read_jsonl(path, required=PAIR_FIELDS)
    for number, pair in enumerate(pairs, start=1):
        pair["_line"] = number
    if limit is not None and limit < len(pairs):
        pairs = sorted(random.Random(seed).sample(pairs, limit), key=lambda p: p["_line"])
    return pairs


def to_rows(loaded: Loaded, pairs: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    """TRL preference rows; the prompt is checked by the loader's encoder first."""
    rows = []
    for pair in pairs:
        try:
            loaded.render_ids(pair["prompt"])
        except InputError as exc:
            raise InputError(f"{path}:{pair['_line']}: {exc}") from exc
        if isinstance(pair["prompt"], list):
            row = {
                "prompt": pair["prompt"],
                "chosen": [{"role": "assistant", "content": pair["chosen"]}],
                "rejected": [{"role": "assistant", "content": pair["rejected"]}],
            }
        else:
            row = {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
        rows.append(row)
    return rows


def check_prompt_ids(loaded: Loaded, pairs: list[dict[str, Any]], dataset: Any, path: Path) -> None:
    """TRL tokenizes preference data itself; its prompt ids must be the loader's."""
    for pair, prompt_ids in zip(pairs, dataset["prompt_ids"], strict=False):
        if list(prompt_ids) != loaded.render_ids(pair["prompt"]):
            raise TunelineError(
                f"{path}:{pair['_line']}: TRL tokenized the prompt differently from tuneline's loader "
                "(e.g. the tokenizer adds a BOS token); training would not match the probe's prompts"
            )


def build_trainer(params: Params, loaded: Loaded, rows: list[dict[str, Any]], output_dir: Path) -> Any:
    from trl import DPOConfig, DPOTrainer

    dp = params.dpo
    args = trainer_args(params, loaded, dp, output_dir=output_dir, has_eval=False)
    try:
        config = DPOConfig(
            **{
                "beta": dp.beta,
                "loss_type": dp.loss_type,
                "max_length": dp.max_length,
                "precompute_ref_log_probs": dp.precompute_ref_log_probs,
                **args,
            }
        )
    except ValueError as exc:
        raise InputError(f"dpo: invalid trainer settings (dpo.loss_type {dp.loss_type!r}, dpo.trainer): {exc}") from exc
    return DPOTrainer(
        model=loaded.model,
        args=config,
        # Several processes share the precomputed reference log-probs through files.
        train_dataset=shared_dataset(rows, output_dir / SHARED_DATASET, config.world_size),
        processing_class=loaded.tokenizer,
        peft_config=lora_config(dp.lora),
    )


def run(params: Params) -> dict[str, Any]:
    dp = params.dpo
    pairs_path = Path(params.paths.pairs) / "train.jsonl"
    sft_dir = Path(params.paths.sft_model)
    metrics_path = Path(params.paths.metrics) / "dpo.json"
    ckpt_dir = Path(params.paths.checkpoints) / "dpo"

    pairs = read_pairs(pairs_path, dp.max_pairs, params.seed)
    base = base_provenance(params)
    parent = {"path": params.paths.sft_model, "sha256": sha256_path(sft_dir)} if sft_dir.is_dir() else None
    if parent is None:
        raise InputError(f"{sft_dir}: the SFT adapter is missing (run `dvc repro sft` first)")
    run_id = fingerprint(
        dpo=dp.model_dump(), model=params.model.model_dump(), seed=params.seed, base=base["content_sha256"],
        parent=parent["sha256"], data=data_hashes(pairs_path),
    )

    loaded = load_for_training(params, dp.gradient_checkpointing, merge=[sft_dir])
    trainer = build_trainer(params, loaded, to_rows(loaded, pairs, pairs_path), ckpt_dir)
    dataset = trainer.train_dataset
    if params.model.format == "completion":
        check_prompt_ids(loaded, pairs, dataset, pairs_path)
    lengths = [
        (len(p) + len(c), len(p) + len(r), len(c) + len(r))
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]
    capped = [min(a, dp.max_length) + min(b, dp.max_length) for a, b, _ in lengths]
    plan = make_plan(
        records=len(dataset),
        eval_records=0,
        tokens_per_epoch=sum(capped),
        completion_tokens_per_epoch=sum(c for _, _, c in lengths),
        truncated=sum(1 for a, b, _ in lengths if max(a, b) > dp.max_length),
        max_seq_len=dp.max_length,
        per_device_batch_size=trainer.args.per_device_train_batch_size,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
        num_processes=trainer.args.world_size,
        epochs=float(trainer.args.num_train_epochs),
        warmup=float(trainer.args.warmup_steps),
    )
    main = trainer.is_world_process_zero()
    warnings = announce_plan(plan, "dpo", dp.min_optimizer_steps, dp.strict_plan, show=main)
    if main:
        write_json(metrics_path, {"status": "training", "plan": plan.as_dict(), "warnings": warnings})

    match_adapter_dtype(trainer)
    trainer.add_callback(GuardCallback("dpo"))
    trainer.add_callback(MarkerCallback(run_id))
    throughput = ThroughputCallback()
    trainer.add_callback(throughput)
    initial = trainable_snapshot(trainer.model)
    resume = resume_checkpoint(ckpt_dir, run_id, "dpo")
    started = time.perf_counter()
    result = train_with_checkpoints(trainer, resume, ckpt_dir, "dpo")
    runtime = time.perf_counter() - started
    model, state = trained_model(trainer)
    if not main:
        wait_for_everyone()
        return read_json(metrics_path)
    change = check_weights_changed(model, initial, "dpo", state)

    history = trainer.state.log_history
    results = {
        "train_loss": float(result.training_loss),
        "final_loss": last_logged(history, "loss"),
        "reward_accuracy": last_logged(history, "rewards/accuracies"),
        "reward_margin": last_logged(history, "rewards/margins"),
        "steps": trainer.state.global_step,
        "max_weight_change": change,
    }
    provenance = {
        "stage": "dpo",
        "base": base,
        # The parent adapter is copied into the model dir, so models/dpo is self-contained
        # and probe@dpo depends on nothing else.
        "parent": "parent",
        "parent_source": params.paths.sft_model,
        "parent_sha256": parent["sha256"],
        "stack": [params.paths.sft_model, params.paths.dpo_model],
        "reference": "the SFT model (base with the parent adapter merged; the DPO adapter disabled)",
        "data": data_hashes(pairs_path),
        "params": {"dpo": dp.model_dump(), "model": params.model.model_dump(), "seed": params.seed},
        "plan": plan.as_dict(),
        "results": results,
    }
    with atomic_dir(params.paths.dpo_model) as tmp:
        write_model_dir(
            tmp, model=model, tokenizer=loaded.tokenizer, provenance=provenance,
            card=model_card("DPO adapter", provenance, plan, results), state=state,
        )
        shutil.copytree(sft_dir, tmp / "parent")
    plots = write_plots(history, Path(params.paths.metrics) / "dpo", PLOT_KEYS)
    tokens_seen = plan.tokens_total
    metrics = {
        "plan": plan.as_dict(),
        "warnings": warnings,
        **results,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        "runtime_s": round(runtime, 2),
        "tokens_seen": tokens_seen,
        "tokens_per_s": round(tokens_seen / runtime, 2) if resume is None and runtime > 0 else None,
        # the plan's tokens per optimizer step (a pair's prompt counted once)
        **throughput.summary(plan.tokens_total / max(plan.optimizer_steps, 1)),
        "plots": plots,
    }
    write_json(metrics_path, metrics)
    finish_checkpoints(ckpt_dir, run_id, trainer.state.global_step)
    drop_shared_dataset(ckpt_dir / SHARED_DATASET)
    wait_for_everyone()
    return metrics
