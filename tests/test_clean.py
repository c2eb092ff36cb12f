"""The clean stage: every filter on planted records, lengths and truncation, leakage,
contamination, split, reject budget, chat format, determinism and properties."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tuneline import filters, tasks
from tuneline.contract import load_contract
from tuneline.datagen.travel import load_destinations, load_phrasings, template_examples
from tuneline.errors import InputError
from tuneline.params import Params, parse_params
from tuneline.records import read_jsonl, write_jsonl
from tuneline.similarity import SimilarityIndex, gram_order, jaccard, shingles
from tuneline.stages import clean, generate

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "data" / "seed"
CONTRACT = load_contract(SEED / "contract.schema.json")
GOLD = read_jsonl(SEED / "gold.jsonl")
PROBE = read_jsonl(SEED / "probe_suite.jsonl")
NATURAL = read_jsonl(SEED / "natural_suite.jsonl")
DEV = read_jsonl(SEED / "dev_suite.jsonl")


def params_for(
    tmp_path: Path, model_dir: Path, clean_section: dict[str, Any] | None = None, **extra: Any
) -> Params:
    data: dict[str, Any] = {
        "paths": {
            "seed_dir": str(SEED),
            "schema_file": str(SEED / "contract.schema.json"),
            "dev_suite": str(SEED / "dev_suite.jsonl"),
            "generated": str(tmp_path / "generated"),
            "clean": str(tmp_path / "clean"),
            "metrics": str(tmp_path / "metrics"),
            "reports": str(tmp_path / "reports"),
            "base_model": str(model_dir),
        },
        "probe": {"suites": {"heldout": {"path": str(SEED / "probe_suite.jsonl")},
                             "natural": {"path": str(SEED / "natural_suite.jsonl")}}},
        "clean": {"min_kept": 1, "max_rejected_fraction": 0.95, **(clean_section or {})},
        "sft": {"max_seq_len": 2048},
        **extra,
    }
    return parse_params(data)


def record(
    rid: str,
    gold: dict[str, Any],
    *,
    instruction: str | None = None,
    completion: Any = None,
    **meta: Any,
) -> dict[str, Any]:
    envelope = gold["completion"] if completion is None else completion
    text = envelope if isinstance(envelope, str) else json.dumps(envelope, ensure_ascii=False)
    instruction = instruction or gold["instruction"]
    return {
        "id": rid,
        "prompt": instruction,
        "completion": text,
        "meta": {
            "instruction": instruction,
            "source": "test",
            "payload_type": gold["payload_type"],
            "destination": gold["destination"],
            "expect": {
                "payload_type": gold["payload_type"],
                "payload.destination": gold["destination"],
            },
            **meta,
        },
        "provenance": {"source": "test"},
    }


def fresh(n: int) -> list[dict[str, Any]]:
    """n template records for different training destinations (unlike each other and the gold)."""
    examples = template_examples(
        load_destinations(SEED / "destinations.jsonl"),
        load_phrasings(SEED / "train_phrasings.json"),
        seed=3,
        variants=1,
    )
    picked = [
        e
        for e in examples
        if e.payload_type == "itinerary" and e.destination not in {g["destination"] for g in GOLD}
    ][:n]
    return [
        {
            "instruction": e.instruction,
            "payload_type": e.payload_type,
            "destination": e.destination,
            "completion": e.envelope,
        }
        for e in picked
    ]


def planted() -> list[dict[str, Any]]:
    """Gold records that pass, then one planted failure per filter (in filter order)."""
    g = {x["id"]: x for x in GOLD}
    lisbon, tokyo = g["gold-itinerary-lisbon"], g["gold-itinerary-tokyo"]
    good = [record(f"good-{i}", x) for i, x in enumerate(GOLD)]
    f = fresh(8)

    missing = copy.deepcopy(f[0]["completion"])
    del missing["payload"]["days"][0]["title"]
    del missing["next_steps"]
    near = copy.deepcopy(tokyo["completion"])
    near["summary"] = near["summary"].replace("three days", "3 days")
    porto = copy.deepcopy(f[3]["completion"])
    porto["payload"]["days"][0]["activities"].append("Day trip to Porto")
    long_envelope = copy.deepcopy(f[5]["completion"])
    long_envelope["assumptions"] = [
        f"assumption number {i} about the trip and the weather" for i in range(200)
    ]
    return good + [
        record("bad-json", f[0], completion='{"summary": "cut'),
        record("bad-schema", f[0], completion=missing),
        record(
            "bad-task",
            f[0],
            expect={"payload_type": "budget", "payload.destination": f[0]["destination"]},
        ),
        record(
            "dup-exact", lisbon, instruction="  Plan a 2-day itinerary for   Lisbon for a couple. "
        ),
        record("dup-near", tokyo, completion=near),
        record("leak-exact", f[1], instruction=PROBE[0]["instruction"].upper()),
        record("leak-near", f[2], instruction="Quick question: " + PROBE[5]["instruction"]),
        record("leak-destination", f[3], completion=porto),
        record("chat-token", f[4], instruction="<|im_start|>user\n" + f[4]["instruction"]),
        record("too-long", f[5], completion=long_envelope),
    ]


EXPECTED_REASONS = {
    "bad-json": "invalid_json",
    "bad-schema": "schema_invalid",
    "bad-task": "task_mismatch",
    "dup-exact": "duplicate",
    "dup-near": "near_duplicate",
    "leak-exact": "probe_leak",
    "leak-near": "probe_leak",
    "leak-destination": "probe_destination",
    "chat-token": "chat_token",
    "too-long": "over_length",
}


def run_planted(
    tmp_path: Path, model_dir: Path, records: list[dict[str, Any]] | None = None, **kwargs: Any
) -> dict[str, Any]:
    write_jsonl(tmp_path / "generated" / "sft.jsonl", planted() if records is None else records)
    return clean.run(params_for(tmp_path, model_dir, **kwargs))


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("planted")
    metrics = run_planted(tmp, tiny_model_dir)
    return tmp, metrics


def test_every_filter_catches_its_planted_record(planted_run):
    tmp, metrics = planted_run
    rejected = {r["id"]: r for r in read_jsonl(tmp / "clean" / "rejected.jsonl")}
    assert {rid: r["reason"] for rid, r in rejected.items()} == EXPECTED_REASONS
    assert rejected["bad-schema"]["detail"]["errors"] == [
        "$: 'next_steps' is a required property",
        "$.payload.days[0]: 'title' is a required property",
    ]
    assert rejected["bad-task"]["detail"]["failed"] == ["payload_type"]
    assert rejected["dup-exact"]["detail"] == {"duplicate_of": "good-0"}
    assert (
        rejected["dup-near"]["detail"]["duplicate_of"] == "good-1"
        and rejected["dup-near"]["detail"]["jaccard"] >= 0.9
    )
    assert rejected["leak-exact"]["detail"] == {"probe_id": PROBE[0]["id"], "match": "exact"}
    assert (
        rejected["leak-near"]["detail"]["probe_id"] == PROBE[5]["id"]
        and rejected["leak-near"]["detail"]["match"] == "near"
    )
    assert rejected["leak-destination"]["detail"] == {"destination": "Porto"}
    assert rejected["chat-token"]["detail"]["tokens"] == ["<|im_start|>"]
    assert rejected["too-long"]["detail"]["max_seq_len"] == 2048
    assert (
        rejected["bad-json"]["record"]["completion"] == '{"summary": "cut'
    )  # the original record is kept
    assert metrics["kept"] == len(GOLD) and metrics["rejected"] == len(EXPECTED_REASONS)
    assert metrics["rejected_by_reason"] == {
        r: list(EXPECTED_REASONS.values()).count(r) for r in clean.reasons(tasks.get("travel"))
    }
    assert metrics["leakage_hits"] == 3 and metrics["contamination_hits"] == 1
    assert (
        metrics["over_length"] == 1
        and metrics["truncated"] == 0
        and metrics["truncated_fraction"] > 0
    )


def test_kept_records_are_canonical_rendered_and_split(planted_run):
    tmp, metrics = planted_run
    train = read_jsonl(tmp / "clean" / "train.jsonl")
    val = read_jsonl(tmp / "clean" / "val.jsonl")
    assert len(train) + len(val) == metrics["kept"] and len(val) >= 1
    assert metrics["train"] == len(train) and metrics["val"] == len(val)
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    for r in train + val:
        assert r["prompt"] == f"### Instruction\n{r['meta']['instruction']}\n\n### Response\n"
        assert r["completion"] == CONTRACT.canonical_text(json.loads(r["completion"]))
        assert CONTRACT.validate(json.loads(r["completion"])) == []
        assert r["meta"]["tokens"]["prompt"] > 0 and r["meta"]["tokens"]["completion"] > 1
        assert r["provenance"] == {"source": "test"}


def test_lengths_file_and_percentiles(planted_run):
    tmp, metrics = planted_run
    lengths = {r["id"]: r for r in read_jsonl(tmp / "clean" / "lengths.jsonl")}
    assert lengths["too-long"]["over_length"] and not lengths["too-long"]["kept"]
    assert not lengths["too-long"]["truncated"]  # dropped, not truncated
    kept = [v for v in lengths.values() if v["kept"]]
    assert len(kept) == metrics["kept"]
    completion = sorted(v["completion_tokens"] for v in kept)
    assert metrics["completion_tokens_max"] == completion[-1]
    assert metrics["completion_tokens_p50"] == clean.percentile(completion, 50)
    assert metrics["prompt_tokens_max"] == max(v["prompt_tokens"] for v in kept)
    for v in lengths.values():
        assert v["total_tokens"] == v["prompt_tokens"] + v["completion_tokens"]


def test_truncate_policy_keeps_and_counts_over_length(tmp_path, tiny_model_dir, capsys):
    metrics = run_planted(tmp_path, tiny_model_dir, clean_section={"over_length": "truncate"})
    lengths = {r["id"]: r for r in read_jsonl(tmp_path / "clean" / "lengths.jsonl")}
    assert lengths["too-long"]["truncated"] and lengths["too-long"]["kept"]
    assert metrics["truncated"] == 1 and metrics["over_length"] == 1
    assert metrics["truncated_fraction"] == pytest.approx(1 / (len(GOLD) + 1), abs=1e-6)
    assert metrics["completion_tokens_max"] > 2048
    assert "longer than sft.max_seq_len=2048" in capsys.readouterr().err


def test_raise_policy_stops_with_exit_2_and_writes_nothing(tmp_path, tiny_model_dir):
    with pytest.raises(
        InputError,
        match=r"clean.over_length is 'raise': 1 of \d+ records .* exceed sft.max_seq_len=2048 .*too-long",
    ) as info:
        run_planted(tmp_path, tiny_model_dir, clean_section={"over_length": "raise"})
    assert info.value.exit_code == 2
    assert not (tmp_path / "clean").exists()


def test_reject_budget_names_top_reasons_and_writes_nothing(tmp_path, tiny_model_dir):
    with pytest.raises(InputError) as info:
        run_planted(
            tmp_path, tiny_model_dir, clean_section={"min_kept": 50, "max_rejected_fraction": 0.2}
        )
    message = str(info.value)
    assert info.value.exit_code == 2
    assert f"only {len(GOLD)} of {len(GOLD) + 10} records kept (clean.min_kept: 50)" in message
    assert "rejected (clean.max_rejected_fraction: 0.2)" in message
    assert "top reasons: probe_leak: 2 (e.g. leak-exact" in message
    assert not (tmp_path / "clean").exists() and not (tmp_path / "metrics").exists()


def test_missing_inputs_are_input_errors(tmp_path, tiny_model_dir):
    with pytest.raises(InputError, match=r"generated/sft\.jsonl: file not found"):
        clean.run(params_for(tmp_path, tiny_model_dir))
    write_jsonl(tmp_path / "generated" / "sft.jsonl", [record("good-0", GOLD[0])])
    with pytest.raises(InputError, match=r"base model directory not found .* run `tuneline base`"):
        clean.run(params_for(tmp_path, tmp_path / "no-model"))
    (tmp_path / "generated" / "sft.jsonl").write_text('{"id": "x", "prompt": "p"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=r"sft\.jsonl:1: missing required field 'completion'"):
        clean.run(params_for(tmp_path, tiny_model_dir))


def held_out_leaks() -> list[dict[str, Any]]:
    """Gold records that pass, and records leaking the natural and the development suites."""
    f = fresh(4)
    dev_place = copy.deepcopy(f[1]["completion"])
    dev_place["payload"]["days"][0]["activities"].append("A side trip to Cairo")
    return [record(f"good-{i}", x) for i, x in enumerate(GOLD)] + [
        record("natural-exact", f[0], instruction=NATURAL[7]["instruction"]),
        record("natural-near", f[2], instruction="Hi! " + NATURAL[20]["instruction"]),
        record("dev-exact", f[3], instruction=DEV[0]["instruction"]),
        record("dev-destination", f[1], completion=dev_place),
    ]


def test_every_held_out_suite_and_the_dev_suite_are_kept_out_of_training(tmp_path, tiny_model_dir):
    metrics = run_planted(tmp_path, tiny_model_dir, held_out_leaks())
    rejected = {r["id"]: r for r in read_jsonl(tmp_path / "clean" / "rejected.jsonl")}
    assert {rid: r["reason"] for rid, r in rejected.items()} == {
        "natural-exact": "probe_leak", "natural-near": "probe_leak", "dev-exact": "probe_leak",
        "dev-destination": "probe_destination",
    }
    assert rejected["natural-exact"]["detail"] == {"probe_id": NATURAL[7]["id"], "match": "exact"}
    assert rejected["natural-near"]["detail"]["probe_id"] == NATURAL[20]["id"]
    assert rejected["dev-exact"]["detail"]["probe_id"] == DEV[0]["id"]
    assert rejected["dev-destination"]["detail"] == {"destination": "Cairo"}
    assert metrics["leakage_hits"] == 4


def test_a_suite_left_out_of_the_params_is_not_held_out(tmp_path, tiny_model_dir):
    """What clean keeps out is what the params name: without the development suite its
    prompts and destinations pass; without the natural suite its prompts are no longer
    prompt leaks, yet still name the held-out suite's destinations."""
    metrics = run_planted(tmp_path, tiny_model_dir, held_out_leaks(), paths={
        "seed_dir": str(SEED), "schema_file": str(SEED / "contract.schema.json"), "dev_suite": None,
        "generated": str(tmp_path / "generated"), "clean": str(tmp_path / "clean"),
        "metrics": str(tmp_path / "metrics"), "reports": str(tmp_path / "reports"), "base_model": str(tiny_model_dir),
    }, probe={"suites": {"heldout": {"path": str(SEED / "probe_suite.jsonl")}}})
    rejected = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "clean" / "rejected.jsonl")}
    assert rejected == {"natural-exact": "probe_destination", "natural-near": "probe_destination"}
    assert metrics["kept"] == len(GOLD) + 2


