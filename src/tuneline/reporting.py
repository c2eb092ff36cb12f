"""Probe results as statistics and reports: what ``compare`` and ``tuneline diff`` share.

A probe run is one model's results on one suite: ``<metrics>/probe/<suite>/<model>.json``
and its per-sample outcomes from ``<reports>/probe/<suite>/<model>.samples.jsonl``; runs
are compared within a suite, never across suites. From runs this module computes, per
outcome, a rate with a Wilson interval and, between two runs scored on the same prompts,
a paired difference with Newcombe's score interval for paired proportions, an exact
McNemar p-value and the discordant counts (``diff = a - b``; the statistics are
``tuneline.stats``; pairing is by prompt id, so the order of the samples never matters).
It turns them into verdict sentences, a power note, the markdown report and the rates
plot. Runs are compared only when their suite and contract hashes agree and they cover
the same prompts, and a run's samples must all name its model; anything else is an
InputError naming the files.

Nothing here reads params beyond ``paths``: which runs to load and which pairs to compare
is the caller's recipe (``stages/compare.py``, ``diff.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline import stats
from tuneline.errors import InputError
from tuneline.params import Params, split_model
from tuneline.records import loads_strict, read_json, read_jsonl

# --- Probe outputs: where a probe run lives and what one sample scores


@dataclass(frozen=True)
class ProbePaths:
    """The four files one probe run writes (see ``output_paths``)."""

    metrics: Path
    samples: Path
    failures: Path
    provenance: Path


def output_paths(params: Params, model: str, suite: str) -> ProbePaths:
    """Where the probe of ``model`` writes its metrics (the rates), samples and grouped
    failures on ``suite`` (a name in ``probe.suites``), and its run record (one per model,
    for every suite: suite and contract hashes, decoding, commit, timings)."""
    return suite_paths(params.paths.metrics, params.paths.reports, model, suite)


def suite_paths(metrics: str | Path, reports: str | Path, model: str, suite: str) -> ProbePaths:
    """``output_paths`` from the two output directories (``paths.metrics``, ``paths.reports``)."""
    probe_reports = Path(reports) / "probe" / suite
    return ProbePaths(
        metrics=Path(metrics) / "probe" / suite / f"{model}.json",
        samples=probe_reports / f"{model}.samples.jsonl",
        failures=probe_reports / f"{model}.failures.jsonl",
        provenance=provenance_path(reports, model),
    )


def provenance_path(reports: str | Path, model: str) -> Path:
    """The run record of ``model``'s probe, ``<reports>/provenance/probe/<model>.json``."""
    return Path(reports) / "provenance" / "probe" / f"{model}.json"


def with_hashes(metrics: Mapping[str, Any], provenance: Mapping[str, Any] | None, suite: str) -> dict[str, Any]:
    """Probe metrics on ``suite`` with the suite and contract hashes of the run record
    beside them (the contract's at the top of the record, the suite's under
    ``suites.<suite>``; metrics hold only rates)."""
    merged = dict(metrics)
    section = ((provenance or {}).get("suites") or {}).get(suite) or {}
    for key in HASH_KEYS:
        for source in (section, provenance or {}):
            if key not in merged and key in source:
                merged[key] = source[key]
    return merged


# The sample fields the outcomes are computed from (``id`` is checked as the record id).
SAMPLE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "parsed": bool,
    "valid": bool,
    "finish_reason": str,
    "checks": dict,
}


# The facts outcome and its denominator in probe metrics (samples with a checkable fact).
FACTS_METRIC = "facts_accuracy"
FACTS_CHECKED = "facts_checked"


def binary_outcomes(sample: Mapping[str, Any]) -> dict[str, bool | None]:
    """The per-sample 0/1 outcomes behind every rate in probe metrics and compare.

    ``facts_accuracy`` is there only for samples of a task with a knowledge base (they have
    a ``facts`` field): True when every checkable fact stated is right, None (not scored:
    left out of the rate's denominator) when the sample was not checked or stated none.
    """
    outcomes: dict[str, bool | None] = {
        "parse_rate": bool(sample["parsed"]),
        "schema_valid_rate": bool(sample["valid"]),
    }
    for name, ok in sample["checks"].items():
        outcomes[f"{name}_accuracy"] = bool(ok)
    outcomes["truncated_rate"] = sample["finish_reason"] == "length"
    if "facts" in sample:
        facts = sample["facts"]
        if facts is not None and not (isinstance(facts, dict) and isinstance(facts.get("checked"), int)
                                      and isinstance(facts.get("wrong"), list)):
            raise InputError(f"sample {sample.get('id')!r}: facts must be null or {{checked: int, wrong: list}}, "
                             f"got {facts!r}")
        outcomes[FACTS_METRIC] = None if not facts or not facts["checked"] else not facts["wrong"]
    return outcomes


# --- Runs: one model's metrics and per-sample outcomes, read strictly

