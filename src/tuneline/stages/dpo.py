"""dpo: preference tuning of the SFT model, with the SFT model as the reference.

Reads:  ``paths.pairs``/train.jsonl, ``paths.base_model``, ``paths.sft_model``.
Writes: ``paths.dpo_model``/ (adapter safetensors, tokenizer, provenance.json naming the
        SFT adapter as its parent, README.md), ``paths.metrics``/dpo.json (plan, losses,
        reward accuracy/margins), ``paths.metrics``/dpo/*.tsv (per-step plots),
        ``paths.checkpoints``/dpo/ (resumable checkpoints while training),
        ``paths.reports``/provenance/dpo.json (the commit and library versions of the run).
Params: ``dpo`` (TrainingArguments settings in ``dpo.trainer``), ``model``, ``seed``,
        ``compute.num_processes``.

With ``compute.num_processes > 1`` the command runs under ``accelerate launch`` (one
process per GPU); the main process alone prints the plan and writes the outputs.

The SFT adapter is merged into the base and a fresh LoRA adapter is trained on top, so
TRL's reference (the model with adapters disabled) is exactly the SFT model: at step 0
the chosen and rejected rewards are zero (in float32 to rounding; in bf16 precomputed
reference log-probs come from a differently batched pass, so they differ by bf16
rounding: docs/TRAINING.md). The DPO adapter therefore applies to
base + merged SFT; ``provenance.json`` records ``"parent"`` and ``"stack"`` and
``tuneline.modeling.load_for_eval`` loads it that way. The loop is
``tuneline.training.train_adapter``, as for sft.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import Loaded, load_for_training
from tuneline.params import Params
from tuneline.provenance import sha256_path
from tuneline.records import read_jsonl
from tuneline.training import (
    Job,
    Plan,
    base_provenance,
    data_hashes,
    drop_shared_dataset,
    fingerprint,
    is_main_process,
    last_logged,
    lora_config,
    plan_for_trainer,
    shared_dataset,
    train_adapter,
    trainer_args,
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


def run(params: Params) -> dict[str, Any]:
    dp = params.dpo
    pairs_path = Path(params.paths.pairs) / "train.jsonl"
    sft_dir = Path(params.paths.sft_model)
    ckpt_dir = Path(params.paths.checkpoints) / "dpo"

    pairs = read_pairs(pairs_path, dp.max_pairs, params.seed)
    if not sft_dir.is_dir():
        raise InputError(f"{sft_dir}: the SFT adapter is missing (run `dvc repro sft` first)")
    base, parent_sha256 = base_provenance(params), sha256_path(sft_dir)
    data = data_hashes(pairs_path)
    settings = {"dpo": dp.model_dump(), "model": params.model.model_dump(), "seed": params.seed}
    run_id = fingerprint(**settings, base=base["content_sha256"], parent=parent_sha256, data=data)

    loaded = load_for_training(params, dp.trainer["gradient_checkpointing"], merge=[sft_dir])
    trainer = build_trainer(params, loaded, to_rows(loaded, pairs, pairs_path), ckpt_dir)
    if params.model.format == "completion":
        check_prompt_ids(loaded, pairs, trainer.train_dataset, pairs_path)
    job = Job(
        stage="dpo",
        title="DPO adapter",
        out_dir=Path(params.paths.dpo_model),
        run_id=run_id,
        provenance={
            "stage": "dpo", "base": base,
            # The parent adapter is copied into the model dir, so models/dpo is
            # self-contained and probe@dpo depends on nothing else.
            "parent": "parent", "parent_source": params.paths.sft_model, "parent_sha256": parent_sha256,
            "stack": [params.paths.sft_model, params.paths.dpo_model],
            "reference": "the SFT model (base with the parent adapter merged; the DPO adapter disabled)",
            "data": data, "params": settings,
        },
        plot_keys=PLOT_KEYS,
        results=lambda history: {
            "reward_accuracy": last_logged(history, "rewards/accuracies"),
            "reward_margin": last_logged(history, "rewards/margins"),
        },
        add_files=lambda tmp: shutil.copytree(sft_dir, tmp / "parent"),
    )
    metrics = train_adapter(params, job, trainer, loaded, plan_for(params, trainer))
    if is_main_process():
        drop_shared_dataset(ckpt_dir / SHARED_DATASET)
    return metrics
