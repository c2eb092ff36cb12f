"""Schema-guided decoding (tuneline.guided): the guide schema, the masked decode and the
``<name>+guided`` probe row."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tuneline import guided, modeling
from tuneline.contract import load_contract, parse_lenient
from tuneline.errors import InputError
from tuneline.generation import generate
from tuneline.params import GuideParams, ParamsError, parse_params
from tuneline.records import read_json, read_jsonl
from tuneline.stages import probe

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "data" / "seed" / "contract.schema.json"
GOLD = REPO / "data" / "seed" / "gold.jsonl"
PAYLOAD_TYPES = ["itinerary", "checklist", "budget", "phrasebook", "procedure"]
PROMPTS = [
    f"### Instruction\nMake a {kind} for a trip to {city}.\n\n### Response\n"
    for kind, city in [("checklist", "Lisbon"), ("budget", "Tokyo"), ("itinerary", "Paris"), ("phrasebook", "Rome"), ("procedure", "Oslo")]
]
# Enough for the shortest documents the closing-biased model writes under the guide (the
# longest takes about 120 tokens of the tiny tokenizer).
BUDGET = 240


@pytest.fixture(scope="module")
def contract():
    return load_contract(SCHEMA)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return modeling.load(tiny_model_dir, parse_params({"model": {"device": "cpu", "dtype": "float32"}}).model)


@pytest.fixture(scope="module")
def guide(loaded, contract):
    return guided.build(loaded, contract.schema, str(SCHEMA))


# -- the guide schema: the contract with allOf if/then as anyOf ------------------------------


def _gold():
    return [line["completion"] for line in read_jsonl(GOLD)]


def _documents():
    gold = _gold()
    outputs = []  # every committed model output that parses: the default run's and the whole suites'
    for root in (REPO / "reports" / "probe", REPO / "bench" / "results" / "full_suites" / "reports" / "probe"):
        for path in sorted(root.glob("*/*.samples.jsonl")):
            for sample in read_jsonl(path):
                parsed = parse_lenient(sample["output"])
                if parsed.ok:
                    outputs.append(parsed.value)
    mutated = []
    for doc in gold:
        for kind in PAYLOAD_TYPES:  # every payload under every payload_type: 1 in 5 valid
            mutated.append({**doc, "payload_type": kind})
        mutated += [
            {k: v for k, v in doc.items() if k != "payload_type"},
            {k: v for k, v in doc.items() if k != "payload"},
            {**doc, "payload_type": "map"},
            {**doc, "payload": {}},
            {**doc, "payload": {**doc["payload"], "extra": 1}},
            {**doc, "payload": {k: v for k, v in doc["payload"].items() if k != "destination"}},
            {**doc, "payload": {**doc["payload"], "destination": " "}},
            {**doc, "summary": ""},
            {**doc, "extra": "x"},
            [doc],
            "text",
        ]
    return gold, outputs, mutated


def test_guide_schema_accepts_and_rejects_what_the_contract_does(contract):
    rewritten = guided.guide_schema(contract.schema)
    assert "allOf" not in rewritten and len(rewritten["anyOf"]) == len(PAYLOAD_TYPES)
    assert '"if":' not in json.dumps(rewritten)
    original, guide = Draft202012Validator(contract.schema), Draft202012Validator(rewritten)
    gold, outputs, mutated = _documents()
    assert len(gold) >= 5 and len(outputs) >= 100
    for group in (gold, outputs, mutated):
        verdicts = [(original.is_valid(d), guide.is_valid(d)) for d in group]
        assert all(a == b for a, b in verdicts), [d for d, (a, b) in zip(group, verdicts, strict=True) if a != b][:2]
    assert all(original.is_valid(d) for d in gold)
    assert sum(original.is_valid(d) for d in mutated) == len(gold)  # only the unchanged payload_type
    assert any(original.is_valid(d) for d in outputs) and not all(original.is_valid(d) for d in outputs)


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda s: s["allOf"][0]["if"]["properties"]["payload_type"].update(enum=["x"]), "allowed"),
        (lambda s: s["allOf"].pop(), "exactly these values"),
        (lambda s: s["required"].remove("payload_type"), "requires 'payload_type'"),
        (lambda s: s["allOf"][1].update(**{"else": {}}), "only {'if', 'then'}"),
    ],
)
def test_guide_schema_refuses_what_it_cannot_rewrite(contract, break_it, message):
    schema = copy.deepcopy(contract.schema)
    break_it(schema)
    with pytest.raises(InputError, match="contract") as err:
        guided.guide_schema(schema, "contract")
    assert message in str(err.value)


def test_a_keyword_the_library_does_not_implement_is_refused(loaded, contract):
    schema = copy.deepcopy(contract.schema)
    schema["properties"]["summary"] = {"type": "string", "not": {"const": "x"}}
    with pytest.raises(InputError, match="llguidance cannot guide"):
        guided.build(loaded, schema, "contract")


# -- the bounds: every array, string and integer of the guide schema ---------------------------


def _walk(node, where=""):
    """(path, subschema) for every subschema of a rewritten contract."""
    if isinstance(node, dict):
        yield where, node
        for key, value in node.items():
            if key in ("properties", "$defs"):
                for name, sub in value.items():
                    yield from _walk(sub, f"{where}.{key}.{name}")
            elif key in ("items", "anyOf"):
                for i, sub in enumerate(value if isinstance(value, list) else [value]):
                    yield from _walk(sub, f"{where}.{key}[{i}]")


def _targets():
    """Every envelope the travel templates write (train, probe and dev destinations) and the gold."""
    from tuneline.datagen import travel
    from tuneline.tasks import travel as task

    destinations = travel.load_destinations(REPO / "data" / "seed" / task.KNOWLEDGE_BASE)
    phrasings = travel.load_phrasings(REPO / "data" / "seed" / task.PHRASINGS)
    docs = [json.loads(line)["completion"] for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]
    for split in ("train", "probe", "dev"):
        docs += [e.envelope for e in travel.template_examples(
            destinations, phrasings, seed=0, variants=6, split=split, natural_fraction=0.5, uncovered_language_variants=3)]
    return docs


def test_the_guide_bounds_every_array_string_and_integer_and_cuts_no_training_target(contract):
    bounds = parse_params({}).probe.guide
    bounded = guided.bound_schema(guided.guide_schema(contract.schema), bounds)
    kinds = {}
    for where, node in _walk(bounded):
        kind = node.get("type")
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "array":
            assert node["maxItems"] == bounds.max_items, where
        if kind == "string":
            assert node["maxLength"] == bounds.max_string_length, where
        if kind == "integer":
            assert (node["minimum"], node["maximum"]) == (1, bounds.max_integer), where  # the contract's minimum kept
    assert kinds["array"] == 4 and kinds["string"] == 1 and kinds["integer"] == 1  # texts, nonempty_texts, days, phrases
    # only bounds were added: outside them the guide and the contract agree
    original, guide = Draft202012Validator(contract.schema), Draft202012Validator(bounded)
    docs = _targets()
    assert len(docs) > 1000
    assert all(original.is_valid(d) and guide.is_valid(d) for d in docs), [d for d in docs if not guide.is_valid(d)][:1]
    looping = copy.deepcopy(docs[0])
    looping["assumptions"] = ["x"] * (bounds.max_items + 1)
    assert original.is_valid(looping) and not guide.is_valid(looping)


def test_a_tighter_contract_bound_is_kept_and_a_lower_bound_above_the_guide_is_refused(contract):
    schema = copy.deepcopy(contract.schema)
    schema["$defs"]["phrasebook"]["properties"]["phrases"]["maxItems"] = 3
    schema["$defs"]["text"]["maxLength"] = 40
    bounded = guided.bound_schema(guided.guide_schema(schema), GuideParams())
    assert bounded["$defs"]["phrasebook"]["properties"]["phrases"]["maxItems"] == 3
    assert bounded["$defs"]["texts"]["maxItems"] == 8 and bounded["$defs"]["text"]["maxLength"] == 40
    schema["$defs"]["phrasebook"]["properties"]["phrases"]["minItems"] = 9
    schema["$defs"]["phrasebook"]["properties"]["phrases"].pop("maxItems")
    with pytest.raises(InputError) as err:
        guided.bound_schema(guided.guide_schema(schema), GuideParams(), "contract")
    assert "contract.$defs.phrasebook.properties.phrases: minItems 9 > probe.guide.max_items 8" in str(err.value)
    with pytest.raises(ParamsError, match=r"probe.guide.max_items: 0"):
        parse_params({"probe": {"guide": {"max_items": 0}}})


def test_max_document_bytes_is_the_longest_document_the_library_accepts(loaded):
    import llguidance

    schema = {
        "type": "object", "additionalProperties": False, "required": ["a", "n"],
        "properties": {"a": {"type": "array", "items": {"type": "string"}}, "n": {"type": "integer"},
                       "k": {"enum": ["x", "yy"]}},
    }
    bounds = GuideParams(max_items=3, max_string_length=4, max_integer=50)
    bounded = guided.bound_schema(schema, bounds)
    most = guided.max_document_bytes(bounded)
    # the longest: every item, every character a 6-byte escape, the widest integer and value
    longest = '{"a":[' + ",".join(['"' + "\\u0001" * 4 + '"'] * 3) + '],"n":-50,"k":"yy"}'
    assert most == len(longest.encode()) == 2 + (4 + 2 + 3 * (2 + 6 * 4) + 2) + 1 + (4 + 3) + 1 + (4 + 4)
    guide = guided.build(loaded, schema, "test", bounds)
    assert guide.record["max_document_bytes"] == most and guide.record["bounds"] == bounds.model_dump()

    def accepts(text):
        matcher = llguidance.LLMatcher(guide.tokenizer, guide.grammar, log_level=0)
        tokens = guide.tokenizer.tokenize_bytes(text.encode())
        return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()

    assert accepts(longest) and accepts('{"a":["😀😀😀😀"],"n":1}')
    assert not accepts(longest.replace("\\u0001", "\\u0001\\u0001", 1))  # 5 characters
    assert not accepts(longest.replace("],", ',"x"],', 1))  # 4 items
    assert not accepts(longest.replace("-50", "-51"))
    assert not accepts('{"a":["\\ud83d"],"n":1}')  # no surrogate escapes: 6 bytes a character at most
    assert guided.max_document_bytes(schema) is None  # unbounded before
    for open_part in ({"type": "number"}, {}, {"type": "object"}, {"$ref": "#"}):
        assert guided.max_document_bytes(guided.bound_schema({**bounded, "properties": {**bounded["properties"], "k": open_part}}, bounds)) is None


def test_the_record_says_whether_the_budget_holds_every_document(loaded, contract):
    guide = guided.build(loaded, contract.schema, "contract", GuideParams(), max_new_tokens=320)
    record = guide.record
    assert record["bounds"] == {"max_items": 8, "max_string_length": 160, "max_integer": 99}
    assert record["max_document_bytes"] > 320  # the bounds alone do not hold every document
    shortest = record["closing"]["shortest_document_tokens"]
    assert record["closing"] == {"active": True, "shortest_document_tokens": shortest, "reason": None}
    assert record["greedy"] is True and record["complete_by_construction"] is True  # the closing rule does
    sampled = guided.build(loaded, contract.schema, "contract", GuideParams(), max_new_tokens=320, greedy=False)
    assert sampled.record["closing"]["active"] is True and sampled.record["complete_by_construction"] is False
    short = guided.build(loaded, contract.schema, "contract", GuideParams(), max_new_tokens=shortest)
    assert short.record["closing"]["active"] is False and short.completer is None
    assert short.record["closing"]["reason"] == (
        f"the shortest document and a stop token take {shortest + 1} tokens > max_new_tokens {shortest}"
    )
    assert short.record["complete_by_construction"] is False
    small = guided.build(loaded, contract.schema, "contract", GuideParams(max_items=1, max_string_length=1, max_integer=9),
                         max_new_tokens=shortest)
    assert small.record["max_document_bytes"] + 1 <= 320 and small.record["complete_by_construction"] is False
    assert guided.build(loaded, contract.schema, "contract", GuideParams(max_items=1, max_string_length=1, max_integer=9),
                        max_new_tokens=small.record["max_document_bytes"] + 1).record["complete_by_construction"] is True
    unclosable = {"type": "object", "additionalProperties": False, "required": ["n"],
                  "properties": {"n": {"type": "integer", "multipleOf": 5}}}
    other = guided.build(loaded, unclosable, "test", GuideParams(), max_new_tokens=320)
    assert other.record["closing"]["active"] is False and "'multipleOf'" in other.record["closing"]["reason"]
    open_object = {"type": "object", "properties": {"a": {"type": "string"}}}  # any other key allowed
    reason = guided.build(loaded, open_object, "test", GuideParams(), max_new_tokens=320).record["closing"]["reason"]
    assert "'additionalProperties': false" in reason


class LoopBias:
    """Stands in for a model that loops in a list: of the one-character tokens, prefers
    ``,`` (another item, or one more character inside a string), then ``a``, then ``"``;
    never ``]``."""

    def __init__(self, tokenizer, vocab):
        import torch

        self.bias = torch.zeros(vocab)
        for token_id in range(len(tokenizer)):
            self.bias[token_id] = {",": 100.0, "a": 90.0, '"': 80.0}.get(tokenizer.decode([token_id]), 0.0)

    def __call__(self, input_ids, scores):
        return scores + self.bias[: scores.shape[-1]]


@pytest.mark.parametrize(
    "items, bounds, expect",
    [
        ({"enum": ["a"]}, GuideParams(max_items=3), '["a","a","a"]'),  # the list closes at maxItems
        ({"type": "string"}, GuideParams(max_items=2, max_string_length=5), '[",,,,,",",,,,,"]'),  # strings at maxLength
    ],
)
def test_llguidance_closes_a_looping_list_at_the_bounds(loaded, items, bounds, expect):
    from transformers import LogitsProcessorList

    schema = {"type": "array", "items": items}
    bias = LoopBias(loaded.tokenizer, loaded.model.config.vocab_size)
    ids = loaded.encode(PROMPTS[:1])
    results = {}
    for name, b in (("bounded", bounds), ("unbounded", GuideParams(max_items=1000, max_string_length=1000))):
        guide = guided.build(loaded, schema, "test", b)
        [[results[name]]], _ = generate(loaded, ids, batch_size=1, max_new_tokens=60, progress=False,
                                        logits_processor=lambda rows, g=guide: LogitsProcessorList([bias, *g.processors(rows)]))
    assert results["bounded"].text == expect and results["bounded"].finish_reason == "eos"
    assert results["unbounded"].finish_reason == "length"  # without the bound the model loops to the limit


# -- the guided decode -----------------------------------------------------------------------


class CloserBias:
    """Stands in for a trained model's wish to end: raises the logits of tokens made only
    of ``"``, ``]`` and ``}`` (most those with a quote). Alone it writes no JSON; under the guide it closes strings and
    arrays as soon as the schema allows, so the document ends within a small budget."""

    def __init__(self, tokenizer, vocab):
        import torch

        self.bias = torch.zeros(vocab)
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            if text and set(text) <= set('"]}'):
                self.bias[token_id] = 100.0 if '"' in text else 50.0  # end a string first

    def __call__(self, input_ids, scores):
        return scores + self.bias[: scores.shape[-1]]


def _closing(loaded, guide=None):
    from transformers import LogitsProcessorList

    bias = CloserBias(loaded.tokenizer, loaded.model.config.vocab_size)

    def processors(rows):
        return LogitsProcessorList([bias, *(guide.processors(rows) if guide else [])])

    return processors


def test_guided_decoding_writes_contract_valid_json_and_free_decoding_does_not(loaded, guide, contract):
    ids = loaded.encode(PROMPTS)
    free, _ = generate(loaded, ids, batch_size=5, max_new_tokens=BUDGET, progress=False, logits_processor=_closing(loaded))
    masked, _ = generate(
        loaded, ids, batch_size=5, max_new_tokens=BUDGET, progress=False, logits_processor=_closing(loaded, guide)
    )
    verdicts = [contract.judge(g.text, {}, g.finish_reason) for (g,) in masked]
    assert [g.finish_reason for (g,) in masked] == ["eos"] * len(PROMPTS), [g.text for (g,) in masked]
    assert all(v.valid for v in verdicts), [(g.text, v.errors) for (g,), v in zip(masked, verdicts, strict=True)]
    assert max(g.n_tokens for (g,) in masked) < BUDGET
    free_valid = [contract.judge(g.text, {}, g.finish_reason).valid for (g,) in free]
    assert sum(free_valid) <= 1, [g.text for (g,) in free]


def test_one_matcher_per_row_batched_equals_one_at_a_time(loaded, guide):
    ids = loaded.encode(PROMPTS)
    batched, _ = generate(loaded, ids, batch_size=5, max_new_tokens=BUDGET, progress=False, logits_processor=_closing(loaded, guide))
    alone, _ = generate(loaded, ids, batch_size=1, max_new_tokens=BUDGET, progress=False, logits_processor=_closing(loaded, guide))
    assert [g.text for (g,) in batched] == [g.text for (g,) in alone]


def test_a_guided_output_cut_by_the_budget_counts_as_truncated(loaded, guide, contract):
    """The guide does not know max_new_tokens: an unfinished document is judged as any
    other truncated output (finish reason ``length``, not parsed, not valid)."""
    [[g]], _ = generate(loaded, loaded.encode(PROMPTS[:1]), batch_size=1, max_new_tokens=8, progress=False,
                        logits_processor=guide.processors)
    assert g.finish_reason == "length" and g.text.startswith('{"summary":"')
    verdict = contract.judge(g.text, {}, g.finish_reason)
    assert not verdict.valid and verdict.cause == "truncated"


# -- the closing rule --------------------------------------------------------------------------


def _gold_texts():
    return [json.dumps(doc, ensure_ascii=False, separators=(",", ":")) for doc in _gold()]


def test_the_closing_rule_finishes_every_prefix_of_every_gold_document(loaded, contract):
    """At every byte of every gold document (UTF-8 characters cut in the middle included), the
    closing rule's completion is accepted by llguidance and gives a document the contract
    accepts; the shortest document is the cheapest payload's."""
    import llguidance

    guide = guided.build(loaded, contract.schema, "contract", GuideParams(), max_new_tokens=320)
    completer = guide.completer
    assert completer.completion(completer.start) == (
        b'{"summary":"x","assumptions":[],"uncertainty_notes":[],"next_steps":[],"verification_steps":[],'
        b'"payload_type":"checklist","payload":{"destination":"x","items":["x"]}}'
    )
    texts = _gold_texts()
    assert len(texts) == 10 and any(max(text) > "\x7f" for text in texts)
    for text in texts:
        data, state = text.encode("utf-8"), completer.start.copy()
        for cut in range(len(data) + 1):
            if cut:
                completer.feed(state, data[cut - 1 : cut])
            tail = completer.completion(state)
            whole = data[:cut] + tail
            tokens = guide.tokenizer.tokenize_bytes(whole)
            matcher = llguidance.LLMatcher(guide.tokenizer, guide.grammar, log_level=0)
            assert matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting(), (data[:cut], tail)
            assert contract.judge(whole.decode("utf-8"), {}, "eos").valid, (data[:cut], tail)
        assert tail == b"" and state.done


