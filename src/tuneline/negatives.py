"""Contract-violating negatives for preference pairs: each strategy turns a record's valid
envelope into a rejected completion that fails the strict contract (``Contract.judge`` with
``strict=True``: the whole text one JSON document, then schema and the task checks with
the record's ``meta.expect``); a candidate that would pass is not used. Strict, because a
completion is the whole text the model writes: a document followed by more text is a
wrong completion even though the probe's lenient parser reads the document out of it.

Generic strategies: drop_field (a required root field removed), array_root (the object
wrapped in an array), truncate (cut mid-envelope), invalid_json (a syntax error),
repeat_item (the longest list repeats one of its items until a length limit cuts the text:
the loop greedy decoding of a small model falls into), run_on (the complete envelope, then
closing braces: the model does not stop after the document). A task adds its own
(``tuneline.tasks``); a strategy the task lacks is refused.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneline import tasks
from tuneline.contract import Contract
from tuneline.errors import InputError

Strategy = Callable[[dict[str, Any], list[dict[str, Any]], Contract, random.Random], str | None]


def drop_field(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    obj = json.loads(record["completion"])
    required = [k for k in contract.schema.get("required", []) if k in obj]
    if not required:
        return None
    del obj[rng.choice(required)]
    return contract.canonical_text(obj)


def array_root(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    return "[" + record["completion"] + "]"


def truncate(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    text = record["completion"]
    cut = rng.randint(len(text) // 3, max(len(text) // 3, len(text) * 9 // 10))
    return text[:cut]


def invalid_json(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """One common syntax slip: a missing comma, a trailing comma, or single-quoted keys."""
    text = record["completion"]
    commas = [i for i, ch in enumerate(text) if ch == "," and text[i + 1 : i + 2] == '"']
    kind = rng.choice(["missing_comma", "trailing_comma", "single_quotes"])
    if kind == "missing_comma" and commas:
        i = rng.choice(commas)
        return text[:i] + text[i + 1 :]
    if kind == "trailing_comma":
        return text[:-1] + ",}"
    return text.replace('":', "':").replace(',"', ",'").replace('{"', "{'")


def _lists(node: Any) -> list[list[Any]]:
    """Every list inside a parsed envelope, outermost first."""
    found: list[list[Any]] = []
    if isinstance(node, list):
        found.append(node)
        for item in node:
            found.extend(_lists(item))
    elif isinstance(node, dict):
        for value in node.values():
            found.extend(_lists(value))
    return found


def repeat_item(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """The longest list keeps repeating one of its items and the text is cut at twice the
    envelope's length, mid-loop, as a generation limit would cut it."""
    obj = json.loads(record["completion"])
    lists = [lst for lst in _lists(obj) if lst]
    if not lists:
        return None
    target = max(lists, key=lambda lst: (len(lst), len(json.dumps(lst))))
    item = rng.choice(target)
    limit = 2 * len(record["completion"])
    repeats = limit // max(len(json.dumps(item, ensure_ascii=False)), 1) + 1
    target.extend([item] * repeats)
    return contract.canonical_text(obj)[:limit]


def run_on(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """The complete envelope followed by 8 to 48 closing braces: the run-on of a model that
    does not stop after the document (it goes on until the token limit). The chosen text
    ends at the document, so the pair differs only in what comes after it."""
    return record["completion"] + "}" * rng.randint(8, 48)


STRATEGIES: dict[str, Strategy] = {
    "repeat_item": repeat_item,
    "drop_field": drop_field,
    "array_root": array_root,
    "truncate": truncate,
    "invalid_json": invalid_json,
    "run_on": run_on,
}


def strategies_for(task: tasks.Task, names: list[str]) -> dict[str, Strategy]:
    """The generic strategies and the task's negatives; InputError for a name neither has."""
    known = {**STRATEGIES, **task.negatives}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InputError(
            f"pairs.strategies: {', '.join(map(repr, unknown))} not available for task {task.name!r} "
            f"(allowed: {', '.join(known)})"
        )
    return known


def negatives(
    records: list[dict[str, Any]], contract: Contract, strategies: list[str], per_record: int, seed: int,
    path: Path, task: tasks.Task,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """``per_record`` pairs per record, strategies rotated so each is used about equally
    (``task``'s negatives are available by name; default: the travel task)."""
    available = strategies_for(task, strategies)
    rng = random.Random(seed)
    pairs: list[dict[str, Any]] = []
    skipped: Counter[str] = Counter()
    turn = 0
    for record in records:
        expect = record["meta"].get("expect", {})
        verdict = contract.judge(record["completion"], expect)
        if not verdict.passes:
            raise InputError(
                f"{path}:{record['_line']}: the completion of record {record['id']!r} fails the contract "
                f"(valid={verdict.valid}, checks={verdict.checks}); pairs needs valid chosen envelopes"
            )
        made = 0
        for offset in range(len(strategies)):
            if made == per_record:
                break
            name = strategies[(turn + offset) % len(strategies)]
            rejected = available[name](record, records, contract, rng)
            if rejected is None or contract.judge(rejected, expect, strict=True).passes:
                skipped[name] += 1
                continue
            pairs.append(
                {
                    "id": f"{record['id']}:{name}",
                    "prompt": record["prompt"],
                    "chosen": record["completion"],
                    "rejected": rejected,
                    "meta": {"strategy": name, "source_id": record["id"], "expect": expect},
                }
            )
            made += 1
        turn += 1
    return pairs, skipped


