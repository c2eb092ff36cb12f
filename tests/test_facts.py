"""Facts checks against the travel knowledge base: extraction, the probe's metric and
failures, and facts accuracy in compare and diff."""

import copy
import json
import sys
from types import SimpleNamespace

import pytest

from test_compare import params_for, three_models
from test_probe import REPO, SCHEMA
from tuneline.contract import load_contract
from tuneline.params import parse_params
from tuneline.reporting import binary_outcomes
from tuneline.stages import probe
from tuneline.tasks import GENERIC, travel

KB = travel.fact_base((REPO / "data" / "seed" / "destinations.jsonl").resolve())


def krakow(items, payload_type="checklist", **payload):
    return {
        "summary": "Essentials for a trip to Kraków.",
        "assumptions": ["A stay of about a week."],
        "uncertainty_notes": [],
        "next_steps": ["Pack a day early."],
        "verification_steps": ["Check entry rules for your passport."],
        "payload_type": payload_type,
        "payload": {"destination": "Kraków", "items": items, **payload},
    }


def budget(destination, currency, daily="100-150"):
    return {
        "summary": f"Daily costs in {destination}.",
        "assumptions": [],
        "uncertainty_notes": [],
        "next_steps": [],
        "verification_steps": [f"Check today's exchange rate for {currency}."],
        "payload_type": "budget",
        "payload": {"destination": destination, "currency": currency,
                    "daily": {"budget": f"{daily} {currency}", "mid_range": f"200-350 {currency}"}, "tips": []},
    }


def test_the_right_currency_passes():
    result = KB.check(krakow(["Some Polish złoty (PLN) in cash", "Cards take zloty too"]), "Kraków")
    assert result == {"checked": 3, "wrong": []}
    assert KB.check(budget("Kraków", "PLN"), "Kraków") == {"checked": 4, "wrong": []}
    # a word that can mean several currencies is right when one of them is the destination's
    assert KB.check(krakow(["Cash in Canadian dollars"]), "Montreal")["wrong"] == []
    assert KB.check(krakow(["Some NZ dollar in cash"]), "Queenstown")["wrong"] == []


def test_euros_for_krakow_fail_naming_the_currency():
    result = KB.check(krakow(["Some euro (EUR) in cash and a bank card"]), "Kraków")
    assert result["checked"] == 2
    assert result["wrong"] == [
        {"kind": "currency", "stated": "euro", "expected": "PLN (Polish złoty)", "path": "$.payload.items[0]"},
        {"kind": "currency", "stated": "EUR", "expected": "PLN (Polish złoty)", "path": "$.payload.items[0]"},
    ]
    wrong = KB.check(budget("Kraków", "EUR"), "Kraków")["wrong"]
    assert {"kind": "currency", "stated": "EUR", "expected": "PLN (Polish złoty)", "path": "$.payload.currency"} in wrong
    # the structured field states a currency even when it names none the KB knows
    assert KB.check(budget("Amman", "SCD"), "Amman")["wrong"][-1]["stated"] == "SCD"


def test_a_wrong_country_fails_and_the_right_one_passes():
    ok = KB.check(krakow(["Poland uses the złoty"]), "Kraków")
    assert ok == {"checked": 2, "wrong": []}
    wrong = KB.check(krakow(["Kraków is the old capital of Germany"]), "Kraków")["wrong"]
    assert wrong == [{"kind": "country", "stated": "Germany", "expected": "Poland", "path": "$.payload.items[0]"}]


def test_languages_in_the_field_and_where_said_to_be_spoken():
    phrasebook = krakow([], "phrasebook")
    del phrasebook["payload"]["items"]
    phrasebook["payload"].update(language="Polish", phrases=[{"phrase": "Dzień dobry", "meaning": "Hello"}])
    phrasebook["assumptions"] = ["You speak little or no Polish."]
    assert KB.check(phrasebook, "Kraków") == {"checked": 2, "wrong": []}
    phrasebook["payload"]["language"] = "Czech"
    phrasebook["assumptions"] = ["You speak little or no Czech."]
    assert [(w["kind"], w["stated"], w["expected"]) for w in KB.check(phrasebook, "Kraków")["wrong"]] == [
        ("language", "Czech", "Polish"), ("language", "Czech", "Polish"),
    ]
    phrasebook["payload"]["language"] = "Kraków"  # a place is not a language
    assert KB.check(phrasebook, "Kraków")["wrong"][-1]["stated"] == "Kraków"
    assert KB.check({**phrasebook, "payload": {**phrasebook["payload"], "language": "Quebec french"}},
                    "Montreal")["wrong"][-1]["stated"] == "Czech"  # only the text's Czech is wrong there


