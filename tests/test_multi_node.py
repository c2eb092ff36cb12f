"""Several machines: compute.num_machines from params, this node's rank and the head's
address from the environment (TUNELINE_* or SkyPilot's variables), validated; sft as two
nodes on one machine (gloo over 127.0.0.1) trains the adapter a single process trains with
the same effective batch, and only the head's workspace gets outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from training_data import clean_records, tiny_params, write_clean
from tuneline import launch
from tuneline.errors import InputError
from tuneline.params import Params, parse_params


def _params(**compute: object) -> Params:
    return parse_params({"compute": compute})


# -- the node's place, from the environment -----------------------------------------------


def test_node_from_tuneline_variables() -> None:
    env = {"TUNELINE_MACHINE_RANK": "1", "TUNELINE_MAIN_PROCESS_IP": "10.0.0.5", "TUNELINE_MAIN_PROCESS_PORT": "29600"}
    assert launch.node(_params(num_machines=2), env) == launch.Node(2, 1, "10.0.0.5", 29600)


def test_node_from_skypilot_variables_and_tuneline_wins() -> None:
    env = {
        "SKYPILOT_NODE_RANK": "2", "SKYPILOT_NODE_IPS": "10.0.0.7\n10.0.0.8\n10.0.0.9\n",
        "SKYPILOT_NUM_NODES": "3", "SKYPILOT_NUM_GPUS_PER_NODE": "8",
    }
    assert launch.node(_params(num_machines=3, num_processes=8), env) == launch.Node(3, 2, "10.0.0.7", 29500)
    env["TUNELINE_MACHINE_RANK"] = "0"
    assert launch.node(_params(num_machines=3), env).machine_rank == 0


def test_single_machine_needs_no_variables() -> None:
    node = launch.node(_params(), {})
    assert (node.num_machines, node.machine_rank, node.main_process_ip) == (1, 0, "127.0.0.1")


@pytest.mark.parametrize(
    ("env", "machines", "message"),
    [
        ({"TUNELINE_MACHINE_RANK": "2", "TUNELINE_MAIN_PROCESS_IP": "h"}, 2,
         r"TUNELINE_MACHINE_RANK: '2' is not a machine rank .*allowed: an integer from 0 to 1"),
        ({"TUNELINE_MACHINE_RANK": "x", "TUNELINE_MAIN_PROCESS_IP": "h"}, 2, r"TUNELINE_MACHINE_RANK: 'x'"),
        ({"TUNELINE_MAIN_PROCESS_IP": "h"}, 2, r"TUNELINE_MACHINE_RANK: not set, and compute.num_machines is 2"),
        ({"TUNELINE_MACHINE_RANK": "0"}, 2, r"TUNELINE_MAIN_PROCESS_IP: not set"),
        ({"TUNELINE_MACHINE_RANK": "0", "TUNELINE_MAIN_PROCESS_IP": "h", "TUNELINE_MAIN_PROCESS_PORT": "70000"}, 2,
         r"TUNELINE_MAIN_PROCESS_PORT: '70000' is not a TCP port \(allowed: an integer from 1 to 65535\)"),
        ({"SKYPILOT_NUM_NODES": "4", "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "a\nb\nc\nd"}, 2,
         r"SKYPILOT_NUM_NODES: '4' nodes but compute.num_machines is 2"),
        ({"SKYPILOT_NODE_RANK": "0", "SKYPILOT_NODE_IPS": "a"}, 2, r"SKYPILOT_NODE_IPS: 1 address\(es\)"),
        ({"SKYPILOT_NUM_GPUS_PER_NODE": "1"}, 1, r"SKYPILOT_NUM_GPUS_PER_NODE: 1 GPU\(s\) per node"),
    ],
)
def test_bad_node_variables_are_named(env: dict[str, str], machines: int, message: str) -> None:
    params = _params(num_machines=machines, num_processes=2 if "SKYPILOT_NUM_GPUS_PER_NODE" in env else 1)
    with pytest.raises(InputError, match=message) as info:
        launch.node(params, env)
    assert info.value.exit_code == 2


def test_node_settings_are_not_params() -> None:
    """Rank and address never enter params: every node's stage has the same params hash."""
    with pytest.raises(InputError, match=r"compute.machine_rank: unknown key"):
        parse_params({"compute": {"machine_rank": 1}})


def test_multi_node_launch_command() -> None:
    node = launch.Node(num_machines=2, machine_rank=1, main_process_ip="10.0.0.5", main_process_port=29600)
    command = launch.launch_command("sft", _params(num_machines=2, num_processes=4), Path("p.yaml"), node)

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--num_processes") == "8"  # accelerate counts every machine's processes
    assert (value("--num_machines"), value("--machine_rank")) == ("2", "1")
    assert (value("--main_process_ip"), value("--main_process_port")) == ("10.0.0.5", "29600")
    probe = launch.launch_command("probe", _params(num_processes=2, distributed="fsdp"), Path("p.yaml"), 1, ["sft"])
    assert "--use_fsdp" not in probe and probe[-4:] == ["probe", "sft", "--params", "p.yaml"]
    from accelerate.commands.launch import launch_command_parser

    known = {option for action in launch_command_parser()._actions for option in action.option_strings}
    assert {part for part in command[3:] if part.startswith("--")} - {"--params"} <= known


