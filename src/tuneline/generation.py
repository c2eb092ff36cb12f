"""The one token-level generation loop: probe, teacher and on-policy sampling all use it.

``generate(loaded, prompt_ids, ...)`` takes already encoded prompts (``Loaded.encode``) and
knows nothing about the task. Its rules, the same for every caller:

- order: prompts are batched longest first (ties by position), so a batch wastes little
  padding; results come back in prompt order;
- padding: left, with an attention mask, pad id = the tokenizer's pad token or else the
  first stop id; in float32 a prompt generates the same tokens alone or padded in a batch;
- finished rows: a row leaves the batch (forward pass and KV cache) at the step it writes a
  stop token (``_decode``), so a batch pays per step for the rows still writing, not for
  every row until its longest output ends; the tokens are transformers' greedy
  ``generate``'s on the same batch (tests/test_generation.py). A decode step costs a fixed
  part plus a part per row, so a larger ``batch_size`` is cheaper per prompt. The KV cache
  of each full-attention layer is allocated once per batch for the prompt and every new
  token (``_preallocated_cache``) and written in place, where transformers' dynamic cache
  copies the whole cache into a new tensor at every step; attention reads the same values;
- randomness: greedy unless ``do_sample``. Sampling needs a ``seed`` (ValueError without
  one) and draws sample ``j`` of prompt ``i`` from its own CPU ``torch.Generator``, seeded
  with ``sample_seed(seed, i, j)``: the first 8 bytes of
  ``sha256(f"{seed}:{i}:{j}".encode())`` read big-endian, shifted right by one bit (63
  bits). ``i`` is the prompt's index in the caller's full prompt list (``prompt_index``,
  default ``range(len(prompt_ids))``; ``tuneline.parallel`` passes each share's global
  indices), so a prompt's samples do not depend on the batch size, on the other prompts of
  the call or on the number of processes (float32; same hardware). Each step, row by row,
  the raw logits go through transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``
  (the model's ``generation_config.top_k``, else transformers' sampling default 50) and
  ``TopPLogitsWarper``, in the order transformers' own sampling applies them; the row then
  draws one uniform number from its generator and takes the token where it falls in the
  cumulative softmax (float64). transformers runs greedy on the result (every other token
  at -inf), so ``n`` samples of a prompt are ``n`` rows of the batch, ``j`` = 0..n-1;
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
- ``static_cache``: transformers' own ``generate`` with a preallocated KV cache
  (``cache_implementation="static"``), whose decode step it compiles on CUDA (CUDA graphs);
  finished rows stay in the batch (padded). Every batch then has one
  shape: prompts are left-padded to the longest prompt of the call and the last batch is
  filled up with copies of its first prompt (their outputs are dropped), so the step is
  compiled once. Same tokens as the dynamic cache up to float rounding;
- ``logits_processor``: called once per batch with its number of rows (prompts times
  ``n``), it returns the transformers ``LogitsProcessorList`` for that batch (the probe's
  schema guide, ``tuneline.guided``); it runs before temperature and top-p.
"""

from __future__ import annotations

import hashlib
import inspect
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


def sample_seed(seed: int, prompt_index: int, sample: int) -> int:
    """The 63-bit seed of sample ``sample`` of prompt ``prompt_index`` under ``seed``."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


TRANSFORMERS_DEFAULT_TOP_K = 50  # transformers samples with top-k 50 unless the model sets top_k


def _sampling_processors(loaded: Any, temperature: float, top_p: float, generators: list[Any]) -> Any:
    """transformers' own warpers, in its sampling order, then one seeded draw per row."""
    from transformers import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    configured = getattr(loaded.model.generation_config, "top_k", None)
    top_k = TRANSFORMERS_DEFAULT_TOP_K if configured is None else int(configured)
    processors = LogitsProcessorList()
    if temperature != 1.0:
        processors.append(TemperatureLogitsWarper(temperature))
    if top_k != 0:
        processors.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    processors.append(_RowDraw(generators))
    return processors


