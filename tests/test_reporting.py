import pytest

from tuneline import reporting, stats
from tuneline.errors import InputError
from tuneline.params import parse_params

HASHES = {"suite_sha256": "a" * 64, "contract_sha256": "c" * 64}


def sample(i, *, valid=True, parsed=True, destination=True, finish="eos", **extra):
    return {"id": f"q{i}", "model": "m", "parsed": parsed, "valid": valid, "finish_reason": finish,
            "checks": {"destination": destination}, **extra}


def run_of(name, valid_ids, n=12, metrics=None):
    samples = [sample(i, valid=i in valid_ids) for i in range(n)]
    return reporting.probe_run_from_records(name, metrics or dict(HASHES), samples, f"{name}.samples.jsonl")


def test_binary_outcomes_one_per_check_and_truncation_from_finish_reason():
    assert reporting.binary_outcomes(sample(0, valid=False, destination=False, finish="length")) == {
        "parse_rate": True, "schema_valid_rate": False, "destination_accuracy": False, "truncated_rate": True,
    }


def test_output_paths_are_the_probe_layout(tmp_path):
    params = parse_params({"paths": {"metrics": str(tmp_path / "m"), "reports": str(tmp_path / "r")}})
    paths = reporting.output_paths(params, "sft")
    assert paths == reporting.ProbePaths(
        metrics=tmp_path / "m" / "probe" / "sft.json",
        samples=tmp_path / "r" / "probe" / "sft.samples.jsonl",
        failures=tmp_path / "r" / "probe" / "sft.failures.jsonl",
    )


def test_a_run_must_use_one_set_of_checks_and_unique_ids():
    mixed = [sample(0), {**sample(1), "checks": {"payload_type": True}}]
    with pytest.raises(InputError, match=r"^s\.jsonl:2: sample 'q1' has outcomes .*one set of checks"):
        reporting.probe_run_from_records("m", HASHES, mixed, "s.jsonl")
    with pytest.raises(InputError, match=r"^s\.jsonl:2: duplicate sample id 'q0'"):
        reporting.probe_run_from_records("m", HASHES, [sample(0), sample(0)], "s.jsonl")
    with pytest.raises(InputError, match=r"^s\.jsonl: no samples"):
        reporting.probe_run_from_records("m", HASHES, [], "s.jsonl")
    with pytest.raises(InputError, match=r"lack 'contract_sha256'; re-run the probe stage"):
        reporting.probe_run_from_records("m", {"suite_sha256": "a" * 64}, [sample(0)], "s.jsonl")


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
    diff = reporting.paired_stats(model, base, n_resamples=200, seed=0, conf=0.95)["schema_valid_rate"]
    assert (diff["diff"], diff["only_model"], diff["only_other"], diff["n"]) == (0.0, 2, 2, 12)
    assert diff["p_value"] == 1.0
    hashes, rates, diffs = reporting.compare_runs({"base": base, "model": model}, [("model", "base")],
                                                  n_resamples=200, seed=0, conf=0.95)
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


def test_power_note_only_when_n_is_too_small():
    small = {"schema_valid_rate": {"only_model": 3, "only_other": 1, "n": 20}}
    note = reporting.power_note("sft", "base", small, min_effect=0.1, power=0.8, conf=0.95)
    assert note.startswith("sft vs base: n = 20 is too small to detect a 10.0-point difference at 80% power")
    large = {"schema_valid_rate": {"only_model": 3, "only_other": 1, "n": 5000}}
    assert reporting.power_note("sft", "base", large, min_effect=0.1, power=0.8, conf=0.95) is None


def test_markdown_without_plot_or_causes():
    runs = {"base": run_of("base", range(3)), "sft": run_of("sft", range(6))}
    hashes, rates, diffs = reporting.compare_runs(runs, [("sft", "base")], n_resamples=100, seed=0, conf=0.9)
    text = reporting.render_markdown(rates, diffs, hashes, conf=0.9, min_effect=0.1, power=0.8, plot_name=None)
    assert "## Rates (90% Wilson interval)" in text and "| sft vs base | schema valid rate | +25.0 |" in text
    assert "![" not in text and "Failure causes" not in text
    assert reporting.failure_causes(run_of("x", [], metrics={**HASHES, "failure_causes": {"ok": 3, "b": 1, "a": 1,
                                                                                          "z": 4}})) == {
        "z": 4, "a": 1, "b": 1}
