"""dpo stage: the reference is the SFT model (checked through the stage's first logged
step), outputs and the eval loader."""

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
from tuneline.training import dpo as dpo_method
from tuneline.training.data import read_sample


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Params:
    """A tiny SFT adapter (large lr so it clearly differs from the base) and its pairs."""
    root = tmp_path_factory.mktemp("dpo")
    params = tiny_params(root, tiny_model_dir, {
        "model": {"dtype": "float32"},
        "sft": {"trainer": {"learning_rate": 5e-3, "num_train_epochs": 2}}, "dpo": {"max_pairs": 6},
    })
    write_clean(params)
    sft.run(params)
    pairs.run(params)
    return params


def _eval_metrics(params: Params, merge: list[Path]) -> dict[str, float]:
    loaded = load_for_training(params, False, merge=merge)
    pairs_read = read_sample(Path(params.paths.pairs) / "train.jsonl", dpo_method.PAIR_FIELDS, 4, 0)
    rows = dpo_method.to_rows(loaded, pairs_read, Path("pairs"))
    trainer = dpo_method.build_trainer(params, loaded, rows, Path(params.paths.checkpoints) / "probe-ref")
    return trainer.evaluate(eval_dataset=Dataset.from_list(rows))


@pytest.mark.parametrize("precompute", [True, False])
def test_first_step_of_the_stage_has_zero_rewards_in_float32(
    trained: Params, precompute: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dpo.run's first logged step is computed before any update: the policy (base + merged
    SFT + a fresh adapter) is the reference, so rewards are 0 and the loss is ln 2."""
    import math

    from tuneline.training import GuardCallback, loop

    seen: list[dict] = []

    class Record(GuardCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001, ANN003
            seen.append({"step": state.global_step, **(logs or {})})
            super().on_log(args, state, control, logs=logs, **kwargs)

    monkeypatch.setattr(loop, "GuardCallback", Record)
    data = trained.model_dump(by_alias=True)
    for name in ("dpo_model", "checkpoints", "metrics", "reports"):
        data["paths"][name] = str(tmp_path / name)
    data["dpo"]["precompute_ref_log_probs"] = precompute
    params = Params.model_validate(data)
    dpo.run(params)
    first = seen[0]
    assert first["step"] == 1
    # precomputed reference log-probs come from a separate pass (other batches, other float32
    # rounding): equal to the policy's up to a few 1e-6 per token, not bit for bit
    tol = 1e-4 if precompute else 1e-6
    assert abs(first["rewards/chosen"]) < tol and abs(first["rewards/rejected"]) < tol, first
    assert abs(first["loss"] - math.log(2)) < tol, first


def test_reference_is_the_sft_model_not_the_base(trained: Params) -> None:
    sft_dir = Path(trained.paths.sft_model)
    at_start = _eval_metrics(trained, [sft_dir])
    assert abs(at_start["eval_rewards/chosen"]) < 1e-6
    # the reference's log-probs are the SFT model's, not the bare base's
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
    for name in ("loss", "rewards/accuracies", "rewards/margins"):
        assert (Path(trained.paths.metrics) / "dpo" / "plots" / "metrics" / f"{name}.tsv").is_file()
    assert set(json.loads((Path(trained.paths.metrics) / "dpo.json").read_text())) == {
        "train_loss", "reward_accuracy", "reward_margin"}

    loaded = load_for_eval(trained, out)
    assert [m["path"] for m in loaded.provenance["merged_parents"]] == [str(out / "parent")]
    ids = torch.tensor([loaded.render_ids("### Instruction\nPlan a day in Lisbon.\n\n### Response\n")])
    with loaded.using("default") as model, torch.no_grad():
        with_dpo = model(input_ids=ids).logits
    with loaded.using(None) as model, torch.no_grad():
        sft_only = model(input_ids=ids).logits
    assert not torch.allclose(with_dpo, sft_only)