class _RowDraw:
    """A logits processor: row ``r`` draws one token from softmax(scores[r]) with
    ``generators[r]`` and keeps only that token (0, every other -inf), so greedy takes it."""

    def __init__(self, generators: list[Any]) -> None:
        self.generators = generators

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if scores.shape[0] != len(self.generators):
            raise RuntimeError(f"generate: {scores.shape[0]} rows for {len(self.generators)} sample generators")
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        cumulative = torch.softmax(scores.double(), dim=-1).cumsum(dim=-1)
        target = (uniform.to(scores.device) * cumulative[:, -1]).unsqueeze(-1)
        chosen = torch.searchsorted(cumulative, target, right=True).clamp(max=scores.shape[-1] - 1)
        kept = torch.full_like(scores, float("-inf"))
        return kept.scatter_(1, chosen, 0.0)


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
    prompt_index: Sequence[int] | None = None,
    logits_processor: Callable[[int], Any] | None = None,
) -> tuple[list[list[Generation]], float]:
    """``n`` generations per prompt, in prompt order, and the seconds spent in ``generate``.

    ``prompt_index[k]``: the index of ``prompt_ids[k]`` in the caller's full prompt list, which
    seeds its samples (default: its position here).
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig, LogitsProcessorList

    if n > 1 and not do_sample:
        raise ValueError("generate: n > 1 needs do_sample (greedy decoding gives n equal texts)")
    if do_sample and seed is None:
        raise ValueError("generate: do_sample needs a seed (each sample's generator is seeded from it)")
    indices = list(range(len(prompt_ids))) if prompt_index is None else [int(i) for i in prompt_index]
    if len(indices) != len(prompt_ids):
        raise ValueError(f"generate: {len(indices)} prompt_index values for {len(prompt_ids)} prompts")
    tokenizer = loaded.tokenizer
    stops = stop_token_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(  # greedy: sampling is done by the seeded processors
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stops,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_logits=logprobs,
        **({"cache_implementation": "static"} if static_cache else {}),
    )
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
            rows = [(i, j) for i in batch for j in range(n)]  # sample j of prompt i
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for row, (i, _) in enumerate(rows):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            processors = LogitsProcessorList(logits_processor(len(rows)) if logits_processor else [])
            if do_sample:  # after the caller's processors (a guide masks before the draw)
                generators = [
                    torch.Generator().manual_seed(sample_seed(seed, indices[i], j)) for i, j in rows
                ]
                processors.extend(_sampling_processors(loaded, temperature, top_p, generators))
            began = time.perf_counter()
            with torch.inference_mode():
                if static_cache:  # transformers' loop: one batch shape, a compiled step on CUDA
                    output = loaded.model.generate(
                        input_ids=input_ids.to(loaded.device),
                        attention_mask=attention.to(loaded.device),
                        generation_config=config,
                        logits_processor=processors,
                    )
                    new_ids = output.sequences[:, width:]
                    token_logps = _token_logps(output.logits, new_ids) if logprobs else None
                else:
                    new_ids, token_logps = _decode(
                        loaded.model,
                        input_ids.to(loaded.device),
                        attention.to(loaded.device),
                        max_new_tokens=max_new_tokens,
                        stops=stops,
                        pad_id=pad_id,
                        processors=processors,
                        logprobs=logprobs,
                    )
            elapsed += time.perf_counter() - began
            for row, i in enumerate(batch[:real]):
                for j in range(n):
                    k = row * n + j
                    results[i].append(
                        _finish(tokenizer, new_ids[k].tolist(), stop_set, stop_texts, token_logps, k)
                    )
            bar.update(real)
    return results, elapsed


def _preallocated_cache(config: Any, capacity: int) -> Any:
    """transformers' ``DynamicCache`` for ``config`` whose full-attention layers hold their
    keys and values in tensors of ``capacity`` positions, allocated at the first write and
    filled in place: the cache the model sees holds the same values at every step, without
    the copy of every earlier position that a concatenating layer makes per step (O(n^2) in
    the output length). Layers of any other kind (sliding window, linear attention) are
    transformers' own."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self) -> None:
            super().__init__()
            self.length = 0

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            rows, heads, _, _ = key_states.shape
            self.device = key_states.device
            self.key_buffer = key_states.new_empty((rows, heads, capacity, key_states.shape[-1]))
            self.value_buffer = value_states.new_empty((rows, value_states.shape[1], capacity, value_states.shape[-1]))
            self.is_initialized = True

        def _views(self) -> None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > capacity:
                raise RuntimeError(f"KV cache of {capacity} positions written past its end ({end})")
            self.key_buffer[:, :, self.length : end] = key_states
            self.value_buffer[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length if self.is_initialized else 0

        def batch_select_indices(self, indices: Any) -> None:
            if self.is_initialized:  # the kept rows' written positions only, into a new buffer
                for name in ("key_buffer", "value_buffer"):
                    old = getattr(self, name)
                    new = old.new_empty((len(indices), *old.shape[1:]))
                    new[:, :, : self.length] = old[indices, :, : self.length]
                    setattr(self, name, new)
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("a preallocated decode cache is never cropped")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("a preallocated decode cache is never repeated")

    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def _decode(
    model: Any,
    input_ids: Any,
    attention: Any,
    *,
    max_new_tokens: int,
    stops: Sequence[int],
    pad_id: int,
    processors: Any,
    logprobs: bool,
) -> tuple[Any, Any]:
    """Greedy decoding of one left-padded batch (after ``processors``) that drops a row from
    the forward pass, and from the KV cache, at the step it writes a stop token; the tokens
    of transformers' greedy ``generate`` (same positions, mask, cache and float32 scores).

    A decode step costs a fixed part (the weights are read once) plus a part per row, so a
    batch no longer pays for its finished rows while its longest output runs on. The
    ``processors`` see every row, as transformers passes them: the tokens so far, a finished
    row continued with ``pad_id``, and for a finished row zero scores, whose result is
    unused. Returns the new tokens (rows x steps run, ``pad_id`` after a stop) and, with
    ``logprobs``, each token's log-probability under the raw logits."""
    import torch

    rows, device = input_ids.shape[0], input_ids.device
    cache = _preallocated_cache(model.config, input_ids.shape[1] + max_new_tokens)
    # the forward's name for it: ``cache`` in newer transformers, ``past_key_values`` before
    forward = inspect.signature(getattr(model, "get_base_model", lambda: model)().forward).parameters
    cache_kwarg = "cache" if "cache" in forward else "past_key_values"
    stop_ids = torch.tensor(sorted(stops), device=device)
    active = torch.arange(rows, device=device)  # the batch rows still in the forward pass
    mask = attention
    step_ids = input_ids
    step_positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    sequences = input_ids  # every row, for the processors
    new = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    token_logps = torch.zeros((rows, max_new_tokens), device=device) if logprobs else None
    steps = 0
    while steps < max_new_tokens:
        out = model(
            input_ids=step_ids,
            attention_mask=mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_kwarg: cache},
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        scores = logits
        if processors:
            every = torch.zeros((rows, logits.shape[-1]), dtype=logits.dtype, device=device)
            every[active] = logits
            scores = processors(sequences, every)[active]
        chosen = scores.argmax(dim=-1)
        new[active, steps] = chosen
        if token_logps is not None:
            token_logps[active, steps] = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
        steps += 1
        if processors:
            column = torch.full((rows, 1), pad_id, dtype=torch.long, device=device)
            column[active, 0] = chosen
            sequences = torch.cat([sequences, column], dim=-1)
        running = ~torch.isin(chosen, stop_ids)
        n_running = int(running.sum())  # one device sync per step, as in transformers' loop
        if steps == max_new_tokens or n_running == 0:
            break
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        step_positions = step_positions[:, -1:] + 1
        step_ids = chosen[:, None]
        if n_running < len(active):  # drop the rows that stopped
            kept = running.nonzero().squeeze(-1)
            cache.batch_select_indices(kept)
            active, mask, step_positions, step_ids = active[kept], mask[kept], step_positions[kept], step_ids[kept]
    return new[:, :steps], None if token_logps is None else token_logps[:, :steps]


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
