"""Callbacks and guards around ``trainer.train``.

- ``GuardCallback``: a non-finite loss or non-finite trainable weights stop training with
  the step number (no final output is written); ``check_weights_changed`` fails a run
  whose adapter weights did not move.
- ``ThroughputCallback``: steady-state seconds and tokens per second.
- ``MarkerCallback``: marks a checkpoint complete once the trainer has written it.
- ``StartCallback``: the global step the trainer starts from once it has loaded a
  checkpoint, and the optimizer steps it runs: what resume metrics are made of.
- ``ProgressBarCallback``: one progress line on the main process (optimizer steps, ETA,
  the last logged loss) in place of the Trainer's printed log dicts (``use_progress_bar``).
- ``LiveCallback``: the Trainer's logs through DVCLive's Hugging Face callback into a
  directory that ``dvc plots`` reads (``open_live``): main process only, x = optimizer
  step, no timestamps, no DVC experiment, no ``dvc.yaml`` written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.integrations import DVCLiveCallback

from tuneline.errors import TunelineError
from tuneline.training.checkpoints import write_marker
from tuneline.training.distributed import wait_for_everyone


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
            f"was learned and no adapter is written (is {stage}.trainer.learning_rate 0, or was every label masked?)"
        )
    return largest


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
                    f"was written (lower {self.stage}.trainer.learning_rate or check the data)"
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
                    f"non-finite; training stopped and no adapter was written (lower {self.stage}.trainer.learning_rate "
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

    def summary(self, tokens_per_step: float, paused: Mapping[int, float] | None = None) -> dict[str, Any]:
        """``steady_steps``, ``steady_s`` and ``steady_tokens_per_s`` (None when too few
        steps). Tokens are the Trainer's count of non-padding input tokens; where the
        Trainer counts none, ``tokens_per_step`` (the plan's) per step. ``paused``: seconds
        spent after a step's end on other work (the curve's evaluations), by step; those
        inside the measured steps are left out."""
        if self.start is None or self.end is None:
            return {"steady_steps": 0, "steady_s": None, "steady_tokens_per_s": None}
        seconds = self.end[0] - self.start[0]
        seconds -= sum(s for step, s in (paused or {}).items() if self.skip <= step < self.end[2])
        steps = self.end[2] - self.skip
        tokens = (self.end[1] - self.start[1]) or tokens_per_step * steps
        return {
            "steady_steps": steps,
            "steady_s": round(seconds, 3),
            "steady_tokens_per_s": round(tokens / seconds, 2) if seconds > 0 and tokens > 0 else None,
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
            write_marker(directory, self.run_fingerprint, state.global_step)


class StartCallback(TrainerCallback):
    """The trainer's own account of a run: ``start_step`` is its global step when training
    begins (after a checkpoint's trainer state, optimizer and scheduler are loaded) and
    ``steps_run`` the optimizer steps it then runs. A resumed run that started over, or
    ran the steps before its checkpoint again, shows it here."""

    def __init__(self) -> None:
        self.start_step: int | None = None
        self.steps_run = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start_step = int(state.global_step)
        self.steps_run = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps_run += 1

    def check(self, resume: Path | None, end_step: int, stage: str) -> None:
        """The trainer started where the checkpoint left off and ran only the rest."""
        expected = int(resume.name.split("-")[1]) if resume else 0
        if self.start_step != expected:
            where = f"resuming from {resume}" if resume else "starting from scratch"
            raise TunelineError(
                f"{stage}: {where}, the trainer began at step {self.start_step}, not {expected}; no adapter was written"
            )
        if self.steps_run != end_step - self.start_step:
            raise TunelineError(
                f"{stage}: the trainer ran {self.steps_run} optimizer steps from step {self.start_step} to "
                f"{end_step}; no adapter was written"
            )


class ProgressBarCallback(TrainerCallback):
    """One tqdm line per run on the main process: optimizer steps done of the plan's, the
    ETA and the last logged train (and eval) loss, the same kind of bar the generation loop
    shows. The Trainer's own printing (a log dict per logging step) is removed by
    ``use_progress_bar``; the logs themselves go to files (``LiveCallback``)."""

    def __init__(self, stage: str):
        self.stage = stage
        self.bar: Any = None
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc=self.stage, unit="step", dynamic_ncols=True
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.bar is None:
            return
        for key, name in (("loss", "loss"), ("eval_loss", "eval_loss")):
            value = (logs or {}).get(key)
            if isinstance(value, int | float):
                self.shown[name] = f"{value:.4g}"
        if self.shown:
            self.bar.set_postfix(self.shown, refresh=True)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_progress_bar(trainer: Any, stage: str) -> ProgressBarCallback:
    """Replace the Trainer's log printing (``PrinterCallback``, or ``ProgressCallback``
    with its dict per logging step) by one ``ProgressBarCallback``."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    bar = ProgressBarCallback(stage)
    trainer.add_callback(bar)
    return bar


def open_live(directory: Path) -> Any:
    """A ``dvclive.Live`` writing only under ``directory``: no DVC experiment saved
    (``save_dvc_exp``), no ``dvc.yaml`` written, no report, no Studio events, and no look
    at the DVC repository or git (DVCLive would otherwise open, or even initialise, the
    repository and ``git add`` its directory inside ``dvc exp run``)."""
    from dvclive import Live

    class StageLive(Live):
        def _init_dvc(self) -> None:
            self._save_dvc_exp = False

        def _init_studio(self) -> None:
            self._studio_events_to_skip.update({"start", "data", "done"})

    return StageLive(dir=str(directory), save_dvc_exp=False, dvcyaml=None, report=None)


class LiveCallback(DVCLiveCallback):
    """The Trainer's logs as DVCLive metrics (``<dir>/plots/metrics/<name>.tsv`` with
    columns ``step`` and the name, and the last values in ``<dir>/metrics.json``), through
    the Hugging Face callback DVCLive documents (``transformers.integrations``; the copy in
    ``dvclive.huggingface`` is deprecated in favour of it).

    Differences from the stock callback, so the files are byte-deterministic and the same
    after a resume: the step is the Trainer's optimizer step (not a count of log calls);
    only ``keys`` are logged (no runtimes or samples per second); TrainingArguments are not
    logged (paths and run names; the params are DVC's); a resumed run replays the log
    history its checkpoint restored. Only the main process is given one.
    """

    def __init__(self, live: Any, keys: tuple[str, ...]):
        super().__init__(live=live)
        self.keys = keys

    def setup(self, args: Any, state: Any, model: Any) -> None:
        self._initialized = True

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self.setup(args, state, model)
        for entry in state.log_history:  # restored from a checkpoint when resuming
            self.log_entry(state, entry, int(entry.get("step", 0)))

    def on_log(self, args: Any, state: Any, control: Any, model: Any = None, logs: Any = None, **kwargs: Any) -> None:
        if not self._initialized:
            self.setup(args, state, model)
        self.log_entry(state, logs or {}, state.global_step)

    def log_entry(self, state: Any, logs: Mapping[str, Any], step: int) -> None:
        from dvclive.utils import standardize_metric_name

        if not state.is_world_process_zero:
            return
        values = {k: v for k, v in logs.items() if k in self.keys and isinstance(v, int | float)}
        if not values:
            return
        self.live.step = step
        for key, value in values.items():
            self.live.log_metric(standardize_metric_name(key, "dvclive.huggingface"), float(value))
        self.live.make_summary()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._initialized and state.is_world_process_zero:
            self.live.end()
