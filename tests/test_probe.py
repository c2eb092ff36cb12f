import json
from pathlib import Path

import pytest

from tuneline.contract import load_contract, load_suite
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.provenance import sha256_file
from tuneline.records import read_json, read_jsonl
from tuneline.stages import probe

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "data" / "seed" / "contract.schema.json"
TYPES = ["itinerary", "checklist", "budget"]
CITIES = ["Lisbon", "Tokyo", "Paris"]


def envelope(payload_type="checklist", destination="Lisbon"):
    return {
        "summary": f"Packing list for {destination}.",
        "assumptions": [],
        "uncertainty_notes": [],
        "next_steps": ["Pack the night before."],
        "verification_steps": ["Check the weather forecast."],
        "payload_type": payload_type,
        "payload": {"destination": destination, "items": ["passport", "adapter"]},
    }


def suite_line(i, payload_type, city, instruction=None):
    return {
        "id": f"p{i:02d}",
        "instruction": instruction or f"Make a {payload_type} for a trip to {city}.",
        "expect": {"payload_type": payload_type, "payload.destination": city},
        "meta": {"city": city},
    }


def write_suite(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def contract():
    return load_contract(SCHEMA)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A randomly initialised (non-identity) LoRA adapter on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    config = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(out))
    return out


def probe_params(tmp_path, tiny_model_dir, adapter=None, dtype="auto", suites=None, **probe_overrides):
    """Params probing one suite ``heldout`` (six lines, whole) unless ``suites`` is given."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    suite = write_suite(
        tmp_path / "suite.jsonl",
        [suite_line(i, TYPES[i % 3], CITIES[(i // 3) % 3]) for i in range(6)],
    )
    models = {"base": str(tiny_model_dir)}
    if adapter is not None:
        models["sft"] = str(adapter)
    return parse_params(
        {
            "paths": {
                "base_model": str(tiny_model_dir),
                "schema_file": str(SCHEMA),
                "seed_dir": str(REPO / "data" / "seed"),
                "dev_suite": None,
                "metrics": str(tmp_path / "metrics"),
                "reports": str(tmp_path / "reports"),
            },
            "model": {"device": "cpu", "dtype": dtype},
            "probe": {
                "models": models,
                "suites": suites or {"heldout": {"path": str(suite), "limit": None}},
                "batch_size": 4,
                "max_new_tokens": 6,
                **probe_overrides,
            },
            "compare": {"pairs": []},
        }
    )


# -- judging one output -----------------------------------------------------------------

EXPECT = {"payload_type": "checklist", "payload.destination": "Lisbon"}


def test_judge_valid_output_passes_every_check(contract):
    text = "Here you go:\n```json\n" + json.dumps(envelope()) + "\n```"
    result = probe.judge(text, "eos", EXPECT, contract)
    assert result["parsed"] and result["valid"]
    assert result["errors"] == []
    assert result["checks"] == {"payload_type": True, "destination": True}
    assert result["cause"] == "ok"
    assert len(result["fields_present"]) == 7


def test_judge_each_task_check_fails_on_its_own(contract):
    wrong_city = probe.judge(json.dumps(envelope(destination="Tokyo")), "eos", EXPECT, contract)
    assert wrong_city["valid"] and wrong_city["checks"] == {"payload_type": True, "destination": False}
    assert wrong_city["cause"] == "wrong_destination"

    other = envelope(payload_type="procedure")
    other["payload"] = {"destination": "Lisbon", "task": "Buy a metro card", "steps": ["Go to a machine"]}
    wrong_type = probe.judge(json.dumps(other), "eos", EXPECT, contract)
    assert wrong_type["valid"] and wrong_type["checks"] == {"payload_type": False, "destination": True}
    assert wrong_type["cause"] == "wrong_payload_type"


def test_judge_schema_errors_keep_every_path(contract):
    broken = envelope()
    del broken["summary"]
    broken["next_steps"] = "pack"
    result = probe.judge(json.dumps(broken), "eos", EXPECT, contract)
    assert result["parsed"] and not result["valid"]
    assert any(e.startswith("$:") and "'summary' is a required property" in e for e in result["errors"])
    assert any(e.startswith("$.next_steps:") for e in result["errors"])
    assert result["cause"] == "missing_field:summary"
    assert "summary" not in result["fields_present"]


def test_judge_array_root_and_truncation(contract):
    array = probe.judge("[1, 2]", "eos", EXPECT, contract)
    assert array["parsed"] and not array["valid"] and array["cause"] == "wrong_root_type"
    assert array["checks"] == {"payload_type": False, "destination": False}
    cut = probe.judge(json.dumps(envelope())[:50], "length", EXPECT, contract)
    assert not cut["parsed"] and cut["cause"] == "truncated"
    assert cut["parse_error"].startswith("truncated JSON")
    prose = probe.judge("I cannot help with that.", "eos", EXPECT, contract)
    assert not prose["parsed"] and prose["cause"] == "invalid_json"


def test_binary_outcomes_and_failure_groups():
    samples = [
        {"id": "a", "parsed": True, "valid": True, "finish_reason": "eos", "checks": {"destination": True},
         "cause": "ok", "output": "{}", "parse_error": None, "errors": []},
        {"id": "b", "parsed": False, "valid": False, "finish_reason": "length", "checks": {"destination": False},
         "cause": "truncated", "output": "{", "parse_error": "truncated JSON", "errors": []},
        {"id": "c", "parsed": False, "valid": False, "finish_reason": "length", "checks": {"destination": False},
         "cause": "truncated", "output": "{\"a", "parse_error": "truncated JSON", "errors": []},
        {"id": "d", "parsed": True, "valid": False, "finish_reason": "eos", "checks": {"destination": False},
         "cause": "wrong_root_type", "output": "[]", "parse_error": None, "errors": ["$: [] is not of type 'object'"]},
    ]
    assert probe.binary_outcomes(samples[1]) == {
        "parse_rate": False, "schema_valid_rate": False, "destination_accuracy": False, "truncated_rate": True,
    }
    groups = probe.group_failures(samples)
    assert [(g["cause"], g["count"], g["ids"]) for g in groups] == [
        ("truncated", 2, ["b", "c"]),
        ("wrong_root_type", 1, ["d"]),
    ]
    assert groups[1]["examples"][0]["errors"] == ["$: [] is not of type 'object'"]


# -- suite and subset -------------------------------------------------------------------


def test_stratified_subset_is_deterministic_and_balanced():
    suite = [suite_line(i, TYPES[i % 3] if i < 30 else "checklist", CITIES[i % 3]) for i in range(60)]
    subset = probe.select_subset(suite, 12, ["payload_type"])
    assert len(subset) == 12
    counts = {t: sum(s["expect"]["payload_type"] == t for s in subset) for t in TYPES}
    assert counts == {"itinerary": 4, "checklist": 4, "budget": 4}
    assert subset == probe.select_subset(list(reversed(suite)), 12, ["payload_type"])[::-1]
    positions = [suite.index(s) for s in subset]
    assert positions == sorted(positions)  # suite order kept
    # small strata are exhausted, the rest is filled from the others
    assert len(probe.select_subset(suite, 50, ["payload_type"])) == 50
    assert probe.select_subset(suite, None, ["payload_type"]) == suite
    with pytest.raises(InputError, match=r"probe.stratify_by: 'language'"):
        probe.select_subset(suite, 10, ["language"])


def test_load_suite_refuses_inconsistent_expect_keys(tmp_path):
    lines = [suite_line(0, "budget", "Paris"), suite_line(1, "budget", "Paris")]
    del lines[1]["expect"]["payload.destination"]
    path = write_suite(tmp_path / "s.jsonl", lines)
    with pytest.raises(InputError, match=r"s.jsonl:2: expect keys"):
        load_suite(path)
    (tmp_path / "bad.jsonl").write_text('{"id": "x", "instruction": 3, "expect": {}}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: field 'instruction'"):
        load_suite(tmp_path / "bad.jsonl")


def test_unknown_model_is_refused(tmp_path, tiny_model_dir):
    params = probe_params(tmp_path, tiny_model_dir)
    with pytest.raises(InputError, match=r"probe model 'v9': not in probe.models \(allowed: base\)"):
        probe.run(params, "v9")
    assert probe.adapter_dir(params, "base") is None


# -- the stage with the tiny model -----------------------------------------------------


def test_probe_base_writes_samples_failures_and_metrics(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = probe_params(tmp_path, tiny_model_dir)
    result = probe.run(params, "base")
    metrics = {**result, **result["suites"]["heldout"]}
    paths = probe.output_paths(params, "base", "heldout")
    assert paths.metrics == tmp_path / "metrics" / "probe" / "heldout" / "base.json"
    assert paths.samples == tmp_path / "reports" / "probe" / "heldout" / "base.samples.jsonl"
    samples = read_jsonl(paths.samples)
    assert [s["id"] for s in samples] == [f"p{i:02d}" for i in range(6)]
    for s in samples:
        assert s["model"] == "base"
        assert s["prompt"].startswith("### Instruction\n") and s["prompt"].endswith("### Response\n")
        assert s["finish_reason"] in {"eos", "length"}
        assert 1 <= s["n_tokens"] <= 6
        assert s["finish_reason"] == "eos" or s["n_tokens"] == 6
        assert set(s["checks"]) == {"payload_type", "destination"}
        assert s["cause"] != "ok" or s["valid"]
        assert s["meta"]["city"] in CITIES
    on_disk = read_json(paths.metrics)
    # the metrics file holds n and the rates; everything else is in the run record
    rates = ("parse_rate", "schema_valid_rate", "payload_type_accuracy", "destination_accuracy", "truncated_rate")
    assert on_disk == {k: metrics[k] for k in ("n", *rates, "facts_accuracy", "facts_checked")}
    # travel checks facts; the tiny model writes no valid envelope, so none is checked
    assert all(s["facts"] is None for s in samples if not s["valid"])
    assert (on_disk["facts_accuracy"], on_disk["facts_checked"]) == (None, sum(bool(s["facts"]) for s in samples))
    record = read_json(paths.provenance)
    assert record["stage"] == "probe@base" and record["git"] and record["versions"]["torch"]
    section = record["suites"]["heldout"]
    assert section["suite_sha256"] == sha256_file(params.probe.suites["heldout"].path)
    assert section["n_suite_selected"] == 6 and section["limit"] is None
    assert record["run"]["mean_new_tokens"] == metrics["mean_new_tokens"] and record["run"]["n"] == 6
    for key in ("parse_rate", "schema_valid_rate", "payload_type_accuracy", "destination_accuracy", "truncated_rate"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["n"] == 6
    assert metrics["truncated_rate"] == pytest.approx(sum(s["finish_reason"] == "length" for s in samples) / 6, abs=1e-6)
    assert metrics["mean_new_tokens"] == pytest.approx(sum(s["n_tokens"] for s in samples) / 6, abs=1e-3)
    assert set(metrics["field_presence"]) == set(load_contract(SCHEMA).schema["required"])
    assert metrics["run"]["tokens_per_s"] > 0
    assert len(metrics["contract_sha256"]) == 64
    assert metrics["loaded"]["adapters"] == {}
    failures = read_jsonl(paths.failures, allow_empty=True)
    assert sum(f["count"] for f in failures) == sum(s["cause"] != "ok" for s in samples)
    assert "ok" not in metrics["failure_causes"]  # not a failure cause
    assert sum(metrics["failure_causes"].values()) == sum(s["cause"] != "ok" for s in samples)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_probe_is_deterministic_and_batching_does_not_change_outputs(tmp_path, noisy_model_dir, monkeypatch, dtype):
    """The same params give the same outputs. In float32, batch size changes nothing (left
    padding is exact); in bf16 (``bfloat16``, and auto on CUDA) a different
    batch shape may flip a near-tie greedy choice, so only same-batch determinism holds."""
    monkeypatch.chdir(tmp_path)
    runs = []
    for name, batch_size in (("a", 3), ("b", 3), ("c", 1)):
        params = probe_params(tmp_path / name, noisy_model_dir, dtype=dtype, batch_size=batch_size, max_new_tokens=8)
        lines = [
            suite_line(i, TYPES[i % 3], CITIES[i % 3], instruction="Plan a trip. " * (1 + 2 * i) + CITIES[i % 3])
            for i in range(6)
        ]
        write_suite(Path(params.probe.suites["heldout"].path), lines)
        probe.run(params, "base")
        runs.append([(s["output"], s["n_tokens"])
                     for s in read_jsonl(probe.output_paths(params, "base", "heldout").samples)])
    assert len({text for text, _ in runs[0]}) > 3  # the outputs depend on the prompt
    assert runs[0] == runs[1]
    if dtype == "float32":
        # left padding: a prompt generates the same tokens alone or padded in a batch
        assert runs[0] == runs[2]


def test_generation_stops_at_eos_and_counts_it(noisy_model_dir):
    from tuneline import modeling
    from tuneline.generation import generate

    loaded = modeling.load(noisy_model_dir, parse_params({"model": {"device": "cpu"}}).model)
    ids = loaded.encode(["### Instruction\nPlan a trip to Lisbon\n\n### Response\n"])
    [[free]], _ = generate(
        loaded, ids, batch_size=1, max_new_tokens=8, do_sample=False, temperature=1.0, top_p=1.0
    )
    assert free.finish_reason == "length" and free.n_tokens == 8
    tokens = loaded.tokenizer(free.text, add_special_tokens=False)["input_ids"]
    stop = tokens[3]
    first = tokens.index(stop)
    loaded.model.generation_config.eos_token_id = [stop]
    [[stopped]], _ = generate(
        loaded, ids, batch_size=1, max_new_tokens=8, do_sample=False, temperature=1.0, top_p=1.0
    )
    assert stopped.finish_reason == "eos"
    assert stopped.n_tokens == first + 1
    assert stopped.text == loaded.tokenizer.decode(tokens[:first])


def test_probe_applies_the_adapter(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = probe_params(tmp_path, tiny_model_dir, adapter=adapter_dir)
    base_metrics = probe.run(params, "base")
    sft_metrics = probe.run(params, "sft")
    assert set(sft_metrics["loaded"]["adapters"]) == {"sft"}
    assert base_metrics["contract_sha256"] == sft_metrics["contract_sha256"]
    base_out = [s["output"] for s in read_jsonl(probe.output_paths(params, "base", "heldout").samples)]
    sft_out = [s["output"] for s in read_jsonl(probe.output_paths(params, "sft", "heldout").samples)]
    assert base_out != sft_out


def test_merging_the_adapter_for_probing_keeps_the_outputs(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    """probe.merge_adapter folds the LoRA weights into the base (faster generation); in
    float32 the greedy outputs are the ones the attached adapter gives."""
    monkeypatch.chdir(tmp_path)
    outputs = {}
    for merge in (True, False):
        params = probe_params(tmp_path / str(merge), tiny_model_dir, adapter=adapter_dir, dtype="float32", merge_adapter=merge)
        metrics = probe.run(params, "sft")
        assert metrics["loaded"].get("merged_top", False) is merge
        assert set(metrics["loaded"]["adapters"]) == {"sft"}
        outputs[merge] = [s["output"] for s in read_jsonl(probe.output_paths(params, "sft", "heldout").samples)]
    assert outputs[True] == outputs[False]


def test_probe_refuses_chat_tokens_in_completion_prompts(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = probe_params(tmp_path, tiny_model_dir)
    write_suite(
        Path(params.probe.suites["heldout"].path),
        [suite_line(0, "budget", "Paris", instruction="<|im_start|>user\nA budget for Paris")],
    )
    with pytest.raises(InputError, match="chat special token"):
        probe.run(params, "base")
    assert not probe.output_paths(params, "base", "heldout").metrics.exists()


def test_probe_merges_the_parent_of_a_stacked_adapter(tmp_path, tiny_model_dir, adapter_dir, monkeypatch):
    """A dpo adapter trained on base+merged sft is probed on base+merged sft, not on the bare base."""
    import json
    import shutil

    monkeypatch.chdir(tmp_path)
    child = tmp_path / "child"
    shutil.copytree(adapter_dir, child)
    (child / "provenance.json").write_text(json.dumps({"parent": str(adapter_dir)}))
    alone = tmp_path / "alone"
    shutil.copytree(adapter_dir, alone)
    params = probe_params(tmp_path, tiny_model_dir, adapter=child)
    stacked = probe.run(params, "sft")
    assert stacked["loaded"]["merged_parents"][0]["path"] == str(adapter_dir)
    stacked_out = [s["output"] for s in read_jsonl(probe.output_paths(params, "sft", "heldout").samples)]
    params_alone = probe_params(tmp_path / "b", tiny_model_dir, adapter=alone)
    probe.run(params_alone, "sft")
    alone_out = [s["output"] for s in read_jsonl(probe.output_paths(params_alone, "sft", "heldout").samples)]
    assert stacked_out != alone_out


def test_probe_writes_every_suite_apart_from_one_generate_call(tmp_path, tiny_model_dir, monkeypatch):
    """Two suites: each gets its own metrics, samples and failures (its limit applied, a
    stratified subset), the run record a section per suite; generating the suites
    together gives each prompt the output it gets when its suite is probed alone (float32)."""
    monkeypatch.chdir(tmp_path)
    natural = write_suite(tmp_path / "natural.jsonl", [
        {**suite_line(i, TYPES[i % 3], CITIES[i % 3], instruction=f"hey can u do a {TYPES[i % 3]} for {CITIES[i % 3]}"),
         "id": f"n{i:02d}"} for i in range(9)
    ])
    write_suite(tmp_path / "suite.jsonl", [suite_line(i, TYPES[i % 3], CITIES[(i // 3) % 3]) for i in range(6)])
    both = {"heldout": {"path": str(tmp_path / "suite.jsonl"), "limit": None},
            "natural": {"path": str(natural), "limit": 3}}
    params = probe_params(tmp_path, tiny_model_dir, dtype="float32", suites=both)
    result = probe.run(params, "base")
    assert set(result["suites"]) == {"heldout", "natural"}
    record = read_json(probe.output_paths(params, "base", "natural").provenance)
    assert set(record["suites"]) == {"heldout", "natural"} and record["run"]["n"] == 9
    assert record["suites"]["natural"]["n_suite_selected"] == 3 and record["suites"]["natural"]["limit"] == 3
    samples = {}
    for name, n in (("heldout", 6), ("natural", 3)):
        paths = probe.output_paths(params, "base", name)
        assert read_json(paths.metrics)["n"] == n
        samples[name] = read_jsonl(paths.samples)
        assert paths.failures.is_file()
    assert [s["id"][0] for s in samples["natural"]] == ["n"] * 3
    assert sorted(s["expect"]["payload_type"] for s in samples["natural"]) == sorted(TYPES)  # stratified

    alone = probe_params(tmp_path / "alone", tiny_model_dir, dtype="float32",
                         suites={"natural": {"path": str(natural), "limit": 3}})
    probe.run(alone, "base")
    assert [s["output"] for s in read_jsonl(probe.output_paths(alone, "base", "natural").samples)] == [
        s["output"] for s in samples["natural"]
    ]
    assert not probe.output_paths(alone, "base", "heldout").metrics.exists()


def test_suite_names_and_limits_are_checked():
    from tuneline.params import ParamsError

    for suites, message in (
        ({}, "at least one suite"),
        ({"Held Out": {"path": "x.jsonl"}}, "suite name 'Held Out'"),
        ({"heldout": {"path": "x.jsonl", "limit": 0}}, "probe.suites.heldout.limit"),
        ({"heldout": {"limit": 3}}, "probe.suites.heldout.path"),
        ({"dev": {"path": "data/seed/./dev_suite.jsonl"}}, "probe.suites.dev.path: .* is paths.dev_suite, which is for "
                                                           "tuning only"),
    ):
        with pytest.raises(ParamsError, match=message):
            parse_params({"probe": {"suites": suites}})
    assert parse_params({"paths": {"dev_suite": None}, "probe": {"suites": {"dev": {"path": "data/seed/dev_suite.jsonl"}}}})
