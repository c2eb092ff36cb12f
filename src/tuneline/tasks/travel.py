"""The travel task: pocket travel-guide envelopes (the default task).

Everything the pipeline does only for travel lives here or in ``tuneline.datagen.travel``
(the template generator) and ``data/seed/``:

- generate: template examples from ``destinations.jsonl`` x ``train_phrasings.json``, their
  records (``meta.expect`` = payload type and destination) and teacher shots from
  ``gold.jsonl`` that never show the request's own destination;
- clean: ``probe_destination`` (with ``clean.exclude_probe_destinations``), a record naming
  an entity the probe suite expects at a path ending in ``destination``, as a whole word;
- pairs: ``off_topic`` and ``wrong_payload_type`` negatives;
- probe: a limited suite is stratified by ``payload_type``.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneline.contract import Contract, task_checks
from tuneline.datagen import teacher, travel
from tuneline.filters import Candidate, Filter, Rejection
from tuneline.provenance import sha256_file
from tuneline.tasks import Task

KNOWLEDGE_BASE = "destinations.jsonl"
PHRASINGS = "train_phrasings.json"
GOLD_FIELDS = {"instruction": str, "payload_type": str, "destination": str, "completion": dict}


# -- generate ----------------------------------------------------------------------------


def examples(params: Any) -> list[travel.Example]:
    seed_dir = Path(params.paths.seed_dir)
    return travel.template_examples(
        travel.load_destinations(seed_dir / KNOWLEDGE_BASE),
        travel.load_phrasings(seed_dir / PHRASINGS),
        seed=params.seed,
        variants=params.generate.sources.template.variants,
    )


def generator_version() -> str:
    return "travel-" + sha256_file(travel.__file__)[:12]


def example_meta(e: travel.Example, source: str) -> dict[str, Any]:
    return {
        "instruction": e.instruction,
        "source": source,
        "payload_type": e.payload_type,
        "destination": e.destination,
        "expect": {"payload_type": e.payload_type, "payload.destination": e.destination},
        "phrasing": e.phrasing,
        "profile": e.profile,
    }


@functools.lru_cache(maxsize=4)
def _template_provenance(seed_dir: Path, seed: int) -> tuple[tuple[str, Any], ...]:
    return (
        ("source", "template"),
        ("generator", generator_version()),
        ("seed", seed),
        ("knowledge_base_sha256", sha256_file(seed_dir / KNOWLEDGE_BASE)),
        ("phrasings_sha256", sha256_file(seed_dir / PHRASINGS)),
    )


def template_record(e: travel.Example, params: Any, contract: Contract) -> dict[str, Any]:
    provenance = dict(_template_provenance(Path(params.paths.seed_dir).resolve(), params.seed))
    return {
        "id": f"tpl-{e.key}",
        "prompt": e.instruction,
        "completion": contract.canonical_text(e.envelope),
        "meta": example_meta(e, "template"),
        "provenance": provenance,
    }


def shots(gold: Sequence[dict[str, Any]], k: int, e: travel.Example, seed: int) -> list[dict[str, Any]]:
    """Gold shots for one request: seeded per request, never showing its own destination."""
    pool = [g for g in gold if g["destination"] != e.destination]
    return teacher.pick_shots(pool, k, e.payload_type, random.Random(f"{seed}:shots:{e.key}"))


# -- clean -------------------------------------------------------------------------------


def probe_entities(probe: Sequence[dict[str, Any]]) -> list[str]:
    """Values the probe suite expects at paths ending in 'destination'."""
    found = {
        str(v)
        for p in probe
        for k, v in (p.get("expect") or {}).items()
        if k.rsplit(".", 1)[-1] == "destination" and str(v).strip()
    }
    return sorted(found)


def destination_filter(entities: Sequence[str]) -> Filter:
    patterns = [(e, re.compile(rf"(?<!\w){re.escape(e.casefold())}(?!\w)")) for e in entities]

    def check(c: Candidate) -> Rejection | None:
        text = f"{c.instruction}\n{c.completion}".casefold()
        for entity, pattern in patterns:
            if pattern.search(text):
                return "probe_destination", {"destination": entity}
        return None

    return check


def clean_filters(probe: Sequence[dict[str, Any]], params: Any) -> list[Filter]:
    if not params.clean.exclude_probe_destinations:
        return []
    return [destination_filter(probe_entities(probe))]


# -- pairs -------------------------------------------------------------------------------


def _others(record: dict[str, Any], pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in pool if r["completion"] != record["completion"]]


def off_topic(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """Another record's valid envelope that fails this record's task checks (another
    destination), preferring one of the same payload type so only the topic is wrong."""
    expect = record["meta"].get("expect", {})
    topic_keys = [k for k in expect if k != "payload_type"]
    if not topic_keys:
        return None
    sub = {k: expect[k] for k in topic_keys}
    candidates = [r for r in _others(record, pool) if not all(task_checks(json.loads(r["completion"]), sub).values())]
    same_type = [r for r in candidates if r["meta"].get("payload_type") == record["meta"].get("payload_type")]
    chosen = same_type or candidates
    return rng.choice(chosen)["completion"] if chosen else None


def wrong_payload_type(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """An envelope of another payload type: another record's for the same topic when one
    exists, else this envelope relabelled with another allowed payload type."""
    expect = record["meta"].get("expect", {})
    if "payload_type" not in expect:
        return None
    topic = {k: v for k, v in expect.items() if k != "payload_type"}
    others = [
        r for r in _others(record, pool)
        if not task_checks(json.loads(r["completion"]), {"payload_type": expect["payload_type"]})["payload_type"]
    ]
    same_topic = [r for r in others if all(task_checks(json.loads(r["completion"]), topic).values())]
    if same_topic:
        return rng.choice(same_topic)["completion"]
    allowed = contract.schema.get("properties", {}).get("payload_type", {}).get("enum", [])
    choices = [t for t in allowed if t != expect["payload_type"]]
    if not choices:
        return rng.choice(others)["completion"] if others else None
    obj = json.loads(record["completion"])
    obj["payload_type"] = rng.choice(choices)
    return contract.canonical_text(obj)


TASK = Task(
    name="travel",
    stratify_by=("payload_type",),
    clean_reasons=("probe_destination",),
    clean_filters=clean_filters,
    negatives={"off_topic": off_topic, "wrong_payload_type": wrong_payload_type},
    examples=examples,
    template_record=template_record,
    example_meta=example_meta,
    gold_fields=GOLD_FIELDS,
    shots=shots,
)
