"""compare: rates with intervals and paired differences between the probed models.

Reads:  ``<metrics>/probe/<model>.json`` and ``<reports>/probe/<model>.samples.jsonl`` for
        every model in ``probe.models``.
Writes: ``<metrics>/compare.json``, ``<reports>/compare.md``, ``<reports>/compare_rates.png``.
Params: ``probe.models``, ``compare.baseline``, ``compare.pairs``, ``compare.confidence``,
        ``compare.min_effect``, ``compare.power``.

Every per-sample binary outcome the probe records (parse, schema validity, each task
check, truncation) gets, per model, a rate with a Wilson interval; and, for every model
against ``compare.baseline`` and for every pair in ``compare.pairs``, a paired
difference with Newcombe's score interval for paired proportions, an exact McNemar
p-value and the discordant counts (paired by prompt id; sample order does not matter). ``<model>_vs_<other>`` always means ``model - other``; a pair
``[a, b]`` is reported as ``a_vs_b``.

The models must have been probed on the same prompts with the same suite and contract
(their hashes are compared), and each samples file must hold its own model's samples;
otherwise the comparison is refused. The statistics, the
verdicts and the report are ``tuneline.reporting``'s, shared with ``tuneline diff``; this
stage only says which runs and which pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.params import Params
from tuneline.provenance import stamp
from tuneline.records import write_json, write_text
from tuneline.reporting import (
    ProbeRun,
    compare_runs,
    failure_causes,
    load_probe_run,
    output_paths,
    plot_rates,
    render_markdown,
)


def comparisons(params: Params) -> list[tuple[str, str]]:
    """(model, other) pairs: each model against the baseline, then compare.pairs."""
    names = list(params.probe.models)
    result = [(m, params.compare.baseline) for m in names if m != params.compare.baseline]
    for a, b in params.compare.pairs:
        if (a, b) not in result and a != b:
            result.append((a, b))
    return result


def run(params: Params) -> dict[str, Any]:
    cp = params.compare
    runs: dict[str, ProbeRun] = {}
    for name in params.probe.models:
        paths = output_paths(params, name)
        runs[name] = load_probe_run(name, paths.metrics, paths.samples)
    hashes, rates, diffs = compare_runs(runs, comparisons(params), conf=cp.confidence)

    reports = Path(params.paths.reports)
    plot_path = reports / "compare_rates.png"
    plot_rates(rates, plot_path, conf=cp.confidence)
    markdown = render_markdown(
        rates,
        diffs,
        hashes,
        conf=cp.confidence,
        min_effect=cp.min_effect,
        power=cp.power,
        plot_name=plot_path.name,
        causes={name: failure_causes(run) for name, run in runs.items()},
    )
    write_text(reports / "compare.md", markdown)

    metrics: dict[str, Any] = dict(rates)
    for (a, b), per_metric in diffs.items():
        metrics[f"{a}_vs_{b}"] = per_metric
    metrics.update(hashes)
    metrics["provenance"] = stamp(confidence=cp.confidence, interval="newcombe")
    write_json(Path(params.paths.metrics) / "compare.json", metrics)
    return metrics
