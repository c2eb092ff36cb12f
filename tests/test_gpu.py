"""CUDA paths: bf16 and nf4 (QLoRA) training steps, DPO on top, probing on the GPU.

Run on a CUDA machine with `pytest -m gpu tests/test_gpu.py` (needs bitsandbytes for nf4; on a
machine with several GPUs, with `CUDA_VISIBLE_DEVICES=0`).
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
    # The stages run in this process; with several GPUs visible the Trainer would use
    # nn.DataParallel, which TRL refuses (the CLI pins one GPU, see tuneline.launch).
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.device_count() > 1,
        reason="single-process training: make one GPU visible (CUDA_VISIBLE_DEVICES=0)",
    ),
]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_sft_step_on_cuda(tmp_path: Path, tiny_model_dir: Path, quantization: str) -> None:
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    from tuneline.stages import sft

    params = tiny_params(
        tmp_path, tiny_model_dir,
        {"model": {"device": "cuda", "quantization": quantization},
         "sft": {"trainer": {"gradient_checkpointing": quantization == "nf4", "warmup_steps": 0.0}}},
    )
    write_clean(params)
    metrics = sft.run(params)
    prov = json.loads((Path(params.paths.sft_model) / "provenance.json").read_text())
    assert prov["params"]["model"]["quantization"] == quantization
    assert metrics["steps"] >= 1 and metrics["max_weight_change"] > 0
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


def test_dpo_and_probe_on_cuda(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuneline.modeling import load_for_eval
    from tuneline.stages import dpo, pairs, sft

    monkeypatch.chdir(tmp_path)
    params = tiny_params(tmp_path, tiny_model_dir, {"model": {"device": "cuda"}, "sft": {"trainer": {"warmup_steps": 0.0}},
                                                   "dpo": {"trainer": {"warmup_steps": 0.0}}})
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


def test_sdpa_varlen_matches_padded_sdpa_on_cuda(tiny_model_dir: Path) -> None:
    """One packed row through varlen flash attention gives the logits of the same
    sequences padded through SDPA; without the boundaries it would not."""
    from tuneline.modeling import load
    from tuneline.params import ModelParams

    loaded = load(tiny_model_dir, ModelParams(device="cuda", dtype="bfloat16", attn_implementation="sdpa_varlen"))
    model = loaded.model
    torch.manual_seed(0)
    lengths = [37, 5, 120, 64]
    ids = [torch.randint(3, len(loaded.tokenizer), (n,)) for n in lengths]
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=0).cuda()
    mask = (torch.arange(padded.shape[1])[None] < torch.tensor(lengths)[:, None]).long().cuda()
    packed = torch.cat(ids)[None].cuda()
    positions = torch.cat([torch.arange(n) for n in lengths])[None].cuda()
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32).cuda()
    with torch.no_grad():
        ref = model(padded, attention_mask=mask, use_cache=False).logits.float()
        ref = torch.cat([ref[i, :n] for i, n in enumerate(lengths)])
        out = model(packed, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
                    max_length_k=max(lengths), use_cache=False).logits[0].float()
        fallback = model(packed, position_ids=positions, use_cache=False).logits[0].float()  # SDPA, packed mask
        leak = model(packed, use_cache=False).logits[0].float()  # one causal row: no boundaries
    error = float((out - ref).norm() / ref.norm())
    assert error < 2e-2, error
    assert float((fallback - ref).norm() / ref.norm()) < 2e-2
    assert float((leak - ref).norm() / ref.norm()) > 5 * error


def test_sft_padding_free_varlen_on_cuda(tmp_path: Path, tiny_model_dir: Path) -> None:
    from tuneline.stages import sft

    params = tiny_params(
        tmp_path, tiny_model_dir,
        {"model": {"device": "cuda", "attn_implementation": "sdpa_varlen"},
         "sft": {"padding_free": True, "trainer": {"warmup_steps": 0.0}, "lora": {"dropout": 0.0}}},
    )
    write_clean(params)
    metrics = sft.run(params)
    assert metrics["steps"] >= 1 and metrics["max_weight_change"] > 0
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert "steady_tokens_per_s" in metrics
