"""The contract's learning curve during training: points at step 0, every N steps and the
last step with the probe's rates, through DVCLive; the trained weights the same with it on
or off; resume neither loses nor repeats a point; bad params named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from training_data import REPO, tiny_params, write_clean
from tuneline.errors import InputError
from tuneline.records import write_jsonl
from tuneline.stages import dpo, pairs, sft
from tuneline.training import GuardCallback, loop
from tuneline.training.curve import evaluating

RATES = ("parse_rate", "schema_valid_rate", "payload_type_accuracy", "destination_accuracy", "truncated_rate")


def write_suite(path: Path, n: int = 6) -> str:
    """A development suite in the probe suite's line format: its first ``n`` lines."""
    lines = (REPO / "data/seed/probe_suite.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    write_jsonl(path, [json.loads(line) for line in lines])
    return str(path)


def curve_params(
    root: Path, model: Path, curve: dict[str, Any], extra: dict[str, Any] | None = None, suite: str | None = None
) -> Any:
    suite = suite or write_suite(root / "dev_suite.jsonl")
    overrides = {"paths": {"dev_suite": suite}, "sft": {"curve": {"max_new_tokens": 6, **curve},
                                                        "trainer": {"per_device_train_batch_size": 2}}}
    for key, value in (extra or {}).items():
        overrides["sft"][key] = {**overrides["sft"].get(key, {}), **value}
    return tiny_params(root, model, overrides)


def curve_rows(params: Any, stage: str = "sft") -> dict[str, list[list[str]]]:
    directory = Path(params.paths.metrics) / stage / "plots/metrics/curve"
    return {
        path.stem: [row.split("\t") for row in path.read_text().splitlines()]
        for path in sorted(directory.glob("*.tsv"))
    }


def test_points_at_step_zero_every_n_and_the_last_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    # 8 records, batch 2: 4 optimizer steps; every 3 -> steps 0, 3 and the last, 4
    params = curve_params(tmp_path, tiny_model_dir, {"every_n_steps": 3, "limit": 4})
    write_clean(params)
    metrics = sft.run(params)
    rows = curve_rows(params)
    assert sorted(rows) == sorted(RATES)
    for name, table in rows.items():
        assert table[0] == ["step", name]
        assert [r[0] for r in table[1:]] == ["0", "3", "4"]
        assert all(0.0 <= float(r[1]) <= 1.0 for r in table[1:])
    assert metrics["curve_points"] == 3 and metrics["curve_s"] > 0
    # beside the loss in the same DVCLive directory, the last values in its summary
    live = Path(params.paths.metrics) / "sft"
    # the loss of a step with a curve point is logged too
    assert [r.split("\t")[0] for r in (live / "plots/metrics/loss.tsv").read_text().splitlines()] == [
        "step", "1", "2", "3", "4"]
    assert "schema_valid_rate" in json.loads((live / "metrics.json").read_text())["curve"]
    # the numbers compared between versions are unchanged
    assert set(json.loads((tmp_path / "metrics/sft.json").read_text())) == {"train_loss", "eval_loss"}


def test_rates_are_the_probes_on_the_same_outputs(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A model that always writes a valid itinerary for Porto: every rate is exact."""
    from tuneline.contract import load_contract
    from tuneline.generation import Generation
    from tuneline.modeling import load
    from tuneline.training.curve import curve_rates, load_dev_suite

    params = curve_params(tmp_path, tiny_model_dir, {"every_n_steps": 1, "limit": 3})
    loaded = load(tiny_model_dir, params.model)
    suite = load_dev_suite(params, "sft", loaded)
    # a stratified prefix: one line of each of three payload types
    assert len({line["expect"]["payload_type"] for line in suite.lines}) == 3
    assert suite.keys == tuple(f"curve/{name}" for name in RATES)
    gold = next(json.loads(g) for g in (REPO / "data/seed/gold.jsonl").read_text().splitlines()
                if json.loads(g)["payload_type"] == "itinerary")
    completion = {**gold["completion"], "payload": {**gold["completion"]["payload"], "destination": "Porto"}}
    text = load_contract(params.paths.schema_file).canonical_text(completion)
    # a valid Porto itinerary for every line but the last, which gets no JSON at all
    outputs = [Generation(text, "eos", 10), Generation(text, "eos", 10), Generation("no json", "length", 6)]
    itinerary = [line["expect"]["payload_type"] == "itinerary" for line in suite.lines[:2]]
    porto = [line["expect"]["payload.destination"] == "Porto" for line in suite.lines[:2]]
    assert curve_rates(suite, outputs) == {
        "curve/parse_rate": round(2 / 3, 6), "curve/schema_valid_rate": round(2 / 3, 6),
        "curve/payload_type_accuracy": round(sum(itinerary) / 3, 6),
        "curve/destination_accuracy": round(sum(porto) / 3, 6),
        "curve/truncated_rate": round(1 / 3, 6),  # the one that reached the token limit
    }


def test_weights_are_the_same_bytes_with_the_curve_on_or_off(tmp_path: Path, tiny_model_dir: Path) -> None:
    # LoRA dropout draws from the torch RNG every step and two epochs reshuffle: a curve
    # that drew from it, or left dropout off, would change the trained weights
    extra = {"lora": {"dropout": 0.1}, "trainer": {"num_train_epochs": 2}}
    off = curve_params(tmp_path / "off", tiny_model_dir, {"every_n_steps": 0}, extra)
    on = curve_params(tmp_path / "on", tiny_model_dir, {"every_n_steps": 1}, extra)
    for params in (off, on):
        write_clean(params)
        sft.run(params)
    assert not (Path(off.paths.metrics) / "sft/plots/metrics/curve").exists()
    assert [r[0] for r in curve_rows(on)["schema_valid_rate"][1:]] == [str(s) for s in range(9)]
    weights = [(Path(p.paths.sft_model) / "adapter_model.safetensors").read_bytes() for p in (off, on)]
    assert weights[0] == weights[1]
    losses = [(Path(p.paths.metrics) / "sft/plots/metrics/loss.tsv").read_text() for p in (off, on)]
    assert losses[0] == losses[1]


def test_evaluating_puts_back_every_modules_mode_and_the_rng(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.train()
    frozen = model.model.layers[0]
    frozen.eval()  # a submodule the trainer keeps in eval mode stays so
    before = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    with evaluating(model):
        assert not any(m.training for m in model.modules())
        torch.rand(3)
    assert [m.training for m in model.modules()] == before and not frozen.training
    assert torch.equal(torch.get_rng_state(), rng)


class Interrupt(Exception):
    pass


def test_resume_neither_loses_nor_repeats_a_point(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 4 steps per epoch, 2 epochs; checkpoints every 3 steps; killed at step 5
    extra = {"trainer": {"num_train_epochs": 2, "save_steps": 3}}
    straight = curve_params(tmp_path / "a", tiny_model_dir, {"every_n_steps": 2}, extra)
    write_clean(straight)
    sft.run(straight)
    resumed = curve_params(tmp_path / "b", tiny_model_dir, {"every_n_steps": 2}, extra)
    write_clean(resumed)

    class KilledAtStep5(GuardCallback):
        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003
            if state.global_step == 5:
                raise Interrupt("killed")

    monkeypatch.setattr(loop, "GuardCallback", KilledAtStep5)
    with pytest.raises(Interrupt):
        sft.run(resumed)
    monkeypatch.undo()
    metrics = sft.run(resumed)
    assert metrics["resumed_from_step"] == 3
    assert metrics["curve_points"] == 3  # steps 4, 6 and 8 evaluated by the resumed run; 0 and 2 replayed
    a, b = curve_rows(straight), curve_rows(resumed)
    assert [r[0] for r in a["schema_valid_rate"][1:]] == ["0", "2", "4", "6", "8"]
    assert a == b


def test_disabled_curve_loads_no_suite(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = curve_params(tmp_path, tiny_model_dir, {"every_n_steps": 0}, suite=str(tmp_path / "missing.jsonl"))
    write_clean(params)
    metrics = sft.run(params)
    assert "curve_points" not in metrics
    assert not (Path(params.paths.metrics) / "sft/plots/metrics/curve").exists()


def test_bad_suite_or_limit_is_named(tmp_path: Path, tiny_model_dir: Path) -> None:
    params = curve_params(tmp_path, tiny_model_dir, {"every_n_steps": 2}, suite=str(tmp_path / "missing.jsonl"))
    write_clean(params)
    with pytest.raises(InputError, match=r"paths\.dev_suite: .*missing\.jsonl.* is not a file"):
        sft.run(params)
    assert not Path(params.paths.sft_model).exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "instruction": "hi"}\n')
    params = curve_params(tmp_path, tiny_model_dir, {"every_n_steps": 2}, suite=str(bad))
    with pytest.raises(InputError, match=r"paths\.dev_suite: .*bad\.jsonl:1"):
        sft.run(params)
    with pytest.raises(InputError, match=r"sft\.curve\.limit"):
        curve_params(tmp_path, tiny_model_dir, {"every_n_steps": 2, "limit": 0})
    with pytest.raises(InputError, match=r"dpo\.curve\.every_n_steps"):
        tiny_params(tmp_path, tiny_model_dir, {"dpo": {"curve": {"every_n_steps": -1}}})


def test_dpo_logs_its_curve(tmp_path: Path, tiny_model_dir: Path) -> None:
    suite = write_suite(tmp_path / "dev_suite.jsonl")
    params = tiny_params(tmp_path, tiny_model_dir, {
        "paths": {"dev_suite": suite},
        "dpo": {"max_pairs": 4, "curve": {"every_n_steps": 1, "limit": 3, "max_new_tokens": 4}},
    })
    write_clean(params)
    sft.run(params)
    pairs.run(params)
    metrics = dpo.run(params)
    rows = curve_rows(params, "dpo")
    assert sorted(rows) == sorted(RATES)
    assert [r[0] for r in rows["parse_rate"][1:]] == [str(s) for s in range(metrics["steps"] + 1)]
