"""compare: rates with intervals and paired differences between the probed models.

Reads:  for every model in ``probe.models`` and every suite in ``probe.suites``:
        ``<metrics>/probe/<suite>/<model>.json``,
        ``<reports>/probe/<suite>/<model>.{samples,failures}.jsonl`` and the run record
        ``<reports>/provenance/probe/<model>.json`` (suite and contract hashes); for the
        training stages (``sft``, ``dpo``) where present, the DVCLive loss logs
        ``<metrics>/<stage>/plots/metrics/{loss,eval/loss}.tsv`` and the plan in
        ``<reports>/provenance/<stage>.json``.
Writes: ``<metrics>/compare.json`` (per suite: rates, differences, hashes; a stage output,
        not a DVC metric), ``<reports>/compare.md`` (a section per suite),
        ``<reports>/compare_rates.png`` (a panel per suite), ``<reports>/compare_rates.json``
        (the rates with intervals as DVC plot data, a ``suite`` field per row),
        ``<reports>/index.html`` (one self-contained page: per suite tables, inline SVG
        charts, failure causes with examples, links to the samples; loss curves, plans) and
        ``<reports>/provenance/compare.json`` (commit, versions, confidence).
Params: ``probe.models``, ``probe.suites`` (names and paths), ``compare.baseline``, ``compare.pairs``, ``compare.confidence``,
        ``compare.min_effect``, ``compare.power``.

Each suite is compared on its own (suites have different prompts; nothing is paired
across them). Every per-sample binary outcome the probe records (parse, schema validity, each task
check, truncation, and with a task's knowledge base ``facts_accuracy`` over the samples
whose facts were checked) gets, per model, a rate with a Wilson interval; and, for every model
against ``compare.baseline`` and for every pair in ``compare.pairs``, a paired
difference with Newcombe's score interval for paired proportions, an exact McNemar
p-value and the discordant counts (paired by prompt id; sample order does not matter;
``facts_accuracy`` over the prompts checked for both models, left out when there is none). ``<model>_vs_<other>`` always means ``model - other``; a pair
``[a, b]`` is reported as ``a_vs_b``.

The models must have been probed on the same prompts with the same suite and contract
(their hashes are compared), and each samples file must hold its own model's samples;
otherwise the comparison is refused. The statistics, the
verdicts and the report are ``tuneline.reporting``'s, shared with ``tuneline diff``; this
stage only says which runs and which pairs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tuneline.curves import read_curve  # shared with bench/dev_sweep.py
from tuneline.params import Params, split_model
from tuneline.provenance import run_provenance_path, write_provenance
from tuneline.records import read_json, write_json, write_text
from tuneline.reporting import (
    ProbeRun,
    SuiteComparison,
    compare_runs,
    load_failures,
    load_probe_run,
    output_paths,
    plot_rates,
    provenance_path,
    rate_rows,
    render_html,
    render_suites_markdown,
)

# The pipeline's training stages: their loss logs and plans go into the HTML report.
TRAINING_STAGES = ("sft", "dpo")


def comparisons(params: Params) -> list[tuple[str, str]]:
    """(model, other) pairs: each model against the baseline, each guided row against its
    model's free row when both are probed, then compare.pairs."""
    names = list(params.probe.models)
    result = [(m, params.compare.baseline) for m in names if m != params.compare.baseline]
    result += [(m, split_model(m)[0]) for m in names if split_model(m)[1] and split_model(m)[0] in names]
    for a, b in params.compare.pairs:
        if (a, b) not in result and a != b:
            result.append((a, b))
    return result


def training_logs(params: Params) -> tuple[dict[str, dict[str, list[tuple[float, float]]]], dict[str, Any]]:
    """Loss curves (train, eval) and plans of the training stages that have them."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    plans: dict[str, Any] = {}
    for stage in TRAINING_STAGES:
        log = Path(params.paths.metrics) / stage / "plots" / "metrics"
        series = {f"{stage} {split}": read_curve(log / name) for split, name in (("train", "loss.tsv"),
                                                                              ("eval", "eval/loss.tsv"))}
        if any(series.values()):
            curves[stage] = {name: values for name, values in series.items() if values}
        record = run_provenance_path(params.paths.reports, stage)
        if record.is_file():
            plan = (read_json(record).get("run") or {}).get("plan")
            if plan:
                plans[stage] = plan
    return curves, plans


def decode_speeds(params: Params) -> dict[str, dict[str, Any]]:
    """Each probed model's decode timings (one generate call over every suite), from its
    run record (models without one are left out)."""
    speeds: dict[str, dict[str, Any]] = {}
    for name in params.probe.models:
        record = provenance_path(params.paths.reports, name)
        if Path(record).is_file():
            run = read_json(record).get("run") or {}
            if "generation_s" in run:
                speeds[name] = run
    return speeds


def compare_suite(params: Params, suite: str) -> SuiteComparison:
    """Every model's run on ``suite`` loaded and compared (rates, paired differences)."""
    reports = Path(params.paths.reports)
    runs: dict[str, ProbeRun] = {}
    failures: dict[str, list[dict[str, Any]]] = {}
    samples: dict[str, str] = {}
    for name in params.probe.models:
        paths = output_paths(params, name, suite)
        runs[name] = load_probe_run(name, paths, suite)
        failures[name] = load_failures(paths.failures) if paths.failures.is_file() else []
        samples[name] = Path(os.path.relpath(paths.samples, reports)).as_posix()
    hashes, rates, diffs = compare_runs(runs, comparisons(params), conf=params.compare.confidence)
    return SuiteComparison(
        name=suite, path=params.probe.suites[suite].path, hashes=hashes, rates=rates, diffs=diffs,
        failures=failures, samples=samples,
    )


def run(params: Params) -> dict[str, Any]:
    cp = params.compare
    suites = {suite: compare_suite(params, suite) for suite in params.probe.suites}

    reports = Path(params.paths.reports)
    plot_path = reports / "compare_rates.png"
    plot_rates({name: s.rates for name, s in suites.items()}, plot_path, conf=cp.confidence)
    markdown = render_suites_markdown(
        suites,
        conf=cp.confidence,
        min_effect=cp.min_effect,
        power=cp.power,
        plot_name=plot_path.name,
        speeds=decode_speeds(params),
    )
    write_text(reports / "compare.md", markdown)
    write_json(reports / "compare_rates.json", [row for name, s in suites.items() for row in rate_rows(s.rates, name)])
    curves, plans = training_logs(params)
    write_text(reports / "index.html", render_html(suites, conf=cp.confidence, curves=curves, plans=plans))

    metrics: dict[str, Any] = {}
    for name, s in suites.items():
        section: dict[str, Any] = dict(s.rates)
        for (a, b), per_metric in s.diffs.items():
            section[f"{a}_vs_{b}"] = per_metric
        section.update(s.hashes)
        metrics[name] = section
    write_json(Path(params.paths.metrics) / "compare.json", metrics)
    write_provenance(
        run_provenance_path(reports, "compare"),
        {"stage": "compare", "confidence": cp.confidence, "interval": "newcombe", "suites": list(suites)},
    )
    return metrics
