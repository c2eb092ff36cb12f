"""The teacher source: few-shot completion-format generation through the one model loader.

The teacher is always prompted in completion format (no chat template, no special tokens
added, sentinel-checked by ``Loaded.encode``): k gold examples as shots, then the request,
using ``prompting.few_shot``. Generation is ``tuneline.generation.generate`` (longest first,
left padding, seeded once with ``seed`` so a run is reproducible on the same hardware;
greedy at temperature 0). A sample ends at a stop token (finish reason ``eos``), at the
start of a new ``### Instruction`` block (the model starting another shot: ``stop``), or at
``max_new_tokens`` (``length``); its text is stripped. Launched with several processes
(``compute.num_processes``), each generates a share of the prompts (``tuneline.parallel``).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tuneline import parallel, tasks
from tuneline.contract import Contract, parse_lenient
from tuneline.generation import Generation
from tuneline.params import Params
from tuneline.prompting import INSTRUCTION_HEADER, few_shot
from tuneline.records import read_jsonl

STOP_TEXT = "\n" + INSTRUCTION_HEADER.strip()
GOLD = "gold.jsonl"


def pick_shots(
    gold: Sequence[dict[str, Any]], k: int, payload_type: str | None, rng: random.Random
) -> list[dict[str, Any]]:
    """k gold records: one of the requested payload type first (when there is one), then others."""
    if k == 0 or not gold:
        return []
    ordered = sorted(gold, key=lambda g: g["id"])
    same = [g for g in ordered if g.get("payload_type") == payload_type]
    first = [rng.choice(same)] if same else []
    rest = [g for g in ordered if g not in first]
    return first + rng.sample(rest, min(len(rest), k - len(first)))


def shot_prompt(shots: Sequence[tuple[str, str]], instruction: str) -> str:
    return few_shot(shots, instruction)


def generate(
    loaded: Any,
    prompts: Sequence[str],
    *,
    n_samples: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[list[Generation]]:
    """``n_samples`` samples for each prompt, in prompt order."""
    outputs, _ = parallel.generate(  # split across processes when launched with several
        loaded,
        loaded.encode(list(prompts)),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature,
        top_p=top_p,
        n=n_samples,
        seed=seed,
        stop_texts=[STOP_TEXT],
        desc="teacher",
        progress=progress,
    )
    return [[replace(g, text=g.text.strip()) for g in group] for group in outputs]


def teacher_records(
    params: Params, task: tasks.Task, examples: Sequence[Any], contract: Contract
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The teacher's records and stats: ``tp.max_prompts`` seeded requests, each prompted
    with the task's shots from ``gold.jsonl``, sampled ``tp.n_samples`` times; a sample
    that parses is kept as canonical JSON, any other as its raw text."""
    from tuneline import modeling

    tp = params.generate.sources.teacher
    gold = read_jsonl(Path(params.paths.seed_dir) / GOLD, required=dict(task.gold_fields))
    rng = random.Random(f"{params.seed}:teacher")
    requests = list(examples)
    if tp.max_prompts is not None and tp.max_prompts < len(requests):
        requests = [requests[i] for i in sorted(rng.sample(range(len(requests)), tp.max_prompts))]
    shots_for = [task.shots(gold, tp.shots, e, params.seed) for e in requests]
    prompts = [
        shot_prompt(
            [(g["instruction"], contract.canonical_text(g["completion"])) for g in shots],
            e.instruction,
        )
        for e, shots in zip(requests, shots_for, strict=True)
    ]
    model_path = tp.model or params.paths.base_model
    spec = params.model.model_copy(update={"format": "completion"})
    loaded = modeling.load(model_path, spec)
    samples = generate(
        loaded,
        prompts,
        n_samples=tp.n_samples,
        temperature=tp.temperature,
        top_p=tp.top_p,
        max_new_tokens=tp.max_new_tokens,
        batch_size=tp.batch_size,
        seed=params.seed,
    )
    decoding = {
        "temperature": tp.temperature,
        "top_p": tp.top_p,
        "max_new_tokens": tp.max_new_tokens,
        "n_samples": tp.n_samples,
        "do_sample": tp.temperature > 0,
        "batch_size": tp.batch_size,
    }
    teacher_ref = {
        "model": str(model_path),
        "content_sha256": loaded.provenance["content_sha256"],
        "dtype": loaded.provenance["dtype"],
        "device": loaded.provenance["device"],
    }
    records = []
    parsed_count = 0
    finish = Counter()
    for e, shots, outs in zip(requests, shots_for, samples, strict=True):
        for s, sample in enumerate(outs):
            parsed = parse_lenient(sample.text)
            completion = sample.text
            if parsed.ok and isinstance(parsed.value, dict):
                completion = contract.canonical_text(parsed.value)
                parsed_count += 1
            finish[sample.finish_reason] += 1
            records.append(
                {
                    "id": f"teacher-{e.key}-{s}",
                    "prompt": e.instruction,
                    "completion": completion,
                    "meta": task.example_meta(e, "teacher"),
                    "provenance": {
                        "source": "teacher",
                        "teacher": teacher_ref,
                        "format": "completion",
                        "decoding": decoding,
                        "seed": params.seed,
                        "sample": s,
                        "shots": [g["id"] for g in shots],
                        "finish_reason": sample.finish_reason,
                        "n_tokens": sample.n_tokens,
                        "parsed": parsed.ok,
                    },
                }
            )
    stats = {
        "prompts": len(requests),
        "samples": len(records),
        "parsed": parsed_count,
        "finish_reasons": dict(sorted(finish.items())),
        "teacher": teacher_ref,
        "decoding": decoding,
    }
    return records, stats
