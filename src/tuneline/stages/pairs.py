"""pairs: preference pairs for DPO — diverse contract negatives, on-policy samples, imports.

Reads:  ``paths.clean``/train.jsonl (chosen = each record's valid envelope), the contract
        schema (``paths.schema_file``), ``paths.clean``/preferences.jsonl when present
        (imported triples clean kept: leak- and chat-token-checked, prompt in the model format), and ``paths.sft_model`` when
        ``pairs.on_policy`` is set.
Writes: ``paths.pairs``/train.jsonl — ``{"id", "prompt", "chosen", "rejected", "meta":
        {"strategy", ...}}`` with the prompt in the model format and plain completions (the
        trainer appends the terminator); ``paths.metrics``/pairs.json (counts per strategy); the run
        record ``paths.reports``/provenance/pairs.json.
Params: ``task``, ``pairs``, ``seed``, ``model.format`` (and ``model`` for on-policy sampling).

Every diverse negative fails the strict contract (``Contract.judge(strict=True)``: the whole
text one JSON document, then schema and the task checks with the record's ``meta.expect``)
while its chosen passes; a candidate that would pass is not used. Generic strategies:
drop_field (a required root field removed), array_root (the object wrapped in an array),
truncate (cut mid-envelope), invalid_json (a syntax error), repeat_item (the longest list
repeats one of its items until a length limit cuts the text: the loop greedy decoding of a
small model falls into), run_on (the complete envelope, then closing braces). The task adds its
own (``tuneline.tasks``; travel: off_topic, another record's envelope that fails this
record's task checks, and wrong_payload_type, an envelope of another payload type or this
one relabelled); a strategy the task lacks is refused.

On-policy: ``pairs.on_policy_k`` samples per prompt from ``tuneline.generation.generate``
(seeded with ``seed``, with mean log-probs); best vs worst by the strict ``Verdict.score``
(a sample with more text after its document scores below one that stops) then log-prob.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from tuneline import tasks
from tuneline.contract import Contract, load_contract
from tuneline.errors import InputError
from tuneline.negatives import negatives
from tuneline.params import Params
from tuneline.provenance import sha256_path, write_run_provenance
from tuneline.records import read_jsonl, write_json, write_jsonl, written
from tuneline.training.data import read_sample

RECORD_FIELDS = {"prompt": (str, list), "completion": str, "meta": dict}
PREFERENCE_FIELDS = {"prompt": (str, list), "chosen": str, "rejected": str}


# -- imported and on-policy pairs --------------------------------------------------------


def imported(path: Path) -> list[dict[str, Any]]:
    """Imported triples as clean kept them: probe leaks and chat tokens refused, the prompt
    already in the model format."""
    records = read_jsonl(path, required=PREFERENCE_FIELDS, allow_empty=True)
    for number, r in enumerate(records, start=1):
        if not isinstance(r.get("meta", {}), dict):
            raise InputError(f"{path}:{number}: field 'meta' must be an object, got {type(r['meta']).__name__}")
    return [
        {
            "id": f"imported:{r['id']}",
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "meta": {**r.get("meta", {}), "strategy": "imported", "source_id": r["id"]},
        }
        for r in records
    ]


def sample(loaded: Any, prompts: list[Any], params: Params) -> list[list[tuple[str, float]]]:
    """k samples per prompt with their mean token log-prob under the sampling model."""
    from tuneline.parallel import generate  # split across processes when launched with several

    pp = params.pairs
    outputs, _ = generate(
        loaded, loaded.encode(prompts), batch_size=pp.on_policy_batch_size, max_new_tokens=pp.on_policy_max_new_tokens,
        do_sample=True, temperature=pp.on_policy_temperature, top_p=pp.on_policy_top_p, n=pp.on_policy_k,
        seed=params.seed, logprobs=True, desc="on-policy",
    )
    return [[(g.text, g.mean_logp) for g in group] for group in outputs]


def on_policy(records: list[dict[str, Any]], contract: Contract, params: Params) -> list[dict[str, Any]]:
    """Best vs worst of k samples per prompt, ranked by contract score then mean log-prob."""
    from tuneline.modeling import load_for_eval

    pp = params.pairs
    chosen_records = records[: pp.on_policy_max_prompts]
    loaded = load_for_eval(params, params.paths.sft_model)
    loaded.model.eval()
    samples = sample(loaded, [r["prompt"] for r in chosen_records], params)
    pairs = []
    for record, group in zip(chosen_records, samples, strict=True):
        expect = record["meta"].get("expect", {})
        scored = sorted(
            ((contract.judge(text, expect, strict=True).score, logp, text) for text, logp in group),
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
    records = read_sample(train_path, RECORD_FIELDS, pp.max_records, params.seed)
    contract = load_contract(params.paths.schema_file)

    task = tasks.get(params.task)
    pairs, skipped = negatives(
        records, contract, list(pp.strategies), pp.negatives_per_record, params.seed, train_path, task
    )
    if pp.on_policy:
        pairs += on_policy(records, contract, params)
    preferences = Path(params.paths.clean) / "preferences.jsonl"
    if pp.include_imported and preferences.is_file():
        pairs += imported(preferences)
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
    }
    write_json(Path(params.paths.metrics) / "pairs.json", metrics)
    write_run_provenance(params, "pairs", {"seed": params.seed})
    return metrics
