"""The output contract: schema, lenient parsing, validation paths, task checks, causes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuneline.contract import (
    Parsed,
    failure_cause,
    load_contract,
    parse_lenient,
    task_checks,
)
from tuneline.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "data" / "seed" / "contract.schema.json"


@pytest.fixture(scope="module")
def contract():
    return load_contract(SCHEMA)


def envelope(**overrides):
    env = {
        "summary": "Two days in Lisbon.",
        "assumptions": ["First visit."],
        "uncertainty_notes": [],
        "next_steps": ["Book the castle."],
        "verification_steps": ["Check opening hours."],
        "payload_type": "itinerary",
        "payload": {
            "destination": "Lisbon",
            "days": [{"day": 1, "title": "Alfama", "activities": ["Castle", "Tram 28"]}],
        },
    }
    env.update(overrides)
    return env


PAYLOADS = {
    "itinerary": {
        "destination": "Rome",
        "days": [{"day": 1, "title": "Ancient Rome", "activities": ["Colosseum"]}],
    },
    "checklist": {"destination": "Rome", "items": ["Type L adapter"]},
    "budget": {
        "destination": "Rome",
        "currency": "EUR",
        "daily": {"budget": "55-85 EUR", "mid_range": "130-200 EUR"},
        "tips": [],
    },
    "phrasebook": {
        "destination": "Rome",
        "language": "Italian",
        "phrases": [{"phrase": "Grazie", "meaning": "Thank you"}],
    },
    "procedure": {
        "destination": "Rome",
        "task": "Buy a metro ticket",
        "steps": ["Tap a contactless card at the gate."],
    },
}


# -- schema ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload_type", sorted(PAYLOADS))
def test_each_payload_type_validates(contract, payload_type):
    assert (
        contract.validate(envelope(payload_type=payload_type, payload=PAYLOADS[payload_type])) == []
    )


@pytest.mark.parametrize("payload_type", sorted(PAYLOADS))
def test_payload_destination_is_required(contract, payload_type):
    payload = {k: v for k, v in PAYLOADS[payload_type].items() if k != "destination"}
    errors = contract.validate(envelope(payload_type=payload_type, payload=payload))
    assert errors == ["$.payload: 'destination' is a required property"]


def test_payload_shape_follows_payload_type(contract):
    # a checklist payload under payload_type itinerary fails as an itinerary, at the real field
    errors = contract.validate(envelope(payload_type="itinerary", payload=PAYLOADS["checklist"]))
    assert errors == [
        "$.payload: 'days' is a required property",
        "$.payload: Additional properties are not allowed ('items' was unexpected)",
    ]


def test_error_paths_name_the_real_field_and_are_sorted(contract):
    env = envelope()
    del env["assumptions"]
    env["extra"] = 1
    env["summary"] = "  "
    env["payload"]["days"] = (
        [
            {"day": 1, "title": "a", "activities": ["x"]},
            {"day": "2", "activities": []},
        ]
        + [{"day": i, "title": "t", "activities": ["x"]} for i in range(3, 11)]
        + [{"day": 11, "title": "t", "activities": [3]}]
    )
    errors = contract.validate(env)
    assert errors == [
        "$: 'assumptions' is a required property",
        "$: Additional properties are not allowed ('extra' was unexpected)",
        "$.payload.days[1]: 'title' is a required property",
        "$.payload.days[1].activities: [] should be non-empty",
        "$.payload.days[1].day: '2' is not of type 'integer'",
        "$.payload.days[10].activities[0]: 3 is not of type 'string'",
        "$.summary: '  ' must not be empty or blank",
    ]


def test_bad_payload_type_and_root_type(contract):
    errors = contract.validate(envelope(payload_type="poem"))
    assert errors == [
        "$.payload_type: 'poem' is not one of ['itinerary', 'checklist', 'budget', 'phrasebook', 'procedure']"
    ]
    root = contract.validate([envelope()])
    assert (
        len(root) == 1
        and root[0].startswith("$: [")
        and root[0].endswith("is not of type 'object'")
    )
    assert len(root[0]) < 120  # long instances are shortened in messages


def test_validate_is_deterministic(contract):
    env = envelope(summary="", payload={"days": "x"}, next_steps=[1, 2])
    assert contract.validate(env) == contract.validate(json.loads(json.dumps(env)))


def test_canonical_text_orders_keys_by_schema(contract):
    env = envelope()
    shuffled = dict(reversed(list(env.items())))
    shuffled["payload"] = dict(reversed(list(env["payload"].items())))
    text = contract.canonical_text(shuffled)
    assert text == contract.canonical_text(env)
    assert text.startswith('{"summary":"Two days in Lisbon.","assumptions":')
    assert (
        '"payload_type":"itinerary","payload":{"destination":"Lisbon","days":[{"day":1,"title"'
        in text
    )
    assert (
        contract.canonical_text({"zz": 1, "aa": 2, "summary": "é"})
        == '{"summary":"é","aa":2,"zz":1}'
    )


def test_load_contract_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_contract(tmp_path / "missing.json")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"type": "object",\n oops}')
    with pytest.raises(InputError, match=r"bad\.json:2: contract schema is not valid JSON"):
        load_contract(bad_json)
    bad_schema = tmp_path / "schema.json"
    bad_schema.write_text(json.dumps({"type": "objekt"}))
    with pytest.raises(
        InputError, match=r"schema\.json: not a valid Draft202012 schema at \$\.type"
    ):
        load_contract(bad_schema)
    not_object = tmp_path / "list.json"
    not_object.write_text("[]")
    with pytest.raises(InputError, match="must be a JSON object"):
        load_contract(not_object)


def test_own_schema_with_other_draft(tmp_path):
    schema = tmp_path / "mine.json"
    schema.write_text(
        json.dumps(
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "type": "object",
                "required": ["answer"],
                "properties": {"answer": {"type": "string"}},
            }
        )
    )
    mine = load_contract(schema)
    assert mine.validate({"answer": "yes"}) == []
    assert mine.validate({}) == ["$: 'answer' is a required property"]


# -- lenient parsing ---------------------------------------------------------------------


def test_parse_plain_object():
    assert parse_lenient('{"a": 1}') == Parsed({"a": 1}, True, None)


def test_parse_strips_code_fences_and_prose():
    text = 'Here you go:\n```json\n{"a": [1, {"b": "}"}]}\n```\nEnjoy {"not": "this"}'
    assert parse_lenient(text) == Parsed({"a": [1, {"b": "}"}]}, True, None)
    assert parse_lenient('```\n{"a": 1}\n```').value == {"a": 1}
    assert parse_lenient('```json\n{"a": 1}').value == {"a": 1}  # unclosed fence


def test_parse_skips_prose_before_and_after():
    parsed = parse_lenient('Sure! The answer is {"a": "x"} -- hope it helps.')
    assert parsed.ok and parsed.value == {"a": "x"}


def test_parse_two_objects_takes_the_first():
    assert parse_lenient('{"a": 1}\n{"b": 2}').value == {"a": 1}


def test_parse_array_root_prefers_a_later_object():
    assert parse_lenient('[1, 2]\n{"a": 1}') == Parsed({"a": 1}, True, None)
    only_array = parse_lenient('[{"a": 1}]')
    assert only_array == Parsed([{"a": 1}], True, None)


def test_parse_truncated_json():
    parsed = parse_lenient('{"summary": "A trip", "payload": {"days": [1, 2')
    assert not parsed.ok and parsed.value is None
    assert parsed.error.startswith("truncated JSON")
    assert parse_lenient('{"summary": "A tr').error.startswith("truncated JSON")


def test_parse_invalid_json_is_not_called_truncated():
    parsed = parse_lenient('{"a": 1,, "b": 2}')
    assert not parsed.ok and parsed.error.startswith(
        "invalid JSON at char 8: Expecting property name"
    )
    assert parse_lenient("no json here").error.startswith("no JSON value found")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_parse_rejects_nan_and_infinity(constant):
    parsed = parse_lenient(f'{{"a": {constant}}}')
    assert not parsed.ok and constant in parsed.error


# -- task checks -------------------------------------------------------------------------


def test_task_checks_each_check():
    env = envelope()
    expect = {"payload_type": "itinerary", "payload.destination": "  lisbon "}
    assert task_checks(env, expect) == {"payload_type": True, "destination": True}
    assert task_checks(env, {"payload_type": "budget", "payload.destination": "Porto"}) == {
        "payload_type": False,
        "destination": False,
    }


def test_task_checks_whitespace_case_arrays_and_numbers():
    env = envelope(payload={"destination": "Rio  de\nJaneiro", "days": [{"day": 3}]})
    assert task_checks(env, {"payload.destination": "RIO DE JANEIRO"}) == {"destination": True}
    assert task_checks(env, {"payload.days.0.day": "3"}) == {"day": True}
    assert task_checks(env, {"payload.days.1.day": "3"}) == {"day": False}


def test_task_checks_missing_path_and_wrong_root():
    assert task_checks({"payload": "x"}, {"payload.destination": "Lisbon"}) == {
        "destination": False
    }
    assert task_checks(["x"], {"payload_type": "itinerary"}) == {"payload_type": False}
    assert task_checks(None, {"payload_type": "itinerary"}) == {"payload_type": False}


def test_task_checks_ambiguous_names_use_full_paths():
    obj = {"payload": {"destination": "A"}, "meta": {"destination": "A"}}
    result = task_checks(obj, {"payload.destination": "a", "meta.destination": "b"})
    assert result == {"payload.destination": True, "meta.destination": False}


# -- failure causes ----------------------------------------------------------------------


def test_failure_cause_categories(contract):
    ok = parse_lenient(json.dumps(envelope()))
    assert failure_cause(ok, contract.validate(ok.value), "stop") == "ok"

    cut = parse_lenient('{"summary": "A')
    assert failure_cause(cut, [], "stop") == "truncated"
    bad = parse_lenient("{oops}")
    assert failure_cause(bad, [], "stop") == "invalid_json"
    assert failure_cause(bad, [], "length") == "truncated"

    array = parse_lenient("[1, 2]")
    assert failure_cause(array, contract.validate(array.value), "stop") == "wrong_root_type"

    env = envelope()
    del env["payload"]["days"][0]["title"]
    env["payload"]["days"][0]["day"] = "1"
    parsed = Parsed(env, True)
    assert failure_cause(parsed, contract.validate(env), "stop") == "missing_field:title"
    env["payload"]["days"][0]["title"] = "t"
    assert (
        failure_cause(parsed, contract.validate(env), "stop") == "wrong_type:$.payload.days[*].day"
    )
    other = envelope(payload_type="poem")
    assert failure_cause(Parsed(other, True), contract.validate(other), "stop") == "other"


# -- the one verdict ---------------------------------------------------------------------

JUDGE_EXPECT = {"payload_type": "checklist", "payload.destination": "Lisbon"}


def test_judge_passes_a_valid_envelope_and_scores_it(contract):
    text = json.dumps(envelope())
    v = contract.judge(text, {"payload_type": envelope()["payload_type"]}, "eos")
    assert v.parsed and v.valid and v.passes and v.cause == "ok" and v.errors == []
    assert v.score == 2 and v.fields_present == contract.schema["required"]


def test_judge_parse_failure_has_all_checks_false_and_no_schema_errors(contract):
    v = contract.judge("I cannot help with that.", JUDGE_EXPECT, "eos")
    assert not v.parsed and not v.valid and not v.passes and v.value is None
    assert v.checks == {"payload_type": False, "destination": False}  # keyed like task_checks
    assert v.errors == [] and v.parse_error.startswith("no JSON value found")
    assert v.cause == "invalid_json" and v.score == 0 and v.fields_present == []
    cut = contract.judge(json.dumps(envelope())[:40], JUDGE_EXPECT, None)
    assert cut.cause == "truncated" and cut.checks == {"payload_type": False, "destination": False}


def test_judge_strict_refuses_what_lenient_parsing_accepts(contract):
    fenced = "```json\n" + json.dumps(envelope()) + "\n```"
    assert contract.judge(fenced, {}).parsed
    strict = contract.judge(fenced, {}, strict=True)
    assert not strict.parsed and strict.parse_error.startswith("Expecting value")
    dup = contract.judge('{"summary": "a", "summary": "b"}', {}, strict=True)
    assert not dup.parsed and "duplicate" in dup.parse_error


def test_judge_names_the_first_failing_check(contract):
    v = contract.judge(json.dumps(envelope()), {"payload.destination": "Tokyo", "payload_type": "budget"})
    assert v.valid and not v.passes and v.cause == "wrong_destination" and v.score == 1
    assert contract.judge_value(envelope(), {}).passes
