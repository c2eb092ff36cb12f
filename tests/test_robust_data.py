"""Template training data as users write it: registers, roughening, phrasebooks that stop,
uncovered languages, and facts that match the knowledge base."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import product
from pathlib import Path

import pytest

from tuneline.contract import load_contract
from tuneline.datagen import travel
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.records import read_jsonl
from tuneline.tasks import travel as travel_task

SEED = Path(__file__).resolve().parents[1] / "data" / "seed"


@pytest.fixture(scope="module")
def kb():
    return travel.load_destinations(SEED / "destinations.jsonl")


@pytest.fixture(scope="module")
def phrasings():
    return travel.load_phrasings(SEED / "train_phrasings.json")


@pytest.fixture(scope="module")
def params():
    return parse_params({"paths": {"seed_dir": str(SEED)}})


@pytest.fixture(scope="module")
def default_examples(params):
    """What the generate stage expands with the default params."""
    return travel_task.examples(params)


def _grams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def _jaccard(a: str, b: str) -> float:
    return len(_grams(a) & _grams(b)) / len(_grams(a) | _grams(b))


def test_natural_mix_is_deterministic_and_seed_sensitive(kb, phrasings):
    def run(seed):
        return travel.template_examples(kb, phrasings, seed=seed, variants=3, natural_fraction=0.5,
                                        uncovered_language_variants=2)

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert [e.instruction for e in a] != [e.instruction for e in c]
    assert len({e.key for e in a}) == len(a)


def test_default_params_keep_the_set_size_and_mix_registers(default_examples, params):
    template = params.generate.sources.template
    train = [e for e in default_examples if "uncovered_language" not in e.style]
    extra = len(default_examples) - len(train)
    assert extra <= 0.05 * len(train)  # the size stays about what the formal-only set had
    share = Counter(e.register for e in train)["casual"] / len(train)
    assert abs(share - template.natural_fraction) < 0.07, share
    casual = [e for e in train if e.register == "casual"]
    shown = Counter(part for e in casual for part in e.style.split("+"))
    for kind, expected in travel.NOISE_SHARES["casual"].items():
        if kind == "typo":
            expected *= 0.9  # a request without a word long enough stays clean
        assert abs(shown[kind] / len(casual) - expected) < 0.1, (kind, shown[kind] / len(casual))
    assert shown["question"] / len(casual) > 0.5
    formal = [e for e in train if e.register == "formal"]
    assert not any({"typo", "lower", "no_punct"} & set(e.style.split("+")) for e in formal)
    # every payload type is asked for casually, in several wordings
    for ptype in travel.PAYLOAD_TYPES:
        wordings = {e.phrasing for e in casual if e.payload_type == ptype}
        assert len(wordings) >= 8, (ptype, wordings)


def test_register_share_follows_the_param(kb, phrasings):
    formal = travel.template_examples(kb, phrasings, seed=0, variants=3, natural_fraction=0.0)
    casual = travel.template_examples(kb, phrasings, seed=0, variants=3, natural_fraction=1.0)
    assert {e.register for e in formal} == {"formal"} and {e.register for e in casual} == {"casual"}
    assert [e.key for e in formal] == [e.key for e in casual]  # the same set, asked differently


def test_roughening_never_touches_the_destination_or_language(default_examples):
    for e in default_examples:
        assert e.destination in e.instruction, (e.key, e.instruction)
        if "uncovered_language" in e.style:
            assert e.envelope["payload"]["language"] in e.instruction, e.instruction
    typos = [e for e in default_examples if "typo" in e.style]
    assert len(typos) > 50


def test_naturalise_changes_words_around_a_protected_name(phrasings):
    name = "Rio de Janeiro"
    request = f"What should I really pack for Rio de Janeiro because of the weather in {name}?"
    changed = 0
    for i in range(300):
        text, applied = travel.naturalise(request, protected=[name, "Spanish"], natural=phrasings.natural,
                                          register="casual", rng=random.Random(i))
        assert text.count(name) == 2, text
        if "typo" in applied:
            changed += 1
            words = set(re.findall(r"[A-Za-z]+", text.casefold()))
            assert not words >= set(re.findall(r"[A-Za-z]+", request.casefold())) or "context" in applied
    assert changed > 50
    assert travel.naturalise(request, protected=[name], natural=phrasings.natural, register="casual",
                             rng=random.Random(7)) == travel.naturalise(
        request, protected=[name], natural=phrasings.natural, register="casual", rng=random.Random(7))


def test_natural_wording_shares_nothing_with_the_probe_suites(phrasings):
    probe = travel.load_phrasings(SEED / "probe_phrasings.json")
    natural = phrasings.natural
    ours = [t for ts in natural.templates.values() for t in ts] + list(natural.language_templates)
    theirs = [t for ts in probe.templates.values() for t in ts]
    assert not set(ours) & set(theirs)
    assert max(_jaccard(a, b) for a, b in product(ours, theirs)) < 0.4
    assert not set(natural.profiles.values()) & {t for _, t in probe.profiles}
    assert not {w for ws in natural.tasks.values() for w in ws} & {w for ws in probe.tasks.values() for w in ws}
    said = " ".join(theirs).casefold()
    assert not [c for c in natural.before + natural.after if c.casefold().rstrip(".!") in said]


def test_generated_prompts_stay_clear_of_held_out_prompts(default_examples):
    """Below clean's leakage threshold against the probe suite and, where present, the
    natural-prompt suite."""
    held_out = [r["instruction"] for r in read_jsonl(SEED / "probe_suite.jsonl")]
    natural_suite = SEED / "natural_suite.jsonl"
    if natural_suite.exists():
        held_out += [r["instruction"] for r in read_jsonl(natural_suite)]
    grams = [_grams(h) for h in held_out]
    worst = max(
        len(g & _grams(e.instruction)) / len(g | _grams(e.instruction))
        for e in default_examples
        if e.register == "casual"
        for g in grams
    )
    assert worst < 0.8


def test_phrasebooks_vary_in_length_without_repeats(default_examples, params):
    template = params.generate.sources.template
    books = [e for e in default_examples if e.payload_type == "phrasebook" and "uncovered_language" not in e.style]
    lengths = Counter(len(e.envelope["payload"]["phrases"]) for e in books)
    assert set(lengths) == set(range(template.phrasebook_min_items, template.phrasebook_max_items + 1)), lengths
    for e in books:
        phrases = e.envelope["payload"]["phrases"]
        meanings = [" ".join(p["meaning"].casefold().split()) for p in phrases]
        assert len(set(meanings)) == len(meanings) and len({p["phrase"] for p in phrases}) == len(phrases), e.key


@pytest.mark.parametrize(
    ("low", "high", "seen"),
    [(3, None, {3, 4, 5, 6, 7}), (2, 4, {2, 3, 4}), (4, 4, {4}), (6, 9, {5, 6, 7})],
)
def test_phrasebook_items_bound_the_list(kb, phrasings, low, high, seen):
    """Lengths stay in [low, high], both capped at the destination's list (5-7 phrases)."""
    books = [
        e for e in travel.template_examples(kb, phrasings, seed=0, variants=6, phrasebook_items=(low, high))
        if e.payload_type == "phrasebook"
    ]
    by_size = {d["name"]: len(d["phrases"]) for d in kb}
    for e in books:
        n = len(e.envelope["payload"]["phrases"])
        cap = by_size[e.destination] if high is None else min(high, by_size[e.destination])
        assert min(low, cap) <= n <= cap, (e.key, n)
    assert {len(e.envelope["payload"]["phrases"]) for e in books} == seen


