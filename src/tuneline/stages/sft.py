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
``tuneline.training.sft`` tokenizes the records and builds TRL's ``SFTTrainer``; this
module is the recipe.

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

from pathlib import Path
from typing import Any

from tuneline.modeling import load_for_training
from tuneline.params import Params
from tuneline.training import (
    Job,
    base_provenance,
    data_hashes,
    fingerprint,
    last_logged,
    read_sample,
    train_adapter,
)
from tuneline.training.sft import PLOT_KEYS, RECORD_FIELDS, build_trainer, plan_for, tokenize


def run(params: Params) -> dict[str, Any]:
    sp = params.sft
    clean = Path(params.paths.clean)
    train_path, val_path = clean / "train.jsonl", clean / "val.jsonl"
    ckpt_dir = Path(params.paths.checkpoints) / "sft"

    train_records = read_sample(train_path, RECORD_FIELDS, sp.max_records, params.seed)
    val_records = read_sample(val_path, RECORD_FIELDS, sp.max_eval_records, params.seed) if val_path.is_file() else []
    base = base_provenance(params)
    data = data_hashes(train_path, val_path)
    settings = {"sft": sp.model_dump(), "model": params.model.model_dump(), "seed": params.seed}
    run_id = fingerprint("sft", **settings, base=base["content_sha256"], data=data)

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
