"""Probe results as statistics and reports: what ``compare`` and ``tuneline diff`` share.

A probe run is one model's ``<metrics>/probe/<model>.json`` and its per-sample outcomes
from ``<reports>/probe/<model>.samples.jsonl``. From runs this module computes, per
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
from tuneline.params import Params
from tuneline.records import loads_strict, read_json, read_jsonl

# --- Probe outputs: where a probe run lives and what one sample scores


@dataclass(frozen=True)
class ProbePaths:
    """The three files one probe run writes (see ``output_paths``)."""

    metrics: Path
    samples: Path
    failures: Path


def output_paths(params: Params, model: str) -> ProbePaths:
    """Where the probe of ``model`` writes its metrics, samples and grouped failures."""
    metrics = Path(params.paths.metrics) / "probe"
    reports = Path(params.paths.reports) / "probe"
    return ProbePaths(
        metrics=metrics / f"{model}.json",
        samples=reports / f"{model}.samples.jsonl",
        failures=reports / f"{model}.failures.jsonl",
    )


# The sample fields the outcomes are computed from (``id`` is checked as the record id).
SAMPLE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "parsed": bool,
    "valid": bool,
    "finish_reason": str,
    "checks": dict,
}


def binary_outcomes(sample: Mapping[str, Any]) -> dict[str, bool]:
    """The per-sample 0/1 outcomes behind every rate in probe metrics and compare."""
    outcomes = {"parse_rate": bool(sample["parsed"]), "schema_valid_rate": bool(sample["valid"])}
    for name, ok in sample["checks"].items():
        outcomes[f"{name}_accuracy"] = bool(ok)
    outcomes["truncated_rate"] = sample["finish_reason"] == "length"
    return outcomes


# --- Runs: one model's metrics and per-sample outcomes, read strictly

HASH_KEYS = ("suite_sha256", "contract_sha256")


@dataclass(frozen=True)
class ProbeRun:
    """One model's probe results: its metrics file and per-sample outcomes by id."""

    name: str
    metrics: Mapping[str, Any]
    outcomes: Mapping[Any, Mapping[str, bool]]
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
    outcomes: dict[Any, dict[str, bool]] = {}
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
            raise InputError(f"{source}: probe metrics lack {key!r}; re-run the probe stage")
    return ProbeRun(name=name, metrics=metrics, outcomes=outcomes, source=source)


def load_probe_run(name: str, metrics_path: str | Path, samples_path: str | Path) -> ProbeRun:
    """A probe run from its files on disk (``output_paths``), read strictly."""
    metrics = read_json(metrics_path)
    if not isinstance(metrics, dict):
        raise InputError(f"{metrics_path}: expected a JSON object of probe metrics")
    samples = read_jsonl(samples_path, required=SAMPLE_FIELDS)
    return probe_run_from_records(name, metrics, samples, str(samples_path))


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


def aligned(a: ProbeRun, b: ProbeRun) -> list[Any]:
    """Prompt ids scored in both runs; InputError when the runs cover different prompts."""
    ids_a, ids_b = set(a.outcomes), set(b.outcomes)
    if ids_a != ids_b:
        only_a = sorted(map(str, ids_a - ids_b))
        only_b = sorted(map(str, ids_b - ids_a))
        raise InputError(
            f"{a.name} and {b.name} were probed on different prompts "
            f"({len(only_a)} only in {a.source}, e.g. {only_a[:3]}; {len(only_b)} only in {b.source}, "
            f"e.g. {only_b[:3]}); check probe.limit and paths.probe_suite"
        )
    if a.metric_names != b.metric_names:
        raise InputError(
            f"{a.name} and {b.name} have different outcomes ({a.metric_names} vs {b.metric_names}); "
            "re-probe both with the same contract"
        )
    return [i for i in a.outcomes]  # the first run's (suite) order


# --- Statistics: rates and paired differences


def rate_stats(run: ProbeRun, *, conf: float) -> dict[str, dict[str, float]]:
    """Per outcome: rate, Wilson interval, successes k and trials n."""
    result: dict[str, dict[str, float]] = {}
    n = len(run.outcomes)
    for metric in run.metric_names:
        k = sum(1 for row in run.outcomes.values() if row[metric])
        rate, low, high = stats.wilson(k, n, conf)
        result[metric] = {"rate": _r(rate), "ci_low": _r(low), "ci_high": _r(high), "k": k, "n": n}
    return result


