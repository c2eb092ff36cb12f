"""A GGUF writer for merged llama-architecture models (``tuneline export --format gguf``).

Written with the ``gguf`` package (the library transformers reads GGUF with), following
llama.cpp's ``convert_hf_to_gguf.py`` for the llama architecture:

- tensor names from ``gguf.get_tensor_name_map`` (``model.layers.N.self_attn.q_proj`` ->
  ``blk.N.attn_q``); ``lm_head`` is left out when the embeddings are tied;
- q and k projection rows are permuted to llama.cpp's rotary layout (transformers' loader
  undoes exactly this permutation);
- 1-D tensors (norms) stay float32; 2-D tensors get the requested type (:data:`TYPES`); a
  tensor whose rows do not split into the type's blocks falls back to f16, as in llama.cpp;
- metadata: ``llama.*`` hyperparameters and ``tokenizer.ggml.*`` for a byte-level BPE
  tokenizer (tokens, token types, merges, bos/eos/unk/pad ids, ``add_bos_token`` false:
  tuneline never prepends BOS), and ``tokenizer.chat_template``.

Only the llama architecture with default rotary embeddings and no biases is written;
anything else is an :class:`InputError` naming what was found.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneline.errors import InputError

# --gguf-type -> (tensor type name, file type name) in gguf's enums; every type here is one
# gguf.quants.quantize writes and transformers' GGUF loader reads back.
TYPES = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
SUPPORTED_ARCHITECTURES = ("llama",)
# tokenizer.json pre-tokenizer -> llama.cpp's name for it (tokenizer.ggml.pre)
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}


def check_type(gguf_type: str) -> str:
    if gguf_type not in TYPES:
        raise InputError(f"--gguf-type {gguf_type!r}: not supported (allowed: {', '.join(TYPES)})")
    return gguf_type


def permute_rotary(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """Rows of a q/k projection in llama.cpp's rotary order (the inverse of the permutation
    transformers' GGUF loader applies to ``attn_q``/``attn_k``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    if value is None:
        raise InputError(f"config.json: {name!r} is missing; cannot write GGUF hyperparameters")
    return value


def check_architecture(config: Any) -> None:
    """Refuse what the llama writer cannot represent, naming it."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"--format gguf: architecture {model_type!r} ({', '.join(getattr(config, 'architectures', None) or [])}) "
            f"is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} (use --format hf for other models)"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise InputError(f"--format gguf: config.json rope type {rope_type!r} is not supported (only 'default')")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise InputError(f"--format gguf: config.json {flag}: true is not supported by the llama writer")


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and rope.get("rope_theta") is not None:
        return float(rope["rope_theta"])
    return float(_config_value(config, "rope_theta"))


def _pre_tokenizer_name(spec: Any) -> str:
    if isinstance(spec, dict) and spec.get("type") == "ByteLevel" and spec.get("use_regex", True):
        return "gpt-2"
    raise InputError(
        f"--format gguf: tokenizer.json pre_tokenizer {json.dumps(spec)[:200]} is not supported "
        f"(supported: a byte-level BPE tokenizer with pre_tokenizer {json.dumps(_BYTE_LEVEL)})"
    )


def tokenizer_metadata(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of a byte-level BPE tokenizer, padded to ``vocab_size``."""
    import gguf

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(f"--format gguf: tokenizer model {model.get('type')!r} is not supported (supported: BPE)")
    if data.get("normalizer") is not None:
        raise InputError(f"--format gguf: tokenizer normalizer {data['normalizer'].get('type')!r} is not supported")
    pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or (by_id and max(by_id) >= vocab_size):
        raise InputError(f"--format gguf: the tokenizer has {len(by_id)} tokens, more than vocab_size {vocab_size}")
    added = {int(i): t for i, t in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = {
        name: getattr(tokenizer, f"{name}_token_id")
        for name in ("bos", "eos", "unk", "pad")
        if getattr(tokenizer, f"{name}_token_id") is not None
    }
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges, "special": special}


def write_gguf(
    model: Any, tokenizer: Any, path: str | Path, *, gguf_type: str, name: str, chat_template: str | None
) -> dict[str, Any]:
    """Write ``model`` (a plain, merged transformers llama model) and its tokenizer as one
    GGUF file; returns what was written (type, per-type tensor counts, fallbacks)."""
    import gguf
    import numpy as np
    import torch

    check_type(gguf_type)
    config = model.config
    check_architecture(config)
    tensor_type = gguf.GGMLQuantizationType[TYPES[gguf_type][0]]
    n_layers = int(_config_value(config, "num_hidden_layers"))
    n_head = int(_config_value(config, "num_attention_heads"))
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    hidden = int(_config_value(config, "hidden_size"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // n_head)
    vocab_size = int(_config_value(config, "vocab_size"))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    vocab = tokenizer_metadata(tokenizer, vocab_size)

    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(int(_config_value(config, "max_position_embeddings")))
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(int(_config_value(config, "intermediate_size")))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(_config_value(config, "rms_norm_eps")))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(int(gguf.LlamaFileType[TYPES[gguf_type][1]]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    for key, token_id in vocab["special"].items():
        getattr(writer, {"bos": "add_bos_token_id", "eos": "add_eos_token_id", "unk": "add_unk_token_id",
                         "pad": "add_pad_token_id"}[key])(int(token_id))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    counts: dict[str, int] = {}
    fallback: list[str] = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        base, _, suffix = hf_name.rpartition(".")
        new_name = names.get_name(base)
        if new_name is None:
            raise InputError(f"--format gguf: tensor {hf_name!r} has no llama GGUF name")
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        if new_name.endswith(".attn_q"):
            data = permute_rotary(data, n_head, n_head)
        elif new_name.endswith(".attn_k"):
            data = permute_rotary(data, n_head, n_head_kv)
        qtype = tensor_type if data.ndim > 1 else gguf.GGMLQuantizationType.F32
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if data.shape[-1] % block:
            fallback.append(f"{new_name}.{suffix}")
            qtype = gguf.GGMLQuantizationType.F16
        quantized = gguf.quants.quantize(np.ascontiguousarray(data), qtype)
        writer.add_tensor(f"{new_name}.{suffix}", quantized, raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"gguf_type": gguf_type, "tensor_types": counts, "f16_fallback": fallback, "tokenizer_pre": vocab["pre"]}
