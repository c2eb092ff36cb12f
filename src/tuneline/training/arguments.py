"""What the trainers are built from: the LoRA config and the TrainingArguments fields."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from tuneline.modeling import Loaded
from tuneline.params import LoraParams, Params


def lora_config(lp: LoraParams) -> Any:
    """peft ``LoraConfig`` from params (``lora.extra`` passed through)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lp.r,
        lora_alpha=lp.alpha,
        lora_dropout=lp.dropout,
        target_modules=lp.target_modules,
        task_type="CAUSAL_LM",
        **lp.extra,
    )


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def trainer_args(
    params: Params,
    loaded: Loaded,
    stage: Any,
    *,
    output_dir: Path,
    has_eval: bool,
) -> dict[str, Any]:
    """TrainingArguments fields of a training stage: what tuneline fixes (precision,
    seed, checkpoints, logging, Liger), then the stage's ``trainer`` settings, which win."""
    import torch

    cuda = loaded.device == "cuda"
    # bf16/fp16 weights train under autocast in that precision, on CUDA and on a CPU with
    # native bf16: the dtype the loader chose (tuneline.modeling.resolve_dtype).
    dtype = getattr(loaded.model, "dtype", torch.float32)
    settings = stage.trainer
    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "per_device_eval_batch_size": settings["per_device_train_batch_size"],
        "logging_first_step": True,
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "eval_strategy": "epoch" if has_eval else "no",
        "report_to": "none",
        "seed": params.seed,
        "data_seed": params.seed,
        "bf16": dtype == torch.bfloat16,
        "fp16": cuda and dtype == torch.float16,
        "use_cpu": not cuda,
        "use_liger_kernel": cuda and liger_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        # Every LoRA weight takes part in each step; DDP need not search the graph for
        # unused ones (the Trainer's default for a peft model).
        "ddp_find_unused_parameters": False,
    }
    if settings["gradient_checkpointing"]:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return {**args, **settings}
