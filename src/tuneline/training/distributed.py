"""Several training processes (``accelerate launch``, see ``tuneline.launch``).

Every rank trains; only the main process (global rank 0, on the head machine) prints the
plan and writes metrics, plots, the model directory and checkpoint markers; the others
get its metrics by broadcast (``from_main``), never from its files, which another
machine cannot read. ``trained_model`` gathers FSDP shards into a full state dict before saving.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def _process_group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """True in a single-process run and on rank 0 of a distributed one."""
    group = _process_group()
    return group is None or group.get_rank() == 0


def is_local_main_process() -> bool:
    """True on the first process of each machine (``LOCAL_RANK`` 0), and in a single-process run."""
    return os.environ.get("LOCAL_RANK", "0") in ("", "0")


def wait_for_everyone() -> None:
    """A barrier across the training processes (nothing in a single-process run)."""
    group = _process_group()
    if group is not None:
        group.barrier()


def from_main(value: Any, checkpoints: Path | None = None) -> Any:
    """The main process's ``value`` on every rank (a broadcast; ``value`` itself in a
    single-process run). Ranks on other machines cannot read the files rank 0 wrote.

    With ``checkpoints`` (the stage's checkpoint directory, after the head has finished
    it), the first process of every other machine then removes the checkpoint folders
    that machine's ranks left there (the Trainer saves each rank's RNG state where that
    rank runs), so only the head keeps anything of the run.
    """
    group = _process_group()
    if group is None:
        return value
    box = [value if group.get_rank() == 0 else None]
    group.broadcast_object_list(box, src=0)
    if checkpoints is not None and node_directory(checkpoints) != checkpoints and is_local_main_process():
        for leftover in sorted(checkpoints.glob("checkpoint-*")):
            shutil.rmtree(leftover, ignore_errors=True)
        for directory in (checkpoints, checkpoints.parent):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
    return box[0]


def shared_dataset(rows: list[dict[str, Any]], directory: Path, world_size: int) -> Any:
    """A ``datasets.Dataset`` of ``rows``; with several processes, one on shared disk.

    An in-memory dataset keeps its cache files in a temporary directory of each process,
    so a cache that rank 0 writes (TRL's precomputed reference log-probs) is not found by
    the others. Saved once per machine under ``directory`` by that machine's first
    process (machines share no disk), every rank's dataset and caches live there.
    ``drop_shared_dataset`` (called by each machine's first process) removes it after the run.
    """
    from datasets import Dataset, load_from_disk

    dataset = Dataset.from_list(rows)
    if world_size <= 1:
        return dataset
    directory = node_directory(directory)
    if is_local_main_process():
        if directory.exists():
            shutil.rmtree(directory)
        dataset.save_to_disk(str(directory))
    wait_for_everyone()
    return load_from_disk(str(directory))


def node_directory(directory: Path) -> Path:
    """``directory`` on the head machine, ``<directory>-node<R>`` on machine R > 0 (torchrun's
    ``GROUP_RANK``): machines that share a mounted checkpoints directory keep apart."""
    rank = os.environ.get("GROUP_RANK", "0")
    return directory if rank in ("", "0") else directory.with_name(f"{directory.name}-node{rank}")


def drop_shared_dataset(directory: Path) -> None:
    directory = node_directory(directory)
    if directory.is_dir():
        shutil.rmtree(directory)


def trained_model(trainer: Any) -> tuple[Any, dict[str, Any] | None]:
    """The trained model to save and, under FSDP, its full state dict.

    Every rank must call this: gathering FSDP shards is a collective. The state dict is
    complete on the main process only; without FSDP it is None and the model's own
    parameters are whole on every rank.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        state = trainer.accelerator.get_state_dict(trainer.model)
        return trainer.accelerator.unwrap_model(trainer.model), state
    return trainer.model, None


def match_adapter_dtype(trainer: Any) -> None:
    """Under FSDP, give the LoRA weights the base weights' dtype.

    peft keeps adapters in float32 over a bf16 base, but FSDP flattens each wrapped layer
    into one tensor of a single dtype; accelerate then holds every weight in float32
    for bf16 mixed precision. A no-op without FSDP.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    if len(frozen) != 1:
        return
    dtype = frozen.pop()
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
