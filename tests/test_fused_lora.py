"""The fused LoRA forward (``sft.fused_lora``) computes what peft's forward computes:
same outputs and same gradients on every LoRA weight, on the tiny model."""

from __future__ import annotations

import pytest


def _peft_model(tiny_model_dir, dropout: float = 0.0):
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneline.params import LoraParams
    from tuneline.training import lora_config

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, lora_config(LoraParams(dropout=dropout)))
    # B starts at zero; give it values so the LoRA branch contributes to outputs and grads.
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _step(model, ids):
    model.zero_grad()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def test_fused_matches_peft(tiny_model_dir):
    import torch

    from tuneline.training.fused_lora import fuse_lora, unfuse_lora

    model = _peft_model(tiny_model_dir)
    ids = torch.randint(5, 500, (3, 17))
    ref_logits, ref_grads = _step(model, ids)
    counts = fuse_lora(model)
    layers = model.get_base_model().config.num_hidden_layers
    assert counts == {"single": 2 * layers, "grouped": 5 * layers, "groups": 2 * layers, "unfused": 0}
    logits, grads = _step(model, ids)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    unfuse_lora(model)
    again, _ = _step(model, ids)
    torch.testing.assert_close(again, ref_logits, rtol=1e-5, atol=1e-5)


def test_dropout_layers_keep_peft_forward(tiny_model_dir):
    from tuneline.training.fused_lora import fuse_lora

    model = _peft_model(tiny_model_dir, dropout=0.1)
    counts = fuse_lora(model)
    assert counts["single"] == counts["grouped"] == 0 and counts["unfused"] > 0


@pytest.mark.parametrize("merged", [True])
def test_merged_layer_falls_back(tiny_model_dir, merged):
    import torch

    from tuneline.training.fused_lora import fuse_lora

    model = _peft_model(tiny_model_dir)
    ids = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        fuse_lora(model)
        model.merge_adapter()
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _train(tmp_path, tiny_model_dir, **speed):
    from pathlib import Path

    from training_data import clean_records, tiny_params
    from tuneline.modeling import load
    from tuneline.training import sft as sft_method

    params = tiny_params(tmp_path, tiny_model_dir, {"model": {"dtype": "float32"}, "sft": {
        **speed, "padding_free": True, "trainer": {"max_steps": 4, "logging_steps": 2, "save_strategy": "no",
                                                  "per_device_train_batch_size": 3}}})
    loaded = load(tiny_model_dir, params.model)
    records = clean_records()[:12]
    for n, r in enumerate(records, start=1):
        r["_line"] = n
    rows, _ = sft_method.tokenize(loaded, records, 2048, Path("train.jsonl"))
    trainer = sft_method.build_trainer(params, loaded, rows, [], tmp_path / "ckpt")
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e]


def test_speedups_train_like_the_reference(tmp_path, tiny_model_dir):
    """sft.fused_lora and sft.sync_free_metrics: the same losses, entropy, token accuracy
    and token count as TRL's and peft's own path."""
    ref = _train(tmp_path / "ref", tiny_model_dir)
    fast = _train(tmp_path / "fast", tiny_model_dir, fused_lora=True, sync_free_metrics=True)
    assert len(ref) == len(fast) == 3  # the first step, then every 2
    for a, b in zip(ref, fast, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["num_tokens"] == a["num_tokens"]
        # TRL averages per-step ratios, the sync-free path weights by tokens: close, not equal
        assert b["entropy"] == pytest.approx(a["entropy"], rel=0.05)
        assert b["mean_token_accuracy"] == pytest.approx(a["mean_token_accuracy"], abs=0.05)


def test_fused_matches_peft_under_bf16_autocast(tiny_model_dir):
    """A bf16 base with float32 adapters under autocast, as the Trainer runs it: the fused
    path casts the adapter weights rather than the activations, with the same result."""
    import torch

    from tuneline.training.fused_lora import fuse_lora

    model = _peft_model(tiny_model_dir)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    ids = torch.randint(5, 500, (2, 11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_grads = _step(model, ids)
        fuse_lora(model)
        logits, grads = _step(model, ids)
    torch.testing.assert_close(logits.float(), ref_logits.float(), rtol=2e-2, atol=2e-2)
    for name in grads:
        assert grads[name].dtype == ref_grads[name].dtype == torch.float32
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=5e-2, atol=5e-3, msg=name)
