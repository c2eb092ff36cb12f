"""The one generation loop: batching, stop rules, sampling seeds and log-probs."""

from __future__ import annotations

import pytest

from tuneline import modeling
from tuneline.generation import generate, sample_seed
from tuneline.params import parse_params

PROMPTS = [
    "### Instruction\n" + "Plan a trip. " * (1 + 2 * i) + city + "\n\n### Response\n"
    for i, city in enumerate(["Lisbon", "Tokyo", "Paris", "Lisbon", "Tokyo"])
]


@pytest.fixture(scope="module")
def loaded(noisy_model_dir):
    """The tiny tokenizer with larger random weights (varied output), loaded in float32."""
    return modeling.load(noisy_model_dir, parse_params({"model": {"device": "cpu", "dtype": "float32"}}).model)


def _left_padded(loaded, prompts):
    """The prompts encoded and left-padded into one batch, as the generation loop pads them:
    (input ids, attention mask, pad id)."""
    import torch

    ids = loaded.encode(prompts)
    width = max(map(len, ids))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, prompt in enumerate(ids):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    return input_ids, attention, pad


def _texts(outputs):
    return [[(g.text, g.finish_reason, g.n_tokens) for g in group] for group in outputs]


def test_batched_equals_one_at_a_time_in_float32(loaded):
    ids = loaded.encode(PROMPTS)
    batched, _ = generate(loaded, ids, batch_size=3, max_new_tokens=8, progress=False)
    alone, _ = generate(loaded, ids, batch_size=1, max_new_tokens=8, progress=False)
    assert _texts(batched) == _texts(alone)
    assert len({group[0].text for group in batched}) > 2  # outputs depend on the prompt
    # results come back in prompt order: each equals its own single-prompt run
    for i, prompt_ids in enumerate(ids):
        [[single]], _ = generate(loaded, [prompt_ids], batch_size=1, max_new_tokens=8, progress=False)
        assert (single.text, single.n_tokens) == (batched[i][0].text, batched[i][0].n_tokens)


def test_stop_token_and_stop_text(loaded):
    ids = loaded.encode(PROMPTS[:1])
    [[free]], _ = generate(loaded, ids, batch_size=1, max_new_tokens=8, progress=False)
    assert free.finish_reason == "length" and free.n_tokens == 8
    cut_at = free.text[len(free.text) // 2 :][:3]
    [[cut]], _ = generate(loaded, ids, batch_size=1, max_new_tokens=8, stop_texts=[cut_at], progress=False)
    assert cut.finish_reason == "stop" and cut.text == free.text[: free.text.index(cut_at)]
    assert cut.n_tokens == 8  # every generated token is counted
    tokens = loaded.tokenizer(free.text, add_special_tokens=False)["input_ids"]
    stop = tokens[2]
    original = loaded.model.generation_config.eos_token_id
    loaded.model.generation_config.eos_token_id = [stop]
    try:
        [[stopped]], _ = generate(loaded, ids, batch_size=1, max_new_tokens=8, progress=False)
    finally:
        loaded.model.generation_config.eos_token_id = original
    first = tokens.index(stop)
    assert stopped.finish_reason == "eos" and stopped.n_tokens == first + 1
    assert stopped.text == loaded.tokenizer.decode(tokens[:first])


def test_sampling_is_seeded_and_logprobs_match_a_forward_pass(loaded):
    import torch

    ids = loaded.encode(PROMPTS)
    # temperature and top-p change the draw, not the log-prob, which is under the raw logits
    kwargs = dict(batch_size=2, max_new_tokens=4, do_sample=True, temperature=0.7, top_p=0.9, n=3, progress=False)
    a, _ = generate(loaded, ids, seed=7, logprobs=True, **kwargs)
    b, _ = generate(loaded, ids, seed=7, logprobs=True, **kwargs)
    assert _texts(a) == _texts(b) and all(len(group) == 3 for group in a)
    # the mean log-prob is that of the generated tokens under a plain forward pass
    checked = 0
    for prompt_ids, group in zip(ids, a, strict=True):
        for g in group:
            new = loaded.tokenizer(g.text, add_special_tokens=False)["input_ids"]
            if g.finish_reason == "eos":
                new = [*new, loaded.tokenizer.eos_token_id]
            if len(new) != g.n_tokens:  # decode/encode round trip not exact for this sample
                continue
            full = torch.tensor([prompt_ids + new])
            with torch.inference_mode():
                logits = loaded.model(full).logits[0, len(prompt_ids) - 1 : -1].float()
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(new).unsqueeze(-1)).mean()
            assert g.mean_logp == pytest.approx(float(expected), abs=1e-4)
            checked += 1
    assert checked >= 1
    plain, _ = generate(loaded, ids, seed=7, **kwargs)
    assert all(x.mean_logp is None for group in plain for x in group)


