"""Data-parallel generation: each process generates a share of the prompts, rank 0 gets all.

Under ``accelerate launch`` (``tuneline.launch``: ``compute.num_processes`` > 1 for
``generate``, ``pairs`` or ``probe``, on one or several machines) ``generate`` splits the
prompts into contiguous shares in prompt order, one per global rank (the first
``len % world`` shares one prompt longer, as accelerate's ``split_between_processes``),
runs ``tuneline.generation.generate`` on this process's share, and gathers the shares on
global rank 0 in rank order, which is prompt order. Rank 0 returns every result and goes
on to write the stage's outputs; every other rank leaves the stage at once with exit code
0 (``NotMainProcess``), so it writes nothing (``staged_outputs`` drops what it staged).

Greedy decoding gives the same text for a prompt alone or padded in any batch (float32;
see ``tuneline.generation``), so a greedy run writes the same bytes whatever the number of
processes. Sampling does too: each rank passes its share's global prompt indices
(``prompt_index``), and ``generation.generate`` seeds sample ``j`` of prompt ``i`` from
``(seed, i, j)`` alone, so a prompt gets the same samples on any rank of any process count
as in a one-process run (float32, same hardware; docs/SCALING.md).

One process (no ``WORLD_SIZE`` > 1 in the environment) calls ``generation.generate``
directly: nothing changes for a single-process run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tuneline import generation


class NotMainProcess(SystemExit):
    """A rank > 0 leaving a generation stage after handing its share to rank 0 (exit 0)."""

    def __init__(self) -> None:
        super().__init__(0)


def world_size() -> int:
    """Processes in this run: ``WORLD_SIZE`` as the launcher set it, else 1."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.strip().isdigit() else 1


def _group() -> Any:
    """The initialized process group (accelerate's ``PartialState`` starts it: NCCL on
    CUDA, gloo on CPU)."""
    import torch.distributed as dist
    from accelerate import PartialState

    if not dist.is_initialized():
        PartialState()
    return dist


def share(count: int, rank: int, size: int) -> range:
    """The contiguous indices of ``count`` prompts that rank ``rank`` of ``size`` generates."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_in_order(part: list[Any], rank: int, size: int, dist: Any) -> list[Any] | None:
    """Every rank's ``part`` concatenated in rank order on rank 0; None elsewhere."""
    parts: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    if rank != 0:
        return None
    return [item for chunk in parts or [] for item in chunk]


def generate(
    loaded: Any, prompt_ids: Sequence[Sequence[int]], **kwargs: Any
) -> tuple[list[list[generation.Generation]], float]:
    """``generation.generate`` over the prompts, split across the run's processes.

    Rank 0 returns the results of every prompt in prompt order and the longest share's
    generation seconds; any other rank raises ``NotMainProcess`` once its share is gathered.
    Each share keeps its prompts' indices in the full list (``prompt_index``), which seed
    their samples.
    """
    size = world_size()
    if size <= 1:
        return generation.generate(loaded, prompt_ids, **kwargs)
    dist = _group()
    rank = dist.get_rank()
    mine = share(len(prompt_ids), rank, size)
    given = kwargs.pop("prompt_index", None)
    indices = list(range(len(prompt_ids))) if given is None else list(given)
    if len(indices) != len(prompt_ids):
        raise ValueError(f"parallel.generate: {len(indices)} prompt_index values for {len(prompt_ids)} prompts")
    kwargs.setdefault("desc", "generate")
    kwargs["desc"] = f"{kwargs['desc']} [rank {rank}/{size}]"
    outputs, seconds = generation.generate(
        loaded, [prompt_ids[i] for i in mine], prompt_index=[indices[i] for i in mine], **kwargs
    )
    gathered = gather_in_order([(outputs, seconds)], rank, size, dist)
    if gathered is None:
        raise NotMainProcess()
    results = [group for part, _ in gathered for group in part]
    if len(results) != len(prompt_ids):
        raise RuntimeError(f"parallel.generate: gathered {len(results)} results for {len(prompt_ids)} prompts")
    return results, max(elapsed for _, elapsed in gathered)
