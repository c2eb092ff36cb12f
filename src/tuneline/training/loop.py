"""``train_adapter``: the one training loop of the sft and dpo stages.

plan → announce → resume → train with checkpoints (one progress line, the log through
DVCLive) → guards → the step count against the plan → weights changed → save the model
directory → metrics and the run record → drop the checkpoints. The stages build their
trainer and plan and say what they add (results from the log, files beside the
adapter); everything else is the same for both.

What a run leaves besides the model (``job_paths``):

- ``<metrics>/<stage>.json``: the numbers a user compares between versions (``train_loss``
  and the stage's own results, e.g. ``eval_loss``), what ``dvc metrics show`` and ``dvc exp
  show`` print;
- ``<metrics>/<stage>/``: DVCLive's directory (``plots/metrics/*.tsv`` per logged key,
  x = optimizer step, and ``metrics.json``), what ``dvc plots`` draws;
- ``<reports>/provenance/<stage>.json``: the run record, not a metric: the commit and
  library versions (``write_run_provenance``) and under ``run`` the plan, warnings, steps,
  tokens, timings and throughput.
"""

from __future__ import annotations

import contextlib
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
    LiveCallback,
    MarkerCallback,
    StartCallback,
    ThroughputCallback,
    check_weights_changed,
    open_live,
    trainable_snapshot,
    use_progress_bar,
)
from tuneline.training.checkpoints import (
    finish_checkpoints,
    resume_checkpoint,
    train_with_checkpoints,
)
from tuneline.training.curve import CurveCallback, attach_curve
from tuneline.training.distributed import from_main, match_adapter_dtype, trained_model
from tuneline.training.outputs import (
    epoch_losses,
    last_logged,
    model_card,
    split_metrics,
    write_model_dir,
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
    plot_keys: tuple[str, ...]  # the Trainer log keys written to the DVCLive directory
    # Stage results read from the Trainer's log history (beside the common ones).
    results: Callable[[list[dict[str, Any]]], dict[str, Any]] = lambda history: {}
    # Called with the model directory before it is moved into place (dpo: copy the parent).
    add_files: Callable[[Path], None] | None = None


def job_paths(params: Params, stage: str) -> tuple[Path, Path, Path]:
    """``(metrics file, DVCLive directory, checkpoints directory)`` of a training stage."""
    metrics = Path(params.paths.metrics)
    return metrics / f"{stage}.json", metrics / stage, Path(params.paths.checkpoints) / stage


def train_adapter(params: Params, job: Job, trainer: Any, loaded: Loaded, plan: Plan) -> dict[str, Any]:
    """Train ``trainer``'s adapter as ``plan`` says and write what the run leaves.

    Every rank of a distributed run calls this; the main process writes the outputs and
    returns everything it recorded (metrics and the run record's ``run`` section in one
    dict), the others return the same read back from the files it wrote.
    """
    stage = job.stage
    section = getattr(params, stage)
    metrics_path, plot_dir, ckpt_dir = job_paths(params, stage)
    main = trainer.is_world_process_zero()
    warnings = announce_plan(plan, stage, section.min_optimizer_steps, section.strict_plan, show=main)

    match_adapter_dtype(trainer)
    use_progress_bar(trainer, stage)
    trainer.add_callback(GuardCallback(stage))
    trainer.add_callback(MarkerCallback(job.run_id))
    throughput = ThroughputCallback()
    trainer.add_callback(throughput)
    start = StartCallback()
    trainer.add_callback(start)
    initial = trainable_snapshot(trainer.model)
    resume = resume_checkpoint(ckpt_dir, job.run_id, stage)
    with contextlib.ExitStack() as stack:
        if main:
            # DVCLive writes beside the final directory; it replaces it when the stage's
            # outputs are committed, and a failed run leaves the previous log.
            live_dir = stack.enter_context(atomic_dir(plot_dir))
            live = LiveCallback(open_live(live_dir), job.plot_keys)
            trainer.add_callback(live)
        # After the LiveCallback: its replay of a restored log at train begin comes before
        # the curve's step-0 point is logged. Every rank reads the suite; rank 0 evaluates.
        curve = attach_curve(params, stage, trainer, loaded)
        if main and curve is not None:
            live.keys = (*live.keys, *curve.suite.keys)
        started = time.perf_counter()
        result = train_with_checkpoints(trainer, resume, ckpt_dir, stage)
        runtime = time.perf_counter() - started
        check_steps(trainer.state.global_step, plan, stage)
        start.check(resume, trainer.state.global_step, stage)
        model, state = trained_model(trainer)
        if not main:
            return from_main(None, ckpt_dir)  # the main process's results (other machines share no disk)
        change = check_weights_changed(model, initial, stage, state)
        return _finish(params, job, trainer, loaded, plan, result, runtime, change, state, model, warnings,
                       start, throughput, stack, curve)


def _finish(
    params: Params, job: Job, trainer: Any, loaded: Loaded, plan: Plan, result: Any, runtime: float, change: float,
    state: Any, model: Any, warnings: list[str], start: StartCallback, throughput: ThroughputCallback,
    stack: contextlib.ExitStack, curve: CurveCallback | None,
) -> dict[str, Any]:
    """The main process's outputs: model directory, DVCLive log, metrics, run record."""
    stage = job.stage
    metrics_path, plot_dir, ckpt_dir = job_paths(params, stage)

    history = trainer.state.log_history
    own = job.results(history)
    results = {
        "train_loss": float(result.training_loss),
        "final_loss": last_logged(history, "loss"),
        **own,
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
    recorded = {
        "plan": plan.as_dict(),
        "warnings": warnings,
        **results,
        **timing(runtime, start.start_step, plan),
        # the curve's evaluations are left out of the steady throughput, and timed on their own
        **throughput.summary(plan.tokens_total / max(plan.optimizer_steps, 1), curve.timed if curve else None),
        **(curve.summary() if curve else {}),
        "eval_loss_per_epoch": epoch_losses(history),
        "log": plot_dir.as_posix(),
    }
    metrics, run = split_metrics(recorded, ("train_loss", *own))
    stack.close()  # the DVCLive directory is complete: stage it beside the other outputs
    write_run_provenance(
        params, stage, {"model": str(job.out_dir), "adapter_sha256": provenance["adapter_sha256"], "run": run}
    )
    write_json(metrics_path, metrics)
    commit_staged()  # the outputs are in place before the checkpoints go
    finish_checkpoints(ckpt_dir, job.run_id, trainer.state.global_step)
    return from_main(recorded)


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
