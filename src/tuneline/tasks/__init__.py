"""Tasks: what the generic pipeline needs to know about one domain, chosen by ``task``.

A task plugs into four places and nowhere else:

- ``generate``: ``examples(params)`` expands the task's template source (None: no template
  or teacher source; only imported data), ``template_record``/``example_meta`` turn an
  example into a record, ``gold_fields``/``shots`` pick teacher shots;
- ``clean``: ``clean_reasons`` (extra rejection reasons, listed after ``probe_leak``) and
  ``clean_filters(probe, params)``, applied after the probe-leak filter;
- ``pairs``: ``negatives``, extra negative strategies by name;
- ``probe``: ``stratify_by``, the ``expect`` keys a limited suite is stratified by when
  ``probe.stratify_by`` is not set; ``facts(params)``, a check of the facts a parsed,
  schema-valid output states against the task's knowledge base: ``(value, expect) ->
  {"checked": n, "wrong": [{kind, stated, expected, path}]}``, or None when the knowledge
  base cannot check that prompt (None: the task has no knowledge base, and its probe
  samples and metrics have no facts at all).

``generic`` adds nothing: any schema and suite, import-only data, no facts check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tuneline.errors import InputError


@dataclass(frozen=True)
class Task:
    name: str
    stratify_by: tuple[str, ...] = ()
    clean_reasons: tuple[str, ...] = ()
    clean_filters: Callable[[Sequence[dict[str, Any]], Any], list[Any]] = lambda probe, params: []
    negatives: Mapping[str, Callable[..., str | None]] = field(default_factory=dict)
    examples: Callable[[Any], list[Any]] | None = None
    template_record: Callable[..., dict[str, Any]] | None = None
    example_meta: Callable[[Any, str], dict[str, Any]] | None = None
    gold_fields: Mapping[str, type] = field(default_factory=dict)
    shots: Callable[..., list[dict[str, Any]]] | None = None
    facts: Callable[[Any], Callable[[Any, Mapping[str, Any]], dict[str, Any] | None]] | None = None


GENERIC = Task(name="generic")


def get(name: str) -> Task:
    """The task registered as ``name`` (the ``task`` param); InputError naming the choices."""
    tasks = registry()
    if name not in tasks:
        raise InputError(f"task: {name!r} is not a known task (allowed: {', '.join(sorted(tasks))})")
    return tasks[name]


def registry() -> dict[str, Task]:
    from tuneline.tasks import travel

    return {"generic": GENERIC, "travel": travel.TASK}
