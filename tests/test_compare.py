import json

import pytest

from tuneline import stats
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.records import read_json, write_json, write_jsonl
from tuneline.stages import compare

SUITE_SHA = "a" * 64
CONTRACT_SHA = "c" * 64
ONE_SUITE = {"heldout": {"path": "data/seed/probe_suite.jsonl"}}


def outcomes(n, **ones):
    """Per-outcome 0/1 lists of length n: ``valid=range(...)`` marks the successes."""
    names = ("parsed", "valid", "payload_type", "destination", "truncated")
    return {name: [i in ones.get(name, ()) for i in range(n)] for name in names}


def write_run(tmp_path, model, flags, *, suite=SUITE_SHA, ids=None, legacy=False, name="heldout"):
    """A probe run on suite ``name`` in the probe's layout: rates in metrics, hashes in the
    model's run record (the suite's under ``suites.<name>``), failures grouped by cause
    (``legacy``: the hashes in metrics, as older revisions had)."""
    n = len(flags["parsed"])
    ids = ids or [f"q{i:03d}" for i in range(n)]
    samples = [
        {
            "id": ids[i],
            "model": model,
            "parsed": flags["parsed"][i],
            "valid": flags["valid"][i],
            "finish_reason": "length" if flags["truncated"][i] else "eos",
            "checks": {"payload_type": flags["payload_type"][i], "destination": flags["destination"][i]},
        }
        for i in range(n)
    ]
    write_jsonl(tmp_path / "reports" / "probe" / name / f"{model}.samples.jsonl", samples)
    failed = [ids[i] for i in range(n) if not flags["valid"][i]]
    groups = [{"id": "invalid_json", "cause": "invalid_json", "count": len(failed), "ids": failed,
               "examples": [{"id": failed[0], "output": f"<{model} said> not json"}]}] if failed else []
    write_jsonl(tmp_path / "reports" / "probe" / name / f"{model}.failures.jsonl", groups)
    hashes = {"suite_sha256": suite, "contract_sha256": CONTRACT_SHA}
    write_json(tmp_path / "metrics" / "probe" / name / f"{model}.json", {"n": n, **(hashes if legacy else {})})
    if not legacy:
        path = tmp_path / "reports" / "provenance" / "probe" / f"{model}.json"
        record = read_json(path) if path.is_file() else {"model": model, "contract_sha256": CONTRACT_SHA, "suites": {}}
        record["suites"][name] = {"suite_sha256": suite}
        write_json(path, record)


def params_for(tmp_path, **compare_overrides):
    return parse_params(
        {
            "seed": 7,
            "paths": {"metrics": str(tmp_path / "metrics"), "reports": str(tmp_path / "reports")},
            "probe": {"models": {"base": None, "sft": "models/sft", "dpo": "models/dpo"}, "suites": ONE_SUITE},
            "compare": {**compare_overrides},
        }
    )


def three_models(tmp_path, n=60):
    # base: 20 valid; sft: those 20 except 2, plus 10 more; dpo: everything sft has plus 15.
    base_valid = set(range(20))
    sft_valid = (base_valid - {0, 1}) | set(range(20, 30))
    dpo_valid = sft_valid | set(range(30, 45))
    write_run(tmp_path, "base", outcomes(n, parsed=range(40), valid=base_valid, payload_type=range(30),
                                         destination=range(25), truncated=range(50, 60)))
    write_run(tmp_path, "sft", outcomes(n, parsed=range(50), valid=sft_valid, payload_type=range(31),
                                        destination=range(25), truncated=range(55, 60)))
    write_run(tmp_path, "dpo", outcomes(n, parsed=range(n), valid=dpo_valid, payload_type=range(31),
                                        destination=range(26), truncated=()))


