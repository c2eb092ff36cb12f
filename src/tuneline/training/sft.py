"""The SFT method: tokenize prompt/completion records (completion-only loss, the
terminator inside it) and build TRL's ``SFTTrainer`` and its plan. The stage
(``tuneline.stages.sft``) is the recipe; benchmarks build the same trainer from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.modeling import Loaded, chat_special_ids
from tuneline.params import Params
from tuneline.training.arguments import lora_config, trainer_args
from tuneline.training.plan import Plan, plan_for_trainer

RECORD_FIELDS = {"prompt": (str, list), "completion": str}
PLOT_KEYS = ("loss", "learning_rate", "grad_norm", "eval_loss")


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
    if sp.fused_lora:
        from tuneline.training.fused_lora import fuse_lora

        fuse_lora(trainer.model)
    if sp.completion_logits_only:
        from tuneline.training.cpu_loss import completion_logits_only

        completion_logits_only(trainer)
    if sp.sync_free_metrics:
        from tuneline.training.lean_step import sync_free_metrics

        sync_free_metrics(trainer)
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