def test_words_that_merely_contain_a_name_do_not_count():
    text = [
        "Europe's rail pass is not needed",      # not 'euro'
        "Polish your shoes; pack a Japanese-style fan",  # 'polish', a style: no language claim
        "Do you speak English? is a useful phrase",  # English only counts in the language field
        "Visit Insa-dong and the Won Buddhist temple",  # 'dong', 'won': not currencies alone
        "Try a real bagel",
        "A pound of coffee beans makes a good gift",  # a weight, not a currency
    ]
    assert KB.check(krakow(text), "Kraków") == {"checked": 0, "wrong": []}
    assert KB.check(krakow(["Some South Korean won (KRW)"]), "Seoul") == {"checked": 2, "wrong": []}


def test_an_unknown_destination_is_not_checked():
    assert KB.check(krakow(["Some euro (EUR)"]), "Atlantis") is None
    assert KB.check(krakow(["Some złoty"]), "Krakow")["wrong"] == []  # accents folded for the lookup


# -- the probe: samples, metric and failures --------------------------------------------

SUITE = [
    {"id": "k-checklist", "expect": {"payload_type": "checklist", "payload.destination": "Kraków"}},
    {"id": "k-budget", "expect": {"payload_type": "budget", "payload.destination": "Kraków"}},
    {"id": "k-plain", "expect": {"payload_type": "checklist", "payload.destination": "Kraków"}},
    {"id": "k-broken", "expect": {"payload_type": "checklist", "payload.destination": "Kraków"}},
]
OUTPUTS = [
    json.dumps(krakow(["Some euro (EUR) in cash and a bank card"])),
    json.dumps(budget("Kraków", "PLN")),
    json.dumps(krakow(["Comfortable walking shoes"])),  # states no checkable fact
    '{"summary": "Kraków',  # not parsed: not checked
]


def probe_samples(facts):
    contract = load_contract(SCHEMA)
    return [
        probe.make_sample("sft", line, "prompt", SimpleNamespace(text=text, finish_reason="eos", n_tokens=9),
                          contract, facts)
        for line, text in zip(SUITE, OUTPUTS, strict=True)
    ]


def test_probe_samples_metric_and_failures_carry_the_facts():
    samples = probe_samples(travel.fact_checker(parse_params({"paths": {"seed_dir": str(REPO / "data" / "seed")}})))
    assert [s["facts"] and s["facts"]["checked"] for s in samples] == [2, 4, 0, None]
    assert samples[0]["facts"]["wrong"][0] == {
        "kind": "currency", "stated": "euro", "expected": "PLN (Polish złoty)", "path": "$.payload.items[0]"}
    assert [binary_outcomes(s)["facts_accuracy"] for s in samples] == [False, True, None, None]
    metrics = probe.summarize(samples, [], 1.0)
    assert (metrics["facts_accuracy"], metrics["facts_checked"]) == (0.5, 2)  # 1 of the 2 samples checked
    groups = probe.group_failures(samples)
    facts = [g for g in groups if g.get("kind")]
    assert [(g["cause"], g["count"], g["ids"]) for g in facts] == [("wrong_currency", 1, ["k-checklist"])]
    assert facts[0]["top"] == [{"stated": "EUR", "expected": "PLN (Polish złoty)", "count": 1},
                               {"stated": "euro", "expected": "PLN (Polish złoty)", "count": 1}]
    assert facts[0]["examples"][0]["wrong"][0]["stated"] == "euro"


def test_a_task_without_knowledge_base_has_no_facts_at_all():
    assert GENERIC.facts is None
    samples = probe_samples(None)
    assert all("facts" not in s for s in samples)
    assert "facts_accuracy" not in probe.summarize(samples, [], 1.0)


# -- compare and diff --------------------------------------------------------------------