HASH_KEYS = ("suite_sha256", "contract_sha256")


@dataclass(frozen=True)
class ProbeRun:
    """One model's probe results: its metrics file and per-sample outcomes by id."""

    name: str
    metrics: Mapping[str, Any]
    outcomes: Mapping[Any, Mapping[str, bool | None]]  # None: not scored (facts not checked)
    source: str

    @property
    def metric_names(self) -> list[str]:
        first = next(iter(self.outcomes.values()))
        return list(first)


def probe_run_from_records(
    name: str, metrics: Mapping[str, Any], samples: Iterable[Mapping[str, Any]], source: str
) -> ProbeRun:
    """Build a ProbeRun, checking that every sample is ``name``'s and has the same outcome names.

    A samples file whose records name another model (one model's file copied over
    another's) is refused: its outcomes would be reported under the wrong name.
    """
    outcomes: dict[Any, dict[str, bool | None]] = {}
    expected: list[str] | None = None
    for i, sample in enumerate(samples, start=1):
        if sample["model"] != name:
            raise InputError(
                f"{source}:{i}: sample {sample['id']!r} is from model {sample['model']!r}, "
                f"expected {name!r}; this file holds another model's probe samples — re-run probe@{name}"
            )
        row = binary_outcomes(sample)
        if expected is None:
            expected = list(row)
        elif list(row) != expected:
            raise InputError(
                f"{source}:{i}: sample {sample['id']!r} has outcomes {sorted(row)}, "
                f"but earlier samples have {sorted(expected)}; one probe run must use one set of checks"
            )
        if sample["id"] in outcomes:
            raise InputError(f"{source}:{i}: duplicate sample id {sample['id']!r}")
        outcomes[sample["id"]] = row
    if not outcomes:
        raise InputError(f"{source}: no samples; probe the model before comparing")
    for key in HASH_KEYS:
        if not isinstance(metrics.get(key), str):
            raise InputError(f"{source}: neither the probe metrics nor its run record has {key!r}; re-run the probe stage")
    return ProbeRun(name=name, metrics=metrics, outcomes=outcomes, source=source)


def load_probe_run(name: str, paths: ProbePaths, suite: str) -> ProbeRun:
    """``name``'s probe run on ``suite`` from its files on disk (``output_paths``), read
    strictly; the hashes come from the run record."""
    metrics = read_json(paths.metrics)
    if not isinstance(metrics, dict):
        raise InputError(f"{paths.metrics}: expected a JSON object of probe metrics")
    record = read_json(paths.provenance) if Path(paths.provenance).is_file() else None
    samples = read_jsonl(paths.samples, required=SAMPLE_FIELDS)
    return probe_run_from_records(name, with_hashes(metrics, record, suite), samples, str(paths.samples))


