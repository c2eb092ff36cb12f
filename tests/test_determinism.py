"""dpo is reproducible: the same inputs give the same adapter bytes and losses in a fresh
process, whatever the hash seed and the number of torch threads.

The thread count: on a CPU with AVX512, MKL's float32 matmul (PyTorch's CPU BLAS) divides
its work by the number of threads and rounds differently with 1 and 2 (seen on an Intel
Xeon: other adapter bytes, train loss 0.91443335 against 0.91443487); on AVX2 CPUs it does
not. MKL's strict conditional numerical reproducibility (``MKL_CBWR=AUTO,STRICT``) makes it
independent of the thread count; importing tuneline sets it unless the caller set
``MKL_CBWR``, and both processes inherit it from this one."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training_data import tiny_params, write_clean
from tuneline.params import Params
from tuneline.stages import pairs, sft

TESTS = Path(__file__).resolve().parent
RUN_DPO = """
import json, sys
from tuneline.params import parse_params
from tuneline.stages import dpo
params = parse_params(json.loads(sys.argv[1]))
metrics = dpo.run(params)
print(json.dumps({"final_loss": metrics["final_loss"], "train_loss": metrics["train_loss"]}))
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Params:
    root = tmp_path_factory.mktemp("determinism")
    # A large DPO learning rate so that any difference in a step shows in the weights.
    params = tiny_params(root, tiny_model_dir, {"sft": {"trainer": {"learning_rate": 5e-3}}, "dpo": {"trainer": {"learning_rate": 1e-2}}})
    write_clean(params)
    sft.run(params)
    pairs.run(params)
    return params


def _run_dpo(params: Params, name: str, env: dict[str, str]) -> tuple[str, dict[str, float]]:
    """dpo in a fresh process with its own output directories."""
    data = params.model_dump()
    root = Path(params.paths.dpo_model).parent / name
    data["paths"].update(
        dpo_model=str(root / "dpo"), checkpoints=str(root / "checkpoints"), metrics=str(root / "metrics")
    )
    src = str(Path(__import__("tuneline").__file__).resolve().parents[1])
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(TESTS)]), **env}
    done = subprocess.run(
        [sys.executable, "-c", RUN_DPO, json.dumps(data)],
        env=full_env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    losses = json.loads(done.stdout.strip().splitlines()[-1])
    weights = (root / "dpo" / "adapter_model.safetensors").read_bytes()
    return hashlib.sha256(weights).hexdigest(), losses


def test_dpo_adapter_bytes_do_not_depend_on_hash_seed_or_threads(trained: Params) -> None:
    first = _run_dpo(trained, "a", {"PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "2"})
    second = _run_dpo(trained, "b", {"PYTHONHASHSEED": "2", "OMP_NUM_THREADS": "1"})
    assert first[1] == second[1]
    assert first[0] == second[0]
