"""``train_adapter``: the one training loop of the sft and dpo stages.

plan → announce → resume → train with checkpoints → guards → the step count against the
plan → weights changed → save the model directory → plots and metrics → drop the
checkpoints. The stages build their trainer and plan and say what they add (results
from the log, files beside the adapter); everything else is the same for both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.errors import TunelineError
from tuneline.modeling import Loaded
from tuneline.params import Params
from tuneline.provenance import write_run_provenance
from tuneline.records import atomic_dir, commit_staged, write_json
from tuneline.training.callbacks import (
    GuardCallback,
    MarkerCallback,
    StartCallback,
    ThroughputCallback,
    check_weights_changed,
    trainable_snapshot,
)
from tuneline.training.checkpoints import (
    finish_checkpoints,
    resume_checkpoint,
    train_with_checkpoints,
)
from tuneline.training.distributed import from_main, match_adapter_dtype, trained_model
from tuneline.training.outputs import (
    epoch_losses,
    last_logged,
    model_card,
    write_model_dir,
    write_plots,
)
from tuneline.training.plan import Plan, announce_plan


@dataclass
class Job:
    """What a stage trains and where its outputs go."""

    stage: str  # "sft" or "dpo": names params, messages, metrics and plots
    title: str  # the model card's title
    out_dir: Path
    run_id: str  # tuneline.training.checkpoints.fingerprint of everything the run depends on
    provenance: dict[str, Any]  # content provenance for provenance.json (results are added)
    plot_keys: tuple[str, ...]
    # Stage results read from the Trainer's log history (beside the common ones).
    results: Callable[[list[dict[str, Any]]], dict[str, Any]] = lambda history: {}
    # Called with the model directory before it is moved into place (dpo: copy the parent).
    add_files: Callable[[Path], None] | None = None


def job_paths(params: Params, stage: str) -> tuple[Path, Path, Path]:
    """``(metrics file, plots directory, checkpoints directory)`` of a training stage."""
    metrics = Path(params.paths.metrics)
    return metrics / f"{stage}.json", metrics / stage, Path(params.paths.checkpoints) / stage


def train_adapter(params: Params, job: Job, trainer: Any, loaded: Loaded, plan: Plan) -> dict[str, Any]:
    """Train ``trainer``'s adapter as ``plan`` says and write what the run leaves.

    Every rank of a distributed run calls this; the main process writes the outputs and
    returns the metrics, the others return the metrics file it wrote.
    """
    stage = job.stage
    section = getattr(params, stage)
    metrics_path, plot_dir, ckpt_dir = job_paths(params, stage)
    main = trainer.is_world_process_zero()
    warnings = announce_plan(plan, stage, section.min_optimizer_steps, section.strict_plan, show=main)

    match_adapter_dtype(trainer)
    trainer.add_callback(GuardCallback(stage))
    trainer.add_callback(MarkerCallback(job.run_id))
    throughput = ThroughputCallback()
    trainer.add_callback(throughput)
    start = StartCallback()
    trainer.add_callback(start)
    initial = trainable_snapshot(trainer.model)
    resume = resume_checkpoint(ckpt_dir, job.run_id, stage)
    started = time.perf_counter()
    result = train_with_checkpoints(trainer, resume, ckpt_dir, stage)
    runtime = time.perf_counter() - started
    check_steps(trainer.state.global_step, plan, stage)
    start.check(resume, trainer.state.global_step, stage)
    model, state = trained_model(trainer)
    if not main:
        return from_main(None, ckpt_dir)  # the main process's metrics (other machines share no disk)
    change = check_weights_changed(model, initial, stage, state)

    history = trainer.state.log_history
    results = {
        "train_loss": float(result.training_loss),
        "final_loss": last_logged(history, "loss"),
        **job.results(history),
        "steps": trainer.state.global_step,
        "tokens_seen": plan.tokens_total,
        "max_weight_change": change,
    }
    provenance = {**job.provenance, "plan": plan.as_dict(), "results": results}
    with atomic_dir(job.out_dir) as tmp:
        provenance = write_model_dir(
            tmp, model=model, tokenizer=loaded.tokenizer, provenance=provenance,
            card=model_card(job.title, provenance, plan, results), state=state,
        )
        if job.add_files is not None:
            job.add_files(tmp)
    write_run_provenance(params, stage, {"model": str(job.out_dir), "adapter_sha256": provenance["adapter_sha256"]})
    metrics = {
        "plan": plan.as_dict(),
        "warnings": warnings,
        **results,
        **timing(runtime, start.start_step, plan),
        **throughput.summary(plan.tokens_total / max(plan.optimizer_steps, 1)),
        "eval_loss_per_epoch": epoch_losses(history),
        "plots": write_plots(history, plot_dir, job.plot_keys),
    }
    write_json(metrics_path, metrics)
    commit_staged()  # the outputs are in place before the checkpoints go; the other ranks read the metrics
    finish_checkpoints(ckpt_dir, job.run_id, trainer.state.global_step)
    return from_main(metrics)


def check_steps(steps: int, plan: Plan, stage: str) -> None:
    """The Trainer must have run the optimizer steps the plan announced."""
    if steps != plan.optimizer_steps:
        raise TunelineError(
            f"{stage}: the trainer ran {steps} optimizer steps but the plan said {plan.optimizer_steps}; "
            "no adapter was written"
        )


def timing(runtime: float, start_step: int | None, plan: Plan) -> Mapping[str, Any]:
    """Wall time, tokens per second of a run that started from scratch, and the step
    the trainer itself resumed from (its global step when training began)."""
    resumed = bool(start_step)
    return {
        "runtime_s": round(runtime, 2),
        "tokens_per_s": round(plan.tokens_total / runtime, 2) if not resumed and runtime > 0 else None,
        "resumed_from_step": start_step if resumed else None,
    }
