"""CUDA paths: bf16 and nf4 (QLoRA) training steps, DPO on top, probing on the GPU.

Run on a CUDA machine with `pytest -m gpu tests/test_gpu.py` (needs bitsandbytes for nf4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training_data import tiny_params, write_clean

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sft_step_on_cuda(tmp_path: Path, tiny_model_dir: Path, quantization: str) -> None:
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    from tuneline.stages import sft

    params = tiny_params(
        tmp_path, tiny_model_dir,
        {"model": {"device": "cuda", "quantization": quantization},
         "sft": {"gradient_checkpointing": quantization == "nf4", "warmup_ratio": 0.0}},
    )
    write_clean(params)
    metrics = sft.run(params)
    prov = json.loads((Path(params.paths.sft_model) / "provenance.json").read_text())
    assert prov["params"]["model"]["quantization"] == quantization
    assert metrics["steps"] >= 1 and metrics["max_weight_change"] > 0
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_dpo_and_probe_on_cuda(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneline.stages import dpo, pairs, sft
    from tuneline.training import load_for_eval

    monkeypatch.chdir(tmp_path)
    params = tiny_params(tmp_path, tiny_model_dir, {"model": {"device": "cuda"}, "sft": {"warmup_ratio": 0.0},
                                                   "dpo": {"warmup_ratio": 0.0}})
    write_clean(params)
    sft.run(params)
    pairs.run(params)
    metrics = dpo.run(params)
    assert metrics["steps"] >= 1
    loaded = load_for_eval(params, params.paths.dpo_model)
    assert loaded.device == "cuda"
    assert str(next(loaded.model.parameters()).dtype) == "torch.bfloat16"
    ids = torch.tensor([loaded.render_ids("### Instruction\nPlan a day in Lisbon.\n\n### Response\n")], device="cuda")
    out = loaded.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
