"""``generate(..., static_cache=True)`` (``probe.static_cache``): a preallocated KV cache,
one batch shape for the whole call, the same greedy tokens as the dynamic cache in float32."""

from __future__ import annotations

import pytest

from tuneline import modeling
from tuneline.generation import generate
from tuneline.params import parse_params

PROMPTS = [
    "### Instruction\n" + "Plan a trip. " * (1 + 2 * i) + city + "\n\n### Response\n"
    for i, city in enumerate(["Lisbon", "Tokyo", "Paris", "Lisbon", "Tokyo"])
]


@pytest.fixture(scope="module")
def loaded(noisy_model_dir):
    return modeling.load(noisy_model_dir, parse_params({"model": {"device": "cpu", "dtype": "float32"}}).model)


def _texts(outputs):
    return [[(g.text, g.finish_reason, g.n_tokens) for g in group] for group in outputs]


def test_static_cache_gives_the_dynamic_cache_tokens(loaded):
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
