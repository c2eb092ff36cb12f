"""The datagen library on its own: travel templates, imports, teacher shots/generation, probe suite."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tuneline import modeling
from tuneline.contract import load_contract
from tuneline.datagen import imports, probe_suite, teacher, travel
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.prompting import INSTRUCTION_HEADER
from tuneline.records import RecordError

SEED = Path(__file__).resolve().parents[1] / "data" / "seed"


@pytest.fixture(scope="module")
def kb():
    return travel.load_destinations(SEED / "destinations.jsonl")


# -- travel ------------------------------------------------------------------------------


def test_slug_and_instruction_rendering():
    assert travel.slug("Kraków") == "krakow" and travel.slug("Rio de Janeiro") == "rio-de-janeiro"
    text = travel.render_instruction("{span} in {destination} for {profile}", destination="Oslo", days=1,
                                     profile="a student", task="")
    assert text == "1 day in Oslo for a student"


def test_template_examples_are_deterministic_valid_and_seed_sensitive(kb):
    phrasings = travel.load_phrasings(SEED / "train_phrasings.json")
    train = [d for d in kb if d["split"] == "train"][:2]
    a = travel.template_examples(train, phrasings, seed=0, variants=2)
    b = travel.template_examples(train, phrasings, seed=0, variants=2)
    c = travel.template_examples(train, phrasings, seed=1, variants=2)
    assert a == b and [e.instruction for e in a] != [e.instruction for e in c]
    assert len(a) == len(train) * len(travel.PAYLOAD_TYPES) * 2 and len({e.key for e in a}) == len(a)
    contract = load_contract(SEED / "contract.schema.json")
    for e in a:
        assert contract.judge_value(e.envelope, {"payload_type": e.payload_type,
                                                 "payload.destination": e.destination}).passes
        assert e.destination in e.instruction
    probe_only = [d for d in kb if d["split"] == "probe"][:1]
    assert travel.template_examples(probe_only, phrasings, seed=0, variants=1) == []


def test_knowledge_base_errors_name_file_and_line(tmp_path, kb):
    bad = dict(kb[0], split="holdout")
    path = tmp_path / "destinations.jsonl"
    path.write_text(json.dumps(kb[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(RecordError, match=r"destinations.jsonl:2: .*split 'holdout' is not one of"):
        travel.load_destinations(path)
    phr = tmp_path / "phrasings.json"
    phr.write_text("[]")
    with pytest.raises(InputError, match="phrasings.json: expected a JSON object"):
        travel.load_phrasings(phr)


# -- imports -----------------------------------------------------------------------------


def test_import_detects_formats_and_keeps_expect(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"instruction": "Q", "output": "A", "meta": {"expect": {"n": 1}}}) + "\n")
    result = imports.read_import(path)
    assert result.format == "alpaca" and result.examples[0].expect == {"n": 1}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "Q", "output": "A", "meta": {"expect": [1]}}) + "\n")
    with pytest.raises(RecordError, match=r"bad.jsonl:1: 'meta.expect' must be an object"):
        imports.read_import(bad)


# -- teacher -----------------------------------------------------------------------------


def test_pick_shots_puts_one_of_the_requested_type_first_and_is_seeded():
    gold = [{"id": f"g{i}", "payload_type": t} for i, t in enumerate(["budget", "itinerary", "budget", "checklist"])]
    shots = teacher.pick_shots(gold, 2, "itinerary", random.Random(3))
    assert len(shots) == 2 and len({s["id"] for s in shots}) == 2
    assert all(teacher.pick_shots(gold, 2, "itinerary", random.Random(s))[0]["id"] == "g1" for s in range(20))
    assert shots == teacher.pick_shots(gold, 2, "itinerary", random.Random(3))
    assert teacher.pick_shots(gold, 0, "budget", random.Random(0)) == []
    prompt = teacher.shot_prompt([("Q1", "A1")], "Q2")
    assert prompt == f"{INSTRUCTION_HEADER}Q1\n\n### Response\nA1\n\n{INSTRUCTION_HEADER}Q2\n\n### Response\n"


def test_teacher_generation_stops_at_a_new_instruction_block(tiny_model_dir):
    loaded = modeling.load(tiny_model_dir, parse_params({"model": {"device": "cpu", "format": "completion"}}).model)
    prompts = [teacher.shot_prompt([("Plan a trip", "{}")], "Plan a day in Lisbon")]
    kwargs = dict(n_samples=2, temperature=1.0, top_p=1.0, max_new_tokens=24, batch_size=1, seed=5, progress=False)
    [samples] = teacher.generate(loaded, prompts, **kwargs)
    assert len(samples) == 2 and samples == teacher.generate(loaded, prompts, **kwargs)[0]
    for s in samples:
        assert s.finish_reason in {"eos", "stop", "length"} and teacher.STOP_TEXT not in s.text
        assert s.text == s.text.strip() and 1 <= s.n_tokens <= 24


# -- probe suite -------------------------------------------------------------------------


def test_probe_suite_uses_only_held_out_destinations_and_is_stratified(kb, tmp_path):
    phrasings = travel.load_phrasings(SEED / "probe_phrasings.json")
    suite = probe_suite.build_probe_suite(kb, phrasings, per_pair=2)
    held_out = {d["name"] for d in kb if d["split"] == "probe"}
    assert {s["expect"]["payload.destination"] for s in suite} == held_out
    assert len(suite) == len(held_out) * len(travel.PAYLOAD_TYPES) * 2 == len({s["id"] for s in suite})
    first = suite[: len(held_out) * len(travel.PAYLOAD_TYPES)]
    assert {(s["expect"]["payload.destination"], s["expect"]["payload_type"]) for s in first} == {
        (d, t) for d in held_out for t in travel.PAYLOAD_TYPES
    }
    probe_suite.main(["--seed-dir", str(SEED), "--out-dir", str(tmp_path)])
    for name in ("probe_suite.jsonl", "natural_suite.jsonl", "dev_suite.jsonl"):  # the committed suites are reproducible
        assert (tmp_path / name).read_bytes() == (SEED / name).read_bytes(), name