def test_probe_destinations_allowed_when_not_excluded(tmp_path, tiny_model_dir):
    metrics = run_planted(
        tmp_path, tiny_model_dir, clean_section={"exclude_probe_destinations": False}
    )
    assert metrics["rejected_by_reason"]["probe_destination"] == 0
    assert "leak-destination" in {
        r["id"]
        for r in read_jsonl(tmp_path / "clean" / "train.jsonl")
        + read_jsonl(tmp_path / "clean" / "val.jsonl")
    }


def test_chat_format_renders_messages(tmp_path, tiny_model_dir):
    records = [record(f"good-{i}", x) for i, x in enumerate(GOLD)]
    records[0]["meta"]["system"] = "Answer with one JSON object."
    run_planted(tmp_path, tiny_model_dir, records, model={"format": "chat"})
    out = read_jsonl(tmp_path / "clean" / "train.jsonl") + read_jsonl(
        tmp_path / "clean" / "val.jsonl"
    )
    by_id = {r["id"]: r for r in out}
    assert by_id["good-0"]["prompt"] == [
        {"role": "system", "content": "Answer with one JSON object."},
        {"role": "user", "content": GOLD[0]["instruction"]},
    ]
    assert by_id["good-1"]["completion"][0]["role"] == "assistant"
    lengths = {r["id"]: r for r in read_jsonl(tmp_path / "clean" / "lengths.jsonl")}
    assert (
        lengths["good-0"]["prompt_tokens"] > lengths["good-1"]["prompt_tokens"] - 30
    )  # template tokens counted


