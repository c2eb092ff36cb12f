"""dpo stage: the reference is the SFT model, outputs and the eval loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from training_data import tiny_params, write_clean
from tuneline.modeling import load_for_eval, load_for_training
from tuneline.params import Params
from tuneline.stages import dpo, pairs, sft


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Params:
    """A tiny SFT adapter (large lr so it clearly differs from the base) and its pairs."""
    root = tmp_path_factory.mktemp("dpo")
    params = tiny_params(root, tiny_model_dir, {"sft": {"trainer": {"learning_rate": 5e-3, "num_train_epochs": 2}}, "dpo": {"max_pairs": 6}})
    write_clean(params)
    sft.run(params)
    pairs.run(params)
    return params


def _eval_metrics(params: Params, merge: list[Path]) -> dict[str, float]:
    loaded = load_for_training(params, False, merge=merge)
    rows = dpo.to_rows(loaded, dpo.read_pairs(Path(params.paths.pairs) / "train.jsonl", 4, 0), Path("pairs"))
    trainer = dpo.build_trainer(params, loaded, rows, Path(params.paths.checkpoints) / "probe-ref")
    return trainer.evaluate(eval_dataset=Dataset.from_list(rows))


def test_reference_is_the_sft_model(trained: Params) -> None:
    sft_dir = Path(trained.paths.sft_model)
    at_start = _eval_metrics(trained, [sft_dir])
    # Step 0: policy (SFT + fresh adapter) and reference (SFT) agree exactly.
    assert abs(at_start["eval_rewards/chosen"]) < 1e-6
    assert abs(at_start["eval_rewards/rejected"]) < 1e-6
    # ...and that reference is not the bare base: its log-probs differ from the base's.
    on_base = _eval_metrics(trained, [])
    assert abs(at_start["eval_logps/chosen"] - on_base["eval_logps/chosen"]) > 1e-2


def test_dpo_run_outputs_and_eval_loader(trained: Params) -> None:
    metrics = dpo.run(trained)
    out = Path(trained.paths.dpo_model)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["parent"] == "parent" and prov["parent_source"] == trained.paths.sft_model
    # self-contained: the parent adapter travels inside the dpo model dir
    assert (out / "parent" / "adapter_model.safetensors").read_bytes() == (
        Path(trained.paths.sft_model) / "adapter_model.safetensors"
    ).read_bytes()
    assert prov["stack"] == [trained.paths.sft_model, trained.paths.dpo_model]
    assert metrics["steps"] == metrics["plan"]["optimizer_steps"] == 3
    assert metrics["max_weight_change"] > 0 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    for name in ("loss", "rewards_accuracies", "rewards_margins"):
        assert (Path(trained.paths.metrics) / "dpo" / f"{name}.tsv").is_file()

    loaded = load_for_eval(trained, out)
    assert [m["path"] for m in loaded.provenance["merged_parents"]] == [str(out / "parent")]
    ids = torch.tensor([loaded.render_ids("### Instruction\nPlan a day in Lisbon.\n\n### Response\n")])
    with loaded.using("default") as model, torch.no_grad():
        with_dpo = model(input_ids=ids).logits
    with loaded.using(None) as model, torch.no_grad():
        sft_only = model(input_ids=ids).logits
    assert not torch.allclose(with_dpo, sft_only)
