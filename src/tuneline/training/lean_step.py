"""Per-step metrics without host syncs (``sft.sync_free_metrics``).

TRL's ``SFTTrainer.compute_loss`` reads its metrics back to the host on every step,
right after the forward pass (entropy, token accuracy, a ``> 0`` test and the token
count: four ``.item()``/``bool`` syncs), so the GPU drains its queue before the backward
pass is launched. ``sync_free_metrics(trainer)`` computes the same loss and keeps the
metric sums on the device; they are read once per logging step. The logged entropy and
accuracy are then token-weighted over the logging window (TRL averages per-step ratios:
the same at ``logging_steps: 1`` and for equal-sized steps); ``num_tokens`` is the same.

Only the plain path is replaced (no ``compute_loss_func``, label smoothing, MoE aux loss
or sequence parallelism, loss type ``nll``/``dft``); anything else runs TRL's own.
"""

from __future__ import annotations

import types
from typing import Any


def sync_free_metrics(trainer: Any) -> None:
    import torch

    original_loss = trainer.compute_loss
    original_log = trainer.log
    sums: dict[str, Any] = {}

    def plain(inputs: dict[str, Any], return_outputs: bool) -> bool:
        parallel = getattr(trainer.accelerator, "parallelism_config", None)
        return (
            not return_outputs
            and trainer.compute_loss_func is None
            and trainer.label_smoother is None
            and trainer.args.loss_type in ("nll", "dft")
            and not trainer.aux_loss_enabled
            and not (parallel is not None and getattr(parallel, "sp_enabled", False))
        )

    def compute_loss(self: Any, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if not plain(inputs, return_outputs):
            return original_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        per_token_loss = -outputs.log_probs
        if self.args.loss_type == "dft":
            per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
        num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        with torch.no_grad():
            step = torch.stack([outputs.label_mask.sum(), outputs.entropy.detach().sum(), outputs.is_top1.sum()])
            step = step.double()
            sums[mode] = step if mode not in sums else sums[mode] + step
            if mode == "train":
                if "attention_mask" in inputs:
                    tokens = inputs["attention_mask"].sum()
                else:  # padding-free rows: the token count is the row's length, known on the host
                    tokens = inputs["position_ids"].size(1)
                sums["tokens"] = sums.get("tokens", 0) + tokens
        return loss

    def log(self: Any, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if mode in sums:
            total = self.accelerator.gather_for_metrics(sums.pop(mode)[None]).sum(0).tolist()
            valid, entropy, correct = total
            self._metrics[mode]["entropy"].append(entropy / valid if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append(correct / valid if valid > 0 else 0.0)
        if mode == "train" and "tokens" in sums:
            tokens = torch.as_tensor(sums.pop("tokens"), device=self.args.device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(tokens[None]).sum()) // self._tp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return original_log(logs, start_time)

    trainer.compute_loss = types.MethodType(compute_loss, trainer)
    trainer.log = types.MethodType(log, trainer)
