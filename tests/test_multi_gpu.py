"""Several GPUs from params alone: `tuneline sft` with compute.num_processes > 1 re-runs
itself under accelerate launch; only rank 0 writes the outputs.

The launch decision and command line are checked everywhere; the 2-GPU run needs a CUDA
machine with at least two GPUs (`pytest -m gpu tests/test_multi_gpu.py`).
"""

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
from tuneline.params import Params, parse_params


def _params(**compute: object) -> Params:
    return parse_params({"compute": compute, "model": {"device": "auto"}})


def test_launch_command_ddp() -> None:
    command = launch.launch_command("sft", _params(num_processes=2), Path("p.yaml"), 29511)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--main_process_port") + 1] == "29511"
    assert "--multi_gpu" in command and "--use_fsdp" not in command
    assert command[-5:] == ["-m", "tuneline.cli", "sft", "--params", "p.yaml"]


def test_launch_command_fsdp() -> None:
    command = launch.launch_command("dpo", _params(num_processes=4, distributed="fsdp"), Path("x/p.yaml"), 1)
    assert "--multi_gpu" not in command and "--use_fsdp" in command

    def value(flag: str) -> str:
        return command[command.index(flag) + 1]

    assert value("--num_processes") == "4"
    assert value("--fsdp_sharding_strategy") == "FULL_SHARD"
    assert value("--fsdp_auto_wrap_policy") == "TRANSFORMER_BASED_WRAP"
    assert value("--fsdp_use_orig_params") == "true"
    assert value("--fsdp_cpu_ram_efficient_loading") == "false"
    assert command[-3:] == ["dpo", "--params", "x/p.yaml"]


def test_launch_command_flags_exist_in_accelerate() -> None:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    known = {option for action in parser._actions for option in action.option_strings}
    command = launch.launch_command("sft", _params(num_processes=2, distributed="fsdp"), Path("p.yaml"), 1)
    used = {part for part in command[3:-5] if part.startswith("--")}
    assert used <= known, used - known
    assert "--multi_gpu" in known


def test_wants_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    two = _params(num_processes=2)
    assert not launch.wants_launch("sft", _params(num_processes=1))
    assert launch.wants_launch("probe", two) == torch.cuda.is_available()  # probe splits its prompts
    assert not launch.wants_launch("clean", two)
    assert not launch.wants_launch("sft", parse_params({"compute": {"num_processes": 2}, "model": {"device": "cpu"}}))
    assert launch.wants_launch("sft", two) == torch.cuda.is_available()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not launch.wants_launch("sft", two)  # already a worker


def test_record_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(launch.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    launch.record_exit(2)
    assert not list(tmp_path.iterdir())  # not a worker: nothing to report
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    launch.record_exit(2)
    assert (tmp_path / "rank-1").read_text() == "2"


def _write_params(directory: Path, params: Params) -> Path:
    """params.yaml in ``directory``, the project: the base model is copied into it (a
    params file's paths may not point outside its project)."""
    data = params.model_dump(mode="json", by_alias=True)
    base = Path(data["paths"]["base_model"])
    if directory.resolve() not in base.resolve().parents:
        shutil.copytree(base, directory / "models/base")
        data["paths"]["base_model"] = "models/base"
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _sft_cli(
    directory: Path, tiny_model_dir: Path, num_processes: int, distributed: str = "ddp"
) -> tuple[dict, subprocess.CompletedProcess]:
    params = tiny_params(
        directory, tiny_model_dir,
        {"model": {"device": "cuda"}, "compute": {"num_processes": num_processes, "distributed": distributed},
         "sft": {"trainer": {"warmup_steps": 0.0, "save_steps": 2}}},
    )
    write_clean(params, clean_records(repeat=4))
    path = _write_params(directory, params)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "sft", "--params", str(path)],
        cwd=directory, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    recorded = json.loads((directory / "reports/provenance/sft.json").read_text())["run"]
    return {**recorded, **json.loads((directory / "metrics/sft.json").read_text())}, done


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_sft_on_two_gpus(tmp_path: Path, tiny_model_dir: Path) -> None:
    one, _ = _sft_cli(tmp_path / "one", tiny_model_dir, 1)
    two, done = _sft_cli(tmp_path / "two", tiny_model_dir, 2)
    assert "accelerate.commands.launch" in done.stderr
    assert two["plan"]["num_processes"] == 2 and one["plan"]["num_processes"] == 1
    assert two["plan"]["effective_batch"] == 2 * one["plan"]["effective_batch"]
    assert two["steps"] == two["plan"]["optimizer_steps"] < one["steps"]
    assert two["max_weight_change"] > 0 and torch.isfinite(torch.tensor(two["train_loss"]))
    assert done.stderr.count("sft plan") == 1  # printed by rank 0 only
    assert done.stdout.count('"plan"') == 1  # the metrics, printed once
    out = tmp_path / "two/models/sft"
    assert (out / "adapter_model.safetensors").is_file() and (out / "provenance.json").is_file()
    ckpt = tmp_path / "two/models/checkpoints/sft"
    assert json.loads((ckpt / "finished.json").read_text())["steps"] == two["steps"]
    assert not list(ckpt.glob("checkpoint-*"))
    assert (tmp_path / "two/metrics/sft/plots/metrics/loss.tsv").is_file()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 CUDA GPUs")
