"""``tuneline diff REV_A REV_B``: paired statistics between two versions of the probe results.

A version is anything DVC resolves: a commit, branch or tag, a DVC experiment name
(``dvc exp run -n v3``; experiments live under ``refs/exps``), or ``workspace`` for the
files on disk. The probe samples and metrics are git-tracked (``cache: false``), so a
fresh clone without a DVC remote can be compared; files are read through
``dvc.api.DVCFileSystem``, which also serves DVC-tracked files from the cache.

For every model probed in both versions and every per-sample outcome it reports
``rate(B) - rate(A)`` on the shared prompts (paired by prompt id; ``facts_accuracy`` on
the prompts whose facts were checked in both, its n shown beside it) with Newcombe's score
interval for paired proportions, an exact McNemar p-value and the discordant counts,
exactly as ``compare`` does between models. The terminal table fits 80 columns.
Versions whose probe suite or contract hashes differ are refused: their prompts or
their definition of "valid" are not the same, so a difference would not mean anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.params import Params
from tuneline.records import loads_strict
from tuneline.reporting import (
    ProbeRun,
    check_same_inputs,
    interval_points,
    label,
    output_paths,
    paired_stats,
    parse_samples,
    points,
    probe_run_from_records,
    rate_stats,
    signed_points,
    with_hashes,
)

WORKSPACE = "workspace"


@dataclass(frozen=True)
class Version:
    rev: str  # as given
    sha: str | None  # None for the workspace
    runs: dict[str, ProbeRun]

    @property
    def title(self) -> str:
        return self.rev if self.sha is None or self.sha.startswith(self.rev) else f"{self.rev} ({self.sha[:7]})"


def resolve(repo: str | Path, rev: str) -> str | None:
    """Commit sha of ``rev`` (git revision or DVC experiment name); None for the workspace."""
    from dvc.scm import SCM, SCMError, resolve_rev

    if rev == WORKSPACE:
        return None
    try:
        return resolve_rev(SCM(str(repo)), rev)
    except SCMError as exc:
        raise InputError(
            f"revision {rev!r}: {exc}; use a commit, branch, tag, DVC experiment name or 'workspace'"
        ) from exc


def read_version(repo: str | Path, rev: str, params: Params) -> Version:
    """Every probe run (metrics + samples) present at ``rev``."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    sha = resolve(repo, rev)
    try:
        fs = DVCFileSystem(str(repo), rev=sha)
    except DvcException as exc:
        raise InputError(f"{repo}: cannot open the DVC repository at {rev!r}: {exc}") from exc
    metrics_dir = f"{params.paths.metrics}/probe"
    runs: dict[str, ProbeRun] = {}
    for metrics_path in sorted(fs.glob(f"{metrics_dir}/*.json")):
        name = Path(metrics_path).stem
        samples_path = output_paths(params, name).samples.as_posix()
        source = f"{rev}:{samples_path}"
        try:
            metrics = loads_strict(fs.read_text(metrics_path, encoding="utf-8"))
            text = fs.read_text(samples_path, encoding="utf-8")
        except FileNotFoundError as exc:
            raise InputError(
                f"{rev}:{samples_path}: missing beside {metrics_path}; was the probe output committed?"
            ) from exc
        except ValueError as exc:
            raise InputError(f"{rev}:{metrics_path}: invalid JSON: {exc}") from exc
        if not isinstance(metrics, dict):
            raise InputError(f"{rev}:{metrics_path}: expected a JSON object of probe metrics")
        record_path = output_paths(params, name).provenance.as_posix()
        record = loads_strict(fs.read_text(record_path, encoding="utf-8")) if fs.exists(record_path) else None
        metrics = with_hashes(metrics, record if isinstance(record, dict) else None)
        runs[name] = probe_run_from_records(name, metrics, parse_samples(text, source), source)
    if not runs:
        raise InputError(f"{rev}: no probe results under {metrics_dir}/ (run `dvc repro` and commit them)")
    return Version(rev=rev, sha=sha, runs=runs)


def diff_versions(a: Version, b: Version, *, conf: float) -> dict[str, Any]:
    """Paired statistics of B against A for every model in both, after the hash check."""
    common = [name for name in b.runs if name in a.runs]
    if not common:
        raise InputError(
            f"no model was probed in both versions ({a.rev}: {sorted(a.runs)}; {b.rev}: {sorted(b.runs)})"
        )
    labelled = {f"{a.rev}:{m}": a.runs[m] for m in common} | {f"{b.rev}:{m}": b.runs[m] for m in common}
    hashes = check_same_inputs(labelled)
    models: dict[str, Any] = {}
    for name in common:
        rates_a = rate_stats(a.runs[name], conf=conf)
        rates_b = rate_stats(b.runs[name], conf=conf)
        diffs = paired_stats(b.runs[name], a.runs[name], conf=conf, shared_outcomes=True)
        models[name] = {
            metric: {
                "rate_a": rates_a[metric]["rate"],
                "rate_b": rates_b[metric]["rate"],
                "diff": s["diff"],
                "ci_low": s["ci_low"],
                "ci_high": s["ci_high"],
                "p_value": s["p_value"],
                "only_a": s["only_other"],
                "only_b": s["only_model"],
                "n": s["n"],
            }
            for metric, s in diffs.items()
        }
    return {
        "a": {"rev": a.rev, "sha": a.sha},
        "b": {"rev": b.rev, "sha": b.sha},
        **hashes,
        "confidence": conf,
        "interval": "newcombe",
        "models": models,
        "only_in_a": sorted(set(a.runs) - set(b.runs)),
        "only_in_b": sorted(set(b.runs) - set(a.runs)),
        "outcomes_only_in_a": sorted(_outcomes(a, common) - _outcomes(b, common)),
        "outcomes_only_in_b": sorted(_outcomes(b, common) - _outcomes(a, common)),
    }