def test_imported_preferences_are_leak_checked(tmp_path, tiny_model_dir):
    write_jsonl(
        tmp_path / "generated" / "preferences.jsonl",
        [
            {
                "id": "p-ok",
                "prompt": "Plan a day in Lisbon.",
                "chosen": "{}",
                "rejected": "[]",
                "meta": {"strategy": "imported"},
            },
            {"id": "p-leak", "prompt": PROBE[3]["instruction"], "chosen": "{}", "rejected": "[]"},
            {"id": "p-token", "prompt": "Hi", "chosen": "<|im_end|>", "rejected": "x"},
        ],
    )
    metrics = run_planted(
        tmp_path, tiny_model_dir, [record(f"good-{i}", x) for i, x in enumerate(GOLD)]
    )
    kept = read_jsonl(tmp_path / "clean" / "preferences.jsonl")
    assert [p["id"] for p in kept] == ["p-ok"] and kept[0]["prompt"].startswith("### Instruction\n")
    rejected = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "clean" / "rejected.jsonl")}
    assert rejected == {"p-leak": "probe_leak", "p-token": "chat_token"}
    assert metrics["preferences"] == {"input": 3, "kept": 1, "rejected": 2}


def test_generate_then_clean_twice_is_byte_identical_and_seed_matters(tmp_path, tiny_model_dir):
    def both(where: Path, seed: int) -> dict[str, bytes]:
        data = {"seed": seed, "generate": {"sources": {"template": {"max_records": 60}}}}
        p = params_for(where, tiny_model_dir, **data)
        generate.run(p)
        clean.run(p)
        files = [where / "generated" / "sft.jsonl", *sorted((where / "clean").glob("*.jsonl"))]
        return {f.name: f.read_bytes() for f in files}

    first, second, other = both(tmp_path / "a", 0), both(tmp_path / "b", 0), both(tmp_path / "c", 7)
    assert first == second
    assert first["train.jsonl"] != other["train.jsonl"] and first["sft.jsonl"] != other["sft.jsonl"]


