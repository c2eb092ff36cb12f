"""sft: supervised LoRA/QLoRA fine-tuning on the clean prompt/completion records.

Reads:  ``paths.clean``/train.jsonl and val.jsonl (prompt already rendered in the model
        format, completion = envelope text without terminator), ``paths.base_model``.
Writes: ``paths.sft_model``/ (adapter safetensors, tokenizer, provenance.json, README.md),
        ``paths.metrics``/sft.json (plan, losses, steps, tokens, throughput),
        ``paths.metrics``/sft/*.tsv (per-step loss, learning rate, grad norm, eval loss),
        ``paths.checkpoints``/sft/ (resumable checkpoints while training),
        ``paths.reports``/provenance/sft.json (the commit and library versions of the run).
Params: ``sft`` (TrainingArguments settings in ``sft.trainer``), ``model``, ``seed``,
        ``compute.num_processes``.

The loop (plan, resume, guards, save, metrics) is ``tuneline.training.train_adapter``;
this module reads and tokenizes the records and builds TRL's ``SFTTrainer``.

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
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.modeling import Loaded, chat_special_ids, load_for_training
from tuneline.params import Params
from tuneline.records import read_jsonl
from tuneline.training import (
    Job,
    Plan,
    base_provenance,
    data_hashes,
    fingerprint,
    last_logged,
    lora_config,
    plan_for_trainer,
    train_adapter,
    trainer_args,
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
    return plan_for_trainer(
        trainer,
        eval_records=eval_records,
        tokens_per_epoch=stats["tokens"],
        completion_tokens_per_epoch=stats["completion_tokens"],
        truncated=stats["truncated"],
        max_seq_len=params.sft.max_seq_len,
    )


def run(params: Params) -> dict[str, Any]:
    sp = params.sft
    clean = Path(params.paths.clean)
    train_path, val_path = clean / "train.jsonl", clean / "val.jsonl"
    ckpt_dir = Path(params.paths.checkpoints) / "sft"

    train_records = read_records(train_path, sp.max_records, params.seed)
    val_records = read_records(val_path, sp.max_eval_records, params.seed) if val_path.is_file() else []
    base = base_provenance(params)
    data = data_hashes(train_path, val_path)
    settings = {"sft": sp.model_dump(), "model": params.model.model_dump(), "seed": params.seed}
    run_id = fingerprint(**settings, base=base["content_sha256"], data=data)

    loaded = load_for_training(params, sp.trainer["gradient_checkpointing"])
    train_rows, stats = tokenize(loaded, train_records, sp.max_seq_len, train_path)
    eval_rows, _ = tokenize(loaded, val_records, sp.max_seq_len, val_path)
    trainer = build_trainer(params, loaded, train_rows, eval_rows, ckpt_dir)
    plan = plan_for(params, trainer, stats, len(eval_rows) if trainer.eval_dataset is not None else 0)
    job = Job(
        stage="sft",
        title="SFT adapter",
        out_dir=Path(params.paths.sft_model),
        run_id=run_id,
        provenance={
            "stage": "sft", "base": base, "parent": None, "stack": [params.paths.sft_model], "data": data,
            "params": settings,
        },
        plot_keys=PLOT_KEYS,
        results=lambda history: {"eval_loss": last_logged(history, "eval_loss")},
    )
    return train_adapter(params, job, trainer, loaded, plan)