def _outcomes(version: Version, models: list[str]) -> set[str]:
    return {m for name in models for m in version.runs[name].metric_names}


def diff(repo: str | Path, rev_a: str, rev_b: str, params: Params) -> dict[str, Any]:
    a = read_version(repo, rev_a, params)
    b = read_version(repo, rev_b, params)
    result = diff_versions(a, b, conf=params.compare.confidence)
    result["a"]["title"], result["b"]["title"] = a.title, b.title
    return result


COLUMNS = ("model", "outcome", "A", "B", "diff (pts)", "interval", "p (McNemar)", "only A", "only B")
# The terminal table: the model as a section heading, short outcome names, discordant
# counts in one cell, so that it fits 80 columns.
SHORT_COLUMNS = ("outcome", "A %", "B %", "B-A", "interval", "p", "A/B only")


def short_label(metric: str) -> str:
    """``schema_valid_rate`` -> ``schema valid``; ``payload_type_accuracy`` -> ``payload type``."""
    return label(metric.removesuffix("_rate").removesuffix("_accuracy"))


def _p_cell(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _on(s: dict[str, Any], per_metric: dict[str, Any]) -> str:
    """`` (n=38)`` for an outcome paired on fewer prompts than the others (facts accuracy:
    the prompts checked in both versions)."""
    n = max(other["n"] for other in per_metric.values())
    return f" (n={s['n']})" if s["n"] != n else ""


def rows(result: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for model, per_metric in result["models"].items():
        for metric, s in per_metric.items():
            out.append(
                (
                    model,
                    label(metric) + _on(s, per_metric),
                    f"{points(s['rate_a'])}%",
                    f"{points(s['rate_b'])}%",
                    signed_points(s["diff"]),
                    interval_points(s["ci_low"], s["ci_high"]),
                    _p_cell(s["p_value"]),
                    str(s["only_a"]),
                    str(s["only_b"]),
                )
            )
    return out


def short_rows(per_metric: dict[str, Any]) -> list[tuple[str, ...]]:
    """One model's rows of the terminal table (columns ``SHORT_COLUMNS``)."""
    return [
        (
            short_label(metric) + _on(s, per_metric),
            points(s["rate_a"]),
            points(s["rate_b"]),
            signed_points(s["diff"]),
            interval_points(s["ci_low"], s["ci_high"]),
            _p_cell(s["p_value"]),
            f"{s['only_a']}/{s['only_b']}",
        )
        for metric, s in per_metric.items()
    ]


def _caption(result: dict[str, Any]) -> str:
    pct = round(result["confidence"] * 100)
    skipped = ""
    if result["only_in_a"] or result["only_in_b"]:
        skipped = f" Not in both: A only {result['only_in_a']}, B only {result['only_in_b']}."
    if result.get("outcomes_only_in_a") or result.get("outcomes_only_in_b"):
        skipped += (
            f" Outcomes scored in one version only (not compared): A {result['outcomes_only_in_a']},"
            f" B {result['outcomes_only_in_b']}."
        )
    return (
        f"A = {result['a']['title']}, B = {result['b']['title']}; diff = B - A in points, paired "
        f"{pct}% Newcombe interval, exact McNemar p; A/B only: prompts where only A / only B has the "
        f"outcome; same suite ({result['suite_sha256'][:12]}) and contract "
        f"({result['contract_sha256'][:12]}).{skipped}"
    )


def to_markdown(result: dict[str, Any]) -> str:
    lines = [_caption(result), "", "| " + " | ".join(COLUMNS) + " |", "|---|---|" + "---:|" * (len(COLUMNS) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return "\n".join(lines) + "\n"


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


def table(result: dict[str, Any]) -> Any:
    """The terminal table (a ``rich.table.Table``): one section per model, at most 80 columns."""
    from rich import box
    from rich.table import Table

    out = Table(title="tuneline diff", caption=_caption(result), box=box.SIMPLE_HEAD, pad_edge=False)
    pct = round(result["confidence"] * 100)
    for i, name in enumerate(SHORT_COLUMNS):
        heading = f"{pct}% CI" if name == "interval" else name
        out.add_column(heading, justify="left" if i == 0 else "right", overflow="fold")
    for model, per_metric in result["models"].items():
        out.add_row(f"[bold]{model}[/bold]")
        for row in short_rows(per_metric):
            out.add_row(*row)
        out.add_section()
    return out


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(table(result), width=min(console.width, 80))