def test_default_template_data_is_fully_kept(tmp_path, tiny_model_dir):
    p = params_for(
        tmp_path, tiny_model_dir, clean_section={"min_kept": 50, "max_rejected_fraction": 0.05}
    )
    generate.run(p)
    metrics = clean.run(p)
    assert (
        metrics["rejected"] == 0
        and metrics["leakage_hits"] == 0
        and metrics["kept"] == metrics["input"] > 500
    )
    assert metrics["val"] > 0.05 * metrics["kept"]


# -- pure functions ----------------------------------------------------------------------


def test_normalize_text_and_value():
    assert (
        filters.normalize_text("  Plan\t a  trip \r\n\n\n\n to  Lisbon  ")
        == "Plan a trip\n\nto Lisbon"
    )
    assert filters.normalize_text("Cafe\u0301") == "Café"
    assert filters.normalize_value({"a": [" x  y ", 1, None], "b": "z\n"}) == {
        "a": ["x y", 1, None],
        "b": "z",
    }


def test_split_is_deterministic_by_id():
    cands = [
        filters.Candidate(record={"id": f"r{i}"}, instruction="", system=None, completion="")
        for i in range(200)
    ]
    train, val = clean.split(cands, 0.1)
    again_train, again_val = clean.split(list(reversed(cands)), 0.1)
    assert {c.id for c in val} == {c.id for c in again_val} and 5 <= len(val) <= 40
    assert len(train) + len(val) == 200
    one_val = clean.split(cands[:3], 0.0001)[1]
    assert len(one_val) == 1  # never an empty val split with two or more records