def test_phrasebook_items_range_is_checked():
    from tuneline.params import ParamsError, parse_params

    with pytest.raises(ParamsError, match="phrasebook_max_items 2 is below phrasebook_min_items 3") as raised:
        parse_params({"generate": {"sources": {"template": {"phrasebook_min_items": 3, "phrasebook_max_items": 2}}}})
    # one problem, reported as one, with what is allowed
    assert raised.value.problems == [
        "generate.sources.template: phrasebook_max_items 2 is below phrasebook_min_items 3 "
        "(allowed: null or at least phrasebook_min_items)"
    ]


def test_uncovered_languages_get_a_short_list_and_a_note(kb, default_examples):
    expected = {(d["name"], lang) for d in kb if d["split"] == "train" for lang in travel.uncovered_languages(d, kb)}
    assert ("Ubud", "Balinese") in expected and ("Edinburgh", "Scottish Gaelic") in expected
    assert not any(lang == d["phrase_language"] for d in kb for lang in travel.uncovered_languages(d, kb))
    books = [e for e in default_examples if "uncovered_language" in e.style]
    assert {(e.destination, e.envelope["payload"]["language"]) for e in books} == expected
    for e in books:
        payload = e.envelope["payload"]
        assert 1 <= len(payload["phrases"]) <= 3, e.key
        assert any("could not be verified" in note for note in e.envelope["uncertainty_notes"]), e.key
    assert Counter(len(e.envelope["payload"]["phrases"]) for e in books).keys() >= {1, 3}


def test_every_template_envelope_is_valid_and_states_only_right_facts(default_examples, params):
    contract = load_contract(SEED / "contract.schema.json")
    check = travel_task.fact_checker(params)
    checked = 0
    for e in default_examples:
        expect = {"payload_type": e.payload_type, "payload.destination": e.destination}
        assert contract.judge_value(e.envelope, expect).passes, e.key
        result = check(e.envelope, expect)
        assert result is not None and result["wrong"] == [], (e.key, result)
        checked += result["checked"]
    assert checked > 2 * len(default_examples)


def test_records_carry_register_and_style(default_examples, params):
    contract = load_contract(SEED / "contract.schema.json")
    e = next(e for e in default_examples if e.register == "casual")
    meta = travel_task.template_record(e, params, contract)["meta"]
    assert meta["register"] == "casual" and meta["style"] == e.style


def test_natural_section_errors_name_file_and_field(tmp_path, kb):
    data = json.loads((SEED / "train_phrasings.json").read_text())
    del data["natural"]["profiles"]["couple"]
    path = tmp_path / "phrasings.json"
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"phrasings.json: natural.profiles: needs a wording for exactly"):
        travel.load_phrasings(path)
    data = json.loads((SEED / "train_phrasings.json").read_text())
    data["natural"]["language_templates"] = ["phrases for {destination}"]
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"natural.language_templates\[0\]: must contain \{language\}"):
        travel.load_phrasings(path)
    formal_only = travel.load_phrasings(SEED / "probe_phrasings.json")
    with pytest.raises(InputError, match="natural_fraction"):
        travel.template_examples(kb, formal_only, seed=0, variants=1, natural_fraction=0.5)
