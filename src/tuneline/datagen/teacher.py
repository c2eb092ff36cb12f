"""The teacher source: few-shot completion-format generation through the one model loader.

The teacher is always prompted in completion format (no chat template, no special tokens
added, sentinel-checked by ``Loaded.encode``): k gold examples as shots, then the request,
using ``prompting.few_shot``. Generation is ``tuneline.generation.generate`` (longest first,
left padding, seeded once with ``seed`` so a run is reproducible on the same hardware;
greedy at temperature 0). A sample ends at a stop token (finish reason ``eos``), at the
start of a new ``### Instruction`` block (the model starting another shot: ``stop``), or at
``max_new_tokens`` (``length``); its text is stripped.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tuneline import generation
from tuneline.generation import Generation
from tuneline.prompting import INSTRUCTION_HEADER, few_shot

STOP_TEXT = "\n" + INSTRUCTION_HEADER.strip()


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
    outputs, _ = generation.generate(
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
