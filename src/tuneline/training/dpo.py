"""The DPO method: preference rows for TRL (prompts checked by the loader's encoder),
the check that TRL's prompt ids are the loader's, and TRL's ``DPOTrainer`` and its plan.
The stage (``tuneline.stages.dpo``) is the recipe; benchmarks build the same trainer
from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import Loaded
from tuneline.params import Params
from tuneline.training.arguments import lora_config, trainer_args
from tuneline.training.distributed import shared_dataset
from tuneline.training.plan import Plan, plan_for_trainer

SHARED_DATASET = "shared-dataset"
PAIR_FIELDS = {"prompt": (str, list), "chosen": str, "rejected": str}
PLOT_KEYS = (
    "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
    "rewards/margins", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
)


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
    if len(dataset) != len(pairs):
        raise TunelineError(f"{path}: TRL kept {len(dataset)} of {len(pairs)} pairs; every pair must be trained on")
    for pair, prompt_ids in zip(pairs, dataset["prompt_ids"], strict=True):
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


def plan_for(params: Params, trainer: Any) -> Plan:
    """Tokens per pair: prompt + chosen and prompt + rejected, each capped at max_length."""
    cap = params.dpo.max_length
    dataset = trainer.train_dataset
    lengths = [
        (len(p) + len(c), len(p) + len(r), len(c) + len(r))
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"], strict=True)
    ]
    return plan_for_trainer(
        trainer,
        eval_records=0,
        tokens_per_epoch=sum(min(a, cap) + min(b, cap) for a, b, _ in lengths),
        completion_tokens_per_epoch=sum(c for _, _, c in lengths),
        truncated=sum(1 for a, b, _ in lengths if max(a, b) > cap),
        max_seq_len=cap,
    )
