"""export: the merged checkpoint reloads through the one loader, matches the stacked
adapters and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training_data import tiny_params, write_clean
from tuneline.errors import InputError
from tuneline.export import export
from tuneline.modeling import load, load_for_eval
from tuneline.stages import dpo, pairs, sft


def test_export_dpo_stack_reloads_and_generates(tmp_path: Path, tiny_model_dir: Path) -> None:
    # float32: merged and stacked logits agree to 1e-4 (bf16 rounding would swamp that).
    params = tiny_params(
        tmp_path, tiny_model_dir,
        {"model": {"dtype": "float32"}, "sft": {"trainer": {"learning_rate": 5e-3}}, "dpo": {"max_pairs": 4}},
    )
    write_clean(params)
    sft.run(params)
    pairs.run(params)
    dpo.run(params)

    out = tmp_path / "export"
    prov = export(params, params.paths.dpo_model, out)
    assert [a["path"] for a in prov["merged_adapters"]] == [str(Path(params.paths.dpo_model) / "parent"), params.paths.dpo_model]
    assert json.loads((out / "provenance.json").read_text())["content_sha256"] == prov["content_sha256"]
    assert not list(out.glob("adapter_*"))

    merged = load(out, params.model)
    stacked = load_for_eval(params, params.paths.dpo_model)
    ids = torch.tensor([merged.render_ids("### Instruction\nPlan a day in Lisbon.\n\n### Response\n")])
    with torch.no_grad():
        a = merged.model(input_ids=ids).logits
        b = stacked.model(input_ids=ids).logits
        base = load(tiny_model_dir, params.model).model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, base, atol=1e-4)
    generated = merged.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
        pad_token_id=merged.tokenizer.pad_token_id,
    )
    assert generated.shape[1] > ids.shape[1]

    with pytest.raises(InputError, match="would overwrite an input"):
        export(params, params.paths.dpo_model, Path(params.paths.dpo_model) / "parent")
