"""sft: supervised LoRA/QLoRA fine-tuning on the clean prompt/completion records.

Reads:  ``paths.clean``/train.jsonl and val.jsonl (prompt already rendered in the model
        format, completion = envelope text without terminator), ``paths.base_model``.
Writes: ``paths.sft_model``/ (adapter safetensors, tokenizer, provenance.json, README.md),
        ``paths.metrics``/sft.json (plan, losses, steps, tokens, throughput),
        ``paths.metrics``/sft/*.tsv (per-step loss, learning rate, grad norm, eval loss),
        ``paths.checkpoints``/sft/ (resumable checkpoints while training).
Params: ``sft``, ``model``, ``seed``, ``compute.num_processes``.

With ``compute.num_processes > 1`` the command runs under ``accelerate launch`` (one
process per GPU): every rank trains on its share of each batch; the main process alone
prints the plan and writes the outputs, and the others return the metrics it wrote.

Loss is on completion tokens only, and the terminator (the tokenizer's eos) is appended
to every completion inside the loss so the model learns to stop. Records are tokenized
here with the loader's prompt encoding (sentinel-checked) so training sees exactly the
prompt ids the probe will generate from; TRL then builds labels from the completion mask
(padding is -100 by position, so an eos that is also the pad token stays in the loss).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import Loaded, chat_special_ids
from tuneline.params import Params
from tuneline.records import atomic_dir, read_json, read_jsonl, write_json
from tuneline.training import (
    GuardCallback,
    MarkerCallback,
    Plan,
    ThroughputCallback,
    announce_plan,
    base_provenance,
    check_weights_changed,
    data_hashes,
    epoch_losses,
    fingerprint,
    finish_checkpoints,
    last_logged,
    load_for_training,
    lora_config,
    make_plan,
    match_adapter_dtype,
    model_card,
    resume_checkpoint,
    train_with_checkpoints,
    trainable_snapshot,
    trained_model,
    trainer_args,
    wait_for_everyone,
    write_model_dir,
    write_plots,
)

RECORD_FIELDS = {"prompt": (str, list), "completion": str}
PLOT_KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss")


def read_records(path: Path, limit: int | None, seed: int) -> list[dict[str, Any]]:
    records = read_jsonl(path, required=RECORD_FIELDS)
    for number, record in enumerate(records, start=1):
        record["_line"] = number
    if limit is not None and limit < len(records):
        records = sorted(random.Random(seed).sample(records, limit), key=lambda r: r["_line"])
    return records


def tokenize(
    loaded: Loaded, records: list[dict[str, Any]], max_seq_len: int, path: Path
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    """input_ids = prompt ids + completion ids + eos; completion_mask marks the loss."""
    tokenizer = loaded.tokenizer
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError(f"{loaded.provenance['model']}: the tokenizer has no eos token to end completions with")
    special = chat_special_ids(tokenizer)
    rows = []
    stats = {"tokens": 0, "completion_tokens": 0, "truncated": 0}
    for record in records:
        where = f"{path}:{record['_line']}"
        try:
            prompt_ids = loaded.render_ids(record["prompt"])
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc
        completion_ids = tokenizer(record["completion"], add_special_tokens=False)["input_ids"]
        leaked = sorted({tokenizer.convert_ids_to_tokens(i) for i in completion_ids if i in special})
        if leaked:
            raise InputError(
                f"{where}: completion contains special token(s) {leaked}; completions are plain text and the "
                "terminator is added by the trainer"
            )
        ids = prompt_ids + completion_ids + [eos]
        mask = [0] * len(prompt_ids) + [1] * (len(completion_ids) + 1)
        if len(ids) > max_seq_len:
            stats["truncated"] += 1
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if not any(mask):
            raise InputError(
                f"{where}: the prompt alone takes {len(prompt_ids)} tokens >= sft.max_seq_len {max_seq_len}; "
                "no completion token is left to learn from"
            )
        stats["tokens"] += len(ids)
        stats["completion_tokens"] += sum(mask)
        rows.append({"input_ids": ids, "completion_mask": mask})
    return rows, stats


def build_trainer(params: Params, loaded: Loaded, train_rows: list, eval_rows: list, output_dir: Path) -> Any:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    sp = params.sft
    args = trainer_args(params, loaded, sp, output_dir=output_dir, has_eval=bool(eval_rows) and sp.eval_each_epoch)
    # Rows are tokenized and truncated above; TRL's own max_length only matters for packing.
    max_length = sp.max_seq_len if sp.packing else None
    config = SFTConfig(
        **{
            "completion_only_loss": True,
            "max_length": max_length,
            "packing": sp.packing,
            "padding_free": sp.padding_free,
            "weight_decay": sp.weight_decay,
            "max_grad_norm": sp.max_grad_norm,
            **args,
        }
    )
    trainer = SFTTrainer(
        model=loaded.model,
        args=config,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if config.eval_strategy != "no" else None,
        processing_class=loaded.tokenizer,
        peft_config=lora_config(sp.lora),
    )
    return trainer


def plan_for(params: Params, trainer: Any, stats: dict[str, int], eval_records: int) -> Plan:
    sp = params.sft
    return make_plan(
        records=len(trainer.train_dataset),
        eval_records=eval_records,
        tokens_per_epoch=stats["tokens"],
        completion_tokens_per_epoch=stats["completion_tokens"],
        truncated=stats["truncated"],
        max_seq_len=sp.max_seq_len,
        per_device_batch_size=trainer.args.per_device_train_batch_size,
        gradient_accumulation_steps=trainer.args.gradient_accumulation_steps,
        num_processes=trainer.args.world_size,
        epochs=float(trainer.args.num_train_epochs),
        warmup=float(trainer.args.warmup_steps),
    )


def run(params: Params) -> dict[str, Any]:
    sp = params.sft
    clean = Path(params.paths.clean)
    train_path, val_path = clean / "train.jsonl", clean / "val.jsonl"
    metrics_path = Path(params.paths.metrics) / "sft.json"
    ckpt_dir = Path(params.paths.checkpoints) / "sft"

    train_records = read_records(train_path, sp.max_records, params.seed)
    val_records = read_records(val_path, sp.max_eval_records, params.seed) if val_path.is_file() else []
    base = base_provenance(params)
    run_id = fingerprint(
        sft=sp.model_dump(), model=params.model.model_dump(), seed=params.seed, base=base["content_sha256"],
        data=data_hashes(train_path, val_path),
    )

    loaded = load_for_training(params, sp.gradient_checkpointing)
    train_rows, stats = tokenize(loaded, train_records, sp.max_seq_len, train_path)
    eval_rows, _ = tokenize(loaded, val_records, sp.max_seq_len, val_path)
    trainer = build_trainer(params, loaded, train_rows, eval_rows, ckpt_dir)
    plan = plan_for(params, trainer, stats, len(eval_rows) if trainer.eval_dataset is not None else 0)
    main = trainer.is_world_process_zero()
    warnings = announce_plan(plan, "sft", sp.min_optimizer_steps, sp.strict_plan, show=main)
    if main:
        write_json(metrics_path, {"status": "training", "plan": plan.as_dict(), "warnings": warnings})

    match_adapter_dtype(trainer)
    trainer.add_callback(GuardCallback("sft"))
    trainer.add_callback(MarkerCallback(run_id))
    throughput = ThroughputCallback()
    trainer.add_callback(throughput)
    initial = trainable_snapshot(trainer.model)
    resume = resume_checkpoint(ckpt_dir, run_id, "sft")
    started = time.perf_counter()
    result = train_with_checkpoints(trainer, resume, ckpt_dir, "sft")
    runtime = time.perf_counter() - started
    if trainer.state.global_step != plan.optimizer_steps:
        raise TunelineError(
            f"sft: the trainer ran {trainer.state.global_step} optimizer steps but the plan said {plan.optimizer_steps}"
        )
    model, state = trained_model(trainer)
    if not main:
        wait_for_everyone()
        return read_json(metrics_path)
    change = check_weights_changed(model, initial, "sft", state)

    history = trainer.state.log_history
    tokens_seen = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0) or plan.tokens_total
    results = {
        "train_loss": float(result.training_loss),
        "final_loss": last_logged(history, "loss"),
        "eval_loss": last_logged(history, "eval_loss"),
        "steps": trainer.state.global_step,
        "tokens_seen": tokens_seen,
        "max_weight_change": change,
    }
    timing = {
        "runtime_s": round(runtime, 2),
        "tokens_per_s": round(tokens_seen / runtime, 2) if resume is None and runtime > 0 else None,
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else None,
        **throughput.summary(),
    }
    provenance = {
        "stage": "sft",
        "base": base,
        "parent": None,
        "stack": [params.paths.sft_model],
        "data": data_hashes(train_path, val_path),
        "params": {"sft": sp.model_dump(), "model": params.model.model_dump(), "seed": params.seed},
        "plan": plan.as_dict(),
        "results": results,
    }
    with atomic_dir(params.paths.sft_model) as tmp:
        write_model_dir(
            tmp, model=model, tokenizer=loaded.tokenizer, provenance=provenance,
            card=model_card("SFT adapter", provenance, plan, results), state=state,
        )
    plots = write_plots(history, Path(params.paths.metrics) / "sft", PLOT_KEYS)
    metrics = {
        "plan": plan.as_dict(),
        "warnings": warnings,
        **results,
        **timing,
        "eval_loss_per_epoch": epoch_losses(history),
        "plots": plots,
    }
    write_json(metrics_path, metrics)
    finish_checkpoints(ckpt_dir, run_id, trainer.state.global_step)
    wait_for_everyone()
    return metrics
