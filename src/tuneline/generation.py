"""The one token-level generation loop: probe, teacher and on-policy sampling all use it.

``generate(loaded, prompt_ids, ...)`` takes already encoded prompts (``Loaded.encode``) and
knows nothing about the task. Its rules, the same for every caller:

- order: prompts are batched longest first (ties by position), so a batch wastes little
  padding; results come back in prompt order;
- padding: left, with an attention mask, pad id = the tokenizer's pad token or else the
  first stop id; in float32 a prompt generates the same tokens alone or padded in a batch;
- randomness: greedy unless ``do_sample``; with a ``seed`` the torch generator is seeded
  once before the first batch, so the same prompts, params and hardware give the same text;
- stop rules: generation ends at any stop token (``stop_token_ids``: the tokenizer's EOS and
  the model's ``generation_config.eos_token_id``; finish reason ``eos``, the stop token is
  counted in ``n_tokens`` and not decoded), or at ``max_new_tokens`` (``length``). Each text
  in ``stop_texts`` cuts the decoded text at its first occurrence (finish reason ``stop``,
  ``n_tokens`` still counts every token generated);
- log-probs: with ``logprobs`` each result carries the mean log-probability, under the
  model's raw logits (before temperature or top-p), of the tokens it generated, stop token
  included;
- no gradients: the loop runs under ``torch.inference_mode``; one tqdm progress bar (stderr)
  counts prompts;
- ``static_cache``: a preallocated KV cache (transformers' ``cache_implementation="static"``),
  whose decode step transformers compiles on CUDA (CUDA graphs). Every batch then has one
  shape: prompts are left-padded to the longest prompt of the call and the last batch is
  filled up with copies of its first prompt (their outputs are dropped), so the step is
  compiled once. Same tokens as the dynamic cache up to float rounding;
- ``logits_processor``: called once per batch with its number of rows (prompts times
  ``n``), it returns the transformers ``LogitsProcessorList`` for that batch (the probe's
  schema guide, ``tuneline.guided``); it runs before temperature and top-p.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tuneline.errors import InputError


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "eos", "stop" or "length"
    n_tokens: int
    mean_logp: float | None = None


def stop_token_ids(loaded: Any) -> list[int]:
    """The tokenizer's EOS and the model's configured EOS ids (sorted); InputError if none."""
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise InputError(f"{loaded.provenance.get('model')}: the tokenizer has no EOS token to stop generation at")
    return sorted(ids)


def generate(
    loaded: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    n: int = 1,
    seed: int | None = None,
    stop_texts: Sequence[str] = (),
    logprobs: bool = False,
    desc: str = "generate",
    progress: bool = True,
    static_cache: bool = False,
    logits_processor: Callable[[int], Any] | None = None,
) -> tuple[list[list[Generation]], float]:
    """``n`` generations per prompt, in prompt order, and the seconds spent in ``generate``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if n > 1 and not do_sample:
        raise ValueError("generate: n > 1 needs do_sample (greedy decoding gives n equal texts)")
    tokenizer = loaded.tokenizer
    stops = stop_token_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=stops,
        pad_token_id=pad_id,
        num_return_sequences=n,
        return_dict_in_generate=True,
        output_logits=logprobs,
        **({"cache_implementation": "static"} if static_cache else {}),
        **sampling,
    )
    if seed is not None:
        torch.manual_seed(seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    results: list[list[Generation]] = [[] for _ in prompt_ids]
    elapsed = 0.0
    stop_set = set(stops)
    with tqdm(total=len(order), desc=desc, unit="prompt", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            real = len(batch)
            width = max(len(prompt_ids[i]) for i in batch)
            if static_cache:  # one shape for every batch: one compiled decode step
                width = max(len(ids) for ids in prompt_ids)
                batch = batch + [batch[0]] * (min(batch_size, len(order)) - real)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            began = time.perf_counter()
            with torch.inference_mode():
                output = loaded.model.generate(
                    input_ids=input_ids.to(loaded.device),
                    attention_mask=attention.to(loaded.device),
                    generation_config=config,
                    logits_processor=logits_processor(len(batch) * n) if logits_processor else None,
                )
                new_ids = output.sequences[:, width:]
                token_logps = _token_logps(output.logits, new_ids) if logprobs else None
            elapsed += time.perf_counter() - began
            for row, i in enumerate(batch[:real]):
                for j in range(n):
                    k = row * n + j
                    results[i].append(
                        _finish(tokenizer, new_ids[k].tolist(), stop_set, stop_texts, token_logps, k)
                    )
            bar.update(real)
    return results, elapsed


def _token_logps(logits: Sequence[Any], new_ids: Any) -> Any:
    import torch

    stacked = torch.stack(tuple(logits), dim=1).float()
    return torch.log_softmax(stacked, dim=-1).gather(-1, new_ids.unsqueeze(-1)).squeeze(-1)


def _finish(
    tokenizer: Any, new: list[int], stop_set: set[int], stop_texts: Sequence[str], token_logps: Any, row: int
) -> Generation:
    end = next((j for j, t in enumerate(new) if t in stop_set), None)
    if end is None:
        kept, finish, count = new, "length", len(new)
    else:
        kept, finish, count = new[:end], "eos", end + 1
    text = tokenizer.decode(kept, skip_special_tokens=True)
    cuts = [text.index(s) for s in stop_texts if s in text]
    if cuts:
        text, finish = text[: min(cuts)], "stop"
    mean_logp = None
    if token_logps is not None:
        mean_logp = float(token_logps[row, :count].mean()) if count else float("-inf")
    return Generation(text=text, finish_reason=finish, n_tokens=count, mean_logp=mean_logp)