@pytest.mark.parametrize("extra", [1, 40, 200])
def test_a_looping_model_is_closed_within_the_budget(loaded, contract, extra):
    """A model that would loop (a string or list to the guide's bounds, far past the budget)
    ends every output at a stop token within max_new_tokens, valid under the contract, from
    a budget of the shortest document and a stop token up; without the closing rule the same
    model runs to the limit."""
    from transformers import LogitsProcessorList

    shortest = guided.build(loaded, contract.schema, "contract", GuideParams(), max_new_tokens=320).record["closing"][
        "shortest_document_tokens"]
    budget = shortest + extra
    bias = LoopBias(loaded.tokenizer, loaded.model.config.vocab_size)
    ids = loaded.encode(PROMPTS)
    results = {}
    for name, limit in (("closing", budget), ("bounds only", None)):
        guide = guided.build(loaded, contract.schema, "contract", GuideParams(), max_new_tokens=limit)
        results[name], _ = generate(
            loaded, ids, batch_size=5, max_new_tokens=budget, progress=False,
            logits_processor=lambda rows, g=guide: LogitsProcessorList([bias, *g.processors(rows)]),
        )
        results[name + " closed"] = guide.closed
    closed = [g for (g,) in results["closing"]]
    assert [g.finish_reason for g in closed] == ["eos"] * len(PROMPTS), [g.text for g in closed]
    assert max(g.n_tokens for g in closed) <= budget and results["closing closed"] == len(PROMPTS)
    assert all(contract.judge(g.text, {}, g.finish_reason).valid for g in closed), [g.text for g in closed]
    assert [g.finish_reason for (g,) in results["bounds only"]] == ["length"] * len(PROMPTS)
    assert results["bounds only closed"] == 0


