"""``tuneline diff REV_A REV_B``: paired statistics between two versions of the probe results.

A version is anything DVC resolves: a commit, branch or tag, a DVC experiment name
(``dvc exp run -n v3``; experiments live under ``refs/exps``), or ``workspace`` for the
files on disk. The probe samples and metrics are git-tracked (``cache: false``), so a
fresh clone without a DVC remote can be compared; files are read through
``dvc.api.DVCFileSystem``, which also serves DVC-tracked files from the cache.

Per suite (``<metrics>/probe/<suite>/``; a flat older layout counts as one suite), for
every model probed on it in both versions and every per-sample outcome it reports
``rate(B) - rate(A)`` on the shared prompts (paired by prompt id; ``facts_accuracy`` on
the prompts whose facts were checked in both, its n shown beside it) with Newcombe's score
interval for paired proportions, an exact McNemar p-value and the discordant counts,
exactly as ``compare`` does between models. The terminal table fits 80 columns.
Suites in one version only are listed, not compared. A suite whose file or contract
hashes differ between the versions is refused: their prompts or
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
    paired_stats,
    parse_samples,
    points,
    probe_run_from_records,
    provenance_path,
    rate_stats,
    signed_points,
    suite_paths,
    with_hashes,
)

WORKSPACE = "workspace"


@dataclass(frozen=True)
class Version:
    rev: str  # as given
    sha: str | None  # None for the workspace
    runs: dict[str, dict[str, ProbeRun]]  # suite -> model -> run

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


def _legacy_suite(params: Params, record: Any) -> str:
    """The suite a flat ``<metrics>/probe/<model>.json`` (one suite per probe) was probed
    on: the one of ``probe.suites`` with the file its run record names, else the first."""
    path = record.get("suite") if isinstance(record, dict) else None
    for name, suite_path in params.probe_suites.items():
        if path and Path(path).as_posix() == Path(suite_path).as_posix():
            return name
    return next(iter(params.probe.suites))


def read_version(repo: str | Path, rev: str, params: Params) -> Version:
    """Every probe run (metrics + samples) present at ``rev``, per suite: the suites are
    the directories under ``<metrics>/probe/``; a flat ``<metrics>/probe/<model>.json`` of
    an older layout is read as one suite (``_legacy_suite``)."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException

    sha = resolve(repo, rev)
    try:
        fs = DVCFileSystem(str(repo), rev=sha)
    except DvcException as exc:
        raise InputError(f"{repo}: cannot open the DVC repository at {rev!r}: {exc}") from exc
    metrics_dir = f"{params.paths.metrics}/probe"

    def record_of(name: str) -> Any:
        path = provenance_path(params.paths.reports, name).as_posix()
        record = loads_strict(fs.read_text(path, encoding="utf-8")) if fs.exists(path) else None
        return record if isinstance(record, dict) else None

    found: list[tuple[str, str, str, str]] = []  # (suite, model, metrics file, samples file)
    for metrics_path in sorted(fs.glob(f"{metrics_dir}/*/*.json")):
        suite, name = Path(metrics_path).parent.name, Path(metrics_path).stem
        found.append((suite, name, metrics_path, suite_paths(params.paths.metrics, params.paths.reports, name, suite).samples.as_posix()))
    for metrics_path in sorted(fs.glob(f"{metrics_dir}/*.json")):
        name = Path(metrics_path).stem
        legacy = (Path(params.paths.reports) / "probe" / f"{name}.samples.jsonl").as_posix()
        found.append((_legacy_suite(params, record_of(name)), name, metrics_path, legacy))
    runs: dict[str, dict[str, ProbeRun]] = {}
    for suite, name, metrics_path, samples_path in found:
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
        if name in runs.get(suite, {}):
            raise InputError(f"{rev}:{metrics_path}: a second probe run of {name!r} on suite {suite!r}")
        metrics = with_hashes(metrics, record_of(name), suite)
        runs.setdefault(suite, {})[name] = probe_run_from_records(name, metrics, parse_samples(text, source), source)
    if not runs:
        raise InputError(f"{rev}: no probe results under {metrics_dir}/ (run `dvc repro` and commit them)")
    return Version(rev=rev, sha=sha, runs=runs)


