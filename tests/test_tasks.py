"""The task plug-in: the generic pipeline runs a non-travel contract without travel behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline import negatives, tasks
from tuneline.contract import load_contract, load_suite
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.records import read_json, read_jsonl
from tuneline.stages import clean, generate, pairs, probe

RECIPE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["title", "servings", "ingredients"],
    "properties": {
        "title": {"type": "string", "pattern": "\\S"},
        "servings": {"type": "integer", "minimum": 1},
        "ingredients": {"type": "array", "minItems": 1, "items": {"type": "string"}},
    },
}
DISHES = ["soup", "salad", "bread", "curry", "pie", "stew", "pasta", "cake", "tart", "risotto", "omelette", "pancakes"]


def recipe(dish: str, n: int) -> str:
    return json.dumps({"title": f"{dish.title()} for {n}", "servings": n, "ingredients": [dish, "salt", "water"]})


def project(tmp: Path, tiny_model_dir: Path, task: str = "generic") -> dict:
    (tmp / "recipe.schema.json").write_text(json.dumps(RECIPE_SCHEMA))
    rows = []
    for i, dish in enumerate(DISHES):
        for n in (2, 4):
            rows.append({
                "instruction": f"Write a recipe card for {dish} serving {n} people (card {i}).",
                "output": recipe(dish, n),
                "meta": {"expect": {"servings": n, "title": f"{dish.title()} for {n}"}},
            })
    rows.append({"instruction": "Write a recipe card for Lisbon soup.", "output": recipe("Lisbon soup", 2),
                 "meta": {"expect": {"servings": 2}}})
    (tmp / "recipes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = [{"id": f"r{i}", "instruction": f"A recipe card for {d} serving 3.", "expect": {"servings": 3, "destination": d},
              "meta": {}} for i, d in enumerate(["gnocchi", "Lisbon"])]
    (tmp / "suite.jsonl").write_text("".join(json.dumps(s) + "\n" for s in suite))
    return {
        "task": task,
        "paths": {
            "schema_file": str(tmp / "recipe.schema.json"), "dev_suite": None,
            "generated": str(tmp / "gen"), "clean": str(tmp / "clean"), "pairs": str(tmp / "pairs"),
            "metrics": str(tmp / "metrics"), "reports": str(tmp / "reports"), "base_model": str(tiny_model_dir),
        },
        "generate": {"sources": {"template": {"enabled": False},
                                 "import": {"enabled": True, "path": str(tmp / "recipes.jsonl")}}},
        "probe": {"suites": {"heldout": {"path": str(tmp / "suite.jsonl")}}},
        "clean": {"min_kept": 5, "max_rejected_fraction": 0.9},
        "sft": {"max_seq_len": 2048},
        "pairs": {"strategies": ["drop_field", "array_root", "truncate", "invalid_json", "repeat_item"]},
    }


def test_generic_pipeline_runs_a_recipe_contract_without_travel(tmp_path, tiny_model_dir):
    params = parse_params(project(tmp_path, tiny_model_dir))
    generate.run(params)
    metrics = clean.run(params)
    # no travel filter: the record naming the probe's "Lisbon" is kept, no probe_destination reason
    assert "probe_destination" not in metrics["rejected_by_reason"]
    assert list(metrics["rejected_by_reason"]) == [*clean.REASONS, *clean.LATE_REASONS]
    kept = read_jsonl(tmp_path / "clean" / "train.jsonl") + read_jsonl(tmp_path / "clean" / "val.jsonl")
    assert any("Lisbon" in r["meta"]["instruction"] for r in kept)
    assert metrics["kept"] == 25
    made = pairs.run(params)
    assert set(made["per_strategy"]) <= {"drop_field", "array_root", "truncate", "invalid_json", "repeat_item"}
    contract = load_contract(params.paths.schema_file)
    for pair in read_jsonl(tmp_path / "pairs" / "train.jsonl"):
        assert contract.judge(pair["chosen"], pair["meta"]["expect"]).passes
        assert not contract.judge(pair["rejected"], pair["meta"]["expect"]).passes
    # the probe's verdict on outputs for the recipe suite; no stratification by a travel key
    suite = load_suite(params.probe.suites["heldout"].path)
    assert tasks.get(params.task).stratify_by == ()
    assert len(probe.select_subset(suite, 1, tasks.get("generic").stratify_by)) == 1
    good = probe.judge(recipe("gnocchi", 3), "eos", {"servings": 3}, contract)
    assert good["valid"] and good["checks"] == {"servings": True} and good["cause"] == "ok"
    wrong = probe.judge(recipe("gnocchi", 2), "eos", {"servings": 3}, contract)
    assert wrong["cause"] == "wrong_servings"


def test_generic_task_refuses_travel_sources_and_negatives(tmp_path, tiny_model_dir):
    config = project(tmp_path, tiny_model_dir)
    config["generate"]["sources"]["template"]["enabled"] = True
    with pytest.raises(InputError, match="task 'generic' has no template source"):
        generate.run(parse_params(config))
    with pytest.raises(InputError, match="'off_topic' not available for task 'generic'"):
        negatives.strategies_for(tasks.get("generic"), ["drop_field", "off_topic"])
    with pytest.raises(InputError, match="task: 'cooking' is not a known task"):
        tasks.get("cooking")


def test_travel_task_keeps_its_destination_filter(tmp_path, tiny_model_dir):
    params = parse_params(project(tmp_path, tiny_model_dir, task="travel"))
    generate.run(params)
    metrics = clean.run(params)
    assert metrics["rejected_by_reason"]["probe_destination"] == 1
    assert read_json(tmp_path / "metrics" / "clean.json")["leakage_hits"] == 1


def test_default_params_pick_the_travel_task_and_its_probe_strata():
    params = parse_params({})
    assert params.task == "travel" and params.probe.stratify_by is None
    assert tasks.get(params.task).stratify_by == ("payload_type",)
    with pytest.raises(InputError, match="task"):
        parse_params({"task": "cooking"})