def paired_stats(a: ProbeRun, b: ProbeRun, *, conf: float) -> dict[str, dict[str, float]]:
    """Per outcome: ``rate(a) - rate(b)`` on the shared prompts, with interval and p-value.

    Paired by prompt id; the interval is Newcombe's (``stats.paired_difference``).
    """
    ids = aligned(a, b)
    result: dict[str, dict[str, float]] = {}
    for metric in a.metric_names:
        x = [int(a.outcomes[i][metric]) for i in ids]
        y = [int(b.outcomes[i][metric]) for i in ids]
        diff, low, high = stats.paired_difference(x, y, conf=conf)
        only_a, only_b = stats.discordant(x, y)
        result[metric] = {
            "diff": _r(diff),
            "ci_low": _r(low),
            "ci_high": _r(high),
            "p_value": _r(stats.mcnemar_exact(only_a, only_b)),
            "only_model": only_a,
            "only_other": only_b,
            "n": len(ids),
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
    for metric, s in per_metric.items():
        if significant(s, conf=conf):
            direction = "a higher" if s["diff"] > 0 else "a lower"
            better = (s["diff"] > 0) != (metric in LOWER_IS_BETTER)
            changes.append(
                f"{direction} {label(metric)} ({signed_points(s['diff'])} points, {pct}% CI "
                f"{interval_points(s['ci_low'], s['ci_high'])}, {_p_text(s['p_value'])}: "
                f"{'better' if better else 'worse'})"
            )
        else:
            unchanged.append(label(metric))
    n = next(iter(per_metric.values()))["n"]
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
    n = int(next(iter(quiet.values()))["n"])
    fewest = stats.mcnemar_min_discordant(alpha)
    if n < fewest:
        return (
            f"{model} vs {other}: with n = {n} paired prompts no difference can be significant: the exact "
            f"McNemar test needs at least {fewest} prompts on which the models disagree for p < {alpha:.2f}. "
            "Raise probe.limit."
        )
    planned: list[tuple[float, str, int]] = []
    for metric, s in quiet.items():
        k = int(s["only_model"] + s["only_other"])
        planned.append((stats.conservative_discordant_rate(k, n, min_effect, conf=conf), metric, k))
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


def failure_causes(run: ProbeRun) -> dict[str, int]:
    """Failure cause counts from the probe metrics, most frequent first (``ok`` left out)."""
    counts = run.metrics.get("failure_causes") or {}
    ranked = sorted(((c, n) for c, n in counts.items() if c != "ok"), key=lambda cn: (-cn[1], cn[0]))
    return dict(ranked)


# --- Report: markdown and plot


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
) -> str:
    """The report; ``causes`` maps model -> failure cause -> count (most frequent first)."""
    pct = round(conf * 100)
    models = list(rates)
    metrics = list(next(iter(rates.values())))
    lines = [
        "# Probe comparison",
        "",
        f"Suite sha256 `{hashes['suite_sha256'][:12]}`, contract sha256 `{hashes['contract_sha256'][:12]}`. "
        f"Rates with Wilson {pct}% intervals; differences are paired over the same prompts "
        f"(Newcombe's {pct}% score interval for paired proportions, exact McNemar p-value).",
        "",
        "## Verdicts",
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
        lines += ["", "## Power", ""] + [f"- {note}" for note in notes]
    lines += ["", f"## Rates ({pct}% Wilson interval)", ""]
    lines.append("| model | n | " + " | ".join(label(m) for m in metrics) + " |")
    lines.append("|---|---:|" + "---:|" * len(metrics))
    for model in models:
        row = rates[model]
        cells = [
            f"{points(row[m]['rate'])}% [{points(row[m]['ci_low'])}, {points(row[m]['ci_high'])}]"
            for m in metrics
        ]
        lines.append(f"| {model} | {int(row[metrics[0]]['n'])} | " + " | ".join(cells) + " |")
    if causes:
        lines += ["", "## Failure causes (count of prompts)", ""]
        for model in models:
            listed = ", ".join(f"{cause} {count}" for cause, count in causes.get(model, {}).items())
            lines.append(f"- {model}: {listed or 'none'}")
    if diffs:
        lines += [
            "",
            f"## Paired differences (points, {pct}% Newcombe interval)",
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
    if plot_name:
        lines += ["", f"![rates with intervals]({plot_name})"]
    lines += [
        "",
        "Only model / only other: prompts where the outcome holds for that model and not the other "
        "(the discordant pairs McNemar's test uses). No correction for multiple comparisons is applied.",
        "",
    ]
    return "\n".join(lines)


def plot_rates(
    rates: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, *, conf: float
) -> None:
    """Rates with interval bars: one group per outcome, one marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneline.records import atomic_path

    models = list(rates)
    metrics = list(next(iter(rates.values())))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(metrics)), 4.0))
    for j, model in enumerate(models):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(metrics))]
        ys = [rates[model][m]["rate"] for m in metrics]
        lows = [rates[model][m]["rate"] - rates[model][m]["ci_low"] for m in metrics]
        highs = [rates[model][m]["ci_high"] - rates[model][m]["rate"] for m in metrics]
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", capsize=4, label=model)
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
