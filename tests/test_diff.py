import json
import os
import subprocess
import sys

import pytest

from tuneline import stats
from tuneline.diff import diff, rows, table, to_json, to_markdown
from tuneline.errors import InputError
from tuneline.params import parse_params
from tuneline.records import write_json, write_jsonl

N = 40
SUITE = "5" * 64
CONTRACT = "c" * 64
PARAMS = parse_params({})


def sh(repo, *cmd):
    return subprocess.run(cmd, cwd=repo, check=True, capture_output=True, text=True).stdout


def write_probe(repo, model, valid, *, suite=SUITE, name="heldout", legacy=False):
    """One model's probe on suite ``name`` in the probe's layout (hashes in the run record;
    ``legacy``: the flat layout of one suite per probe, hashes in the metrics)."""
    samples = [
        {
            "id": f"probe-{i:02d}",
            "model": model,
            "parsed": True,
            "valid": i in valid,
            "finish_reason": "eos",
            "checks": {"destination": i < 30},
        }
        for i in range(N)
    ]
    if legacy:
        write_jsonl(repo / "reports" / "probe" / f"{model}.samples.jsonl", samples)
        write_json(repo / "metrics" / "probe" / f"{model}.json",
                   {"n": N, "suite_sha256": suite, "contract_sha256": CONTRACT})
        return
    write_jsonl(repo / "reports" / "probe" / name / f"{model}.samples.jsonl", samples)
    write_json(repo / "metrics" / "probe" / name / f"{model}.json", {"n": N})
    path = repo / "reports" / "provenance" / "probe" / f"{model}.json"
    record = json.loads(path.read_text()) if path.is_file() else {"contract_sha256": CONTRACT, "suites": {}}
    record["suites"][name] = {"suite_sha256": suite}
    write_json(path, record)


def commit(repo, message):
    sh(repo, "git", "add", "metrics", "reports")
    sh(repo, "git", "commit", "-q", "-m", message)


@pytest.fixture
def repo(tmp_path):
    sh(tmp_path, "git", "init", "-q")
    sh(tmp_path, "git", "config", "user.email", "test@example.com")
    sh(tmp_path, "git", "config", "user.name", "test")
    sh(tmp_path, sys.executable, "-m", "dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("compare:\n  confidence: 0.95\n")
    write_probe(tmp_path, "base", set(range(10)))
    write_probe(tmp_path, "sft", set(range(20)))
    sh(tmp_path, "git", "add", ".")
    sh(tmp_path, "git", "commit", "-q", "-m", "v1")
    sh(tmp_path, "git", "tag", "v1")
    # v2: sft gains 12 prompts and loses 2; base unchanged
    write_probe(tmp_path, "sft", (set(range(20)) - {0, 1}) | set(range(20, 32)))
    commit(tmp_path, "v2")
    return tmp_path


def test_diff_two_commits(repo):
    result = diff(repo, "v1", "HEAD", PARAMS)
    assert result["a"]["rev"] == "v1" and result["b"]["sha"] == sh(repo, "git", "rev-parse", "HEAD").strip()
    heldout = result["suites"]["heldout"]
    assert heldout["suite_sha256"] == SUITE and heldout["contract_sha256"] == CONTRACT
    sft = heldout["models"]["sft"]["schema_valid_rate"]
    assert (sft["rate_a"], sft["rate_b"]) == (0.5, 0.75)
    assert (sft["only_a"], sft["only_b"], sft["n"]) == (2, 12, N)
    assert sft["diff"] == pytest.approx(0.25)
    assert sft["p_value"] == pytest.approx(stats.mcnemar_exact(12, 2), rel=1e-5)
    _, low, high = stats.newcombe_paired(18, 12, 2, 8)  # both 18, only B 12, only A 2, neither 8
    assert (sft["ci_low"], sft["ci_high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    base = heldout["models"]["base"]["schema_valid_rate"]
    assert (base["diff"], base["p_value"]) == (0.0, 1.0)
    assert set(heldout["models"]["sft"]) == {
        "parse_rate", "schema_valid_rate", "destination_accuracy", "truncated_rate",
    }
    # reversed order flips the sign and swaps the discordant counts
    back = diff(repo, "HEAD", "v1", PARAMS)["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]
    assert back["diff"] == pytest.approx(-0.25) and (back["only_a"], back["only_b"]) == (12, 2)
    assert json.loads(to_json(result)) == json.loads(json.dumps(result))
    md = to_markdown(result)
    assert "| heldout | sft | schema valid rate | 50.0% | 75.0% | +25.0 |" in md
    assert "A = v1" in md


def test_diff_dvc_experiment_and_workspace(repo):
    write_probe(repo, "sft", set(range(36)))
    sh(repo, sys.executable, "-m", "dvc", "exp", "save", "-q", "-n", "v3")
    result = diff(repo, "HEAD", "v3", PARAMS)
    assert result["b"]["sha"] != sh(repo, "git", "rev-parse", "HEAD").strip()
    assert result["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]["diff"] == pytest.approx(6 / N)
    write_probe(repo, "sft", set(range(4)))
    ws = diff(repo, "v3", "workspace", PARAMS)
    assert ws["b"]["sha"] is None
    assert ws["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]["diff"] == pytest.approx(-32 / N)


def test_diff_refuses_different_suites(repo):
    write_probe(repo, "sft", set(range(20)), suite="9" * 64)
    commit(repo, "new suite")
    with pytest.raises(InputError, match=r"different suite files .*v1:sft: 555555555555.*HEAD:sft: 999999999999"):
        diff(repo, "v1", "HEAD", PARAMS)
    cli = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "diff", "v1", "HEAD"], cwd=repo, capture_output=True, text=True
    )
    assert cli.returncode == 2
    assert "different suite files" in cli.stderr


def test_diff_unknown_revision_and_missing_results(repo):
    with pytest.raises(InputError, match=r"revision 'nope'"):
        diff(repo, "v1", "nope", PARAMS)
    sh(repo, "git", "rm", "-q", "-r", "metrics")
    sh(repo, "git", "commit", "-q", "-m", "drop metrics")
    with pytest.raises(InputError, match=r"HEAD: no probe results under metrics/probe/"):
        diff(repo, "v1", "HEAD", PARAMS)


def test_diff_cli_formats(repo):
    as_json = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "diff", "v1", "HEAD", "--json"],
        cwd=repo, capture_output=True, text=True, check=True,
    )
    data = json.loads(as_json.stdout)
    assert data["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]["only_b"] == 12
    table = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "diff", "v1", "HEAD"],
        cwd=repo, capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "160"},
    )
    assert "schema valid" in table.stdout and "+25.0" in table.stdout


