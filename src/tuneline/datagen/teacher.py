"""The teacher source: few-shot completion-format generation through the one model loader.

The teacher is always prompted in completion format (no chat template, no special tokens
added, sentinel-checked by ``Loaded.encode``): k gold examples as shots, then the request,
using ``prompting.few_shot``. Generation is batched with left padding; each batch is seeded
(``seed + batch index``) so a run is reproducible on the same hardware. A sample ends at
the end-of-sequence token, at the start of a new ``### Instruction`` block (the model
starting another shot), or at ``max_new_tokens`` (finish reason ``length``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuneline.prompting import INSTRUCTION_HEADER, few_shot

STOP_TEXT = "\n" + INSTRUCTION_HEADER.strip()


@dataclass(frozen=True)
class Sample:
    text: str
    finish_reason: str  # "stop" or "length"
    n_tokens: int


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
) -> list[list[Sample]]:
    """``n_samples`` samples for each prompt, in prompt order."""
    import torch
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    tokenizer = loaded.tokenizer
    encoded = loaded.encode(list(prompts))
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    sampling: dict[str, Any] = {"do_sample": temperature > 0}
    if temperature > 0:
        sampling.update(temperature=temperature, top_p=top_p)
    results: list[list[Sample]] = []
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    columns = (TextColumn("teacher"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
        task = bar.add_task("teacher", total=len(prompts))
        for index, batch in enumerate(batches):
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor(
                [[pad_id] * (width - len(ids)) + ids for ids in batch], device=loaded.device
            )
            attention = torch.tensor(
                [[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=loaded.device
            )
            torch.manual_seed(seed + index)
            with torch.no_grad():
                out = loaded.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n_samples,
                    pad_token_id=pad_id,
                    eos_token_id=eos_id,
                    **sampling,
                )
            new_tokens = out[:, width:].tolist()
            for p in range(len(batch)):
                results.append(
                    [
                        _sample(tokenizer, new_tokens[p * n_samples + s], eos_id)
                        for s in range(n_samples)
                    ]
                )
            bar.advance(task, len(batch))
    return results


def _sample(tokenizer: Any, tokens: list[int], eos_id: int) -> Sample:
    finish = "length"
    if eos_id in tokens:
        tokens = tokens[: tokens.index(eos_id)]
        finish = "stop"
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if STOP_TEXT in text:
        text = text[: text.index(STOP_TEXT)]
        finish = "stop"
    return Sample(text=text.strip(), finish_reason=finish, n_tokens=len(tokens))
