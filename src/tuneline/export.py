"""export: merge an adapter (and its parents) into the base for serving.

``tuneline export MODEL --out DIR`` loads ``paths.base_model`` through the one loader,
merges MODEL's parent chain (``provenance.json`` ``"parent"``) and then MODEL itself,
and writes a dense safetensors checkpoint with the tokenizer and a ``provenance.json``
naming the base and every merged adapter by hash. Not a DVC stage by default.

A 4-bit (nf4) base cannot be exported dense from its quantized weights without a lossy
round trip, so export loads the base unquantized (``model.quantization: none``) in the
dtype the params train in (``tuneline.modeling.resolve_dtype``: bfloat16 for ``auto``
over an nf4 base).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.modeling import (
    adapter_stack,
    check_model_dir,
    dtype_name,
    load,
    merge_adapter,
    resolve_device,
    resolve_dtype,
)
from tuneline.params import Params
from tuneline.provenance import sha256_path, stamp
from tuneline.records import atomic_dir, write_json


def export(params: Params, adapter_dir: str | Path, out: str | Path) -> dict[str, Any]:
    out = Path(out)
    stack = adapter_stack(adapter_dir)
    if out.resolve() in {p.resolve() for p in stack} or out.resolve() == Path(params.paths.base_model).resolve():
        raise InputError(f"--out {out}: would overwrite an input; choose a new directory")
    dtype = dtype_name(resolve_dtype(params.model, resolve_device(params.model)))
    spec = params.model.model_copy(update={"quantization": "none", "dtype": dtype})
    loaded = load(params.paths.base_model, spec)
    for adapter in stack:
        merge_adapter(loaded, adapter)
    merged = [{"path": str(p), "sha256": sha256_path(p)} for p in stack]
    with atomic_dir(out) as tmp:
        loaded.model.save_pretrained(str(tmp), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp))
        check_model_dir(tmp)
        content = sha256_path(tmp)
        provenance = {
            "kind": "merged",
            "base": {"path": params.paths.base_model, "content_sha256": loaded.provenance["content_sha256"]},
            "merged_adapters": merged,
            "dtype": loaded.provenance["dtype"],
            "format": params.model.format,
            "content_sha256": content,
            **stamp(),
        }
        write_json(tmp / "provenance.json", provenance)
    return provenance
