"""Fused LoRA forward (``sft.fused_lora``): the same function as peft's LoRA layers with
fewer, larger kernels.

peft computes each adapted linear layer as ``base(x) + B(A(x)) * scaling``: two small
matmuls, a multiply and an add over the layer's whole output, per layer and again in
backward. ``fuse_lora(model)`` replaces, per decoder layer,

- the A matmuls of sibling projections that read the same input (``q_proj``/``k_proj``/
  ``v_proj``, ``gate_proj``/``up_proj``) by one matmul with their A matrices
  concatenated; each projection takes its slice of the result;
- ``B(.) * scaling`` and the add by one ``addmm`` into the base output with ``scaling``
  folded into the (small) B matrix.

The weights stay peft's parameters (same names, same state dict, same adapter files),
so saving, merging and resuming are unchanged; only the forward differs. A layer is fused
only when it is a plain LoRA ``Linear`` over an ``nn.Linear`` with one active adapter, no
dropout, no DoRA or other variant, not merged; anything else keeps peft's forward, and a
fused layer falls back to it when called with extra arguments, merged or disabled.
``unfuse_lora(model)`` restores peft's forward everywhere (the reference path).
"""

from __future__ import annotations

from typing import Any

SIBLINGS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """Projections that read one input: their A matmul is done once per input tensor."""

    def __init__(self, members: list[Any], adapter: str):
        self.members = members
        self.adapter = adapter
        self.ranks = [m.lora_A[adapter].weight.shape[0] for m in members]
        self.offsets = [sum(self.ranks[:i]) for i in range(len(members))]
        self._input: Any = None
        self._a: Any = None
        self._served: set[int] = set()

    def lora_a(self, x: Any, index: int) -> Any:
        import torch

        if self._input is not x or index in self._served:
            weights = [m.lora_A[self.adapter].weight for m in self.members]
            weight = weights[0] if len(weights) == 1 else torch.cat(weights)
            self._input, self._a, self._served = x, torch.nn.functional.linear(*_operands(x, weight)), set()
        a = self._a
        self._served.add(index)
        if len(self._served) == len(self.members):  # every sibling has its slice: hold nothing
            self._input = self._a = None
        start = self.offsets[index]
        return a[..., start:start + self.ranks[index]]


def _operands(x: Any, weight: Any) -> tuple[Any, Any]:
    """``(x, weight)`` in the dtype the matmul runs in. peft casts the input to the adapter's
    dtype (float32 adapters over a bf16 base), and autocast then casts it back: under
    autocast cast the small weight instead (the same bf16 operands, two copies of the
    activations fewer); without autocast do what peft does."""
    import torch

    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype)
    return x.to(weight.dtype), weight


def _eligible(module: Any) -> str | None:
    """The active adapter of a LoRA layer the fused forward computes exactly, else None."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    if type(module) is not LoraLinear or not isinstance(module.base_layer, torch.nn.Linear):
        return None
    adapters = list(module.active_adapters)
    if len(adapters) != 1 or module.merged or module.disable_adapters:
        return None
    name = adapters[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    if getattr(module, "lora_bias", {}).get(name, False) or getattr(module, "use_dora", {}).get(name, False):
        return None
    return name


def _fused_forward(module: Any, group: _Group, index: int) -> Any:
    peft_forward = type(module).forward

    def forward(x: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or module.merged or module.disable_adapters or group.adapter not in module.active_adapters:
            return peft_forward(module, x, *args, **kwargs)
        # 2-D throughout: the base output is then a tensor of its own, not a view, and the
        # in-place add below needs no copy of it in backward.
        x2 = x.reshape(-1, x.shape[-1])
        result = module.base_layer(x2)
        a = group.lora_a(x2, index)
        b = module.lora_B[group.adapter].weight * module.scaling[group.adapter]
        # result += a @ (scaling * B)^T in the GEMM's epilogue; the base output is not
        # needed by the base layer's backward, so adding in place is safe for autograd.
        result.addmm_(a.to(result.dtype), b.t().to(result.dtype))
        return result.view(*x.shape[:-1], result.shape[-1])

    return forward


def fuse_lora(model: Any) -> dict[str, int]:
    """Install the fused forward on every eligible LoRA layer of ``model``; returns how
    many layers were fused alone, in sibling groups, and left to peft."""
    counts = {"single": 0, "grouped": 0, "groups": 0, "unfused": 0}
    from peft.tuners.lora import LoraLayer

    done: set[int] = set()
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            adapters = [_eligible(m) if m is not None else None for m in members]
            if any(a is None for a in adapters) or len(set(adapters)) != 1:
                continue
            if len({m.in_features for m in members}) != 1:
                continue
            group = _Group(members, adapters[0])
            for i, member in enumerate(members):
                member.forward = _fused_forward(member, group, i)
                done.add(id(member))
            counts["grouped"] += len(members)
            counts["groups"] += 1
    for module in model.modules():
        if not isinstance(module, LoraLayer) or id(module) in done:
            continue
        adapter = _eligible(module)
        if adapter is None:
            counts["unfused"] += 1
            continue
        module.forward = _fused_forward(module, _Group([module], adapter), 0)
        counts["single"] += 1
    return counts


def unfuse_lora(model: Any) -> None:
    """peft's own forward on every LoRA layer again."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and "forward" in module.__dict__:
            del module.forward
