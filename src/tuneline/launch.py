"""Several GPUs from params alone: a training stage re-runs itself under ``accelerate launch``.

``tuneline sft`` / ``tuneline dpo`` with ``compute.num_processes > 1`` on a CUDA machine
start ``python -m accelerate.commands.launch --num_processes N ... -m tuneline.cli <stage>
--params <file>``: one worker per GPU, DDP (``compute.distributed: ddp``) or FSDP full
sharding of the transformer layers (``fsdp``). Workers are recognised by the variables
the launcher sets (``LOCAL_RANK``, ``WORLD_SIZE``) and train; the parent waits and exits
with the workers' status. The environment passes through unchanged, NCCL settings
included (NVLink multicast stays off where ``NCCL_NVLS_ENABLE=0`` is set).

The launcher reports a failed worker as exit 1; a worker that fails with a tuneline error
records its exit code (2 for bad input) in ``TUNELINE_EXIT_DIR`` so the parent can exit
with it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from tuneline.params import Params
from tuneline.records import write_text

DISTRIBUTED_STAGES = ("sft", "dpo")
WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
EXIT_DIR_ENV = "TUNELINE_EXIT_DIR"
FSDP_FLAGS = [
    "--use_fsdp",
    "--fsdp_version", "1",
    "--fsdp_sharding_strategy", "FULL_SHARD",
    "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
    "--fsdp_use_orig_params", "true",
    "--fsdp_state_dict_type", "FULL_STATE_DICT",
    "--fsdp_sync_module_states", "true",
    # The loader places the whole model on every rank; loading on rank 0 alone would
    # leave the others' weights on the meta device.
    "--fsdp_cpu_ram_efficient_loading", "false",
]
console = Console(stderr=True)


def is_worker() -> bool:
    """True inside a process started by accelerate launch / torchrun."""
    return any(name in os.environ for name in WORKER_ENV)


def wants_launch(stage: str, params: Params) -> bool:
    """Whether this invocation should start the workers rather than train itself.

    CPU runs stay single-process whatever ``compute.num_processes`` says.
    """
    if stage not in DISTRIBUTED_STAGES or params.compute.num_processes <= 1 or is_worker():
        return False
    if params.model.device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def pin_one_gpu(stage: str, params: Params) -> None:
    """A single-process training stage sees one GPU.

    With several GPUs visible to one process the Trainer would wrap the model in
    ``nn.DataParallel``, which TRL refuses; ``compute.num_processes`` is how to use more.
    Call before CUDA is initialised; an explicit ``CUDA_VISIBLE_DEVICES`` is kept.
    """
    if stage in DISTRIBUTED_STAGES and params.compute.num_processes == 1 and not is_worker():
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")


def launch_command(stage: str, params: Params, params_path: Path, port: int) -> list[str]:
    """The accelerate launch command line that runs ``stage`` on ``compute.num_processes`` GPUs."""
    compute = params.compute
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(compute.num_processes),
        "--num_machines", "1",
        # The Trainer sets bf16/fp16 from the loaded dtype (tuneline.training.trainer_args).
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "--main_process_port", str(port),
    ]
    command += FSDP_FLAGS if compute.distributed == "fsdp" else ["--multi_gpu"]
    return [*command, "-m", "tuneline.cli", stage, "--params", str(params_path)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relaunch(stage: str, params: Params, params_path: Path) -> int:
    """Run ``stage`` under accelerate launch and return the exit code to leave with."""
    command = launch_command(stage, params, params_path, free_port())
    console.print(
        f"{stage}: compute.num_processes={params.compute.num_processes} "
        f"({params.compute.distributed}): {' '.join(command)}",
        highlight=False, soft_wrap=True,
    )
    with tempfile.TemporaryDirectory(prefix="tuneline-exit-") as exit_dir:
        env = {**os.environ, EXIT_DIR_ENV: exit_dir}
        returncode = subprocess.run(command, env=env, check=False).returncode
        codes = [int(p.read_text(encoding="utf-8")) for p in sorted(Path(exit_dir).glob("rank-*"))]
    if returncode != 0 and codes:
        return max(codes)
    return returncode


def record_exit(code: int) -> None:
    """In a worker, leave the tuneline exit code for the parent (see ``relaunch``)."""
    directory = os.environ.get(EXIT_DIR_ENV)
    if directory and is_worker() and Path(directory).is_dir():
        rank = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))
        write_text(Path(directory) / f"rank-{rank}", str(code))


def is_main_worker() -> bool:
    """False only in a worker of rank > 0 (which must not print the stage's result)."""
    return os.environ.get("RANK", "0") == "0"
