import pytest

from tuneline import reporting, stats
from tuneline.errors import InputError
from tuneline.params import parse_params

HASHES = {"suite_sha256": "a" * 64, "contract_sha256": "c" * 64}


def sample(i, *, valid=True, parsed=True, destination=True, finish="eos", model="m", **extra):
    return {"id": f"q{i}", "model": model, "parsed": parsed, "valid": valid, "finish_reason": finish,
            "checks": {"destination": destination}, **extra}


def run_of(name, valid_ids, n=12, metrics=None):
    samples = [sample(i, valid=i in valid_ids, model=name) for i in range(n)]
    return reporting.probe_run_from_records(name, metrics or dict(HASHES), samples, f"{name}.samples.jsonl")


def test_binary_outcomes_one_per_check_and_truncation_from_finish_reason():
    assert reporting.binary_outcomes(sample(0, valid=False, destination=False, finish="length")) == {
        "parse_rate": True, "schema_valid_rate": False, "destination_accuracy": False, "truncated_rate": True,
    }


def test_output_paths_are_the_probe_layout(tmp_path):
    params = parse_params({"paths": {"metrics": str(tmp_path / "m"), "reports": str(tmp_path / "r")}})
    paths = reporting.output_paths(params, "sft", "natural")
    assert paths == reporting.ProbePaths(
        metrics=tmp_path / "m" / "probe" / "natural" / "sft.json",
        samples=tmp_path / "r" / "probe" / "natural" / "sft.samples.jsonl",
        failures=tmp_path / "r" / "probe" / "natural" / "sft.failures.jsonl",
        provenance=tmp_path / "r" / "provenance" / "probe" / "sft.json",  # one run record for every suite
    )


def test_a_run_must_use_one_set_of_checks_and_unique_ids():
    mixed = [sample(0), {**sample(1), "checks": {"payload_type": True}}]
    with pytest.raises(InputError, match=r"^s\.jsonl:2: sample 'q1' has outcomes .*one set of checks"):
        reporting.probe_run_from_records("m", HASHES, mixed, "s.jsonl")
    with pytest.raises(InputError, match=r"^s\.jsonl:2: duplicate sample id 'q0'"):
        reporting.probe_run_from_records("m", HASHES, [sample(0), sample(0)], "s.jsonl")
    with pytest.raises(InputError, match=r"^s\.jsonl: no samples"):
        reporting.probe_run_from_records("m", HASHES, [], "s.jsonl")
    with pytest.raises(InputError, match=r"nor its run record has 'contract_sha256'; re-run the probe stage"):
        reporting.probe_run_from_records("m", {"suite_sha256": "a" * 64}, [sample(0)], "s.jsonl")


def test_a_run_refuses_samples_of_another_model():
    copied = [sample(0, model="sft"), sample(1, model="sft")]
    with pytest.raises(InputError, match=r"^dpo\.samples\.jsonl:1: sample 'q0' is from model 'sft', expected 'dpo'"):
        reporting.probe_run_from_records("dpo", HASHES, copied, "dpo.samples.jsonl")
    mixed = [sample(0, model="dpo"), sample(1, model="dpo"), sample(2, model="base")]
    with pytest.raises(InputError, match=r"^d\.jsonl:3: sample 'q2' is from model 'base', expected 'dpo'"):
        reporting.probe_run_from_records("dpo", HASHES, mixed, "d.jsonl")


def test_parse_samples_names_source_and_line():
    good = '{"id": "q0", "model": "m", "parsed": true, "valid": true, "finish_reason": "eos", "checks": {}}'
    assert [r["id"] for r in reporting.parse_samples(good + "\n\n" + good.replace("q0", "q1"), "v1:s")] == ["q0", "q1"]
    with pytest.raises(InputError, match=r"^v1:s:2: invalid JSON"):
        reporting.parse_samples(good + "\n{not json", "v1:s")
    with pytest.raises(InputError, match=r"^v1:s:1: field 'valid' missing"):
        reporting.parse_samples(good.replace('"valid": true, ', ""), "v1:s")


def test_runs_on_other_prompts_or_inputs_are_refused():
    a, b = run_of("a", range(6)), run_of("b", range(6), n=10)
    with pytest.raises(InputError, match=r"a and b were probed on different prompts \(2 only in a\.samples"):
        reporting.aligned(a, b)
    other = run_of("c", range(6), metrics={**HASHES, "contract_sha256": "d" * 64})
    with pytest.raises(InputError, match=r"different contract files \(contract_sha256 a: cccccccccccc, c: dddd"):
        reporting.check_same_inputs({"a": a, "c": other})


