"""The default task's seed data: knowledge base, phrasings, gold examples and probe suite."""

from __future__ import annotations

import re
from collections import Counter
from itertools import product
from pathlib import Path

import pytest

from tuneline.contract import load_contract, task_checks
from tuneline.datagen.probe_suite import build_probe_suite
from tuneline.datagen.travel import PAYLOAD_TYPES, load_destinations, load_phrasings
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
    assert splits["train"] >= 36 and splits["probe"] >= 12
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


def test_probe_phrasings_share_nothing_with_training(train_phrasings, probe_phrasings):
    train_templates = {t for ts in train_phrasings.templates.values() for t in ts}
    probe_templates = {t for ts in probe_phrasings.templates.values() for t in ts}
    assert not train_templates & probe_templates
    assert not {t for _, t in train_phrasings.profiles} & {t for _, t in probe_phrasings.profiles}
    train_tasks = {w for ws in train_phrasings.tasks.values() for w in ws}
    probe_tasks = {w for ws in probe_phrasings.tasks.values() for w in ws}
    assert not train_tasks & probe_tasks
    # not even near-duplicates: word 3-gram Jaccard stays well below clean's leakage threshold
    worst = max(
        len(_grams(a) & _grams(b)) / len(_grams(a) | _grams(b))
        for a, b in product(sorted(train_templates), sorted(probe_templates))
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


def test_probe_prompts_are_unique(suite):
    assert len({r["instruction"] for r in suite}) == len(suite)


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
