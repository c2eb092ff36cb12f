"""The default task's seed data: knowledge base, phrasings, gold examples and probe suite."""

from __future__ import annotations

import re
from collections import Counter
from itertools import product
from pathlib import Path

import pytest

from tuneline.contract import load_contract, task_checks
from tuneline.datagen.probe_suite import (
    NaturalPhrasings,
    build_dev_suite,
    build_natural_suite,
    build_probe_suite,
    load_natural_phrasings,
    register_of,
)
from tuneline.datagen.travel import (
    PAYLOAD_TYPES,
    load_destinations,
    load_phrasings,
    template_examples,
)
from tuneline.records import read_jsonl

SEED = Path(__file__).resolve().parents[1] / "data" / "seed"


@pytest.fixture(scope="module")
def destinations():
    return load_destinations(SEED / "destinations.jsonl")


@pytest.fixture(scope="module")
def train_phrasings():
    return load_phrasings(SEED / "train_phrasings.json")


@pytest.fixture(scope="module")
def probe_phrasings():
    return load_phrasings(SEED / "probe_phrasings.json")


@pytest.fixture(scope="module")
def natural_phrasings():
    return load_natural_phrasings(SEED / "natural_phrasings.json")


def _suite(name):
    return read_jsonl(SEED / name, required={"instruction": str, "expect": dict, "meta": dict})


@pytest.fixture(scope="module")
def natural():
    return _suite("natural_suite.jsonl")


@pytest.fixture(scope="module")
def dev():
    return _suite("dev_suite.jsonl")


@pytest.fixture(scope="module")
def suite():
    return read_jsonl(
        SEED / "probe_suite.jsonl", required={"instruction": str, "expect": dict, "meta": dict}
    )