def test_rates_and_paired_differences_known_values():
    base, model = run_of("base", range(2, 6)), run_of("model", range(0, 4))  # only model: 0,1; only base: 4,5
    rate = reporting.rate_stats(base, conf=0.95)["schema_valid_rate"]
    w = stats.wilson(4, 12)
    assert (rate["k"], rate["n"]) == (4, 12) and rate["ci_low"] == pytest.approx(w[1], abs=1e-6)
    diff = reporting.paired_stats(model, base, conf=0.95)["schema_valid_rate"]
    assert (diff["diff"], diff["only_model"], diff["only_other"], diff["n"]) == (0.0, 2, 2, 12)
    assert diff["p_value"] == 1.0
    _, low, high = stats.newcombe_paired(2, 2, 2, 6)
    assert (diff["ci_low"], diff["ci_high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    hashes, rates, diffs = reporting.compare_runs({"base": base, "model": model}, [("model", "base")], conf=0.95)
    assert hashes == HASHES and list(rates) == ["base", "model"] and diffs[("model", "base")]["schema_valid_rate"] == diff


def test_verdict_says_better_for_fewer_truncations():
    per_metric = {
        "schema_valid_rate": {"diff": 0.0, "ci_low": -0.1, "ci_high": 0.1, "p_value": 1.0, "n": 60},
        "truncated_rate": {"diff": -0.2, "ci_low": -0.3, "ci_high": -0.1, "p_value": 0.0004, "n": 60},
    }
    text = reporting.verdict("dpo", "base", per_metric, conf=0.95)
    assert text == (
        "**dpo vs base** (n = 60 paired prompts): dpo has a lower truncated rate (-20.0 points, 95% CI "
        "[-30.0, -10.0], p < 0.001: better). No significant difference in schema valid rate "
        "(exact McNemar, alpha = 0.05)."
    )


def stat(only_model, only_other, n):
    return {"only_model": only_model, "only_other": only_other, "n": n, "diff": (only_model - only_other) / n,
            "p_value": stats.mcnemar_exact(only_model, only_other)}


def test_power_note_only_for_differences_that_were_not_significant():
    # Huge, significant differences at n = 60 (p ~ 1e-16) are not "underpowered".
    significant = {"parse_rate": stat(53, 0, 60), "truncated_rate": stat(3, 36, 60)}
    assert reporting.power_note("sft", "base", significant, min_effect=0.1, power=0.8, conf=0.95) is None
    # Not significant: the note says what this n detects, and the planning rate it assumed.
    mixed = {"parse_rate": stat(53, 0, 60), "schema_valid_rate": stat(3, 1, 60), "destination_accuracy": stat(1, 1, 60)}
    note = reporting.power_note("dpo", "sft", mixed, min_effect=0.1, power=0.8, conf=0.95)
    psi = stats.wilson(4, 60)[2]
    detectable = stats.mcnemar_detectable_difference(60, psi)
    assert note == (
        'dpo vs sft: "no significant difference" in schema valid rate, destination accuracy is weak evidence: '
        f"n = 60 detects a difference of about {detectable * 100:.1f} points at 80% power, and a 10.0-point "
        f"difference needs about {stats.mcnemar_sample_size(0.1, psi)} prompts (planned with a discordant rate "
        f"of {psi:.2f}: the upper 95% Wilson bound of the 4/60 prompts on which the models disagree in schema "
        "valid rate)."
    )
    assert "parse rate" not in note
    # Enough prompts for the 10-point difference: no note.
    assert reporting.power_note("a", "b", {"parse_rate": stat(3, 1, 5000)}, min_effect=0.1, power=0.8,
                                conf=0.95) is None
    # Agreement everywhere: the planning rate is floored at the difference itself.
    floor = reporting.power_note("a", "b", {"parse_rate": stat(0, 0, 30)}, min_effect=0.1, power=0.8, conf=0.95)
    assert "a discordant rate of 0.11: the upper 95% Wilson bound of the 0/30" in floor


def test_power_note_when_no_difference_can_be_significant():
    for n in (1, 2, 5):
        note = reporting.power_note("a", "b", {"parse_rate": stat(min(n, 1), 0, n)}, min_effect=0.1, power=0.8,
                                    conf=0.95)
        assert note == (
            f"a vs b: with n = {n} paired prompts no difference can be significant: the exact McNemar test needs "
            "at least 6 prompts on which the models disagree for p < 0.05. Raise the suite's limit in probe.suites."
        )


def test_paired_stats_at_tiny_n_and_identical_outcomes():
    for n in (1, 2):
        a, b = run_of("a", {0}, n=n), run_of("b", set(), n=n)
        s = reporting.paired_stats(a, b, conf=0.95)["schema_valid_rate"]
        assert s["p_value"] == 1.0 and s["diff"] == pytest.approx(1 / n)
        assert -1.0 <= s["ci_low"] < s["diff"] <= s["ci_high"] <= 1.0
    same = reporting.paired_stats(run_of("a", {0, 3}), run_of("b", {0, 3}), conf=0.95)
    for s in same.values():
        assert (s["diff"], s["p_value"], s["only_model"], s["only_other"]) == (0.0, 1.0, 0, 0)
        assert s["ci_low"] < 0 < s["ci_high"] and s["ci_low"] == -s["ci_high"]


def test_points_never_negative_zero():
    assert reporting.signed_points(-0.0) == "+0.0"
    assert reporting.signed_points(-0.0004) == "+0.0"
    assert reporting.signed_points(-0.0006) == "-0.1"
    assert reporting.points(-0.0) == "0.0"
    assert reporting.interval_points(-0.0003, 0.1) == "[+0.0, +10.0]"
    assert str(reporting._r(-0.0)) == "0.0"


def test_markdown_without_plot_or_causes():
    runs = {"base": run_of("base", range(3)), "sft": run_of("sft", range(6))}
    hashes, rates, diffs = reporting.compare_runs(runs, [("sft", "base")], conf=0.9)
    text = reporting.render_markdown(rates, diffs, hashes, conf=0.9, min_effect=0.1, power=0.8, plot_name=None)
    assert "## Rates (90% Wilson interval)" in text and "| sft vs base | schema valid rate | +25.0 |" in text
    assert "![" not in text and "Failure causes" not in text
    groups = [{"cause": c, "count": n} for c, n in {"ok": 3, "b": 1, "a": 1, "z": 4}.items()]
    assert reporting.failure_causes(groups) == {"z": 4, "a": 1, "b": 1}
    assert reporting.cause_table({"m": {"z": 4}, "o": {"a": 1}}) == {"m": {"z": 4, "a": 0}, "o": {"z": 0, "a": 1}}