# -- the probe row -----------------------------------------------------------------------------


def test_a_plus_in_a_probe_model_name_is_only_the_guided_suffix():
    assert list(parse_params({}).probe.models) == ["base", "sft", "dpo", "dpo+guided"]
    with pytest.raises(ParamsError, match=r"probe.models: 'dpo\+fast': .*'\+guided'"):
        parse_params({"probe": {"models": {"base": "models/base", "dpo+fast": "models/dpo"}}})
    with pytest.raises(ParamsError, match=r"'\+guided'"):
        parse_params({"probe": {"models": {"base": "models/base", "+guided": "models/base"}}})


def test_probe_guided_row_writes_its_own_outputs_and_names_the_guide(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "instruction": f"Make a checklist for {c}.",
                        "expect": {"payload_type": "checklist", "payload.destination": c}}) + "\n"
            for i, c in enumerate(["Lisbon", "Tokyo", "Paris"])
        ),
        encoding="utf-8",
    )
    params = parse_params(
        {
            "paths": {"base_model": str(tiny_model_dir), "schema_file": str(SCHEMA), "dev_suite": None,
                      "seed_dir": str(REPO / "data" / "seed"),
                      "metrics": "metrics", "reports": "reports"},
            "model": {"device": "cpu", "dtype": "float32"},
            "probe": {"models": {"base": str(tiny_model_dir), "base+guided": str(tiny_model_dir)},
                      "suites": {"heldout": {"path": str(suite)}}, "batch_size": 2, "max_new_tokens": 12},
            "compare": {"pairs": []},
        }
    )
    free = probe.run(params, "base")
    result = probe.run(params, "base+guided")
    paths = probe.output_paths(params, "base+guided", "heldout")
    assert paths.metrics == Path("metrics/probe/heldout/base+guided.json")
    assert paths.samples == Path("reports/probe/heldout/base+guided.samples.jsonl")
    samples = read_jsonl(paths.samples)
    assert {s["model"] for s in samples} == {"base+guided"}
    assert all(s["output"].startswith('{"summary":"') for s in samples)  # the mask, in the stage
    assert not any(s["output"].startswith('{"summary":"') for s in read_jsonl(probe.output_paths(params, "base", "heldout").samples))
    record = read_json(paths.provenance)
    assert record["stage"] == "probe@base+guided"
    assert record["guide"]["library"] == "llguidance" and record["guide"]["version"] == guided.llguidance_version()
    assert record["guide"]["bounds"] == params.probe.guide.model_dump() and record["guide"]["max_new_tokens"] == 12
    assert record["guide"]["max_document_bytes"] > 12 and record["guide"]["complete_by_construction"] is False
    assert record["run"]["generation_s"] > 0 and "guide" not in read_json(probe.output_paths(params, "base", "heldout").provenance)
    assert read_json(paths.metrics)["n"] == 3 and result["suites"]["heldout"]["n"] == free["suites"]["heldout"]["n"]