def _grams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.casefold())
    return {tuple(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


def test_knowledge_base_counts_and_splits(destinations):
    assert len(destinations) >= 48
    splits = Counter(d["split"] for d in destinations)
    assert splits["train"] >= 36 and splits["probe"] >= 12 and splits["dev"] == 5
    dev = [d for d in destinations if d["split"] == "dev"]
    assert len({d["region"] for d in dev}) == 5  # one per region
    assert len({d["phrase_language"] for d in dev}) == 5  # and as many languages
    regions = {d["region"] for d in destinations}
    for region in regions:  # held-out destinations are stratified over regions
        in_region = Counter(d["split"] for d in destinations if d["region"] == region)
        assert in_region["train"] >= 1 and in_region["probe"] >= 1, region


def test_knowledge_base_facts_are_complete(destinations):
    for d in destinations:
        assert 3 <= len(d["sights"]) <= 6 and 4 <= len(d["phrases"]) <= 8, d["name"]
        assert re.fullmatch(r"[A-Z]{3}", d["currency"]["code"]), d["name"]
        assert all(re.fullmatch(r"[A-O]", p) for p in d["plug_types"]), d["name"]
        assert all(re.match(r"\d{2,5} ", e) for e in d["emergency"]), d["name"]
        low, mid = d["daily_budget"]["budget"], d["daily_budget"]["mid_range"]
        assert low[0] < low[1] <= mid[1] and mid[0] < mid[1], d["name"]
        assert d["transit_payment"][0].isupper() and not d["transit_payment"].endswith("."), d[
            "name"
        ]


def test_phrasings_have_ten_templates_per_type(train_phrasings, probe_phrasings):
    for phrasings in (train_phrasings, probe_phrasings):
        for ptype in PAYLOAD_TYPES:
            assert len(set(phrasings.templates[ptype])) >= 10, ptype


@pytest.mark.parametrize(("one", "other"), [("train", "probe"), ("train", "natural"), ("probe", "natural")])
def test_phrasings_files_share_no_wording(train_phrasings, probe_phrasings, natural_phrasings, one, other):
    """No template, profile or task wording (nor a natural context sentence) is shared
    between training, the held-out probe phrasings and the natural phrasings."""
    files = {"train": train_phrasings, "probe": probe_phrasings, "natural": natural_phrasings.phrasings}
    a, b = files[one], files[other]
    templates_a = {t for ts in a.templates.values() for t in ts}
    templates_b = {t for ts in b.templates.values() for t in ts}
    assert not templates_a & templates_b
    assert not {t for _, t in a.profiles} & {t for _, t in b.profiles}
    tasks_a = {w for ws in a.tasks.values() for w in ws}
    tasks_b = {w for ws in b.tasks.values() for w in ws}
    assert not tasks_a & tasks_b
    contexts = {c for places in natural_phrasings.contexts.values() for cs in places.values() for c in cs}
    if other == "natural":
        assert not contexts & (templates_a | tasks_a | {t for _, t in a.profiles})
    # not even near-duplicates: word 3-gram Jaccard stays well below clean's leakage threshold
    worst = max(
        len(_grams(x) & _grams(y)) / len(_grams(x) | _grams(y))
        for x, y in product(sorted(templates_a), sorted(templates_b))
    )
    assert worst < 0.4


def test_probe_suite_is_reproducible_from_its_builder(destinations, probe_phrasings, suite):
    assert build_probe_suite(destinations, probe_phrasings) == suite


def test_probe_suite_is_held_out_and_stratified(destinations, suite):
    assert len(suite) >= 240
    split = {d["name"]: d["split"] for d in destinations}
    assert {r["meta"]["destination"] for r in suite} == {
        n for n, s in split.items() if s == "probe"
    }
    by_type = Counter(r["meta"]["payload_type"] for r in suite)
    assert set(by_type) == set(PAYLOAD_TYPES) and len(set(by_type.values())) == 1
    first = Counter(r["meta"]["payload_type"] for r in suite[:60])
    assert set(first.values()) == {12}  # any prefix (a CPU probe limit) stays stratified
    for r in suite:
        assert r["expect"] == {
            "payload_type": r["meta"]["payload_type"],
            "payload.destination": r["meta"]["destination"],
        }
        assert r["meta"]["destination"] in r["instruction"]
        assert (
            r["instruction"].count(".") + r["instruction"].count("?") <= 3
        )  # one or two sentences


def test_probe_prompts_are_unique(suite, natural, dev):
    everything = [*suite, *natural, *dev]
    assert len({r["instruction"] for r in everything}) == len(everything)
    assert len({r["id"] for r in everything}) == len(everything)


# -- the natural suite and the development suite


def test_natural_suite_is_reproducible_held_out_and_stratified(destinations, natural_phrasings, natural):
    assert build_natural_suite(destinations, natural_phrasings) == natural
    assert len(natural) == 13 * 5 * 2 == 130
    probe_places = {d["name"] for d in destinations if d["split"] == "probe"}
    assert {r["meta"]["destination"] for r in natural} == probe_places
    assert all(r["id"].startswith("natural-") for r in natural)
    for size in (30, 65, 130):  # any prefix (a CPU probe limit) stays stratified
        assert set(Counter(r["expect"]["payload_type"] for r in natural[:size]).values()) == {size // 5}
    first = {(r["meta"]["destination"], r["meta"]["payload_type"]) for r in natural[:65]}
    assert len(first) == 65  # each destination once per payload type
    for r in natural:
        assert r["expect"] == {"payload_type": r["meta"]["payload_type"],
                               "payload.destination": r["meta"]["destination"]}


def test_natural_suite_has_both_registers_typos_and_context(natural_phrasings, natural):
    by_register = Counter(r["meta"]["register"] for r in natural)
    assert by_register == {"casual": 65, "formal": 65}
    for ptype in PAYLOAD_TYPES:  # both registers, several wordings, for every payload type
        rows = [r for r in natural if r["meta"]["payload_type"] == ptype]
        assert {r["meta"]["register"] for r in rows} == {"casual", "formal"}
        assert len({r["meta"]["phrasing"] for r in rows}) >= 5
    casual = [r for r in natural if r["meta"]["register"] == "casual"]
    formal = [r for r in natural if r["meta"]["register"] == "formal"]
    typos = Counter(t for r in casual for t in r["meta"].get("typos", []))
    assert sum(1 for r in casual if r["meta"].get("typos")) >= 20 and len(typos) >= 6, typos
    assert not any("typos" in r["meta"] for r in formal)
    for r in casual:
        for word in r["meta"].get("typos", []):
            assert natural_phrasings.typos[word] in r["instruction"]
        assert r["instruction"][0].islower() or r["meta"]["context"] == "before"
    assert all(r["instruction"][0].isupper() for r in formal)
    assert {r["meta"]["context"] for r in casual} == {r["meta"]["context"] for r in formal} == {"none", "before", "after"}
    assert sum(r["instruction"].rstrip()[-1] not in ".?!" for r in casual) >= 20  # no closing punctuation
    assert sum("?" in r["instruction"] for r in natural) >= 25  # asked as questions
    for r in natural:
        assert register_of(natural_phrasings.phrasings.templates[r["meta"]["payload_type"]][
            int(r["meta"]["phrasing"].split("/")[1])]) == r["meta"]["register"]


def test_a_typo_never_touches_the_destination(destinations, natural_phrasings, natural):
    for r in natural:
        assert r["meta"]["destination"] in r["instruction"], r["id"]
    # even with a typo map that would misspell every destination and every word of the templates
    probe_places = [d["name"] for d in destinations if d["split"] == "probe"]
    words = {w for ts in natural_phrasings.phrasings.templates.values() for t in ts for w in re.findall(r"[a-z]+", t)}
    hostile = {**{w: w + "x" for w in words}, **{p: p[:-1] for p in probe_places}}
    typed = build_natural_suite(destinations, NaturalPhrasings(natural_phrasings.phrasings, hostile,
                                                               natural_phrasings.contexts))
    for r in typed:
        assert r["meta"]["destination"] in r["instruction"], r["instruction"]
        assert "{" not in r["instruction"] and "}" not in r["instruction"]
    assert sum(bool(r["meta"].get("typos")) for r in typed) == 65


def test_dev_suite_is_reproducible_and_on_its_own_destinations(
    destinations, probe_phrasings, natural_phrasings, dev, suite, natural
):
    assert build_dev_suite(destinations, probe_phrasings, natural_phrasings) == dev
    assert len(dev) == 5 * 5 * 2 == 50 and all(r["id"].startswith("dev-") for r in dev)
    dev_places = {d["name"] for d in destinations if d["split"] == "dev"}
    assert {r["meta"]["destination"] for r in dev} == dev_places
    probed = {r["meta"]["destination"] for r in [*suite, *natural]}
    assert not dev_places & probed
    gold = read_jsonl(SEED / "gold.jsonl")
    assert not dev_places & {g["destination"] for g in gold}  # never a teacher's shot
    trained = {e.destination for e in template_examples(destinations, probe_phrasings, seed=0, variants=1)}
    assert trained and not dev_places & trained  # the template generator takes split: train only
    assert Counter(r["meta"]["style"] for r in dev) == {"heldout": 25, "natural": 25}
    assert {r["meta"]["register"] for r in dev} == {"casual", "formal"}
    assert set(Counter(r["expect"]["payload_type"] for r in dev[:25]).values()) == {5}


def test_gold_examples_validate_and_match_their_request(destinations):
    contract = load_contract(SEED / "contract.schema.json")
    gold = read_jsonl(
        SEED / "gold.jsonl",
        required={"instruction": str, "payload_type": str, "destination": str, "completion": dict},
    )
    split = {d["name"]: d["split"] for d in destinations}
    assert Counter(g["payload_type"] for g in gold) == dict.fromkeys(PAYLOAD_TYPES, 2)
    for g in gold:
        assert contract.validate(g["completion"]) == [], g["id"]
        expect = {"payload_type": g["payload_type"], "payload.destination": g["destination"]}
        assert all(task_checks(g["completion"], expect).values()), g["id"]
        assert split[g["destination"]] == "train", g["id"]  # shots never show a probe destination
        assert g["destination"] in g["instruction"]
