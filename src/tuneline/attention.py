"""``model.attn_implementation: sdpa_varlen``: SDPA, plus varlen flash attention for
padding-free batches.

A padding-free batch (``sft.padding_free`` / ``sft.packing``) is one row of several
sequences; TRL's collator sends their boundaries (``cu_seq_lens_q``, ``max_length_q``).
Plain SDPA can only run such a row with a block-diagonal mask, which rules out its flash
kernel; here the row goes to PyTorch's varlen flash attention
(``torch.nn.attention.varlen``), each sequence attending causally to itself alone.
Everything else (padded batches, evaluation, generation, DPO, CPU, a PyTorch without
varlen attention) takes transformers' SDPA path with the mask transformers builds for
SDPA, so results match ``sdpa`` up to bf16 rounding.
"""

from __future__ import annotations

import inspect
from typing import Any

NAME = "sdpa_varlen"


def _find_varlen() -> tuple[Any, dict[str, Any]] | None:
    """PyTorch's varlen attention and its causal keyword (it changed between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "is_causal" in parameters:
        return varlen_attn, {"is_causal": True}
    if "window_size" in parameters:
        return varlen_attn, {"window_size": (-1, 0)}
    return None


# Looked up once by register(), not inside the attention call that torch.compile traces.
_VARLEN: tuple[Any, dict[str, Any]] | None = None


def attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    varlen = _VARLEN
    packed = (
        varlen is not None
        and cu_seq_lens is not None
        and kwargs.get("max_length_q") is not None
        and query.is_cuda
        and query.shape[0] == 1
        and dropout == 0.0
        and kwargs.get("sliding_window") is None
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    function, causal = varlen
    # (1, heads, tokens, head_dim) -> (tokens, heads, head_dim); key/value heads repeated for GQA
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    length = kwargs["max_length_q"]  # kept symbolic under torch.compile (no recompile per length)
    if isinstance(length, torch.Tensor):
        length = int(length)
    out = function(q, k, v, cu, cu, length, length, scale=scaling, **causal)
    return out.unsqueeze(0), None  # (1, tokens, heads, head_dim), as the SDPA path returns


def register() -> None:
    """Make ``attn_implementation="sdpa_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    global _VARLEN
    if _VARLEN is None:
        _VARLEN = _find_varlen()
    AttentionInterface.register(NAME, attention)
    # The SDPA path needs SDPA's masks (padding, and block-diagonal for a packed row when
    # varlen attention is not used).
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