def diff_suite(a: dict[str, ProbeRun], b: dict[str, ProbeRun], rev_a: str, rev_b: str, *, conf: float,
               suite: str) -> dict[str, Any]:
    """Paired statistics of B against A on one suite, for every model in both, after the hash check."""
    common = [name for name in b if name in a]
    if not common:
        raise InputError(
            f"suite {suite!r}: no model was probed in both versions ({rev_a}: {sorted(a)}; {rev_b}: {sorted(b)})"
        )
    labelled = {f"{rev_a}:{m}": a[m] for m in common} | {f"{rev_b}:{m}": b[m] for m in common}
    try:
        hashes = check_same_inputs(labelled)
    except InputError as exc:
        raise InputError(f"suite {suite!r}: {exc}") from exc
    models: dict[str, Any] = {}
    for name in common:
        rates_a = rate_stats(a[name], conf=conf)
        rates_b = rate_stats(b[name], conf=conf)
        diffs = paired_stats(b[name], a[name], conf=conf, shared_outcomes=True)
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
    outcomes_a = {m for name in common for m in a[name].metric_names}
    outcomes_b = {m for name in common for m in b[name].metric_names}
    return {
        **hashes,
        "models": models,
        "only_in_a": sorted(set(a) - set(b)),
        "only_in_b": sorted(set(b) - set(a)),
        "outcomes_only_in_a": sorted(outcomes_a - outcomes_b),
        "outcomes_only_in_b": sorted(outcomes_b - outcomes_a),
    }


def diff_versions(a: Version, b: Version, *, conf: float) -> dict[str, Any]:
    """Per suite probed in both versions, ``diff_suite``; suites in one version only are listed."""
    common = [suite for suite in b.runs if suite in a.runs]
    if not common:
        raise InputError(
            f"no suite was probed in both versions ({a.rev}: {sorted(a.runs)}; {b.rev}: {sorted(b.runs)})"
        )
    return {
        "a": {"rev": a.rev, "sha": a.sha},
        "b": {"rev": b.rev, "sha": b.sha},
        "confidence": conf,
        "interval": "newcombe",
        "suites": {suite: diff_suite(a.runs[suite], b.runs[suite], a.rev, b.rev, conf=conf, suite=suite)
                   for suite in common},
        "suites_only_in_a": sorted(set(a.runs) - set(b.runs)),
        "suites_only_in_b": sorted(set(b.runs) - set(a.runs)),
    }


def diff(repo: str | Path, rev_a: str, rev_b: str, params: Params) -> dict[str, Any]:
    a = read_version(repo, rev_a, params)
    b = read_version(repo, rev_b, params)
    result = diff_versions(a, b, conf=params.compare.confidence)
    result["a"]["title"], result["b"]["title"] = a.title, b.title
    return result


COLUMNS = ("suite", "model", "outcome", "A", "B", "diff (pts)", "interval", "p (McNemar)", "only A", "only B")
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
    for suite, section in result["suites"].items():
        out += [(suite, *row) for row in _suite_rows(section)]
    return out


def _suite_rows(section: dict[str, Any]) -> list[tuple[str, ...]]:
    out = []
    for model, per_metric in section["models"].items():
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
    if result["suites_only_in_a"] or result["suites_only_in_b"]:
        skipped = (f" Suites not in both: A only {result['suites_only_in_a']}, "
                   f"B only {result['suites_only_in_b']}.")
    inputs = []
    for suite, section in result["suites"].items():
        note = f"{suite}: suite {section['suite_sha256'][:12]}, contract {section['contract_sha256'][:12]}"
        if section["only_in_a"] or section["only_in_b"]:
            note += f"; models not in both: A only {section['only_in_a']}, B only {section['only_in_b']}"
        if section.get("outcomes_only_in_a") or section.get("outcomes_only_in_b"):
            note += (f"; outcomes scored in one version only (not compared): A {section['outcomes_only_in_a']},"
                     f" B {section['outcomes_only_in_b']}")
        inputs.append(note)
    return (
        f"A = {result['a']['title']}, B = {result['b']['title']}; diff = B - A in points, paired "
        f"{pct}% Newcombe interval, exact McNemar p; A/B only: prompts where only A / only B has the "
        f"outcome; per suite the same suite file and contract in both ({'; '.join(inputs)}).{skipped}"
    )


def to_markdown(result: dict[str, Any]) -> str:
    lines = [_caption(result), "", "| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(result)]
    return "\n".join(lines) + "\n"


def to_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2, sort_keys=True) + "\n"


def table(result: dict[str, Any]) -> Any:
    """The terminal table (a ``rich.table.Table``): one section per suite and model, at most 80 columns."""
    from rich import box
    from rich.table import Table

    out = Table(title="tuneline diff", caption=_caption(result), box=box.SIMPLE_HEAD, pad_edge=False)
    pct = round(result["confidence"] * 100)
    for i, name in enumerate(SHORT_COLUMNS):
        heading = f"{pct}% CI" if name == "interval" else name
        out.add_column(heading, justify="left" if i == 0 else "right", overflow="fold")
    for suite, section in result["suites"].items():
        for model, per_metric in section["models"].items():
            out.add_row(f"[bold]{suite}: {model}[/bold]")
            for row in short_rows(per_metric):
                out.add_row(*row)
            out.add_section()
    return out


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(table(result), width=min(console.width, 80))