def add_facts(tmp_path, model, facts):
    """Give a written probe run's samples a ``facts`` field (``facts[i]``: None, True or False)."""
    path = tmp_path / "reports" / "probe" / "heldout" / f"{model}.samples.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    for s, f in zip(samples, facts, strict=True):
        s["facts"] = None if f is None else {"checked": 1, "wrong": [] if f else [
            {"kind": "currency", "stated": "EUR", "expected": "PLN (Polish złoty)", "path": "$.payload.currency"}]}
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))


def test_compare_reports_facts_accuracy_over_the_checked_samples(tmp_path):
    from tuneline.reporting import load_probe_run, output_paths
    from tuneline.stages import compare

    three_models(tmp_path)
    # base: nothing checked; sft: 20 checked, 5 right; dpo: the same 20 and 10 more, 22 right
    add_facts(tmp_path, "base", [None] * 60)
    add_facts(tmp_path, "sft", [i < 5 for i in range(20)] + [None] * 40)
    add_facts(tmp_path, "dpo", [i < 17 for i in range(20)] + [True] * 5 + [False] * 5 + [None] * 30)
    metrics = compare.run(params_for(tmp_path))["heldout"]
    assert metrics["base"]["facts_accuracy"] == {"rate": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
    assert (metrics["sft"]["facts_accuracy"]["k"], metrics["sft"]["facts_accuracy"]["n"]) == (5, 20)
    assert (metrics["dpo"]["facts_accuracy"]["k"], metrics["dpo"]["facts_accuracy"]["n"]) == (22, 30)
    paired = metrics["dpo_vs_sft"]["facts_accuracy"]  # over the 20 prompts checked for both
    assert (paired["n"], paired["only_model"], paired["only_other"]) == (20, 12, 0)
    assert "facts_accuracy" not in metrics["sft_vs_base"]  # no prompt checked in both
    md = (tmp_path / "reports" / "compare.md").read_text()
    assert "facts accuracy" in md and "n/a (n = 0)" in md and "(n = 20)" in md
    assert "| dpo vs sft | facts accuracy | +60.0 |" in md
    assert "facts accuracy" in (tmp_path / "reports" / "index.html").read_text()
    run = load_probe_run("sft", output_paths(params_for(tmp_path), "sft", "heldout"), "heldout")
    assert "facts_accuracy" in run.metric_names


@pytest.fixture
def facts_repo(tmp_path):
    import test_diff

    sh = test_diff.sh
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "git", "config", "user.email", "test@example.com")
    sh(tmp_path, "git", "config", "user.name", "test")
    sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    test_diff.write_probe(tmp_path, "sft", set(range(20)))
    add_facts(tmp_path, "sft", [i < 4 for i in range(10)] + [None] * 30)
    sh(tmp_path, "git", "add", ".")
    sh(tmp_path, "git", "commit", "-q", "-m", "v1")
    sh(tmp_path, "git", "tag", "v1")
    add_facts(tmp_path, "sft", [i < 9 for i in range(10)] + [True] * 5 + [None] * 25)
    test_diff.commit(tmp_path, "v2")
    return tmp_path


def test_diff_pairs_facts_accuracy_over_prompts_checked_in_both(facts_repo):
    from tuneline.diff import diff, short_rows, to_markdown

    result = diff(facts_repo, "v1", "HEAD", parse_params({}))
    sft = result["suites"]["heldout"]["models"]["sft"]
    facts = sft["facts_accuracy"]
    assert (facts["rate_a"], facts["rate_b"]) == (0.4, pytest.approx(14 / 15, abs=1e-6))
    assert (facts["n"], facts["only_a"], facts["only_b"]) == (10, 0, 5)
    assert facts["diff"] == pytest.approx(0.5)
    assert "| heldout | sft | facts accuracy (n=10) | 40.0% | 93.3% | +50.0 |" in to_markdown(result)
    assert short_rows(sft)[-1][0] == "facts (n=10)"


def test_probe_run_refuses_a_malformed_facts_field():
    from tuneline.errors import InputError

    sample = {"id": "x", "parsed": True, "valid": True, "finish_reason": "eos", "checks": {}, "facts": {"wrong": []}}
    with pytest.raises(InputError, match="facts must be null"):
        binary_outcomes(copy.deepcopy(sample))
