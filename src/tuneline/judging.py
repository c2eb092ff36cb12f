"""Judging model outputs on a suite: the pieces the probe stage and the training curve
(``tuneline.training.curve``) share.

- ``select_subset(suite, limit, stratify_by)``: a deterministic subset of at most ``limit``
  suite lines, stratified by the ``expect`` values named in ``stratify_by``: within each
  stratum lines are ordered by the sha256 of their id and strata are drawn round-robin, so
  the subset depends only on the suite and the params; lines keep their suite order.
- ``judge(output, finish_reason, expect, contract, facts)``: the judged fields of one
  sample, ``Contract.judge``'s verdict (and a task's facts check); the per-sample 0/1
  outcomes behind every rate are ``tuneline.reporting.binary_outcomes`` of a sample
  holding these fields and its ``finish_reason``.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tuneline.errors import InputError

# A task's facts check (``Task.facts(params)``): (parsed value, expect) -> facts or None.
FactCheck = Callable[[Any, Mapping[str, Any]], dict[str, Any] | None]


def _id_rank(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(str(record["id"]).encode("utf-8")).hexdigest()


def select_subset(
    suite: Sequence[dict[str, Any]], limit: int | None, stratify_by: Sequence[str], source: str = "suite",
    param: str = "probe.stratify_by",
) -> list[dict[str, Any]]:
    """A deterministic subset of at most ``limit`` lines, stratified by expect values
    (``param``: the param that named ``stratify_by``, for the error)."""
    if limit is None or limit >= len(suite):
        return list(suite)
    for key in stratify_by:
        if key not in suite[0]["expect"]:
            raise InputError(
                f"{param}: {key!r} is not an expect key of {source} "
                f"(allowed: {', '.join(suite[0]['expect']) or 'none'})"
            )
    strata: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for position, line in enumerate(suite):
        strata[tuple(str(line["expect"][k]) for k in stratify_by)].append((position, line))
    queues = [sorted(strata[k], key=lambda item: _id_rank(item[1])) for k in sorted(strata)]
    chosen: list[tuple[int, dict[str, Any]]] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return [line for _, line in sorted(chosen, key=lambda item: item[0])]


def judge(
    output: str, finish_reason: str, expect: Mapping[str, Any], contract: Any, facts: FactCheck | None = None
) -> dict[str, Any]:
    """The judged fields of a sample: ``Contract.judge``'s verdict on one output, and with
    a task's ``facts`` check the facts a parsed, schema-valid output states (``facts``:
    ``{checked, wrong}``, or None when not checked: not valid, or a destination the
    knowledge base does not know). Without a facts check there is no ``facts`` field."""
    v = contract.judge(output, expect, finish_reason)
    judged = {
        "parsed": v.parsed,
        "parse_error": v.parse_error,
        "valid": v.valid,
        "errors": v.errors,
        "checks": v.checks,
        "fields_present": v.fields_present,
        "cause": v.cause,
    }
    if facts is not None:
        judged["facts"] = facts(v.value, expect) if v.valid else None
    return judged