def test_diff_table_fits_80_columns_and_never_prints_negative_zero(repo):
    from rich.console import Console

    result = diff(repo, "v1", "HEAD", PARAMS)
    # a zero difference whose interval bound rounds to zero from below
    result["suites"]["heldout"]["models"]["base"]["parse_rate"].update(diff=-0.0, ci_low=-0.0004, ci_high=0.0003)
    console = Console(width=80, record=True, color_system=None)
    console.print(table(result))
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "-0.0" not in text and "-0.0" not in to_markdown(result)
    # one prompt's statistics stay on one line: label, both rates, diff, interval, p, discordant counts
    sft_row = next(line for line in lines if line.split()[:2] == ["schema", "valid"] and "75.0" in line)
    assert sft_row.split() == ["schema", "valid", "50.0", "75.0", "+25.0", *f"[{stats_interval(result)}]".split(),
                               "0.013", "2/12"]
    assert any(line.strip() == "heldout: sft" for line in lines) and any(line.strip() == "heldout: base" for line in lines)
    assert [row[5] for row in rows(result) if row[:3] == ("heldout", "base", "parse rate")] == ["+0.0"]
    cli = subprocess.run(
        [sys.executable, "-m", "tuneline.cli", "diff", "v1", "HEAD"],
        cwd=repo, capture_output=True, text=True, check=True, env={**os.environ, "COLUMNS": "80"},
    )
    assert max(len(line) for line in cli.stdout.splitlines()) <= 80
    assert "-0.0" not in cli.stdout


def stats_interval(result):
    s = result["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]
    return f"{s['ci_low'] * 100:+.1f}, {s['ci_high'] * 100:+.1f}"


def test_diff_pairs_the_outcomes_both_versions_score(repo):
    """A version whose probe scores a new outcome still diffs against an older one: the
    shared outcomes are paired, the new one is named as scored in one version only."""
    path = repo / "reports" / "probe" / "heldout" / "sft.samples.jsonl"
    samples = [json.loads(line) for line in path.read_text().splitlines()]
    for sample in samples:
        sample["checks"]["season"] = True
    write_jsonl(path, samples)
    write_probe(repo, "base", set(range(10)))
    commit(repo, "v3")
    result = diff(repo, "v1", "HEAD", PARAMS)
    heldout = result["suites"]["heldout"]
    assert set(heldout["models"]["sft"]) == {
        "parse_rate", "schema_valid_rate", "destination_accuracy", "truncated_rate",
    }
    assert heldout["models"]["sft"]["schema_valid_rate"]["diff"] == pytest.approx(0.25)
    assert (heldout["outcomes_only_in_a"], heldout["outcomes_only_in_b"]) == ([], ["season_accuracy"])
    assert "scored in one version only (not compared): A [], B ['season_accuracy']" in to_markdown(result)


def test_diff_compares_each_suite_on_its_own(repo):
    """A second suite: diffed on its own prompts and hash; a suite in one version only is
    listed, not compared; a flat older layout is read as the first suite of probe.suites."""
    for model, valid in (("base", set(range(5))), ("sft", set(range(8)))):
        write_probe(repo, model, valid, suite="7" * 64, name="natural")
    commit(repo, "natural v1")
    sh(repo, "git", "tag", "n1")
    write_probe(repo, "sft", set(range(30)), suite="7" * 64, name="natural")
    commit(repo, "natural v2")
    result = diff(repo, "n1", "HEAD", PARAMS)
    assert list(result["suites"]) == ["heldout", "natural"]
    natural = result["suites"]["natural"]
    assert natural["suite_sha256"] == "7" * 64
    assert natural["models"]["sft"]["schema_valid_rate"]["diff"] == pytest.approx(22 / N)
    assert result["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]["diff"] == 0.0
    assert "| natural | sft | schema valid rate | 20.0% | 75.0% | +55.0 |" in to_markdown(result)
    only_old = diff(repo, "v1", "HEAD", PARAMS)
    assert list(only_old["suites"]) == ["heldout"] and only_old["suites_only_in_b"] == ["natural"]
    assert "Suites not in both: A only [], B only ['natural']" in to_markdown(only_old)

    # an older revision in the flat layout of one suite per probe
    sh(repo, "git", "rm", "-q", "-r", "metrics", "reports")
    write_probe(repo, "sft", set(range(20)), legacy=True)
    commit(repo, "flat layout")
    flat = diff(repo, "HEAD", "n1", PARAMS)
    assert list(flat["suites"]) == ["heldout"] and flat["suites_only_in_b"] == ["natural"]
    assert flat["suites"]["heldout"]["models"]["sft"]["schema_valid_rate"]["diff"] == pytest.approx(0.25)  # v2 - v1
