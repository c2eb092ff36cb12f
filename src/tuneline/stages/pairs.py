"""pairs: preference pairs for DPO — diverse contract negatives, on-policy samples, imports.

Reads:  ``paths.clean``/train.jsonl (chosen = each record's valid envelope), the contract
        schema (``paths.schema_file``), ``paths.generated``/preferences.jsonl when present
        (imported triples with a raw instruction as prompt), and ``paths.sft_model`` when
        ``pairs.on_policy`` is set.
Writes: ``paths.pairs``/train.jsonl — ``{"id", "prompt", "chosen", "rejected", "meta":
        {"strategy", ...}}`` with the prompt in the model format and plain completions (the
        trainer appends the terminator); ``paths.metrics``/pairs.json (counts per strategy).
Params: ``task``, ``pairs``, ``seed``, ``model.format`` (and ``model`` for on-policy sampling).

Every diverse negative fails the contract (``Contract.judge``: parse, schema, or a task
check with the record's ``meta.expect``) while its chosen passes; a candidate that would
pass is not used. Generic strategies: drop_field (a required root field removed),
array_root (the object wrapped in an array), truncate (cut mid-envelope), invalid_json (a
syntax error), repeat_item (the longest list repeats one of its items until a length limit
cuts the text: the loop greedy decoding of a small model falls into). The task adds its
own (``tuneline.tasks``; travel: off_topic, another record's envelope that fails this
record's task checks, and wrong_payload_type, an envelope of another payload type or this
one relabelled); a strategy the task lacks is refused.

On-policy: ``pairs.on_policy_k`` samples per prompt from ``tuneline.generation.generate``
(seeded with ``seed``, with mean log-probs); best vs worst by ``Verdict.score`` then log-prob.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tuneline import tasks
from tuneline.contract import Contract, load_contract
from tuneline.errors import InputError
from tuneline.params import Params
from tuneline.prompting import render
from tuneline.provenance import sha256_path, stamp
from tuneline.records import read_jsonl, write_json, write_jsonl, written

RECORD_FIELDS = {"prompt": (str, list), "completion": str, "meta": dict}
PREFERENCE_FIELDS = {"prompt": str, "chosen": str, "rejected": str}


# -- diverse negatives -------------------------------------------------------------------

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


STRATEGIES: dict[str, Strategy] = {
    "repeat_item": repeat_item,
    "drop_field": drop_field,
    "array_root": array_root,
    "truncate": truncate,
    "invalid_json": invalid_json,
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
    path: Path, task: tasks.Task | None = None,
) -> tuple[list[dict[str, Any]], Counter[str]]:
    """``per_record`` pairs per record, strategies rotated so each is used about equally
    (``task``'s negatives are available by name; default: the travel task)."""
    available = strategies_for(task or tasks.get("travel"), strategies)
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
            if rejected is None or contract.judge(rejected, expect).passes:
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


# -- imported and on-policy pairs --------------------------------------------------------


def imported(path: Path, fmt: str) -> list[dict[str, Any]]:
    """Imported triples (raw instruction as prompt), rendered in the model format."""
    records = read_jsonl(path, required=PREFERENCE_FIELDS, allow_empty=True)
    for number, r in enumerate(records, start=1):
        if not isinstance(r.get("meta", {}), dict):
            raise InputError(f"{path}:{number}: field 'meta' must be an object, got {type(r['meta']).__name__}")
    return [
        {
            "id": f"imported:{r['id']}",
            "prompt": render(r["prompt"], fmt),
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "meta": {**r.get("meta", {}), "strategy": "imported", "source_id": r["id"]},
        }
        for r in records
    ]


def sample(loaded: Any, prompts: list[Any], params: Params) -> list[list[tuple[str, float]]]:
    """k samples per prompt with their mean token log-prob under the sampling model."""
    from tuneline.generation import generate

    pp = params.pairs
    outputs, _ = generate(
        loaded, loaded.encode(prompts), batch_size=pp.on_policy_batch_size, max_new_tokens=pp.on_policy_max_new_tokens,
        do_sample=True, temperature=pp.on_policy_temperature, top_p=pp.on_policy_top_p, n=pp.on_policy_k,
        seed=params.seed, logprobs=True, desc="on-policy",
    )
    return [[(g.text, g.mean_logp) for g in group] for group in outputs]


def on_policy(records: list[dict[str, Any]], contract: Contract, params: Params) -> list[dict[str, Any]]:
    """Best vs worst of k samples per prompt, ranked by contract score then mean log-prob."""
    from tuneline.training import load_for_eval

    pp = params.pairs
    chosen_records = records[: pp.on_policy_max_prompts]
    loaded = load_for_eval(params, params.paths.sft_model)
    loaded.model.eval()
    samples = sample(loaded, [r["prompt"] for r in chosen_records], params)
    pairs = []
    for record, group in zip(chosen_records, samples, strict=True):
        expect = record["meta"].get("expect", {})
        scored = sorted(
            ((contract.judge(text, expect).score, logp, text) for text, logp in group),
            key=lambda s: (s[0], s[1]),
        )
        worst, best = scored[0], scored[-1]
        if best[0] == worst[0] or best[2] == worst[2]:
            continue
        pairs.append(
            {
                "id": f"{record['id']}:on_policy",
                "prompt": record["prompt"],
                "chosen": best[2].strip(),
                "rejected": worst[2].strip(),
                "meta": {
                    "strategy": "on_policy", "source_id": record["id"], "expect": expect,
                    "chosen_score": best[0], "rejected_score": worst[0],
                    "chosen_mean_logp": round(best[1], 4), "rejected_mean_logp": round(worst[1], 4),
                },
            }
        )
    return pairs


def run(params: Params) -> dict[str, Any]:
    pp = params.pairs
    train_path = Path(params.paths.clean) / "train.jsonl"
    records = read_jsonl(train_path, required=RECORD_FIELDS)
    for number, record in enumerate(records, start=1):
        record["_line"] = number
    if pp.max_records is not None and pp.max_records < len(records):
        records = sorted(random.Random(params.seed).sample(records, pp.max_records), key=lambda r: r["_line"])
    contract = load_contract(params.paths.schema_file)

    task = tasks.get(params.task)
    pairs, skipped = negatives(
        records, contract, list(pp.strategies), pp.negatives_per_record, params.seed, train_path, task
    )
    if pp.on_policy:
        pairs += on_policy(records, contract, params)
    preferences = Path(params.paths.generated) / "preferences.jsonl"
    if pp.include_imported and preferences.is_file():
        pairs += imported(preferences, params.model.format)
    if not pairs:
        raise InputError(f"{train_path}: no preference pairs could be made (pairs.strategies: {list(pp.strategies)})")

    out = Path(params.paths.pairs) / "train.jsonl"
    write_jsonl(out, pairs)
    counts = Counter(p["meta"]["strategy"] for p in pairs)
    metrics = {
        "pairs": len(pairs),
        "source_records": len(records),
        "per_strategy": dict(sorted(counts.items())),
        "skipped_per_strategy": dict(sorted(skipped.items())),
        "data_sha256": sha256_path(written(out)),
        "provenance": stamp(seed=params.seed),
    }
    write_json(Path(params.paths.metrics) / "pairs.json", metrics)
    return metrics