def test_probe_guided_row_is_complete_by_construction_within_the_budget(tmp_path, tiny_model_dir, monkeypatch):
    """Through the stage: the random tiny model does not end its documents by itself; with a
    budget the shortest document fits, the guided row's every output is schema-valid, the
    closing rule closed them and the run record says so. Sampled, it says the guarantee is off."""
    monkeypatch.chdir(tmp_path)
    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "".join(json.dumps({"id": f"p{i}", "instruction": f"Make a checklist for {c}.",
                            "expect": {"payload_type": "checklist"}}) + "\n"
                for i, c in enumerate(["Lisbon", "Tokyo", "Paris"])),
        encoding="utf-8",
    )
    overrides = {
        "paths": {"base_model": str(tiny_model_dir), "schema_file": str(SCHEMA), "dev_suite": None,
                  "seed_dir": str(REPO / "data" / "seed"), "metrics": "metrics", "reports": "reports"},
        "model": {"device": "cpu", "dtype": "float32"},
        "probe": {"models": {"base": str(tiny_model_dir), "base+guided": str(tiny_model_dir)},
                  "suites": {"heldout": {"path": str(suite)}}, "batch_size": 3, "max_new_tokens": 100},
        "compare": {"pairs": []},
    }
    probe.run(parse_params(overrides), "base+guided")
    paths = probe.output_paths(parse_params(overrides), "base+guided", "heldout")
    metrics, record = read_json(paths.metrics), read_json(paths.provenance)
    assert metrics["n"] == 3 and metrics["schema_valid_rate"] == 1.0, read_jsonl(paths.samples)
    assert metrics["truncated_rate"] == 0.0
    guide = record["guide"]
    assert guide["complete_by_construction"] is True and guide["closing"]["active"] is True
    assert guide["closed_rows"] == 3 and guide["greedy"] is True
    overrides["probe"] |= {"do_sample": True, "temperature": 0.7}
    probe.run(parse_params(overrides), "base+guided")
    sampled = read_json(paths.provenance)["guide"]
    assert sampled["greedy"] is False and sampled["complete_by_construction"] is False


def test_dvc_runs_a_probe_stage_named_with_the_guided_suffix():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
    stage = stages["dvc.yaml:probe@dpo+guided"] if "dvc.yaml:probe@dpo+guided" in stages else stages["probe@dpo+guided"]
    assert stage.cmd == "tuneline probe dpo+guided"
    outs = {Path(o.def_path).as_posix() for o in stage.outs}
    for suite in ("heldout", "natural"):
        assert f"metrics/probe/{suite}/dpo+guided.json" in outs
        assert f"reports/probe/{suite}/dpo+guided.samples.jsonl" in outs
    assert any(Path(d.def_path).as_posix() == "models/dpo" for d in stage.deps)
