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

import shutil
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.modeling import load_for_training
from tuneline.params import Params
from tuneline.provenance import sha256_path
from tuneline.training import (
    Job,
    base_provenance,
    data_hashes,
    drop_shared_dataset,
    fingerprint,
    is_local_main_process,
    last_logged,
    read_sample,
    train_adapter,
)
from tuneline.training.dpo import (
    PAIR_FIELDS,
    PLOT_KEYS,
    SHARED_DATASET,
    build_trainer,
    check_prompt_ids,
    plan_for,
    to_rows,
)


def run(params: Params) -> dict[str, Any]:
    dp = params.dpo
    pairs_path = Path(params.paths.pairs) / "train.jsonl"
    sft_dir = Path(params.paths.sft_model)
    ckpt_dir = Path(params.paths.checkpoints) / "dpo"

    pairs = read_sample(pairs_path, PAIR_FIELDS, dp.max_pairs, params.seed)
    if not sft_dir.is_dir():
        raise InputError(f"{sft_dir}: the SFT adapter is missing (run `dvc repro sft` first)")
    base, parent_sha256 = base_provenance(params), sha256_path(sft_dir)
    data = data_hashes(pairs_path)
    settings = {"dpo": dp.model_dump(), "model": params.model.model_dump(), "seed": params.seed}
    run_id = fingerprint("dpo", **settings, base=base["content_sha256"], parent=parent_sha256, data=data)

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
    if is_local_main_process():  # one copy per machine
        drop_shared_dataset(ckpt_dir / SHARED_DATASET)
    return metrics