def parse_samples(text: str, source: str) -> list[dict[str, Any]]:
    """Probe samples from JSONL text read elsewhere (a git revision); errors name ``source:line``."""
    records: list[dict[str, Any]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = loads_strict(line)
        except ValueError as exc:
            raise InputError(f"{source}:{number}: invalid JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise InputError(f"{source}:{number}: expected a JSON object")
        for field, spec in {"id": (str, int), **SAMPLE_FIELDS}.items():
            if not isinstance(record.get(field), spec):
                raise InputError(f"{source}:{number}: field {field!r} missing or not {spec}")
        records.append(record)
    return records


def check_same_inputs(runs: Mapping[str, ProbeRun]) -> dict[str, str]:
    """The suite and contract hashes shared by all runs; InputError naming any difference."""
    shared: dict[str, str] = {}
    for key in HASH_KEYS:
        values = {label: run.metrics[key] for label, run in runs.items()}
        if len(set(values.values())) > 1:
            listing = ", ".join(f"{label}: {value[:12]}" for label, value in values.items())
            what = key.removesuffix("_sha256")
            raise InputError(
                f"probe runs used different {what} files ({key} {listing}); "
                f"paired comparisons need the same {what} for every run — re-probe with one {what}"
            )
        shared[key] = next(iter(values.values()))
    return shared


def aligned(a: ProbeRun, b: ProbeRun, *, same_outcomes: bool = True) -> list[Any]:
    """Prompt ids scored in both runs; InputError when the runs cover different prompts (or,
    with ``same_outcomes``, score different outcomes)."""
    ids_a, ids_b = set(a.outcomes), set(b.outcomes)
    if ids_a != ids_b:
        only_a = sorted(map(str, ids_a - ids_b))
        only_b = sorted(map(str, ids_b - ids_a))
        raise InputError(
            f"{a.name} and {b.name} were probed on different prompts "
            f"({len(only_a)} only in {a.source}, e.g. {only_a[:3]}; {len(only_b)} only in {b.source}, "
            f"e.g. {only_b[:3]}); check the suite's path and limit in probe.suites"
        )
    if same_outcomes and a.metric_names != b.metric_names:
        raise InputError(
            f"{a.name} and {b.name} have different outcomes ({a.metric_names} vs {b.metric_names}); "
            "re-probe both with the same contract"
        )
    return [i for i in a.outcomes]  # the first run's (suite) order


# --- Statistics: rates and paired differences


def rate_stats(run: ProbeRun, *, conf: float) -> dict[str, dict[str, Any]]:
    """Per outcome: rate, Wilson interval, successes k and trials n (the samples scored:
    all of them, but for ``facts_accuracy`` those stating a checkable fact). With n = 0
    the rate and interval are None."""
    result: dict[str, dict[str, Any]] = {}
    for metric in run.metric_names:
        scored = [row[metric] for row in run.outcomes.values() if row[metric] is not None]
        n, k = len(scored), sum(1 for ok in scored if ok)
        if n == 0:
            result[metric] = {"rate": None, "ci_low": None, "ci_high": None, "k": 0, "n": 0}
            continue
        rate, low, high = stats.wilson(k, n, conf)
        result[metric] = {"rate": _r(rate), "ci_low": _r(low), "ci_high": _r(high), "k": k, "n": n}
    return result


def paired_stats(
    a: ProbeRun, b: ProbeRun, *, conf: float, shared_outcomes: bool = False
) -> dict[str, dict[str, float]]:
    """Per outcome: ``rate(a) - rate(b)`` on the shared prompts, with interval and p-value.

    Paired by prompt id; the interval is Newcombe's (``stats.paired_difference``). An
    outcome some samples do not score (``facts_accuracy``) is paired over the prompts
    scored in both runs, and left out when there is none. With ``shared_outcomes`` (two
    versions of the code, one of which scores an outcome the other does not) only the
    outcomes both runs score are paired; otherwise the runs must score the same ones.
    """
    ids = aligned(a, b, same_outcomes=not shared_outcomes)
    result: dict[str, dict[str, float]] = {}
    for metric in [m for m in a.metric_names if m in b.metric_names]:
        both = [i for i in ids if a.outcomes[i][metric] is not None and b.outcomes[i][metric] is not None]
        if not both:
            continue
        x = [int(bool(a.outcomes[i][metric])) for i in both]
        y = [int(bool(b.outcomes[i][metric])) for i in both]
        diff, low, high = stats.paired_difference(x, y, conf=conf)
        only_a, only_b = stats.discordant(x, y)
        result[metric] = {
            "diff": _r(diff),
            "ci_low": _r(low),
            "ci_high": _r(high),
            "p_value": _r(stats.mcnemar_exact(only_a, only_b)),
            "only_model": only_a,
            "only_other": only_b,
            "n": len(both),
        }
    return result


def compare_runs(
    runs: Mapping[str, ProbeRun],
    pairs: Sequence[tuple[str, str]],
    *,
    conf: float,
) -> tuple[dict[str, str], dict[str, Any], dict[tuple[str, str], Any]]:
    """Hashes, per-model rates and per-pair differences for already loaded runs."""
    hashes = check_same_inputs(runs)
    rates = {name: rate_stats(run, conf=conf) for name, run in runs.items()}
    diffs = {(a, b): paired_stats(runs[a], runs[b], conf=conf) for a, b in pairs}
    return hashes, rates, diffs


def _r(value: float) -> float:
    """Six significant digits: stable diffs in git, small p-values kept; never -0.0."""
    return float(f"{float(value):.6g}") + 0.0


# --- Words: labels, verdicts, power

# Outcomes where a higher rate is worse; verdicts say "worse"/"better" accordingly.
LOWER_IS_BETTER = frozenset({"truncated_rate"})


def label(metric: str) -> str:
    return metric.replace("_", " ")


def points(value: float) -> str:
    """A rate in points with one decimal (``0.8667`` -> ``86.7``); never ``-0.0``."""
    return f"{round(float(value) * 100, 1) + 0.0:.1f}"


def signed_points(value: float) -> str:
    """A difference in points with its sign (``+3.3``, ``-1.7``, ``+0.0``); never ``-0.0``."""
    return f"{round(float(value) * 100, 1) + 0.0:+.1f}"


def interval_points(low: float, high: float) -> str:
    return f"[{signed_points(low)}, {signed_points(high)}]"


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _p_cell(p: float) -> str:
    return "< 0.0001" if p < 0.0001 else f"{p:.4f}"


def verdict(model: str, other: str, per_metric: Mapping[str, Mapping[str, float]], *, conf: float) -> str:
    """One sentence per comparison: which outcomes differ significantly, and which way."""
    alpha = 1 - conf
    pct = round(conf * 100)
    changes: list[str] = []
    unchanged: list[str] = []
    n = max(s["n"] for s in per_metric.values())
    for metric, s in per_metric.items():
        on = f"on n = {s['n']}, " if s["n"] != n else ""
        if significant(s, conf=conf):
            direction = "a higher" if s["diff"] > 0 else "a lower"
            better = (s["diff"] > 0) != (metric in LOWER_IS_BETTER)
            changes.append(
                f"{direction} {label(metric)} ({on}{signed_points(s['diff'])} points, {pct}% CI "
                f"{interval_points(s['ci_low'], s['ci_high'])}, {_p_text(s['p_value'])}: "
                f"{'better' if better else 'worse'})"
            )
        else:
            unchanged.append(label(metric) + (f" (n = {s['n']})" if on else ""))
    head = f"**{model} vs {other}** (n = {n} paired prompts): "
    if changes:
        text = head + f"{model} has " + "; ".join(changes)
        if unchanged:
            text += f". No significant difference in {', '.join(unchanged)}"
    else:
        text = head + f"no significant difference in any outcome ({', '.join(unchanged)})"
    return text + f" (exact McNemar, alpha = {alpha:.2f})."


def significant(s: Mapping[str, float], *, conf: float) -> bool:
    """Whether one paired comparison is significant at ``1 - conf`` (and not a zero difference)."""
    return s["p_value"] < 1 - conf and s["diff"] != 0


def power_note(
    model: str,
    other: str,
    per_metric: Mapping[str, Mapping[str, float]],
    *,
    min_effect: float,
    power: float,
    conf: float,
) -> str | None:
    """What this n can detect, for the outcomes that were NOT significantly different.

    A significant difference needs no power note. For the others, a "no significant
    difference" is only as strong as the difference n could have detected: the note gives
    that difference at ``power`` (Connor's approximation) when it is larger than
    ``min_effect``, and the prompts ``min_effect`` would need. It plans with the largest
    conservative discordant rate among those outcomes (``stats.conservative_discordant_rate``:
    the upper Wilson bound of the observed share of disagreeing prompts, at least
    ``min_effect``), and says so. With fewer prompts than the exact test needs for any
    p < alpha, it says that instead. None when there is nothing to say.
    """
    alpha = 1 - conf
    pct = round(conf * 100)
    quiet = {metric: s for metric, s in per_metric.items() if not significant(s, conf=conf)}
    if not quiet:
        return None
    n = int(max(s["n"] for s in quiet.values()))
    fewest = stats.mcnemar_min_discordant(alpha)
    if n < fewest:
        return (
            f"{model} vs {other}: with n = {n} paired prompts no difference can be significant: the exact "
            f"McNemar test needs at least {fewest} prompts on which the models disagree for p < {alpha:.2f}. "
            "Raise the suite's limit in probe.suites."
        )
    planned: list[tuple[float, str, int]] = []
    for metric, s in quiet.items():
        k = int(s["only_model"] + s["only_other"])  # of its own n (facts: the prompts checked in both)
        planned.append((stats.conservative_discordant_rate(k, int(s["n"]), min_effect, conf=conf), metric, k))
    psi, metric, k = max(planned, key=lambda row: row[0])
    needed = stats.mcnemar_sample_size(min_effect, psi, alpha=alpha, power=power)
    if n >= needed:
        return None
    detectable = stats.mcnemar_detectable_difference(n, psi, alpha=alpha, power=power)
    reach = (
        f"no difference reaches {power:.0%} power at this n"
        if detectable >= 1.0
        else f"n = {n} detects a difference of about {points(detectable)} points at {power:.0%} power"
    )
    floor = f", raised to the {points(min_effect)}-point difference itself" if psi <= min_effect else ""
    return (
        f"{model} vs {other}: \"no significant difference\" in {', '.join(label(m) for m in quiet)} is weak "
        f"evidence: {reach}, and a {points(min_effect)}-point difference needs about {needed} prompts "
        f"(planned with a discordant rate of {psi:.2f}: the upper {pct}% Wilson bound of the {k}/{n} prompts "
        f"on which the models disagree in {label(metric)}{floor})."
    )


def failure_causes(groups: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Failure cause counts from a probe's grouped failures (``<model>.failures.jsonl``),
    most frequent first; ``ok`` is not a cause and is left out."""
    counts = {str(g["cause"]): int(g["count"]) for g in groups if g.get("cause") != "ok"}
    return dict(sorted(counts.items(), key=lambda cn: (-cn[1], cn[0])))


def cause_table(causes: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, int]]:
    """model -> cause -> count over every cause any model has, a cause a model lacks
    counted 0; causes ordered by their total, most frequent first."""
    totals: dict[str, int] = {}
    for per_model in causes.values():
        for cause, count in per_model.items():
            totals[cause] = totals.get(cause, 0) + count
    order = sorted(totals, key=lambda c: (-totals[c], c))
    return {model: {cause: int(per_model.get(cause, 0)) for cause in order} for model, per_model in causes.items()}


def load_failures(path: str | Path) -> list[dict[str, Any]]:
    """A probe's grouped failures (``id``, ``cause``, ``count``, ``examples``), read strictly."""
    return read_jsonl(path, required={"cause": str, "count": int}, allow_empty=True)


def rate_rows(rates: Mapping[str, Mapping[str, Mapping[str, float]]], suite: str) -> list[dict[str, Any]]:
    """One suite's rates as DVC plot data: one row per model and outcome with its interval
    and the suite (``reports/compare_rates.json``, drawn by the ``rates_interval`` template,
    one row of panels per suite)."""
    return [
        {"suite": suite, "model": model, "outcome": label(metric), "rate": s["rate"], "ci_low": s["ci_low"],
         "ci_high": s["ci_high"]}
        for model, per_metric in rates.items()
        for metric, s in per_metric.items()
        if s["rate"] is not None
    ]


def rate_cell(s: Mapping[str, Any], n: int) -> str:
    """``86.7% [75.8, 93.1]``; ``(n = 38)`` added when the outcome scored fewer samples
    than the model's n (``facts_accuracy``); ``n/a (n = 0)`` when it scored none."""
    if s["rate"] is None:
        return "n/a (n = 0)"
    cell = f"{points(s['rate'])}% [{points(s['ci_low'])}, {points(s['ci_high'])}]"
    return cell + (f" (n = {int(s['n'])})" if s["n"] != n else "")


def run_n(per_metric: Mapping[str, Mapping[str, Any]]) -> int:
    """A model's n: the samples its outcomes are scored on (the largest outcome n)."""
    return int(max(s["n"] for s in per_metric.values()))


# --- Report: markdown and plot


def speed_section(speeds: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Decoding time per model; a guided row (``X+guided``) beside its free row ``X``."""
    lines = [
        "## Decoding speed",
        "",
        "| model | decode s | new tokens/s | mean new tokens | vs free decoding |",
        "|---|---:|---:|---:|---:|",
    ]
    for model, run in speeds.items():
        plain, guided = split_model(model)
        free = speeds.get(plain) if guided else None
        ratio = "—"
        if free and free.get("generation_s") and run.get("generation_s"):
            ratio = f"{run['generation_s'] / free['generation_s']:.2f}x the time"
        lines.append(
            f"| {model} | {run.get('generation_s', 0):.1f} | {run.get('tokens_per_s', 0):.1f} | "
            f"{run.get('mean_new_tokens', 0):.1f} | {ratio} |"
        )
    lines += ["", "Timings from each probe's run record (one process per model, the same machine and batch size)."]
    return lines


@dataclass(frozen=True)
class SuiteComparison:
    """One suite's comparison: the models' rates, the paired differences, the hashes they
    share, and per model its failure groups and samples file (relative to the reports)."""

    name: str
    path: str
    hashes: Mapping[str, str]
    rates: Mapping[str, Mapping[str, Mapping[str, Any]]]
    diffs: Mapping[tuple[str, str], Mapping[str, Mapping[str, Any]]]
    failures: Mapping[str, Sequence[Mapping[str, Any]]]
    samples: Mapping[str, str]

    @property
    def causes(self) -> dict[str, dict[str, int]]:
        return {model: failure_causes(groups) for model, groups in self.failures.items()}


def _suite_markdown(
    rates: Mapping[str, Mapping[str, Mapping[str, float]]],
    diffs: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
    hashes: Mapping[str, str],
    *,
    conf: float,
    min_effect: float,
    power: float,
    causes: Mapping[str, Mapping[str, int]] | None,
    heading: str,
) -> list[str]:
    """One suite's sections; ``heading`` prefixes every ``##`` title (``natural: ``)."""
    pct = round(conf * 100)
    models = list(rates)
    metrics = list(next(iter(rates.values())))
    lines = [
        f"Suite sha256 `{hashes['suite_sha256'][:12]}`, contract sha256 `{hashes['contract_sha256'][:12]}`. "
        f"Rates with Wilson {pct}% intervals; differences are paired over the same prompts "
        f"(Newcombe's {pct}% score interval for paired proportions, exact McNemar p-value).",
        "",
        f"## {heading}Verdicts",
        "",
    ]
    lines += [f"- {verdict(m, o, d, conf=conf)}" for (m, o), d in diffs.items()]
    if not diffs:
        lines.append("- Nothing to compare: one model, and no pairs in compare.pairs.")
    notes = [
        note
        for (m, o), d in diffs.items()
        if (note := power_note(m, o, d, min_effect=min_effect, power=power, conf=conf))
    ]
    if notes:
        lines += ["", f"## {heading}Power", ""] + [f"- {note}" for note in notes]
    lines += ["", f"## {heading}Rates ({pct}% Wilson interval)", ""]
    lines.append("| model | n | " + " | ".join(label(m) for m in metrics) + " |")
    lines.append("|---|---:|" + "---:|" * len(metrics))
    for model in models:
        row = rates[model]
        cells = [rate_cell(row[m], run_n(row)) for m in metrics]
        lines.append(f"| {model} | {run_n(row)} | " + " | ".join(cells) + " |")
    if FACTS_METRIC in metrics:
        lines += [
            "",
            f"{label(FACTS_METRIC)}: the share of schema-valid outputs whose stated currency, language and country "
            "(those the knowledge base holds) are all right, over the outputs stating at least one (its n); "
            "paired differences use the prompts checked for both models.",
        ]
    table = cause_table({model: (causes or {}).get(model, {}) for model in models}) if causes else {}
    if causes:
        lines += ["", f"## {heading}Failure causes (count of prompts)", ""]
        order = list(next(iter(table.values()))) if table else []
        if order:
            lines.append("| model | " + " | ".join(order) + " |")
            lines.append("|---|" + "---:|" * len(order))
            lines += [f"| {model} | " + " | ".join(str(table[model][c]) for c in order) + " |" for model in models]
        else:
            lines.append("None: every output passed.")
    if diffs:
        lines += [
            "",
            f"## {heading}Paired differences (points, {pct}% Newcombe interval)",
            "",
            "| comparison | outcome | diff | interval | p (McNemar) | only model | only other |",
            "|---|---|---:|---|---:|---:|---:|",
        ]
    for (model, other), per_metric in diffs.items():
        for metric, s in per_metric.items():
            lines.append(
                f"| {model} vs {other} | {label(metric)} | {signed_points(s['diff'])} | "
                f"{interval_points(s['ci_low'], s['ci_high'])} | "
                f"{_p_cell(s['p_value'])} | {s['only_model']} | {s['only_other']} |"
            )
    return lines


_FOOTER = [
    "",
    "Only model / only other: prompts where the outcome holds for that model and not the other "
    "(the discordant pairs McNemar's test uses). No correction for multiple comparisons is applied.",
    "",
]


def render_markdown(
    rates: Mapping[str, Mapping[str, Mapping[str, float]]],
    diffs: Mapping[tuple[str, str], Mapping[str, Mapping[str, float]]],
    hashes: Mapping[str, str],
    *,
    conf: float,
    min_effect: float,
    power: float,
    plot_name: str | None,
    causes: Mapping[str, Mapping[str, int]] | None = None,
    speeds: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The report of one suite; ``causes`` maps model -> failure cause -> count (a cause
    one model lacks is shown as 0); ``speeds`` maps model -> its probe run record's ``run``
    (decode seconds, tokens/s, mean new tokens)."""
    lines = ["# Probe comparison", ""]
    lines += _suite_markdown(rates, diffs, hashes, conf=conf, min_effect=min_effect, power=power, causes=causes,
                             heading="")
    if speeds:
        lines += ["", *speed_section(speeds)]
    if plot_name:
        lines += ["", f"![rates with intervals]({plot_name})"]
    return "\n".join(lines + _FOOTER)


def render_suites_markdown(
    suites: Mapping[str, SuiteComparison],
    *,
    conf: float,
    min_effect: float,
    power: float,
    plot_name: str | None,
    speeds: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The report of every suite: per suite (``## <suite>: ...`` sections) its verdicts,
    power notes, rates, failure causes and paired differences; then the decoding speed
    (one generate call per model covers every suite) and the plot."""
    listing = ", ".join(f"`{name}` ({s.path}, n = {max(run_n(r) for r in s.rates.values())})"
                        for name, s in suites.items())
    lines = [
        "# Probe comparison",
        "",
        f"Suites: {listing}. Each suite is compared on its own: its models on the same prompts, "
        "its own verdicts.",
    ]
    for name, s in suites.items():
        lines += ["", f"# Suite `{name}`", ""]
        lines += _suite_markdown(s.rates, s.diffs, s.hashes, conf=conf, min_effect=min_effect, power=power,
                                 causes=s.causes, heading=f"{name}: ")
    if speeds:
        lines += ["", *speed_section(speeds)]
    if plot_name:
        lines += ["", f"![rates with intervals]({plot_name})"]
    return "\n".join(lines + _FOOTER)


def plot_rates(
    rates: Mapping[str, Mapping[str, Mapping[str, Mapping[str, float]]]], path: str | Path, *, conf: float
) -> None:
    """Rates with interval bars, one panel per suite (``rates``: suite -> model -> outcome):
    one group per outcome, one marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneline.records import atomic_path

    widest = max(len(next(iter(per_suite.values()))) for per_suite in rates.values())
    fig, axes = plt.subplots(len(rates), 1, figsize=(max(6.0, 1.6 * widest), 4.0 * len(rates)), squeeze=False)
    for ax, (suite, per_suite) in zip(axes[:, 0], rates.items(), strict=True):
        models = list(per_suite)
        metrics = list(next(iter(per_suite.values())))
        width = 0.8 / max(len(models), 1)
        for j, model in enumerate(models):
            shown = [i for i, m in enumerate(metrics) if per_suite[model][m]["rate"] is not None]
            xs = [i - 0.4 + width * (j + 0.5) for i in shown]
            rows = [per_suite[model][metrics[i]] for i in shown]
            ys = [s["rate"] for s in rows]
            lows = [s["rate"] - s["ci_low"] for s in rows]
            highs = [s["ci_high"] - s["rate"] for s in rows]
            ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=4, label=model)
        ax.set_title(f"suite {suite}")
        ax.set_xticks(range(len(metrics)))
        ax.set_xticklabels([label(m) for m in metrics], rotation=20, ha="right")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(f"rate ({round(conf * 100)}% Wilson interval)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)


# --- Report: one self-contained HTML page (inline SVG, no script, nothing fetched)

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _esc(value: Any) -> str:
    import html

    return html.escape(str(value), quote=True)


def svg_rates(rates: Mapping[str, Mapping[str, Mapping[str, float]]], *, conf: float) -> str:
    """Rates as bars with interval whiskers, one group per outcome, one colour per model."""
    models = list(rates)
    metrics = list(next(iter(rates.values())))
    group, bar, left, top, height = 40 + 34 * len(models), 26, 48, 24, 220
    width = left + group * len(metrics) + 150
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{top + height + 70}" '
        f'role="img" aria-label="rates with {round(conf * 100)}% intervals">'
    ]
    for tick in range(0, 101, 25):
        y = top + height * (1 - tick / 100)
        parts.append(f'<line x1="{left}" x2="{width - 150}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{tick}%</text>')
    for i, metric in enumerate(metrics):
        x0 = left + group * i + 20
        for j, model in enumerate(models):
            s = rates[model][metric]
            if s["rate"] is None:
                continue
            x = x0 + 34 * j
            y = top + height * (1 - s["rate"])
            lo, hi = top + height * (1 - s["ci_low"]), top + height * (1 - s["ci_high"])
            colour = PALETTE[j % len(PALETTE)]
            parts.append(
                f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{top + height - y:.1f}" fill="{colour}">'
                f"<title>{_esc(model)} {_esc(label(metric))}: {points(s['rate'])}% "
                f"[{points(s['ci_low'])}, {points(s['ci_high'])}]</title></rect>"
            )
            cx = x + bar / 2
            parts.append(f'<line x1="{cx}" x2="{cx}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="#222" stroke-width="1.5"/>')
            for yy in (lo, hi):
                parts.append(f'<line x1="{cx - 5}" x2="{cx + 5}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#222"/>')
        parts.append(
            f'<text x="{x0 + 17 * len(models)}" y="{top + height + 18}" text-anchor="middle" font-size="12">'
            f"{_esc(label(metric))}</text>"
        )
    for j, model in enumerate(models):
        y = top + 14 + 18 * j
        parts.append(f'<rect x="{width - 130}" y="{y - 10}" width="12" height="12" fill="{PALETTE[j % len(PALETTE)]}"/>')
        parts.append(f'<text x="{width - 112}" y="{y}" font-size="12">{_esc(model)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_lines(series: Mapping[str, Sequence[tuple[float, float]]], *, x_label: str, y_label: str) -> str:
    """Line charts of ``name -> [(x, y), ...]`` on shared axes; a one-point series is a dot."""
    points_all = [pt for values in series.values() for pt in values]
    if not points_all:
        return ""
    xs, ys = [p[0] for p in points_all], [p[1] for p in points_all]
    x_min, x_max = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_min, y_max = min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0
    left, top, width, height = 56, 16, 520, 220

    def at(x: float, y: float) -> tuple[float, float]:
        return left + width * (x - x_min) / (x_max - x_min), top + height * (1 - (y - y_min) / (y_max - y_min))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{left + width + 160}" height="{top + height + 48}" '
        f'role="img" aria-label="{_esc(y_label)} by {_esc(x_label)}">',
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#bbb"/>',
    ]
    for k in range(5):
        value = y_min + (y_max - y_min) * k / 4
        _, y = at(x_min, value)
        parts.append(f'<line x1="{left}" x2="{left + width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:.3g}</text>')
    for value in (x_min, (x_min + x_max) / 2, x_max):
        x, _ = at(value, y_min)
        parts.append(f'<text x="{x:.1f}" y="{top + height + 16}" text-anchor="middle" font-size="11">{value:.0f}</text>')
    parts.append(f'<text x="{left + width / 2}" y="{top + height + 36}" text-anchor="middle" font-size="12">'
                 f"{_esc(x_label)}</text>")
    for j, (name, values) in enumerate(series.items()):
        colour = PALETTE[j % len(PALETTE)]
        coords = [at(x, y) for x, y in values]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for x, y in coords if len(coords) <= 3 else []:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>')
        ly = top + 14 + 18 * j
        parts.append(f'<rect x="{left + width + 14}" y="{ly - 10}" width="12" height="12" fill="{colour}"/>')
        parts.append(f'<text x="{left + width + 32}" y="{ly}" font-size="12">{_esc(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(
            (f'<td class="num">{_esc(c)}</td>' if i >= numeric_from else f"<td>{_esc(c)}</td>")
            for i, c in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


HTML_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.3em .6em}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap;word-break:break-all;font-size:.85em}
.note{color:#555;font-size:.92em}svg.chart{display:block;margin:.6em 0}
"""


def render_html(
    suites: Mapping[str, SuiteComparison],
    *,
    conf: float,
    curves: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]],
    plans: Mapping[str, Mapping[str, Any]],
) -> str:
    """``reports/index.html``: per suite the compare table, rates with intervals (inline
    SVG), paired differences, failure causes with an example output each and links to the
    samples files; then loss curves per training stage (``curves``: stage -> series name
    -> (step, loss)) and each stage's plan. One file, no script, no stylesheet or font
    fetched; the same inputs give the same bytes."""
    pct = round(conf * 100)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>tuneline: probe comparison</title>',
        f"<style>{HTML_STYLE}</style></head><body>",
        "<h1>Probe comparison</h1>",
        f'<p class="note">Suites: {", ".join(_esc(name) for name in suites)}; each compared on its own. Rates '
        f"with Wilson {pct}% intervals; differences are paired over the same prompts (Newcombe's {pct}% score "
        "interval, exact McNemar p-value).</p>",
    ]
    for suite in suites.values():
        out += _suite_html(suite, conf=conf)
    out.append("<h2>Training</h2>")
    if not curves and not plans:
        out.append('<p class="note">No training logs found beside the probe results.</p>')
    for stage in dict.fromkeys([*curves, *plans]):  # pipeline order
        out.append(f"<h3>{_esc(stage)}</h3>")
        chart = svg_lines(curves.get(stage, {}), x_label="optimizer step", y_label="loss")
        out.append(chart or '<p class="note">No loss log.</p>')
        plan = plans.get(stage)
        if plan:
            out.append(_table(["plan", "value"], sorted(plan.items())))
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _suite_html(suite: SuiteComparison, *, conf: float) -> list[str]:
    pct = round(conf * 100)
    rates, diffs, failures = suite.rates, suite.diffs, suite.failures
    models = list(rates)
    metrics = list(next(iter(rates.values())))
    out = [
        f'<h2 id="suite-{_esc(suite.name)}">Suite {_esc(suite.name)}</h2>',
        f'<p class="note"><code>{_esc(suite.path)}</code>: suite sha256 '
        f'<code>{_esc(suite.hashes["suite_sha256"][:12])}</code>, contract sha256 '
        f'<code>{_esc(suite.hashes["contract_sha256"][:12])}</code>.</p>',
        f"<h3>Rates ({pct}% Wilson interval)</h3>",
        _table(
            ["model", "n", *(label(m) for m in metrics)],
            [
                [model, run_n(rates[model])] + [rate_cell(rates[model][m], run_n(rates[model])) for m in metrics]
                for model in models
            ],
        ),
        svg_rates(rates, conf=conf),
    ]
    if diffs:
        out.append(f"<h3>Paired differences (points, {pct}% Newcombe interval)</h3>")
        out.append("<ul>" + "".join(f"<li>{_esc(verdict(m, o, d, conf=conf)).replace('**', '')}</li>"
                                    for (m, o), d in diffs.items()) + "</ul>")
        out.append(_table(
            ["comparison", "outcome", "diff", "interval", "p (McNemar)", "only model", "only other"],
            [
                [f"{model} vs {other}", label(metric), signed_points(s["diff"]),
                 interval_points(s["ci_low"], s["ci_high"]), _p_cell(s["p_value"]), s["only_model"], s["only_other"]]
                for (model, other), per_metric in diffs.items()
                for metric, s in per_metric.items()
            ],
            numeric_from=2,
        ))
    table = cause_table({m: failure_causes(failures.get(m, [])) for m in models})
    order = list(next(iter(table.values()))) if table else []
    out.append("<h3>Failure causes (count of prompts)</h3>")
    if order:
        out.append(_table(["model", *order], [[m, *(table[m][c] for c in order)] for m in models]))
    else:
        out.append("<p>None: every output passed.</p>")
    for model in models:
        for group in failures.get(model, []):
            if not group.get("examples"):
                continue
            example = group["examples"][0]
            out.append(
                f"<details><summary>{_esc(model)}: {_esc(group['cause'])} ({int(group['count'])}), e.g. "
                f"<code>{_esc(example.get('id', ''))}</code></summary><pre>{_esc(example.get('output', ''))}</pre>"
                f"</details>"
            )
    out.append("<h3>Samples</h3><ul>")
    out += [f'<li><a href="{_esc(path)}">{_esc(model)}: {_esc(path)}</a></li>' for model, path in suite.samples.items()]
    out.append("</ul>")
    return out