def test_multi_machine_always_launches(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LOCAL_RANK", "WORLD_SIZE", launch.CPU_LAUNCH_ENV):
        monkeypatch.delenv(name, raising=False)
    cpu = {"model": {"device": "cpu"}}
    assert launch.wants_launch("sft", parse_params({**cpu, "compute": {"num_machines": 2}}))
    assert not launch.wants_launch("probe", parse_params({**cpu, "compute": {"num_machines": 2}}))  # one machine
    assert not launch.wants_launch("sft", parse_params({**cpu, "compute": {"num_processes": 2}}))
    monkeypatch.setenv(launch.CPU_LAUNCH_ENV, "1")
    assert launch.wants_launch("probe", parse_params({**cpu, "compute": {"num_processes": 2}}))


def test_bad_node_variable_exits_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"compute": {"num_machines": 2}, "model": {"device": "cpu"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNELINE_", "SKYPILOT_"))}
    env["TUNELINE_MACHINE_RANK"] = "5"
    done = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "sft"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "TUNELINE_MACHINE_RANK: '5'" in done.stderr


# -- sft as two nodes on one machine ------------------------------------------------------


def _project(directory: Path, tiny_model_dir: Path, compute: dict, trainer: dict) -> Path:
    directory.mkdir(parents=True)
    params = tiny_params(
        directory, tiny_model_dir,
        {"compute": compute, "sft": {"eval_each_epoch": False, "trainer": {"warmup_steps": 0.0, "save_steps": 2, **trainer}}},
    )
    # 16 training rows, a multiple of the effective batch: an uneven last batch would be
    # topped up with repeated rows on the second node (accelerate's even_batches).
    write_clean(params, clean_records(repeat=2)[:18])
    data = params.model_dump(mode="json", by_alias=True)
    shutil.copytree(tiny_model_dir, directory / "models/base")
    data["paths"]["base_model"] = "models/base"
    (directory / "params.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return directory


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TUNELINE_", "SKYPILOT_"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _adapter(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "models/sft/adapter_model.safetensors"))


@pytest.mark.slow
def test_sft_as_two_nodes_matches_one_process(tmp_path: Path, tiny_model_dir: Path) -> None:
    # One process, 2 rows x 2 accumulation steps; two nodes, 2 rows each x 1 step: 4 rows a step.
    single = _project(tmp_path / "single", tiny_model_dir, {}, {
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    nodes = [
        _project(tmp_path / f"node{rank}", tiny_model_dir, {"num_machines": 2}, {
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1})
        for rank in (0, 1)
    ]
    before = [_files(d) for d in nodes]
    command = [sys.executable, "-m", "tuneline.cli", "sft", "--params", "params.yaml"]
    port = str(launch.free_port())
    running = [
        subprocess.Popen(
            command, cwd=directory, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_env(TUNELINE_MACHINE_RANK=str(rank), TUNELINE_MAIN_PROCESS_IP="127.0.0.1",
                     TUNELINE_MAIN_PROCESS_PORT=port),
        )
        for rank, directory in enumerate(nodes)
    ]
    done = subprocess.run(command, cwd=single, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-6000:]
    outputs = [p.communicate(timeout=600) for p in running]
    for p, (_, err) in zip(running, outputs, strict=True):
        assert p.returncode == 0, err[-6000:]
    for rank, (_, err) in enumerate(outputs):
        assert "--num_machines 2" in err and f"--machine_rank {rank}" in err and "--main_process_ip 127.0.0.1" in err

    one, two = (
        {**json.loads((d / "reports/provenance/sft.json").read_text())["run"], **json.loads((d / "metrics/sft.json").read_text())}
        for d in (single, nodes[0])
    )
    assert two["plan"]["num_processes"] == 2 and two["plan"]["effective_batch"] == one["plan"]["effective_batch"] == 4
    assert two["steps"] == one["steps"] > 1
    assert outputs[0][0].count('"plan"') == 1 and outputs[1][0].count('"plan"') == 0  # printed by rank 0 only

    # The same updates: the adapters agree to float32 reduction-order rounding (1e-6; lora_B ~ 2.5e-3).
    a, b = _adapter(single), _adapter(nodes[0])
    assert a.keys() == b.keys()
    assert any(float(w.abs().max()) > 0 for k, w in a.items() if "lora_B" in k)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst  # observed: 0.0 (gloo sums the same float32 values)
    # Only global rank 0 wrote: node 1's workspace is as it was.
    assert _files(nodes[1]) == before[1]
    assert {f for f in _files(nodes[0]) - before[0] if not f.startswith("reports/provenance")} >= {
        "models/sft/adapter_model.safetensors", "metrics/sft.json",
    }
