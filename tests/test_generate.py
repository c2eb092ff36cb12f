"""The generate stage: template expansion, teacher code path, import formats, caps, determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tuneline.contract import load_contract
from tuneline.datagen import imports
from tuneline.datagen.travel import PAYLOAD_TYPES, load_destinations, uncovered_languages
from tuneline.errors import InputError
from tuneline.params import Params, parse_params
from tuneline.records import RecordError, read_jsonl
from tuneline.stages import generate

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "data" / "seed"


def params_for(
    tmp_path: Path, generate_section: dict[str, Any] | None = None, **extra: Any
) -> Params:
    data: dict[str, Any] = {
        "paths": {
            "seed_dir": str(SEED),
            "schema_file": str(SEED / "contract.schema.json"),
            "generated": str(tmp_path / "generated"),
            "metrics": str(tmp_path / "metrics"),
            "base_model": str(tmp_path / "no-base-model"),
        },
        "generate": generate_section or {},
        **extra,
    }
    return parse_params(data)


def only_import(path: Path, fmt: str = "auto") -> dict[str, Any]:
    return {
        "sources": {
            "template": {"enabled": False},
            "import": {"enabled": True, "path": str(path), "format": fmt},
        }
    }


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("template")
    metrics = generate.run(params_for(tmp))
    return tmp, metrics, read_jsonl(tmp / "generated" / "sft.jsonl")


# -- template ----------------------------------------------------------------------------


def test_template_records_validate_and_carry_provenance(template_run):
    tmp, metrics, records = template_run
    contract = load_contract(SEED / "contract.schema.json")
    kb = load_destinations(SEED / "destinations.jsonl")
    train = {d["name"] for d in kb if d["split"] == "train"}
    # 3 per (destination, payload type), plus 3 phrasebooks per language no phrase list covers
    uncovered = sum(len(uncovered_languages(d, kb)) for d in kb if d["split"] == "train")
    assert metrics["records"] == len(records) == len(train) * len(PAYLOAD_TYPES) * 3 + 3 * uncovered
    assert metrics["by_source"] == {"template": len(records)}
    by_type = metrics["by_payload_type"]
    assert by_type.pop("phrasebook") == len(train) * 3 + 3 * uncovered
    assert set(by_type.values()) == {len(train) * 3}
    assert {r["meta"]["register"] for r in records} == {"formal", "casual"}
    for r in records:
        envelope = json.loads(r["completion"])
        assert contract.validate(envelope) == [], r["id"]
        assert r["completion"] == contract.canonical_text(envelope)  # canonical JSON text
        assert r["prompt"] == r["meta"]["instruction"]
        assert r["meta"]["destination"] in train and r["meta"]["destination"] in r["prompt"]
        assert r["meta"]["expect"] == {
            "payload_type": envelope["payload_type"],
            "payload.destination": envelope["payload"]["destination"],
        }
        prov = r["provenance"]
        assert (
            prov["source"] == "template"
            and prov["seed"] == 0
            and prov["generator"].startswith("travel-")
        )
        assert len(prov["knowledge_base_sha256"]) == 64
    assert read_jsonl(tmp / "generated" / "preferences.jsonl", allow_empty=True) == []
    assert json.loads((tmp / "metrics" / "generate.json").read_text())["records"] == len(records)


def test_template_wording_and_list_lengths_vary(template_run):
    _, _, records = template_run
    phrasings = Counter(r["meta"]["phrasing"] for r in records)
    for ptype in PAYLOAD_TYPES:
        assert len([p for p in phrasings if p.startswith(ptype + "/")]) >= 10, ptype
    envelopes = [json.loads(r["completion"]) for r in records]
    items = {len(e["payload"]["items"]) for e in envelopes if e["payload_type"] == "checklist"}
    days = {len(e["payload"]["days"]) for e in envelopes if e["payload_type"] == "itinerary"}
    phrases = {len(e["payload"]["phrases"]) for e in envelopes if e["payload_type"] == "phrasebook"}
    assert len(items) >= 3 and len(days) >= 3 and len(phrases) >= 2
    assert len({e["summary"] for e in envelopes}) > len(envelopes) * 0.8


def test_generate_is_byte_identical_per_seed(tmp_path, template_run):
    first_dir, _, _ = template_run
    generate.run(params_for(tmp_path / "again"))
    same = (tmp_path / "again" / "generated" / "sft.jsonl").read_bytes()
    assert same == (first_dir / "generated" / "sft.jsonl").read_bytes()
    generate.run(params_for(tmp_path / "other", seed=1))
    other = (tmp_path / "other" / "generated" / "sft.jsonl").read_bytes()
    assert other != same


def test_per_source_cap_keeps_a_seeded_subset_in_order(tmp_path, template_run):
    _, _, full = template_run
    generate.run(params_for(tmp_path, {"sources": {"template": {"max_records": 25}}}))
    capped = read_jsonl(tmp_path / "generated" / "sft.jsonl")
    order = {r["id"]: i for i, r in enumerate(full)}
    assert len(capped) == 25
    assert [order[r["id"]] for r in capped] == sorted(order[r["id"]] for r in capped)


# -- teacher -----------------------------------------------------------------------------


def test_teacher_code_path_with_tiny_model(tmp_path, tiny_model_dir):
    section = {
        "sources": {
            "template": {"enabled": False},
            "teacher": {
                "enabled": True,
                "model": str(tiny_model_dir),
                "shots": 2,
                "n_samples": 2,
                "max_prompts": 3,
                "max_new_tokens": 6,
                "batch_size": 2,
                "temperature": 0.8,
            },
        }
    }
    metrics = generate.run(params_for(tmp_path, section, model={"device": "cpu"}))
    records = read_jsonl(tmp_path / "generated" / "sft.jsonl")
    assert len(records) == 6 and metrics["by_source"] == {"teacher": 6}
    assert (
        metrics["teacher"]["prompts"] == 3
        and sum(metrics["teacher"]["finish_reasons"].values()) == 6
    )
    gold = {g["id"]: g for g in read_jsonl(SEED / "gold.jsonl")}
    for r in records:
        prov = r["provenance"]
        assert prov["source"] == "teacher" and prov["format"] == "completion"
        assert len(prov["teacher"]["content_sha256"]) == 64
        assert prov["decoding"] == {
            "temperature": 0.8,
            "top_p": 0.95,
            "max_new_tokens": 6,
            "n_samples": 2,
            "do_sample": True,
            "batch_size": 2,
        }
        assert len(prov["shots"]) == 2 and all(
            gold[s]["destination"] != r["meta"]["destination"] for s in prov["shots"]
        )
        assert (
            gold[prov["shots"][0]]["payload_type"] == r["meta"]["payload_type"]
        )  # a same-type shot first
        assert prov["finish_reason"] in ("stop", "length") and prov["n_tokens"] <= 6
    # same seed, same samples
    generate.run(params_for(tmp_path / "again", section, model={"device": "cpu"}))
    assert (tmp_path / "again" / "generated" / "sft.jsonl").read_bytes() == (
        tmp_path / "generated" / "sft.jsonl"
    ).read_bytes()


# -- import ------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_import_alpaca_list_file(tmp_path):
    src = write(
        tmp_path / "alpaca.json",
        '[\n  {"instruction": "Plan a day in Oslo.", "input": "", "output": "{\\"a\\": 1}"},\n'
        '  {\n    "instruction": "Translate",\n    "input": "hello",\n    "output": "hei"\n  }\n]\n',
    )
    metrics = generate.run(params_for(tmp_path, only_import(src)))
    records = read_jsonl(tmp_path / "generated" / "sft.jsonl")
    assert metrics["import"]["format"] == "alpaca" and metrics["by_source"] == {"import": 2}
    assert [r["id"] for r in records] == ["import-1", "import-2"]  # ids number the records
    assert [r["provenance"]["line"] for r in records] == [2, 3]  # the line each starts on
    assert records[0]["prompt"] == "Plan a day in Oslo." and records[0]["completion"] == '{"a": 1}'
    assert records[1]["prompt"] == "Translate\n\nhello"
    assert records[1]["provenance"]["line"] == 3 and records[1]["provenance"]["format"] == "alpaca"
    assert records[1]["provenance"]["file"].startswith("alpaca.json (outside the project; sha256 ")  # outside the repository: its name
    assert records[1]["provenance"]["outside_repo"] is True


def test_import_alpaca_jsonl(tmp_path):
    src = write(
        tmp_path / "a.jsonl",
        '{"instruction": "Q1", "output": "A1"}\n{"instruction": "Q2", "output": "A2", "id": 7}\n',
    )
    imported = imports.read_import(src)
    assert imported.format == "alpaca" and [e.instruction for e in imported.examples] == [
        "Q1",
        "Q2",
    ]
    assert imported.examples[1].original_id == 7


def test_import_sharegpt_keeps_system_turn(tmp_path):
    row = {
        "conversations": [
            {"from": "system", "value": "Answer in JSON."},
            {"from": "human", "value": "Plan Oslo."},
            {"from": "gpt", "value": "{}"},
        ],
        "meta": {"expect": {"payload_type": "itinerary"}},
    }
    src = write(tmp_path / "sg.jsonl", json.dumps(row) + "\n")
    generate.run(params_for(tmp_path, only_import(src)))
    (record,) = read_jsonl(tmp_path / "generated" / "sft.jsonl")
    assert record["meta"]["system"] == "Answer in JSON."
    assert record["prompt"] == "Plan Oslo." and record["completion"] == "{}"
    assert (
        record["meta"]["expect"] == {"payload_type": "itinerary"}
        and record["meta"]["payload_type"] == "itinerary"
    )


def test_import_openai_messages_and_prompt_completion(tmp_path):
    msgs = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": '{"x": 1}'},
        ]
    }
    src = write(tmp_path / "m.jsonl", json.dumps(msgs) + "\n")
    (ex,) = imports.read_import(src).examples
    assert (ex.instruction, ex.completion, ex.system) == ("Hi", '{"x": 1}', None)
    pc = write(tmp_path / "pc.jsonl", json.dumps({"prompt": "P", "completion": "C"}) + "\n")
    imported = imports.read_import(pc)
    assert imported.format == "prompt_completion" and imported.examples[0].completion == "C"


def test_import_preference_triples_go_to_preferences(tmp_path):
    rows = [
        {"prompt": "P1", "chosen": "{}", "rejected": "[]"},
        {"prompt": "P2", "chosen": "a", "rejected": "b"},
    ]
    src = write(tmp_path / "prefs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    metrics = generate.run(params_for(tmp_path, only_import(src)))
    prefs = read_jsonl(tmp_path / "generated" / "preferences.jsonl")
    assert metrics["preferences"] == 2 and metrics["records"] == 0
    assert prefs[0]["chosen"] == "{}" and prefs[0]["meta"]["strategy"] == "imported"
    assert prefs[1]["provenance"]["line"] == 2


def test_import_errors_name_file_line_and_expectation(tmp_path):
    mixed = write(
        tmp_path / "mixed.jsonl",
        '{"instruction": "a", "output": "b"}\n{"prompt": "a", "completion": "b"}\n',
    )
    with pytest.raises(
        RecordError,
        match=r"mixed\.jsonl:2: keys \['completion', 'prompt'\] do not match format 'alpaca': expected 'instruction' and 'output'",
    ):
        imports.read_import(mixed)
    unknown = write(tmp_path / "u.jsonl", '{"question": "a", "answer": "b"}\n')
    with pytest.raises(
        RecordError,
        match=r"u\.jsonl:1: cannot detect the format .*alpaca: 'instruction' and 'output'",
    ):
        imports.read_import(unknown)
    both = write(tmp_path / "b.jsonl", '{"messages": [], "conversations": []}\n')
    with pytest.raises(RecordError, match="match several formats"):
        imports.read_import(both)
    broken = write(
        tmp_path / "broken.json",
        '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]',
    )
    with pytest.raises(RecordError, match=r"broken\.json:3: record 2: invalid JSON"):
        imports.read_import(broken)
    multi = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    multi_file = write(tmp_path / "multi.jsonl", json.dumps(multi) + "\n")
    with pytest.raises(
        RecordError,
        match=r"multi\.jsonl:1: messages roles are .*; multi-turn conversations are not supported: the prompt format carries one instruction",
    ):
        imports.read_import(multi_file)
    role = write(
        tmp_path / "role.jsonl",
        json.dumps({"conversations": [{"from": "bot", "value": "x"}]}) + "\n",
    )
    with pytest.raises(
        RecordError, match=r"role\.jsonl:1: conversations\[0\]\.from is 'bot'; allowed"
    ):
        imports.read_import(role)
    forced = write(tmp_path / "forced.jsonl", '{"prompt": "a", "completion": "b"}\n')
    with pytest.raises(RecordError, match="do not match format 'sharegpt'"):
        imports.read_import(forced, "sharegpt")
    with pytest.raises(InputError, match="import file not found"):
        imports.read_import(tmp_path / "missing.jsonl")
    empty_output = write(tmp_path / "e.jsonl", '{"instruction": "a", "output": ""}\n')
    with pytest.raises(RecordError, match=r"e\.jsonl:1: 'output' must be a non-empty string"):
        imports.read_import(empty_output)


def test_import_error_surfaces_from_the_stage_and_writes_nothing(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"question": "a"}\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:1"):
        generate.run(params_for(tmp_path, only_import(bad)))
    assert not (tmp_path / "generated").exists() and not (tmp_path / "metrics").exists()


def test_sources_mix(tmp_path):
    src = write(tmp_path / "pc.jsonl", json.dumps({"prompt": "P", "completion": "C"}) + "\n")
    section = {
        "sources": {"template": {"max_records": 5}, "import": {"enabled": True, "path": str(src)}}
    }
    metrics = generate.run(params_for(tmp_path, section))
    assert metrics["by_source"] == {"import": 1, "template": 5}
    ids = [r["id"] for r in read_jsonl(tmp_path / "generated" / "sft.jsonl")]
    assert ids[-1] == "import-1" and all(i.startswith("tpl-") for i in ids[:5])