def test_compare_layout_and_known_values(tmp_path):
    three_models(tmp_path)
    metrics = compare.run(params_for(tmp_path))
    assert read_json(tmp_path / "metrics" / "compare.json") == json.loads(json.dumps(metrics))
    assert set(metrics) == {"heldout"}
    on_disk = read_json(tmp_path / "metrics" / "compare.json")["heldout"]

    for model in ("base", "sft", "dpo"):
        for metric in ("parse_rate", "schema_valid_rate", "payload_type_accuracy", "destination_accuracy",
                       "truncated_rate"):
            assert set(on_disk[model][metric]) >= {"rate", "ci_low", "ci_high"}
    rate, low, high = stats.wilson(20, 60)
    assert on_disk["base"]["schema_valid_rate"] == {
        "rate": pytest.approx(rate, abs=1e-6), "ci_low": pytest.approx(low, abs=1e-6),
        "ci_high": pytest.approx(high, abs=1e-6), "k": 20, "n": 60,
    }

    assert set(on_disk) >= {"sft_vs_base", "dpo_vs_base", "dpo_vs_sft"}
    valid = on_disk["sft_vs_base"]["schema_valid_rate"]
    assert (valid["only_model"], valid["only_other"], valid["n"]) == (10, 2, 60)
    assert valid["diff"] == pytest.approx(8 / 60, abs=1e-6)
    assert valid["p_value"] == pytest.approx(158 / 4096, abs=1e-6)  # exact McNemar, b=10, c=2
    assert valid["ci_low"] < valid["diff"] < valid["ci_high"]
    dpo_sft = on_disk["dpo_vs_sft"]["schema_valid_rate"]
    assert (dpo_sft["only_model"], dpo_sft["only_other"]) == (15, 0)
    assert dpo_sft["diff"] == pytest.approx(0.25) and dpo_sft["p_value"] == pytest.approx(2 * 0.5**15)
    _, low, high = stats.newcombe_paired(18, 10, 2, 30)  # both valid 18, only sft 10, only base 2, neither 30
    assert (valid["ci_low"], valid["ci_high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    same = on_disk["sft_vs_base"]["destination_accuracy"]
    assert (same["diff"], same["p_value"], same["only_model"], same["only_other"]) == (0.0, 1.0, 0, 0)
    _, low, high = stats.newcombe_paired(25, 0, 0, 35)
    assert (same["ci_low"], same["ci_high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    assert on_disk["suite_sha256"] == SUITE_SHA and on_disk["contract_sha256"] == CONTRACT_SHA


def test_compare_report_verdicts_power_note_and_plot(tmp_path):
    three_models(tmp_path)
    compare.run(params_for(tmp_path))
    report = (tmp_path / "reports" / "compare.md").read_text()
    verdicts = [line for line in report.splitlines() if line.startswith("- **")]
    assert len(verdicts) == 3
    sft_base = next(v for v in verdicts if v.startswith("- **sft vs base**"))
    assert "sft has a higher parse rate" in sft_base
    assert "a higher schema valid rate (+13.3 points, 95% CI [" in sft_base and "p = 0.039: better)" in sft_base
    assert "No significant difference in" in sft_base and "destination accuracy" in sft_base
    dpo_base = next(v for v in verdicts if v.startswith("- **dpo vs base**"))
    assert "a lower truncated rate (-16.7 points" in dpo_base and "p = 0.002: better)" in dpo_base
    dpo_sft = next(v for v in verdicts if v.startswith("- **dpo vs sft**"))
    assert "a higher schema valid rate (+25.0 points" in dpo_sft and "p < 0.001: better)" in dpo_sft
    assert "## heldout: Power" in report
    power = [line for line in report.splitlines() if line.startswith("- sft vs base: ")]
    assert power and power[0].startswith(
        '- sft vs base: "no significant difference" in payload type accuracy, destination accuracy, truncated rate '
        "is weak evidence: n = 60 detects a difference of about "
    )
    assert "parse rate" not in power[0].split("weak evidence")[0]
    assert "| base | 60 |" in report
    causes = sections(report)["## heldout: Failure causes (count of prompts)"]
    assert "| model | invalid_json |" in causes and "| base | 40 |" in causes and "| dpo | 17 |" in causes
    assert "![rates with intervals](compare_rates.png)" in report
    png = (tmp_path / "reports" / "compare_rates.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000


def test_compare_is_deterministic(tmp_path):
    three_models(tmp_path)
    params = params_for(tmp_path)
    compare.run(params)
    first = [(tmp_path / p).read_bytes() for p in ("metrics/compare.json", "reports/compare.md",
                                                   "reports/compare_rates.png")]
    compare.run(params)
    second = [(tmp_path / p).read_bytes() for p in ("metrics/compare.json", "reports/compare.md",
                                                    "reports/compare_rates.png")]
    assert first == second


def test_no_power_note_when_n_is_large(tmp_path):
    n = 400
    # models agree everywhere but on 10 prompts for validity: small discordance, large n
    for model, extra in (("base", set()), ("sft", set(range(200, 210))), ("dpo", set(range(200, 205)))):
        flags = outcomes(n, parsed=range(n), valid=set(range(200)) | extra, payload_type=range(n),
                         destination=range(n))
        write_run(tmp_path, model, flags)
    compare.run(params_for(tmp_path))
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "## heldout: Power" not in report
    assert "sft has a higher schema valid rate (+2.5 points" in report


def test_compare_refuses_another_models_samples(tmp_path):
    three_models(tmp_path)
    probe_dir = tmp_path / "reports" / "probe" / "heldout"
    (probe_dir / "dpo.samples.jsonl").write_bytes((probe_dir / "sft.samples.jsonl").read_bytes())
    with pytest.raises(InputError) as caught:
        compare.run(params_for(tmp_path))
    assert str(caught.value).startswith(
        f"{probe_dir / 'dpo.samples.jsonl'}:1: sample 'q000' is from model 'sft', expected 'dpo'"
    )
    assert caught.value.exit_code == 2
    assert not (tmp_path / "metrics" / "compare.json").exists()


def test_sample_order_does_not_change_anything(tmp_path):
    import random

    three_models(tmp_path)
    params = params_for(tmp_path)
    outputs = ("metrics/compare.json", "reports/compare.md")
    compare.run(params)
    before = {p: (tmp_path / p).read_bytes() for p in outputs}
    for model in ("dpo", "sft", "base"):
        path = tmp_path / "reports" / "probe" / "heldout" / f"{model}.samples.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        random.Random(model).shuffle(lines)
        path.write_text("".join(lines))
        compare.run(params)
        assert {p: (tmp_path / p).read_bytes() for p in outputs} == before, f"shuffled {model}"


@pytest.mark.parametrize("n", [1, 2])
def test_compare_at_tiny_n(tmp_path, n):
    write_run(tmp_path, "base", outcomes(n))
    write_run(tmp_path, "sft", outcomes(n, parsed=range(n), valid={0}))
    write_run(tmp_path, "dpo", outcomes(n, parsed=range(n), valid={0}))
    metrics = compare.run(params_for(tmp_path))["heldout"]
    for name in ("sft_vs_base", "dpo_vs_base", "dpo_vs_sft"):
        for s in metrics[name].values():
            assert -1.0 <= s["ci_low"] <= s["diff"] <= s["ci_high"] <= 1.0 and s["ci_low"] < s["ci_high"]
            assert s["p_value"] >= 0.5  # at most 2 discordant pairs
            if s["only_model"] + s["only_other"] == 0:
                assert s["p_value"] == 1.0
    same = metrics["dpo_vs_sft"]["schema_valid_rate"]
    assert (same["diff"], same["only_model"], same["only_other"]) == (0.0, 0, 0)
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert (f"- sft vs base: with n = {n} paired prompts no difference can be significant: the exact McNemar "
            "test needs at least 6 prompts on which the models disagree for p < 0.05. Raise the suite's limit in probe.suites.") in report
    assert "-0.0" not in report


def test_compare_refuses_different_suites(tmp_path):
    three_models(tmp_path)
    write_run(tmp_path, "dpo", outcomes(60), suite="b" * 64)
    with pytest.raises(InputError, match=r"different suite files .*dpo: bbbbbbbbbbbb"):
        compare.run(params_for(tmp_path))
    assert not (tmp_path / "metrics" / "compare.json").exists()


def test_compare_refuses_different_prompts(tmp_path):
    three_models(tmp_path)
    write_run(tmp_path, "sft", outcomes(60), ids=[f"x{i:03d}" for i in range(60)])
    with pytest.raises(InputError, match=r"sft and base were probed on different prompts"):
        compare.run(params_for(tmp_path))


def test_compare_names_a_missing_probe_run(tmp_path):
    three_models(tmp_path)
    (tmp_path / "reports" / "probe" / "heldout" / "dpo.samples.jsonl").unlink()
    with pytest.raises(InputError, match=r"heldout/dpo.samples.jsonl: file not found"):
        compare.run(params_for(tmp_path))


def test_pairs_param_adds_comparisons(tmp_path):
    three_models(tmp_path)
    params = params_for(tmp_path, baseline="sft", pairs=[["dpo", "base"]])
    assert compare.comparisons(params) == [("base", "sft"), ("dpo", "sft"), ("dpo", "base")]
    metrics = compare.run(params)["heldout"]
    assert {"base_vs_sft", "dpo_vs_sft", "dpo_vs_base"} <= set(metrics)
    assert "sft_vs_base" not in metrics


def test_single_model_report_has_rates_only(tmp_path):
    write_run(tmp_path, "base", outcomes(10, parsed=range(5), valid=range(3)))
    params = parse_params(
        {
            "paths": {"metrics": str(tmp_path / "metrics"), "reports": str(tmp_path / "reports")},
            "probe": {"models": {"base": None}, "suites": ONE_SUITE},
            "compare": {"pairs": []},
        }
    )
    metrics = compare.run(params)["heldout"]
    assert set(metrics) == {"base", "suite_sha256", "contract_sha256"}
    report = (tmp_path / "reports" / "compare.md").read_text()
    assert "Nothing to compare" in report and "Paired differences" not in report
    assert "| base | 10 | 50.0% [" in report


def sections(markdown):
    """Markdown split at ``## `` headings: {heading: lines}."""
    out, current = {}, "#"
    for line in markdown.splitlines():
        if line.startswith("## "):
            current = line
        out.setdefault(current, []).append(line)
    return out


def test_committed_report_is_what_compare_makes_from_the_committed_probe_outputs(tmp_path):
    """The committed compare outputs, regenerated from the committed probe outputs: the
    markdown byte for byte and the metrics exactly (but provenance); the paired intervals
    are also checked against ``stats.newcombe_paired`` on the committed counts."""
    import shutil
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    data["paths"] = {**data.get("paths", {}), "metrics": str(tmp_path / "metrics"),
                     "reports": str(tmp_path / "reports")}
    # the models and suites the committed probe outputs cover
    probed = repo / "metrics" / "probe"
    data["probe"]["suites"] = {s: v for s, v in data["probe"]["suites"].items() if (probed / s).is_dir()}
    data["probe"]["models"] = {m: v for m, v in data["probe"]["models"].items()
                               if all((probed / s / f"{m}.json").is_file() for s in data["probe"]["suites"])}
    assert data["probe"]["suites"] and len(data["probe"]["models"]) >= 2
    shutil.copytree(repo / "metrics" / "probe", tmp_path / "metrics" / "probe")
    shutil.copytree(repo / "reports" / "probe", tmp_path / "reports" / "probe")
    shutil.copytree(repo / "reports" / "provenance" / "probe", tmp_path / "reports" / "provenance" / "probe")
    for stage in ("sft", "dpo"):
        shutil.copytree(repo / "metrics" / stage, tmp_path / "metrics" / stage)
        shutil.copy(repo / "reports" / "provenance" / f"{stage}.json", tmp_path / "reports" / "provenance")
    metrics = compare.run(parse_params(data))
    committed = read_json(repo / "metrics" / "compare.json")
    made = json.loads(json.dumps(metrics))
    assert made == committed
    for name in ("compare_rates.json", "index.html"):
        assert (tmp_path / "reports" / name).read_text() == (repo / "reports" / name).read_text(), name
    for suite, key, value in [(suite, k, v) for suite, section in committed.items() for k, v in section.items()]:
        if "_vs_" not in key:
            continue
        rates = made[suite][key.split("_vs_")[0]]
        for metric, s in value.items():
            n, only_model, only_other = s["n"], s["only_model"], s["only_other"]
            if rates[metric]["n"] != n:  # facts accuracy: paired over the prompts checked in both (test_facts)
                continue
            both = rates[metric]["k"] - only_model
            _, low, high = stats.newcombe_paired(both, only_model, only_other, n - both - only_model - only_other)
            assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    assert (tmp_path / "reports" / "compare.md").read_text() == (repo / "reports" / "compare.md").read_text()


def test_failure_causes_missing_on_one_side_are_zero_and_ok_is_not_a_cause(tmp_path):
    three_models(tmp_path)
    groups = [{"id": "truncated", "cause": "truncated", "count": 2, "ids": ["q001", "q002"], "examples": []}]
    write_jsonl(tmp_path / "reports" / "probe" / "heldout" / "sft.failures.jsonl", groups)
    compare.run(params_for(tmp_path))
    causes = sections((tmp_path / "reports" / "compare.md").read_text())["## heldout: Failure causes (count of prompts)"]
    assert "| model | invalid_json | truncated |" in causes
    assert "| base | 40 | 0 |" in causes and "| sft | 0 | 2 |" in causes and "| dpo | 17 | 0 |" in causes
    assert "ok" not in " ".join(causes)


def test_hashes_in_legacy_metrics_are_still_read(tmp_path):
    """Older revisions kept the suite and contract hashes in the probe metrics."""
    write_run(tmp_path, "base", outcomes(10, parsed=range(5), valid=range(3)), legacy=True)
    write_run(tmp_path, "sft", outcomes(10, parsed=range(9), valid=range(8)), legacy=True)
    params = parse_params({"paths": {"metrics": str(tmp_path / "metrics"), "reports": str(tmp_path / "reports")},
                           "probe": {"models": {"base": None, "sft": "models/sft"}, "suites": ONE_SUITE},
                           "compare": {"pairs": []}})
    assert compare.run(params)["heldout"]["suite_sha256"] == SUITE_SHA


def test_compare_writes_rate_plot_data_run_record_and_a_self_contained_page(tmp_path):
    three_models(tmp_path)
    log = tmp_path / "metrics" / "sft" / "plots" / "metrics"
    (log / "eval").mkdir(parents=True)
    (log / "loss.tsv").write_text("step\tloss\n1\t2.5\n2\t1.5\n3\t1.0\n")
    (log / "eval" / "loss.tsv").write_text("step\tloss\n3\t1.25\n")
    write_json(tmp_path / "reports" / "provenance" / "sft.json", {"run": {"plan": {"optimizer_steps": 3}}})
    params = params_for(tmp_path)
    metrics = compare.run(params)
    assert "provenance" not in metrics and "git" not in json.dumps(metrics)
    record = read_json(tmp_path / "reports" / "provenance" / "compare.json")
    assert record["stage"] == "compare" and "git" in record and record["confidence"] == 0.95
    rows = read_json(tmp_path / "reports" / "compare_rates.json")
    assert len(rows) == 3 * 5 and {"suite", "model", "outcome", "rate", "ci_low", "ci_high"} == set(rows[0])
    assert {(r["model"], r["outcome"]): r["rate"] for r in rows}[("dpo", "parse rate")] == 1.0
    page = (tmp_path / "reports" / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") == 2  # rates; sft losses (dpo has no log here)
    assert "sft train" in page and "sft eval" in page and "optimizer_steps" in page
    assert 'href="probe/heldout/base.samples.jsonl"' in page and "&lt;dpo said&gt; not json" in page
    assert "<td>base</td><td class=\"num\">40</td>" in page  # the failure cause table
    first = page
    compare.run(params)
    assert (tmp_path / "reports" / "index.html").read_text() == first


def test_a_malformed_loss_log_is_refused_with_its_line(tmp_path):
    three_models(tmp_path)
    log = tmp_path / "metrics" / "dpo" / "plots" / "metrics"
    log.mkdir(parents=True)
    (log / "loss.tsv").write_text("step\tloss\n1\t0.69\n2\tnan?\n")
    with pytest.raises(InputError, match=r"dpo/plots/metrics/loss\.tsv:3: expected step<TAB>value"):
        compare.run(params_for(tmp_path))


def test_a_guided_row_is_paired_with_its_free_row_and_its_decode_time_shown_beside_it():
    from tuneline.reporting import speed_section
    from tuneline.stages.compare import comparisons

    params = parse_params({"compare": {"pairs": []}, "probe": {"models": {"base": "models/base", "dpo": "models/dpo",
                                                "dpo+guided": "models/dpo"}}})
    assert ("dpo+guided", "dpo") in comparisons(params)
    lonely = parse_params({"probe": {"models": {"base": "models/base", "sft+guided": "models/sft"}},
                           "compare": {"pairs": []}})
    assert comparisons(lonely) == [("sft+guided", "base")]
    lines = speed_section({"dpo": {"generation_s": 80.0, "tokens_per_s": 50.0, "mean_new_tokens": 70.0},
                           "dpo+guided": {"generation_s": 100.0, "tokens_per_s": 42.0, "mean_new_tokens": 70.0}})
    assert "| dpo+guided | 100.0 | 42.0 | 70.0 | 1.25x the time |" in lines
    assert "| dpo | 80.0 | 50.0 | 70.0 | — |" in lines


def test_every_suite_is_compared_on_its_own(tmp_path):
    """Two suites: compare.json, compare.md, the plot data and the page have each suite's
    rates, differences and verdicts; a suite of other prompts and hash is no conflict."""
    three_models(tmp_path)
    for model, valid in (("base", range(2)), ("sft", range(10)), ("dpo", range(12))):
        write_run(tmp_path, model, outcomes(12, parsed=range(12), valid=valid), name="natural", suite="d" * 64,
                  ids=[f"natural-{i}" for i in range(12)])
    params = parse_params({
        "paths": {"metrics": str(tmp_path / "metrics"), "reports": str(tmp_path / "reports")},
        "probe": {"models": {"base": None, "sft": "models/sft", "dpo": "models/dpo"},
                  "suites": {**ONE_SUITE, "natural": {"path": "data/seed/natural_suite.jsonl", "limit": 12}}},
    })
    metrics = compare.run(params)
    assert list(metrics) == ["heldout", "natural"]
    assert metrics["natural"]["suite_sha256"] == "d" * 64 and metrics["heldout"]["suite_sha256"] == SUITE_SHA
    assert metrics["natural"]["sft_vs_base"]["schema_valid_rate"]["n"] == 12
    assert metrics["heldout"]["sft_vs_base"]["schema_valid_rate"]["n"] == 60
    report = (tmp_path / "reports" / "compare.md").read_text()
    for suite in ("heldout", "natural"):
        assert f"# Suite `{suite}`" in report and f"## {suite}: Verdicts" in report
        assert f"## {suite}: Rates (95% Wilson interval)" in report
    natural = report.split("# Suite `natural`")[1]
    assert "| base | 12 | 100.0% [" in natural and "sft has a higher schema valid rate (+66.7 points" in natural
    rows = read_json(tmp_path / "reports" / "compare_rates.json")
    assert {r["suite"] for r in rows} == {"heldout", "natural"} and len(rows) == 2 * 3 * 5
    page = (tmp_path / "reports" / "index.html").read_text()
    assert 'id="suite-natural"' in page and 'href="probe/natural/dpo.samples.jsonl"' in page
    assert page.count("<svg") == 2  # rates per suite; no loss log here

    (tmp_path / "reports" / "probe" / "natural" / "dpo.samples.jsonl").unlink()
    with pytest.raises(InputError, match=r"natural/dpo.samples.jsonl: file not found"):
        compare.run(params)
