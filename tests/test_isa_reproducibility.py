"""In float32, training and greedy generation do not depend on which oneDNN kernels the CPU
gets: the same sft adapter bytes and the same greedy outputs when oneDNN is held to the
instruction set of an older or different x86 CPU (``ONEDNN_MAX_CPU_ISA``: AVX512 without
AMX, or AVX2). Each setting runs in a fresh process, since it is read when torch loads.

What does change the bytes (measured on this tiny model; README "Reproducibility"): in
bf16, every oneDNN setting; in float32 too, ATen's own vector width
(``ATEN_CPU_CAPABILITY=avx2`` or ``default``), which reorders reductions. Those are not
asserted here: whether they differ depends on the CPU the test runs on."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from training_data import tiny_params, write_clean

TESTS = Path(__file__).resolve().parent
SETTINGS = {
    "native": {},
    "avx512_core": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
}
DTYPE = "float32"
RUN = """
import json, sys
import torch
from tuneline.modeling import load_for_eval
from tuneline.generation import generate
from tuneline.params import parse_params
from tuneline.stages import sft
params = parse_params(json.loads(sys.argv[1]))
sft.run(params)
loaded = load_for_eval(params, params.paths.sft_model, adapter_name="sft", merge=True)
prompts = loaded.encode(["Plan two days in Lisbon", "Pack for Oslo", "Phrases for Kyoto", "Budget for Rome"])
outputs, _ = generate(loaded, prompts, batch_size=4, max_new_tokens=24, progress=False)
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "texts": [o[0].text for o in outputs]}))
"""


def _run(root: Path, tiny_model_dir: Path, name: str, env: dict[str, str]) -> tuple[str, dict]:
    params = tiny_params(root / name, tiny_model_dir, {
        "model": {"dtype": DTYPE},
        "sft": {"trainer": {"learning_rate": 5e-3}},
    })
    write_clean(params)
    src = str(Path(__import__("tuneline").__file__).resolve().parents[1])
    done = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(params.model_dump())],
        env={**os.environ, "PYTHONPATH": os.pathsep.join([src, str(TESTS)]), **env},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    weights = (root / name / "models/sft/adapter_model.safetensors").read_bytes()
    return hashlib.sha256(weights).hexdigest(), result


@pytest.mark.slow
def test_float32_sft_and_greedy_outputs_do_not_depend_on_onednn_instruction_set(tmp_path, tiny_model_dir):
    runs = {name: _run(tmp_path, tiny_model_dir, name, env) for name, env in SETTINGS.items()}
    reference_weights, reference = runs["native"]
    assert len(set(reference["texts"])) > 1  # the outputs depend on the prompt
    for name, (weights, result) in runs.items():
        assert weights == reference_weights, f"{name}: sft adapter differs from the native run's"
        assert result["texts"] == reference["texts"], f"{name}: greedy outputs differ from the native run's"
