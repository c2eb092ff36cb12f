"""Shared pieces of the training stages (sft, dpo) and of loading what they made.

- ``load_for_training``: the base through the one loader, k-bit prepared for QLoRA.
- ``lora_config``: peft ``LoraConfig`` from params (``lora.extra`` passed through).
- ``trainer_args``: the TrainingArguments fields both stages share (precision, seed,
  checkpoints, logging, Liger), before the stage's own pass-through ``trainer`` dict.
- ``Plan``: records, tokens, steps per epoch, optimizer steps, effective batch, epochs
  and warmup, printed and written to metrics before the first step; a loud warning under
  ``min_optimizer_steps``, an ``InputError`` when ``strict_plan`` is set.
- ``GuardCallback``: a non-finite loss or non-finite trainable weights stop training with
  the step number (no final output is written); ``check_weights_changed`` fails a run
  whose adapter weights did not move.
- Checkpoints: ``MarkerCallback`` writes ``tuneline-complete.json`` into a checkpoint
  after the trainer has saved it (files, sizes and hashes, plus the run fingerprint);
  ``resume_checkpoint`` picks the newest complete checkpoint of the same run.
- ``write_plots``: per-step TSV files for ``dvc plots``.
- ``write_model_dir``: adapter, tokenizer, ``provenance.json`` and a model card.
- ``load_for_eval``: base plus an adapter, merging the adapter's parents first (a DPO
  adapter is trained on top of the merged SFT adapter).
- Several processes (``accelerate launch``, see ``tuneline.launch``): every rank trains;
  only the main process prints the plan and writes metrics, plots, the model directory
  and checkpoint markers, and the others wait at a barrier until those exist.
  ``trained_model`` gathers FSDP shards into a full state dict before saving.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from transformers import TrainerCallback

from tuneline.errors import InputError, TunelineError
from tuneline.modeling import Loaded, check_adapter_dir, load
from tuneline.params import LoraParams, Params
from tuneline.provenance import sha256_file, sha256_path, stamp
from tuneline.records import read_json, write_json, write_text

MARKER = "tuneline-complete.json"
FINISHED = "finished.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
console = Console(stderr=True)


# -- several processes -------------------------------------------------------------------


def _process_group() -> Any:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def is_main_process() -> bool:
    """True in a single-process run and on rank 0 of a distributed one."""
    group = _process_group()
    return group is None or group.get_rank() == 0


def wait_for_everyone() -> None:
    """A barrier across the training processes (nothing in a single-process run)."""
    group = _process_group()
    if group is not None:
        group.barrier()


def shared_dataset(rows: list[dict[str, Any]], directory: Path, world_size: int) -> Any:
    """A ``datasets.Dataset`` of ``rows``; with several processes, one on shared disk.

    An in-memory dataset keeps its cache files in a temporary directory of each process,
    so a cache that rank 0 writes (TRL's precomputed reference log-probs) is not found by
    the others. Saved once under ``directory`` by the main process, every rank's dataset
    and caches live there. ``drop_shared_dataset`` removes it after the run.
    """
    from datasets import Dataset, load_from_disk

    dataset = Dataset.from_list(rows)
    if world_size <= 1:
        return dataset
    if is_main_process():
        if directory.exists():
            shutil.rmtree(directory)
        dataset.save_to_disk(str(directory))
    wait_for_everyone()
    return load_from_disk(str(directory))


def drop_shared_dataset(directory: Path) -> None:
    if directory.is_dir():
        shutil.rmtree(directory)


# -- model and adapters ------------------------------------------------------------------


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


def lora_config(lp: LoraParams) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lp.r,
        lora_alpha=lp.alpha,
        lora_dropout=lp.dropout,
        target_modules=lp.target_modules,
        task_type="CAUSAL_LM",
        **lp.extra,
    )


def trainable_snapshot(model: Any) -> dict[str, Any]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def check_weights_changed(
    model: Any, before: Mapping[str, Any], stage: str, state: Mapping[str, Any] | None = None
) -> float:
    """Largest absolute change of a trainable weight; fail when nothing moved.

    ``state`` is the full state dict gathered from FSDP shards (``trained_model``); the
    model's own parameters are read otherwise.
    """
    import torch

    params = dict(state) if state is not None else dict(model.named_parameters())
    if not before:
        raise TunelineError(f"{stage}: the model has no trainable parameters; LoRA was not applied")
    largest = 0.0
    for name, old in before.items():
        if name not in params:
            raise TunelineError(f"{stage}: trainable weight {name} is missing from the trained model")
        new = params[name].detach().to(old.device)
        if not torch.isfinite(new).all():
            raise TunelineError(f"{stage}: trainable weight {name} is not finite after training")
        largest = max(largest, float((new.float() - old.float()).abs().max()))
    if largest == 0.0:
        raise TunelineError(
            f"{stage}: the LoRA weights are identical to their initial values after training, so nothing "
            f"was learned and no adapter is written (is {stage}.learning_rate 0, or was every label masked?)"
        )
    return largest


# -- trainer arguments -------------------------------------------------------------------


def trained_model(trainer: Any) -> tuple[Any, dict[str, Any] | None]:
    """The trained model to save and, under FSDP, its full state dict.

    Every rank must call this: gathering FSDP shards is a collective. The state dict is
    complete on the main process only; without FSDP it is None and the model's own
    parameters are whole on every rank.
    """
    if getattr(trainer, "is_fsdp_enabled", False):
        state = trainer.accelerator.get_state_dict(trainer.model)
        return trainer.accelerator.unwrap_model(trainer.model), state
    return trainer.model, None


def match_adapter_dtype(trainer: Any) -> None:
    """Under FSDP, give the LoRA weights the base weights' dtype.

    peft keeps adapters in float32 over a bf16 base, but FSDP flattens each wrapped layer
    into one tensor of a single dtype; accelerate then holds every weight in float32
    for bf16 mixed precision. A no-op without FSDP.
    """
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    if len(frozen) != 1:
        return
    dtype = frozen.pop()
    for param in trainer.model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def trainer_args(
    params: Params,
    loaded: Loaded,
    stage: Any,
    *,
    output_dir: Path,
    has_eval: bool,
) -> dict[str, Any]:
    """TrainingArguments fields the stages share; the stage's ``trainer`` dict wins."""
    import torch

    cuda = loaded.device == "cuda"
    # bf16/fp16 weights train under autocast in that precision, on CUDA and on a CPU
    # with native bf16 (model.dtype auto picks bf16 there).
    dtype = getattr(loaded.model, "dtype", torch.float32)
    args: dict[str, Any] = {
        "output_dir": str(output_dir),
        "num_train_epochs": stage.num_epochs,
        "learning_rate": stage.learning_rate,
        "lr_scheduler_type": stage.lr_scheduler,
        "warmup_steps": stage.warmup_ratio,
        "per_device_train_batch_size": stage.per_device_batch_size,
        "per_device_eval_batch_size": stage.per_device_batch_size,
        "gradient_accumulation_steps": stage.gradient_accumulation_steps,
        "gradient_checkpointing": stage.gradient_checkpointing,
        "logging_steps": stage.logging_steps,
        "logging_first_step": True,
        "logging_nan_inf_filter": False,
        "save_strategy": "steps",
        "save_steps": stage.save_steps,
        "eval_strategy": "epoch" if has_eval else "no",
        "report_to": "none",
        "seed": params.seed,
        "data_seed": params.seed,
        "bf16": dtype == torch.bfloat16,
        "fp16": cuda and dtype == torch.float16,
        "use_cpu": not cuda,
        "use_liger_kernel": cuda and liger_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "include_num_input_tokens_seen": "non_padding",
        # Every LoRA weight takes part in each step; DDP need not search the graph for
        # unused ones (the Trainer's default for a peft model).
        "ddp_find_unused_parameters": False,
    }
    if stage.gradient_checkpointing:
        args["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return {**args, **stage.trainer}


# -- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    records: int
    eval_records: int
    tokens_per_epoch: int
    completion_tokens_per_epoch: int
    truncated: int
    max_seq_len: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    effective_batch: int
    steps_per_epoch: int
    optimizer_steps: int
    epochs: float
    warmup_steps: int
    tokens_total: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(
    *,
    records: int,
    eval_records: int,
    tokens_per_epoch: int,
    completion_tokens_per_epoch: int,
    truncated: int,
    max_seq_len: int,
    per_device_batch_size: int,
    gradient_accumulation_steps: int,
    num_processes: int,
    epochs: float,
    warmup: float,
) -> Plan:
    """The schedule the Trainer will run, computed the way transformers computes it."""
    batches = math.ceil(records / (per_device_batch_size * num_processes))
    steps_per_epoch = max(batches // gradient_accumulation_steps + int(batches % gradient_accumulation_steps > 0), 1)
    optimizer_steps = math.ceil(epochs * steps_per_epoch)
    warmup_steps = int(warmup) if warmup >= 1 else math.ceil(optimizer_steps * warmup)
    return Plan(
        records=records,
        eval_records=eval_records,
        tokens_per_epoch=tokens_per_epoch,
        completion_tokens_per_epoch=completion_tokens_per_epoch,
        truncated=truncated,
        max_seq_len=max_seq_len,
        per_device_batch_size=per_device_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        num_processes=num_processes,
        effective_batch=per_device_batch_size * gradient_accumulation_steps * num_processes,
        steps_per_epoch=steps_per_epoch,
        optimizer_steps=optimizer_steps,
        epochs=epochs,
        warmup_steps=warmup_steps,
        tokens_total=round(tokens_per_epoch * epochs),
    )


def announce_plan(plan: Plan, stage: str, min_steps: int, strict: bool, show: bool = True) -> list[str]:
    """Print the plan; warn loudly (or raise, when strict) under ``min_steps``.

    ``show=False`` (the other ranks of a distributed run) returns the same warnings and
    raises the same errors without printing.
    """
    table = Table(title=f"{stage} plan", show_header=False)
    for key, value in plan.as_dict().items():
        table.add_row(key, str(value))
    if show:
        console.print(table)
    warnings = []
    if plan.optimizer_steps < min_steps:
        text = (
            f"{stage}.min_optimizer_steps: this run makes only {plan.optimizer_steps} optimizer steps "
            f"(< {min_steps}): {plan.records} records / effective batch {plan.effective_batch} "
            f"x {plan.epochs} epochs; add data or epochs, or lower the batch"
        )
        if strict:
            raise InputError(f"{text} ({stage}.strict_plan is true)")
        if show:
            console.print(f"[bold red]WARNING[/] {text}", highlight=False)
        warnings.append(text)
    if plan.optimizer_steps <= plan.warmup_steps:
        text = (
            f"{stage}.warmup_ratio: warmup takes {plan.warmup_steps} of {plan.optimizer_steps} optimizer steps, "
            "so the learning rate never reaches its peak (the first step always runs at 0)"
        )
        if show:
            console.print(f"[bold red]WARNING[/] {text}", highlight=False)
        warnings.append(text)
    if plan.truncated:
        text = (
            f"{stage}: {plan.truncated} of {plan.records} records are longer than {plan.max_seq_len} tokens and "
            "lose their end (and terminator) to truncation"
        )
        if show:
            console.print(f"[bold red]WARNING[/] {text}", highlight=False)
        warnings.append(text)
    return warnings


# -- guards ------------------------------------------------------------------------------


class GuardCallback(TrainerCallback):
    """Stop on a non-finite loss or non-finite trainable weights, naming the step.

    Raising here (before the trainer saves) means no checkpoint and no final output holds
    the broken weights.
    """

    def __init__(self, stage: str):
        self.stage = stage

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        for key in ("loss", "eval_loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                raise TunelineError(
                    f"{self.stage}: {key} is {value} at step {state.global_step}; training stopped and no adapter "
                    f"was written (lower {self.stage}.learning_rate or check the data)"
                )

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        import torch

        if model is None:
            return
        trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        # One device sync per step: a non-finite weight makes its norm non-finite; only
        # then look for the weight to name.
        norms = torch._foreach_norm([param.detach() for _, param in trainable]) if trainable else []
        if not norms or bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
            return
        for name, param in trainable:
            if not torch.isfinite(param).all():
                raise TunelineError(
                    f"{self.stage}: non-finite loss or gradient at step {state.global_step} made weight {name} "
                    f"non-finite; training stopped and no adapter was written (lower {self.stage}.learning_rate "
                    "or check the data)"
                )


class ThroughputCallback(TrainerCallback):
    """Steady-state throughput: seconds and input tokens (as the Trainer counts them) over
    the optimizer steps after the first ``skip``, leaving out start-up, the first kernel
    launches and allocator growth."""

    def __init__(self, skip: int = 3):
        self.skip = skip
        self.start: tuple[float, int] | None = None
        self.end: tuple[float, int, int] | None = None

    def _mark(self, state: Any) -> tuple[float, int]:
        import time

        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.skip:
            self.start = self._mark(state)
        elif state.global_step > self.skip and self.start is not None:
            self.end = (*self._mark(state), state.global_step)

    def summary(self, tokens_per_step: float | None = None) -> dict[str, Any]:
        """``steady_steps``, ``steady_s`` and ``steady_tokens_per_s`` (None when too few
        steps); ``tokens_per_step`` replaces the Trainer's token count (dpo: the plan's)."""
        if self.start is None or self.end is None:
            return {"steady_steps": 0, "steady_s": None, "steady_tokens_per_s": None}
        seconds = self.end[0] - self.start[0]
        steps = self.end[2] - self.skip
        tokens = self.end[1] - self.start[1] if tokens_per_step is None else tokens_per_step * steps
        return {
            "steady_steps": steps,
            "steady_s": round(seconds, 3),
            "steady_tokens_per_s": round(tokens / seconds, 2) if seconds > 0 and tokens > 0 else None,
        }


# -- checkpoints and resume --------------------------------------------------------------


def fingerprint(**parts: Any) -> str:
    """A hash of what determines a run (params, data and base hashes): checkpoints of a
    different run are never resumed."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _manifest(directory: Path) -> dict[str, dict[str, Any]]:
    return {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


class MarkerCallback(TrainerCallback):
    """Mark a checkpoint complete after the trainer has written all of it."""

    def __init__(self, run_fingerprint: str):
        self.run_fingerprint = run_fingerprint

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Each rank writes its own files (RNG state) into the checkpoint: mark it only
        # once all of them are done.
        wait_for_everyone()
        if not state.is_world_process_zero:
            return
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if directory.is_dir():
            write_json(
                directory / MARKER,
                {"fingerprint": self.run_fingerprint, "step": state.global_step, "files": _manifest(directory)},
            )


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found, reverse=True)


def _corrupt(checkpoint: Path, marker: dict[str, Any]) -> str | None:
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "the marker lists no files"
    for rel, info in files.items():
        path = checkpoint / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != info.get("size") or sha256_file(path) != info.get("sha256"):
            return f"{rel} differs from the marker's size/hash"
    return None


def resume_checkpoint(directory: Path, run_fingerprint: str, stage: str) -> Path | None:
    """The newest complete checkpoint of this run, or None to start fresh.

    Checkpoints without a marker (interrupted while saving) and checkpoints of another
    run (different params, data or base) are ignored and removed. A marked checkpoint
    whose files do not match its marker is skipped for an earlier one; if none is left,
    the run fails naming it rather than silently starting over.

    In a distributed run the main process removes and reports; the other ranks wait for
    it, then read the same markers and pick the same checkpoint.
    """
    if is_main_process():
        chosen = _pick_checkpoint(directory, run_fingerprint, stage, main=True)
        wait_for_everyone()
        return chosen
    wait_for_everyone()
    return _pick_checkpoint(directory, run_fingerprint, stage, main=False)


def _pick_checkpoint(directory: Path, run_fingerprint: str, stage: str, *, main: bool) -> Path | None:
    def say(text: str) -> None:
        if main:
            console.print(text, highlight=False)

    corrupt: list[str] = []
    for _, checkpoint in _checkpoints(directory):
        marker_path = checkpoint / MARKER
        if not marker_path.is_file():
            say(f"{stage}: ignoring incomplete checkpoint {checkpoint} (no {MARKER})")
            if main:
                shutil.rmtree(checkpoint)
            continue
        marker = read_json(marker_path)
        if marker.get("fingerprint") != run_fingerprint:
            say(f"{stage}: removing checkpoint {checkpoint} of a different run")
            if main:
                shutil.rmtree(checkpoint)
            continue
        problem = _corrupt(checkpoint, marker)
        if problem:
            say(f"[bold red]WARNING[/] {stage}: checkpoint {checkpoint} is corrupt: {problem}")
            corrupt.append(f"{checkpoint} ({problem})")
            continue
        say(f"{stage}: resuming from {checkpoint}")
        return checkpoint
    if corrupt:
        raise TunelineError(
            f"{stage}: the only complete checkpoint(s) are corrupt: {'; '.join(corrupt)}; "
            f"delete {directory} to start over"
        )
    return None


def train_with_checkpoints(trainer: Any, resume: Path | None, directory: Path, stage: str) -> Any:
    """``trainer.train``, with a checkpoint that cannot be written (disk full, file-size
    limit, permissions) reported as one error naming the directory. The partial checkpoint
    has no marker, so a later run ignores it."""
    from safetensors import SafetensorError

    try:
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except (OSError, SafetensorError) as exc:
        problem = exc
    except RuntimeError as exc:  # torch.save reports a failed write as a RuntimeError
        if "PytorchStreamWriter" not in str(exc):
            raise
        problem = exc
    raise TunelineError(
        f"{stage}: writing a checkpoint under {directory} failed: {' '.join(str(problem).split())}; "
        "free space (or raise the limit) and re-run: training resumes from the last complete checkpoint"
    ) from problem


def finish_checkpoints(directory: Path, run_fingerprint: str, step: int) -> None:
    """After a successful run: drop the checkpoints (DVC will not re-run a finished stage)
    and leave a small record of the run so the directory, a persistent DVC out, exists."""
    for _, checkpoint in _checkpoints(directory):
        shutil.rmtree(checkpoint)
    write_json(directory / FINISHED, {"fingerprint": run_fingerprint, "steps": step})


# -- metrics, plots, model directory -----------------------------------------------------


def write_plots(log_history: Iterable[Mapping[str, Any]], directory: Path, keys: Iterable[str]) -> list[str]:
    """One ``step<TAB>value`` TSV per logged key (what ``dvc plots`` reads)."""
    written = []
    for key in keys:
        rows = [
            (entry["step"], entry[key])
            for entry in log_history
            if key in entry and isinstance(entry[key], int | float) and "step" in entry
        ]
        if not rows:
            continue
        name = key.replace("/", "_")
        lines = [f"step\t{name}"] + [f"{step}\t{value:.6g}" for step, value in rows]
        write_text(directory / f"{name}.tsv", "\n".join(lines) + "\n")
        written.append(name)
    return written


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
    from tuneline.modeling import base_content_hash

    path = Path(params.paths.base_model)
    return {"path": params.paths.base_model, "content_sha256": base_content_hash(path)}


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
) -> None:
    """Adapter (safetensors only), tokenizer, provenance.json and README.md into ``out``.

    ``state``: the full state dict gathered from FSDP shards (``trained_model``).
    """
    if state is not None:
        save_gathered_adapter(out, model, state, adapter_name)
    else:
        model.save_pretrained(str(out), safe_serialization=True, selected_adapters=[adapter_name])
    tokenizer.save_pretrained(str(out))
    check_adapter_dir(out)
    provenance = {**provenance, "adapter_sha256": sha256_file(out / "adapter_model.safetensors"), **stamp()}
    write_json(out / "provenance.json", provenance)
    write_text(out / "README.md", card)


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
            f"(stack: {', '.join(provenance['stack'])}); load it with `tuneline.training.load_for_eval`."
        )
    lines += ["", "## Plan", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in plan.as_dict().items()]
    lines += ["", "## Results", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in results.items() if not isinstance(v, list | dict)]
    lines += ["", "Provenance (data hashes, params, library versions, git) is in `provenance.json`.", ""]
    return "\n".join(lines)


def data_hashes(*paths: Path) -> dict[str, str]:
    return {str(p): sha256_path(p) for p in paths if p.exists()}


# -- loading for evaluation and export ---------------------------------------------------


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


def merge_adapter(loaded: Loaded, adapter_dir: str | Path) -> None:
    """Attach an adapter and merge it into the base weights (the model is then plain)."""
    from peft import PeftModel

    if isinstance(loaded.model, PeftModel):
        raise TunelineError("merge_adapter: merge parent adapters before attaching others")
    peft_model = PeftModel.from_pretrained(loaded.model, str(check_adapter_dir(adapter_dir)), is_trainable=False)
    loaded.model = peft_model.merge_and_unload()
    loaded.model.eval()