def test_sample_seed_rule():
    """The documented rule: sha256 of "seed:index:sample", first 8 bytes big-endian, 63 bits."""
    import hashlib

    digest = hashlib.sha256(b"7:12:3").hexdigest()
    assert sample_seed(7, 12, 3) == int(digest[:16], 16) >> 1
    assert 0 <= sample_seed(0, 0, 0) < 2**63
    assert len({sample_seed(0, i, j) for i in range(20) for j in range(3)}) == 60


def test_sampled_outputs_do_not_depend_on_batching_or_the_other_prompts(loaded):
    """A prompt's samples come from (seed, its index, sample number) alone: the same text for
    any batch size, static cache or not, and in a shuffled subset given the same indices."""
    ids = loaded.encode(PROMPTS)
    kwargs = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=1.0, n=2, seed=3, progress=False)
    alone, _ = generate(loaded, ids, batch_size=1, **kwargs)
    batched, _ = generate(loaded, ids, batch_size=4, **kwargs)
    assert _texts(batched) == _texts(alone)
    static, _ = generate(loaded, ids, batch_size=2, static_cache=True, **kwargs)
    assert _texts(static) == _texts(alone)
    order = [3, 0, 4]
    subset, _ = generate(loaded, [ids[k] for k in order], batch_size=2, prompt_index=order, **kwargs)
    assert _texts(subset) == [_texts(alone)[k] for k in order]
    # really sampled: the two samples of a prompt differ, and another seed gives other text
    assert sum(group[0].text != group[1].text for group in alone) >= 3
    other, _ = generate(loaded, ids, batch_size=4, **{**kwargs, "seed": 4})
    assert _texts(other) != _texts(alone)


def test_sampling_needs_a_seed_and_one_index_per_prompt(loaded):
    ids = loaded.encode(PROMPTS[:2])
    kwargs = dict(batch_size=1, max_new_tokens=2, do_sample=True, progress=False)
    with pytest.raises(ValueError, match="do_sample needs a seed"):
        generate(loaded, ids, **kwargs)
    with pytest.raises(ValueError, match="1 prompt_index values for 2 prompts"):
        generate(loaded, ids, seed=0, prompt_index=[5], **kwargs)


def test_several_greedy_samples_are_refused(loaded):
    with pytest.raises(ValueError, match="needs do_sample"):
        generate(loaded, loaded.encode(PROMPTS[:1]), batch_size=1, max_new_tokens=2, n=2, progress=False)


def test_static_cache_gives_the_dynamic_cache_tokens(loaded):
    """``probe.static_cache``: a preallocated KV cache, one batch shape for the whole call,
    the same greedy tokens as the dynamic cache in float32."""
    ids = loaded.encode(PROMPTS)
    # batch 2 over 5 prompts: the last batch is filled up, and every batch is padded to
    # the longest prompt of the call
    dynamic, _ = generate(loaded, ids, batch_size=2, max_new_tokens=10, progress=False)
    static, _ = generate(loaded, ids, batch_size=2, max_new_tokens=10, progress=False, static_cache=True)
    assert _texts(static) == _texts(dynamic)
    assert len({group[0].text for group in static}) > 2


def test_static_cache_param_defaults_off():
    assert parse_params({}).probe.static_cache is False
    assert parse_params({"probe": {"static_cache": True}}).probe.static_cache is True