def test_sft_fsdp_on_two_gpus(tmp_path: Path, tiny_model_dir: Path) -> None:
    metrics, done = _sft_cli(tmp_path, tiny_model_dir, 2, "fsdp")
    assert "--use_fsdp" in done.stderr
    assert metrics["plan"]["num_processes"] == 2 and metrics["steps"] == metrics["plan"]["optimizer_steps"]
    assert metrics["max_weight_change"] > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    from safetensors.torch import load_file

    from tuneline.modeling import load_for_eval

    weights = load_file(str(tmp_path / "models/sft/adapter_model.safetensors"))
    assert weights and all("lora_" in name and ".default." not in name for name in weights)
    assert any(float(w.abs().max()) > 0 for name, w in weights.items() if "lora_B" in name)  # trained (B starts at 0)
    params = tiny_params(tmp_path, tiny_model_dir, {"model": {"device": "cuda"}})
    loaded = load_for_eval(params, params.paths.sft_model)  # the saved adapter loads into every LoRA layer
    state = loaded.model.state_dict()
    for name, weight in weights.items():
        assert torch.allclose(state[name.removesuffix(".weight") + ".default.weight"].float().cpu(), weight.float())


@pytest.mark.slow
def test_sft_and_dpo_in_two_cpu_processes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """The rank guards without GPUs: two gloo workers started the way accelerate starts them."""
    params = tiny_params(
        tmp_path, tiny_model_dir,
        {"compute": {"num_processes": 2}, "sft": {"trainer": {"warmup_steps": 0.0, "save_steps": 2}},
         "dpo": {"trainer": {"warmup_steps": 0.0, "save_steps": 2}}},
    )
    write_clean(params, clean_records(repeat=4))
    path = _write_params(tmp_path, params)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for stage, workers in (("sft", 2), ("pairs", 0), ("dpo", 2)):
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(launch.free_port())]
        command = [*(prefix if workers else [sys.executable]), "-m", "tuneline.cli", stage, "--params", str(path)]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-6000:]
        if workers:
            metrics = {
                **json.loads((tmp_path / f"reports/provenance/{stage}.json").read_text())["run"],
                **json.loads((tmp_path / f"metrics/{stage}.json").read_text()),
            }
            assert metrics["plan"]["num_processes"] == 2 and metrics["max_weight_change"] > 0
            assert done.stderr.count(f"{stage} plan") == 1 and done.stdout.count('"plan"') == 1
            assert (tmp_path / f"models/{stage}/adapter_model.safetensors").is_file()
            assert sorted(p.name for p in (tmp_path / f"models/checkpoints/{stage}").iterdir()) == ["finished.json"]
