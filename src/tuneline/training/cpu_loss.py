"""The LM head and loss at completion positions only, on devices without Triton
(``sft.completion_logits_only``).

TRL's ``SFTTrainer`` patches the model with a fused LM head (``trl.trainer.utils.
add_fused_lm_head``): called with ``fused_lm_head=True`` it returns the per-token
log-probability of each next-token label, its entropy and whether it is the top-1 token,
zero where the label is ``-100``. On CUDA a Triton kernel scores only the positions with a
label; elsewhere (CPU) TRL folds every position, prompt and padding included, through
vocabulary tiles in torch ops, upcasting each ``[tokens, 32768]`` tile to float32 and
recomputing it in the backward pass; its entropy and top-1 take further passes over each
tile. On the embedded model this was about 40% of a CPU sft step (BENCHMARKS.md).

``completion_logits_only(trainer)`` wraps that fused forward: on a device without Triton
it selects the hidden states whose label is not ``-100`` first, then projects them through
the LM head (under the caller's autocast, as TRL does), and takes the log-softmax, entropy
and top-1 from those logits with one float32 exp pass. It returns TRL's ``FusedCausalLMOutput`` with the
same shapes and zeros, so the trainer's own ``compute_loss`` (or ``lean_step``'s)
normalises the loss as before (``num_items_in_batch``) and logs the same metrics. The
gradient of the selected logits is ``g * (onehot - softmax)``, from the exponentials kept
from the forward pass (TRL recomputes the tile). An adapter on the LM head itself is
applied (the module is called); TRL's head reads the bare weight.

Anything it does not cover runs TRL's forward unchanged: a Triton device (TRL already
scores only labelled positions there), a logit softcap or scale, MoE router logits, a sharded (DTensor) head, or a forward without ``fused_lm_head``. The
entropy it returns carries no gradient (the trainers log it detached).
"""

from __future__ import annotations

import functools
import types
from typing import Any


@functools.cache
def _logprob_function() -> Any:
    import torch

    class CompletionLogProbs(torch.autograd.Function):
        """Per row of ``logits`` [M, V] (upcast to float32): log p(target), the entropy and
        whether the target is the first argmax, as in TRL's fused LM head. Only log p has a
        gradient, ``g * (onehot(target) - p)``, from the probabilities kept in the forward."""

        @staticmethod
        def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
            ctx.set_materialize_grads(False)
            # max and argmax on the unconverted logits (the float32 upcast is exact); argmax is the first
            # maximum, so a tie with an earlier token is a miss, as in TRL
            top = logits.max(-1)
            z = logits.float()
            target_logit = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            exp = torch.sub(z, top.values.float().unsqueeze(-1)).exp_()  # exp(z - max): one pass, kept for backward
            sum_exp = exp.sum(-1)
            log_z = top.values.float() + sum_exp.log()
            entropy = log_z - torch.linalg.vecdot(exp, z) / sum_exp  # log Z - sum p z
            ctx.save_for_backward(exp, sum_exp, targets)
            ctx.logits_dtype = logits.dtype
            ctx.mark_non_differentiable(entropy)
            return target_logit - log_z, entropy, top.indices == targets

        @staticmethod
        def backward(ctx: Any, grad_log_probs: Any, *_: Any) -> tuple[Any, None]:
            if grad_log_probs is None:
                return None, None
            exp, sum_exp, targets = ctx.saved_tensors
            g = grad_log_probs.float().unsqueeze(-1)
            grad = exp.mul_(-g / sum_exp.unsqueeze(-1))  # -g p, in place: a second backward fails on the version
            grad.scatter_add_(-1, targets.unsqueeze(-1), g)
            return grad.to(ctx.logits_dtype), None

    return CompletionLogProbs


def completion_log_probs(hidden: Any, labels: Any, lm_head: Any) -> tuple[Any, Any, Any, Any]:
    """TRL's fused-head fields for shifted ``hidden`` [B, T, H] and ``labels`` [B, T]:
    log p(label), entropy, top-1 (zero where the label is -100) and the label mask."""
    weight = lm_head.weight
    hidden, labels = hidden.to(weight.device), labels.to(weight.device)
    mask = labels != -100
    # prompt and padding positions never reach the head; the module call keeps any adapter on it
    logits = lm_head(hidden[mask])
    picked = _logprob_function().apply(logits, labels[mask])
    # masked_scatter keeps the output connected to the graph when no label is valid (a zero loss)
    log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x) for x in picked)
    return log_probs, entropy, is_top1, mask


_SCALES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def completion_logits_only(trainer: Any) -> bool:
    """Wrap the fused LM head TRL put on ``trainer.model`` (see the module doc). False,
    with nothing changed, where the model's head scales or caps its logits."""
    from trl.kernels.chunked_logprob import _use_triton
    from trl.trainer.utils import FusedCausalLMOutput

    model = trainer.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.get_text_config() is not config or any(getattr(config, k, None) is not None for k in _SCALES):
        return False
    fused = base.forward  # TRL's fused forward, a bound method

    @functools.wraps(type(base).forward)  # generate() checks its kwargs against this signature
    def forward(self: Any, *args: Any, fused_lm_head: bool = False, labels: Any = None, shift_labels: Any = None,
                num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        lm_head = self.get_output_embeddings()
        weight = lm_head.weight
        if (
            not fused_lm_head
            or (labels is None and shift_labels is None)
            or _use_triton(weight.device)
            or getattr(config, "output_router_logits", False)
            or type(weight).__name__ == "DTensor"
        ):
            return fused(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                         num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        log_probs, entropy, is_top1, mask = completion_log_probs(hidden, labels, lm_head)
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    base.forward = types.MethodType(forward, base)
    return True