def test_rows_leave_the_batch_when_they_stop_and_the_tokens_are_transformers_own(loaded):
    """The decode loop drops a row from the forward pass and the KV cache at the step it stops;
    the other rows' tokens are still exactly those of transformers' greedy ``generate`` on the
    same batch (float32), row by row, with rows stopping at different steps, and their
    log-probs the same up to float rounding (one step's rows, not every step's, per softmax)."""
    import torch
    from transformers import GenerationConfig

    from tuneline.generation import _decode

    input_ids, attention, pad = _left_padded(loaded, PROMPTS)
    width = input_ids.shape[1]

    def reference(stops, steps):
        config = GenerationConfig(max_new_tokens=steps, do_sample=False, eos_token_id=stops, pad_token_id=pad,
                                  return_dict_in_generate=True, output_logits=True)
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
        new = out.sequences[:, width:]
        logps = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, new[..., None])[..., 0]
        return new, logps

    free, _ = reference([-1], 12)  # no stop: pick stop tokens that end rows at different steps
    stops = sorted({int(free[0, 2]), int(free[2, 6])} - {int(t) for t in free[1]})
    expected, expected_logps = reference(stops, 12)
    with torch.inference_mode():
        new, logps = _decode(loaded.model, input_ids, attention, max_new_tokens=12, stops=stops, pad_id=pad,
                             processors=None, logprobs=True)
    ends = [next((k for k, t in enumerate(row.tolist()) if t in stops), None) for row in new]
    assert len(set(ends)) >= 3 and None in ends  # rows stop at different steps, one runs to the limit
    assert new.tolist() == expected.tolist()
    for row, end in enumerate(ends):
        count = 12 if end is None else end + 1  # pad after the stop token: no log-prob to compare
        assert logps[row, :count].tolist() == pytest.approx(expected_logps[row, :count].tolist(), rel=1e-5, abs=1e-6)


def test_the_decode_cache_is_written_in_place_with_the_dynamic_caches_values(loaded):
    """``_decode``'s KV cache: each layer's buffer is allocated once (again only when rows
    leave the batch, then holding only the kept rows) and written in place, and at every step
    the model reads the same keys and values, and gives the same logits bit for bit, as with
    transformers' concatenating ``DynamicCache``."""
    import inspect

    import torch
    from transformers import DynamicCache

    from tuneline.generation import _preallocated_cache

    input_ids, attention, pad = _left_padded(loaded, PROMPTS)
    width = input_ids.shape[1]
    steps = 5
    forward = inspect.signature(loaded.model.forward).parameters
    kwarg = "cache" if "cache" in forward else "past_key_values"
    ours = _preallocated_cache(loaded.model.config, width + steps)
    theirs = DynamicCache(config=loaded.model.config)
    buffers = []
    step_ids, mask = input_ids, attention
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    with torch.inference_mode():
        for step in range(steps):
            logits = [
                loaded.model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{kwarg: cache}).logits
                for cache in (ours, theirs)
            ]
            assert torch.equal(logits[0], logits[1])
            for a, b in zip(ours.layers, theirs.layers, strict=True):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
            buffers.append(ours.layers[0].key_buffer.data_ptr())
            step_ids = logits[1][:, -1:].argmax(-1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
            positions = positions[:, -1:] + 1
            if step == 2:  # two rows leave the batch
                kept = torch.tensor([0, 2, 4])
                ours.batch_select_indices(kept)
                theirs.batch_select_indices(kept)
                step_ids, mask, positions = step_ids[kept], mask[kept], positions[kept]
                assert ours.layers[0].key_buffer.shape[0] == 3
    assert ours.get_seq_length() == theirs.get_seq_length() == width + steps - 1
    # one buffer until the rows left, one after: never a new tensor per step
    assert len(set(buffers[:3])) == 1 and len(set(buffers[3:])) == 1
    beyond = torch.zeros((3, ours.layers[0].key_buffer.shape[1], 2, ours.layers[0].key_buffer.shape[-1]))
    with pytest.raises(RuntimeError, match="written past its end"):
        ours.update(beyond, beyond, 0)


def test_decode_uses_the_preallocated_cache_sized_for_prompt_and_output(loaded, monkeypatch):
    import torch

    from tuneline import generation

    made = []

    def recording(config, capacity):
        made.append((capacity, generation_cache := real(config, capacity)))
        return generation_cache

    real = generation._preallocated_cache
    monkeypatch.setattr(generation, "_preallocated_cache", recording)
    ids = loaded.encode(PROMPTS[:2])
    outputs, _ = generate(loaded, ids, batch_size=2, max_new_tokens=6, progress=False)
    assert [capacity for capacity, _ in made] == [max(map(len, ids)) + 6]
    layer = made[0][1].layers[0]
    assert isinstance(layer.key_buffer, torch.Tensor) and layer.key_buffer.shape[2] == made[0][0]
