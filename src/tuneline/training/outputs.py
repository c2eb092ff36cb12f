"""What a training run leaves: the model directory (adapter, tokenizer, provenance.json,
model card) and the metrics helpers (the per-step log is DVCLive's,
``tuneline.training.callbacks.LiveCallback``).

The model directory holds content only (sources, content hashes, params, plan, results):
the same inputs give the same bytes from any commit or machine. The git commit and
library versions go to ``paths.reports``/provenance/<stage>.json
(``tuneline.provenance.write_run_provenance``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tuneline.errors import TunelineError
from tuneline.modeling import base_content_hash, check_adapter_dir
from tuneline.params import Params
from tuneline.provenance import sha256_file, sha256_path
from tuneline.records import write_json, write_text
from tuneline.training.plan import Plan

ADAPTER_CONFIG = "adapter_config.json"
# peft keeps these as sets, so its JSON lists them in PYTHONHASHSEED order.
UNORDERED_CONFIG_KEYS = ("target_modules", "exclude_modules")


def split_metrics(recorded: Mapping[str, Any], headline: Iterable[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(metrics, run)``: the ``headline`` numbers a user compares between versions (the
    DVC metrics file) and everything else a run recorded (the run record's ``run``)."""
    keys = list(headline)
    return {k: recorded[k] for k in keys if k in recorded}, {k: v for k, v in recorded.items() if k not in keys}


def epoch_losses(log_history: Iterable[Mapping[str, Any]], key: str = "eval_loss") -> list[dict[str, float]]:
    return [
        {"epoch": round(float(e["epoch"]), 4), "step": int(e["step"]), key: float(e[key])}
        for e in log_history
        if key in e
    ]


def last_logged(log_history: Iterable[Mapping[str, Any]], key: str) -> float | None:
    values = [float(e[key]) for e in log_history if key in e]
    return values[-1] if values else None


def base_provenance(params: Params) -> dict[str, Any]:
    path = Path(params.paths.base_model)
    return {"path": params.paths.base_model, "content_sha256": base_content_hash(path)}


def data_hashes(*paths: Path) -> dict[str, str]:
    return {str(p): sha256_path(p) for p in paths if p.exists()}


def sort_adapter_config(directory: Path) -> None:
    """Rewrite ``adapter_config.json`` with its set-valued lists sorted (peft's layout
    otherwise: sorted keys, indent 2), so the file does not depend on PYTHONHASHSEED."""
    path = directory / ADAPTER_CONFIG
    config = json.loads(path.read_text(encoding="utf-8"))
    for key in UNORDERED_CONFIG_KEYS:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    write_text(path, json.dumps(config, indent=2, sort_keys=True))


def save_gathered_adapter(out: Path, model: Any, state: Mapping[str, Any], adapter_name: str) -> None:
    """The adapter out of a state dict gathered from FSDP shards, in peft's file layout.

    peft picks an adapter's weights by the model's module names, which FSDP's wrappers
    change, and then writes an empty adapter; the gathered keys are the plain names.
    """
    import copy

    from safetensors.torch import save_file

    marker = f".{adapter_name}."
    weights = {
        key.replace(marker, "."): value.detach().cpu().contiguous()
        for key, value in state.items()
        if "lora_" in key and marker in key
    }
    if not weights:
        raise TunelineError(f"{out}: the gathered state dict holds no weights of adapter {adapter_name!r}")
    out.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(out))
    save_file(weights, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def write_model_dir(
    out: Path,
    *,
    model: Any,
    tokenizer: Any,
    provenance: dict[str, Any],
    card: str,
    adapter_name: str = "default",
    state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Adapter (safetensors only), tokenizer, provenance.json and README.md into ``out``;
    returns the provenance written.

    ``state``: the full state dict gathered from FSDP shards (``trained_model``).
    """
    if state is not None:
        save_gathered_adapter(out, model, state, adapter_name)
    else:
        model.save_pretrained(str(out), safe_serialization=True, selected_adapters=[adapter_name])
    sort_adapter_config(out)
    tokenizer.save_pretrained(str(out))
    check_adapter_dir(out)
    provenance = {**provenance, "adapter_sha256": sha256_file(out / "adapter_model.safetensors")}
    write_json(out / "provenance.json", provenance)
    write_text(out / "README.md", card)
    return provenance


def model_card(title: str, provenance: Mapping[str, Any], plan: Plan, results: Mapping[str, Any]) -> str:
    lines = [
        f"# {title}",
        "",
        f"LoRA adapter made by `tuneline {provenance['stage']}` on the base `{provenance['base']['path']}` "
        f"(content sha256 `{provenance['base']['content_sha256'][:16]}…`).",
    ]
    if provenance.get("parent"):
        lines.append(
            f"It applies on top of the base with the parent adapter `{provenance['parent']}` merged in "
            f"(stack: {', '.join(provenance['stack'])}); load it with `tuneline.modeling.load_for_eval`."
        )
    lines += ["", "## Plan", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in plan.as_dict().items()]
    lines += ["", "## Results", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results.items() if not isinstance(v, list | dict)]
    lines += [
        "",
        "Provenance (data hashes, params, plan) is in `provenance.json`; the commit and library versions of "
        f"the run are in `reports/provenance/{provenance['stage']}.json` beside the project.",
        "",
    ]
    return "\n".join(lines)
