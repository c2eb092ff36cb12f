"""Shared fixtures: a tiny random Llama model and tokenizer built offline, and params helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    words = (
        "summary assumptions uncertainty_notes next_steps verification_steps payload_type payload "
        "itinerary checklist budget phrasebook procedure destination days day title activities items "
        "currency daily mid_range tips language phrases phrase meaning task steps Lisbon Tokyo Paris "
        "Instruction Response plan trip travel visit museum train ticket metro card cash hello thanks "
        "please the a of to and in for with on is are be by at from this that your you"
    ).split()
    lines = []
    for i in range(400):
        chosen = [words[(i * 7 + j * 3) % len(words)] for j in range(12)]
        lines.append('### Instruction\n' + " ".join(chosen) + '\n\n### Response\n{"summary": "' + " ".join(chosen[:4]) + '", "items": [1, 2, 3]}')
    return lines


def build_tiny_model(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token=None))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    raw.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    import torch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved random 2-layer Llama (hidden 64) with an offline-trained BPE tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def write_params(directory: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write a params.yaml in ``directory`` from nested overrides (defaults elsewhere)."""
    data = overrides or {}
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def chdir_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def noisy_model_dir(tiny_model_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's tokenizer with larger random weights: varied, context-sensitive output."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("noisy-model")
    for file in tiny_model_dir.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, out / file.name)
    config = AutoConfig.from_pretrained(str(tiny_model_dir))
    config.initializer_range = 0.2
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    return out
