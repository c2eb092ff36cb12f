"""Probe results as statistics and reports: what ``compare`` and ``tuneline diff`` share.

A probe run is one model's ``<metrics>/probe/<model>.json`` and its per-sample outcomes
from ``<reports>/probe/<model>.samples.jsonl``. From runs this module computes, per
outcome, a rate with a Wilson interval and, between two runs scored on the same prompts,
a paired difference with a seeded percentile bootstrap interval, an exact McNemar
p-value and the discordant counts (``diff = a - b``; the tests are ``tuneline.stats``).
It turns them into verdict sentences, a power note, the markdown report and the rates
plot. Runs are compared only when their suite and contract hashes agree and they cover
the same prompts; anything else is an InputError naming the files.

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
    """Build a ProbeRun, checking that every sample has the same outcome names."""
    outcomes: dict[Any, dict[str, bool]] = {}
    expected: list[str] | None = None
    for i, sample in enumerate(samples, start=1):
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
            f"e.g. {only_b[:3]}); check probe.limit and probe.suite"
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


def paired_stats(
    a: ProbeRun, b: ProbeRun, *, n_resamples: int, seed: int, conf: float
) -> dict[str, dict[str, float]]:
    """Per outcome: ``rate(a) - rate(b)`` on the shared prompts, with interval and p-value."""
    ids = aligned(a, b)
    result: dict[str, dict[str, float]] = {}
    for metric in a.metric_names:
        x = [int(a.outcomes[i][metric]) for i in ids]
        y = [int(b.outcomes[i][metric]) for i in ids]
        diff, low, high = stats.paired_bootstrap(x, y, n_resamples=n_resamples, seed=seed, conf=conf)
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
    n_resamples: int,
    seed: int,
    conf: float,
) -> tuple[dict[str, str], dict[str, Any], dict[tuple[str, str], Any]]:
    """Hashes, per-model rates and per-pair differences for already loaded runs."""
    hashes = check_same_inputs(runs)
    rates = {name: rate_stats(run, conf=conf) for name, run in runs.items()}
    diffs = {
        (a, b): paired_stats(runs[a], runs[b], n_resamples=n_resamples, seed=seed, conf=conf)
        for a, b in pairs
    }
    return hashes, rates, diffs


def _r(value: float) -> float:
    """Six significant digits: stable diffs in git, small p-values kept."""
    return float(f"{float(value):.6g}")


# --- Words: labels, verdicts, power

# Outcomes where a higher rate is worse; verdicts say "worse"/"better" accordingly.
LOWER_IS_BETTER = frozenset({"truncated_rate"})


def label(metric: str) -> str:
    return metric.replace("_", " ")


def _points(value: float) -> str:
    return f"{value * 100:.1f}"


def _signed(value: float) -> str:
    return f"{value * 100:+.1f}"


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
        if s["p_value"] < alpha and s["diff"] != 0:
            direction = "a higher" if s["diff"] > 0 else "a lower"
            better = (s["diff"] > 0) != (metric in LOWER_IS_BETTER)
            changes.append(
                f"{direction} {label(metric)} ({_signed(s['diff'])} points, {pct}% CI "
                f"[{_signed(s['ci_low'])}, {_signed(s['ci_high'])}], {_p_text(s['p_value'])}: "
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


def power_note(
    model: str,
    other: str,
    per_metric: Mapping[str, Mapping[str, float]],
    *,
    min_effect: float,
    power: float,
    conf: float,
) -> str | None:
    """A note when n is too small to detect ``min_effect`` at ``power`` (worst outcome)."""
    alpha = 1 - conf
    worst: tuple[int, str, float] | None = None
    n = 0
    for metric, s in per_metric.items():
        n = int(s["n"])
        psi = (s["only_model"] + s["only_other"]) / n
        needed = stats.mcnemar_sample_size(min_effect, psi, alpha=alpha, power=power)
        if worst is None or needed > worst[0]:
            worst = (needed, metric, psi)
    if worst is None or n >= worst[0]:
        return None
    needed, metric, psi = worst
    detectable = stats.mcnemar_detectable_difference(n, psi, alpha=alpha, power=power)
    floor = f", planned as {min_effect:.2f}" if psi < min_effect else ""
    return (
        f"{model} vs {other}: n = {n} is too small to detect a {_points(min_effect)}-point difference "
        f"at {power:.0%} power on {label(metric)} (observed discordant rate {psi:.2f}{floor}; about "
        f"{needed} prompts needed). The smallest difference detectable at this n is about "
        f"{_points(detectable)} points."
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
        f"(percentile bootstrap {pct}% interval, exact McNemar p-value).",
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
            f"{_points(row[m]['rate'])}% [{_points(row[m]['ci_low'])}, {_points(row[m]['ci_high'])}]"
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
            f"## Paired differences (points, {pct}% bootstrap interval)",
            "",
            "| comparison | outcome | diff | interval | p (McNemar) | only model | only other |",
            "|---|---|---:|---|---:|---:|---:|",
        ]
    for (model, other), per_metric in diffs.items():
        for metric, s in per_metric.items():
            lines.append(
                f"| {model} vs {other} | {label(metric)} | {float(s['diff']) * 100:+.1f} | "
                f"[{float(s['ci_low']) * 100:+.1f}, {float(s['ci_high']) * 100:+.1f}] | "
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
