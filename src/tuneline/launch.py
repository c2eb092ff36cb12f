"""Several GPUs and several machines from params: a stage re-runs itself under ``accelerate launch``.

``tuneline sft`` / ``tuneline dpo`` with ``compute.num_processes > 1`` on a CUDA machine
start ``python -m accelerate.commands.launch --num_processes N ... -m tuneline.cli <stage>
--params <file>``: one worker per GPU, DDP (``compute.distributed: ddp``) or FSDP full
sharding of the transformer layers (``fsdp``). Workers are recognised by the variables
the launcher sets (``LOCAL_RANK``, ``WORLD_SIZE``) and train; the parent waits and exits
with the workers' status. The environment passes through unchanged, NCCL settings
included (NVLink multicast stays off where ``NCCL_NVLS_ENABLE=0`` is set).

Several machines: ``compute.num_machines: M`` (a param: it changes the effective batch)
and, on every node, the same command with this node's rank and the head's address in
the environment (``node``): ``TUNELINE_MACHINE_RANK``, ``TUNELINE_MAIN_PROCESS_IP`` and
``TUNELINE_MAIN_PROCESS_PORT``, else SkyPilot's ``SKYPILOT_NODE_RANK``,
``SKYPILOT_NODE_IPS`` (first line: the head) and ``SKYPILOT_NUM_NODES`` (must equal
``compute.num_machines``). They never enter params, so every node's stage has the same
params hash. accelerate gets ``--num_processes N*M --num_machines M --machine_rank R
--main_process_ip IP --main_process_port P``; global rank 0 (on the head) writes outputs.
A multi-machine training stage always launches, on CPU too (gloo); a single-machine CPU
run launches only with ``TUNELINE_LAUNCH_CPU=1`` (tests, CPU boxes).

The generation stages (``generate`` for its teacher, ``pairs`` for on-policy samples,
``probe``) run under the same launcher with ``compute.num_processes > 1``, on this machine
only (``compute.num_machines`` spans the training stages): each process generates a share
of the prompts and rank 0 writes them in prompt order (``tuneline.parallel``).

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from tuneline.errors import InputError
from tuneline.params import Params
from tuneline.records import write_text

DISTRIBUTED_STAGES = ("sft", "dpo")
# Stages that split their prompts across processes (tuneline.parallel).
GENERATION_STAGES = ("generate", "pairs", "probe")
WORKER_ENV = ("LOCAL_RANK", "WORLD_SIZE")
EXIT_DIR_ENV = "TUNELINE_EXIT_DIR"
CPU_LAUNCH_ENV = "TUNELINE_LAUNCH_CPU"
RANK_ENV = "TUNELINE_MACHINE_RANK"
IP_ENV = "TUNELINE_MAIN_PROCESS_IP"
PORT_ENV = "TUNELINE_MAIN_PROCESS_PORT"
SKY_RANK_ENV = "SKYPILOT_NODE_RANK"
SKY_IPS_ENV = "SKYPILOT_NODE_IPS"
SKY_NODES_ENV = "SKYPILOT_NUM_NODES"
SKY_GPUS_ENV = "SKYPILOT_NUM_GPUS_PER_NODE"
DEFAULT_PORT = 29500
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


@dataclass(frozen=True)
class Node:
    """Where this machine sits in a multi-machine run (runtime only, never params)."""

    num_machines: int
    machine_rank: int
    main_process_ip: str
    main_process_port: int


def _env_int(name: str, value: str, low: int, high: int, what: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise InputError(f"{name}: {value!r} is not {what} (allowed: an integer from {low} to {high})")
    return number


def node(params: Params, environ: dict[str, str] | None = None) -> Node:
    """This node's rank and the head's address and port, from the environment.

    ``TUNELINE_*`` variables win over SkyPilot's; with one machine the defaults are rank
    0 on 127.0.0.1 and a free port. An invalid value is an InputError naming the variable.
    """
    env = os.environ if environ is None else environ
    machines = params.compute.num_machines
    if SKY_NODES_ENV in env:
        nodes = _env_int(SKY_NODES_ENV, env[SKY_NODES_ENV], 1, 1 << 16, "a number of nodes")
        if nodes != machines:
            raise InputError(
                f"{SKY_NODES_ENV}: {env[SKY_NODES_ENV]!r} nodes but compute.num_machines is {machines} "
                f"(allowed: {machines}; launch as many nodes as compute.num_machines, e.g. "
                f"`sky launch --num-nodes {machines}` or -S compute.num_machines={nodes})"
            )
    if SKY_GPUS_ENV in env and env[SKY_GPUS_ENV].strip() not in ("", "0"):
        gpus = _env_int(SKY_GPUS_ENV, env[SKY_GPUS_ENV], 1, 1 << 10, "a number of GPUs")
        if params.compute.num_processes > gpus:
            raise InputError(
                f"{SKY_GPUS_ENV}: {gpus} GPU(s) per node but compute.num_processes is "
                f"{params.compute.num_processes} (allowed: compute.num_processes <= {gpus})"
            )
    if RANK_ENV in env:
        rank_name, rank_value = RANK_ENV, env[RANK_ENV]
    elif SKY_RANK_ENV in env:
        rank_name, rank_value = SKY_RANK_ENV, env[SKY_RANK_ENV]
    else:
        rank_name, rank_value = RANK_ENV, "0"
        if machines > 1:
            raise InputError(
                f"{RANK_ENV}: not set, and compute.num_machines is {machines} (allowed: this node's rank, "
                f"0 to {machines - 1}, in {RANK_ENV} or {SKY_RANK_ENV})"
            )
    rank = _env_int(rank_name, rank_value, 0, machines - 1, f"a machine rank for compute.num_machines={machines}")
    if IP_ENV in env:
        ip = env[IP_ENV].strip()
        if not ip or any(c.isspace() for c in ip):
            raise InputError(f"{IP_ENV}: {env[IP_ENV]!r} is not an address (allowed: the head node's IP or host name)")
    elif SKY_IPS_ENV in env:
        lines = [line.strip() for line in env[SKY_IPS_ENV].splitlines() if line.strip()]
        if len(lines) != machines:
            raise InputError(
                f"{SKY_IPS_ENV}: {len(lines)} address(es) {lines!r} but compute.num_machines is {machines} "
                f"(allowed: one IP per line, the head first, {machines} lines)"
            )
        ip = lines[0]
    elif machines > 1:
        raise InputError(
            f"{IP_ENV}: not set, and compute.num_machines is {machines} (allowed: the head node's IP, "
            f"in {IP_ENV} or the first line of {SKY_IPS_ENV})"
        )
    else:
        ip = "127.0.0.1"
    if PORT_ENV in env:
        port = _env_int(PORT_ENV, env[PORT_ENV], 1, 65535, "a TCP port")
    else:
        port = DEFAULT_PORT if machines > 1 else free_port()
    return Node(num_machines=machines, machine_rank=rank, main_process_ip=ip, main_process_port=port)


def wants_launch(stage: str, params: Params) -> bool:
    """Whether this invocation should start the workers rather than run the stage itself.

    A multi-machine training stage always launches (the other nodes wait for this one);
    generation stages run on this machine alone. On one machine, CPU runs stay
    single-process whatever ``compute.num_processes`` says, unless ``TUNELINE_LAUNCH_CPU=1``.
    """
    compute = params.compute
    if stage not in DISTRIBUTED_STAGES + GENERATION_STAGES or is_worker():
        return False
    if compute.num_machines > 1 and stage in DISTRIBUTED_STAGES:
        return True
    if compute.num_processes <= 1:
        return False
    if os.environ.get(CPU_LAUNCH_ENV) == "1":
        return True
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


def launch_command(
    stage: str, params: Params, params_path: Path, port: int | Node, args: Sequence[str] = ()
) -> list[str]:
    """The accelerate launch command line that runs ``stage`` on ``compute.num_processes``
    processes on each of ``compute.num_machines`` machines (``port``: the head's port on
    one machine, or this node's ``Node``); ``args``: the stage's own arguments."""
    compute = params.compute
    where = port if isinstance(port, Node) else Node(1, 0, "127.0.0.1", port)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(compute.num_processes * where.num_machines),
        "--num_machines", str(where.num_machines),
        "--machine_rank", str(where.machine_rank),
        # The Trainer sets bf16/fp16 from the loaded dtype (tuneline.training.trainer_args).
        "--mixed_precision", "no",
        "--dynamo_backend", "no",
        "--main_process_ip", where.main_process_ip,
        "--main_process_port", str(where.main_process_port),
    ]
    # FSDP shards training only; generation stages replicate the model (plain workers).
    fsdp = compute.distributed == "fsdp" and stage in DISTRIBUTED_STAGES
    command += FSDP_FLAGS if fsdp else ["--multi_gpu"]
    return [*command, "-m", "tuneline.cli", stage, *args, "--params", str(params_path)]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def relaunch(stage: str, params: Params, params_path: Path, args: Sequence[str] = ()) -> int:
    """Run ``stage`` under accelerate launch and return the exit code to leave with."""
    # Generation stages run on one machine: the head, or each node of its own run.
    here = node(params) if stage in DISTRIBUTED_STAGES else free_port()
    command = launch_command(stage, params, params_path, here, args)
    console.print(
        f"{stage}: compute.num_processes={params.compute.num_processes} "
        f"compute.num_machines={params.compute.num_machines} "
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