def test_similarity_index_matches_brute_force():
    texts = [
        f"plan {i % 7} days in city {i % 5} with {i % 3} friends and a visit to the museum"
        for i in range(60)
    ]
    sets = [shingles(t, 3) for t in texts]
    index = SimilarityIndex(0.6, gram_order(sets))
    for i, s in enumerate(sets[:30]):
        index.add(i, s)
    for s in sets[30:]:
        brute = max(((j, jaccard(s, sets[j])) for j in range(30)), key=lambda kv: kv[1])
        hit = index.best(s)
        if brute[1] >= 0.6:
            assert hit is not None and hit[1] == brute[1]
        else:
            assert hit is None


# -- properties --------------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def mutated_records(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Gold records with random damage: dropped keys, wrong types, odd strings, duplicates."""
    out = []
    for i in range(draw(st.integers(1, 8))):
        gold = GOLD[draw(st.integers(0, len(GOLD) - 1))]
        env = copy.deepcopy(gold["completion"])
        action = draw(st.sampled_from(["keep", "drop", "retype", "restring", "payload"]))
        if action == "drop":
            env.pop(draw(st.sampled_from(sorted(env))))
        elif action == "retype":
            env[draw(st.sampled_from(sorted(env)))] = draw(
                st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))
            )
        elif action == "restring":
            env["summary"] = draw(_text)
            env["assumptions"] = draw(st.lists(_text, max_size=2))
        elif action == "payload":
            env["payload"][draw(st.sampled_from(sorted(env["payload"])))] = draw(
                st.one_of(_text, st.integers())
            )
        out.append(record(f"r{i}", gold, completion=env))
    return out


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(records=mutated_records())
def test_property_every_kept_record_validates(tmp_path_factory, tiny_model_dir, records):
    tmp = tmp_path_factory.mktemp("prop")
    valid = [r for r in records if not CONTRACT.validate(json.loads(r["completion"]))]
    try:
        metrics = run_planted(tmp, tiny_model_dir, records, clean_section={"max_rejected_fraction": 1.0})
    except InputError as exc:
        # Nothing survived the filters (schema or any later one): the reject budget
        # (min_kept 1) stops the stage and nothing is written.
        assert "reject budget exceeded" in str(exc)
        assert not (tmp / "clean").exists()
        return
    assert valid, "a record that fails the schema was kept"
    kept = read_jsonl(tmp / "clean" / "train.jsonl", allow_empty=True) + read_jsonl(
        tmp / "clean" / "val.jsonl", allow_empty=True
    )
    assert len(kept) == metrics["kept"] and metrics["kept"] + metrics["rejected"] == len(records)
    for r in kept:
        assert CONTRACT.validate(json.loads(r["completion"])) == []


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | _text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(_text, children, max_size=3),
    max_leaves=10,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=_json, rid=_text.filter(bool), prompt=_text)
def test_property_records_round_trip_and_normalisation_is_idempotent(
    tmp_path_factory, value, rid, prompt
):
    rec = {
        "id": rid,
        "prompt": prompt,
        "completion": json.dumps(value, ensure_ascii=False),
        "meta": {"v": value},
    }
    path = tmp_path_factory.mktemp("rt") / "r.jsonl"
    write_jsonl(path, [rec])
    assert read_jsonl(path) == [rec]
    once = filters.normalize_value(value)
    assert filters.normalize_value(once) == once
    text = CONTRACT.canonical_text(once)
    assert CONTRACT.canonical_text(json.loads(text)) == text
    assert filters.normalize_text(filters.normalize_text(prompt)) == filters.normalize_text(prompt)
