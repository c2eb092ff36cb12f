"""``sft.completion_logits_only``: the LM head and loss at completion positions only give
TRL's fused-head loss, gradients and metrics, on the tiny model with real TRL and peft."""

from __future__ import annotations

from pathlib import Path

import pytest


def _trainer(tmp_path, tiny_model_dir, *, on: bool, padding_free: bool = False, packing: bool = False,
             dtype: str = "float32", steps: int = 4, **sft):
    import torch

    from training_data import clean_records, tiny_params
    from tuneline.modeling import load
    from tuneline.training import sft as sft_method

    params = tiny_params(tmp_path, tiny_model_dir, {"model": {"dtype": dtype}, "sft": {
        "completion_logits_only": on, "padding_free": padding_free, "packing": packing, **sft,
        "trainer": {"max_steps": steps, "logging_steps": 2, "save_strategy": "no",
                    "per_device_train_batch_size": 3, "bf16": dtype == "bfloat16"}}})
    loaded = load(tiny_model_dir, params.model)
    records = clean_records()[:12]
    for n, r in enumerate(records, start=1):
        r["_line"] = n
    rows, _ = sft_method.tokenize(loaded, records, 2048, Path("train.jsonl"))
    trainer = sft_method.build_trainer(params, loaded, rows, [], tmp_path / "ckpt")
    # B starts at zero; give it values so both LoRA matrices get gradients
    gen = torch.Generator().manual_seed(0)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.05
    return trainer


def _patched(trainer) -> bool:
    forward = trainer.model.get_base_model().forward
    return forward.__func__.__code__.co_filename.endswith("cpu_loss.py")


def _loss_and_grads(trainer, num_items: bool):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    inputs = trainer._prepare_inputs(batch)
    n = (inputs["labels"][:, 1:] != -100).sum() if num_items else None
    model = trainer.model
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=n)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    with __import__("torch").no_grad():
        out = model(**inputs, fused_lm_head=True, num_items_in_batch=n)
    return loss.detach(), grads, out


LAYOUTS = {"padded": {}, "padding_free": {"padding_free": True}, "packing": {"packing": True}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("num_items", [False, True])
def test_same_loss_gradients_and_outputs(tmp_path, tiny_model_dir, layout, num_items):
    """Padded rows, padding-free rows (position_ids, no attention mask) and packed rows."""
    import torch

    ref = _trainer(tmp_path / "ref", tiny_model_dir, on=False, **LAYOUTS[layout])
    new = _trainer(tmp_path / "new", tiny_model_dir, on=True, **LAYOUTS[layout])
    assert not _patched(ref) and _patched(new)
    ref_loss, ref_grads, ref_out = _loss_and_grads(ref, num_items)
    loss, grads, out = _loss_and_grads(new, num_items)
    assert ("attention_mask" in ref.data_collator([ref.train_dataset[0]])) == (layout == "padded")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.loss, ref_out.loss, rtol=1e-5, atol=0)
    assert torch.equal(out.label_mask, ref_out.label_mask)
    torch.testing.assert_close(out.log_probs, ref_out.log_probs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.entropy, ref_out.entropy, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.is_top1, ref_out.is_top1)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, g in grads.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_training_logs_and_adapter_match(tmp_path, tiny_model_dir):
    """Four optimizer steps: TRL's logged loss, entropy, token accuracy, token count and
    grad norm, and the trained adapter, as on the reference path."""
    import torch

    runs = {}
    for on in (False, True):
        trainer = _trainer(tmp_path / str(on), tiny_model_dir, on=on)
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        lora = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        runs[on] = logs, lora
    (ref_logs, ref_lora), (logs, lora) = runs[False], runs[True]
    assert len(logs) == len(ref_logs) == 3
    for a, b in zip(ref_logs, logs, strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["num_tokens"] == a["num_tokens"]
    for name, p in lora.items():
        torch.testing.assert_close(p, ref_lora[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_autocast_close(tmp_path, tiny_model_dir):
    """Under bf16 autocast both paths project in bf16 and take the softmax in float32: the
    loss agrees to bf16 rounding and the gradients to a few bf16 ulps."""
    import torch

    ref = _trainer(tmp_path / "ref", tiny_model_dir, on=False)
    new = _trainer(tmp_path / "new", tiny_model_dir, on=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads, _ = _loss_and_grads(ref, True)
        loss, grads, _ = _loss_and_grads(new, True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=3e-2, atol=1e-4, msg=name)


def test_sync_free_metrics_on_top(tmp_path, tiny_model_dir):
    """lean_step's compute_loss reads the same fused outputs: same losses either way."""
    logs = {}
    for on in (False, True):
        trainer = _trainer(tmp_path / str(on), tiny_model_dir, on=on, sync_free_metrics=True, fused_lora=True)
        assert _patched(trainer) == on
        trainer.train()
        logs[on] = [e for e in trainer.state.log_history if "loss" in e]
    for a, b in zip(logs[False], logs[True], strict=True):
        for key in ("loss", "entropy", "mean_token_accuracy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["num_tokens"] == a["num_tokens"]


def test_forward_without_fused_head_and_generate_unchanged(tmp_path, tiny_model_dir):
    import torch

    trainer = _trainer(tmp_path, tiny_model_dir, on=True, steps=1)
    model = trainer.model
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert logits.shape[:2] == (1, 5) and out.shape == (1, 8)
