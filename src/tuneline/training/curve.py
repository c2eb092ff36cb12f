"""The contract's learning curve: how often the model in training meets the contract,
against the optimizer step, beside the loss.

``CurveCallback`` generates greedily on a stratified prefix of a development suite
(``paths.dev_suite``; ``<stage>.curve.limit`` lines, stratified as the task's) at step 0 (the
flat start, before the first update), every ``every_n_steps`` optimizer steps and at the
last step, judges every output exactly as the probe does (``tuneline.judging.judge``,
``tuneline.reporting.binary_outcomes``) and logs ``curve/parse_rate``,
``curve/schema_valid_rate``, ``curve/<check>_accuracy`` for every check of the suite's
``expect`` (travel: ``payload_type``, ``destination``) and ``curve/truncated_rate`` (outputs
that reached the token limit: a loop, or a run-on after a complete document that the
lenient parse still counts as valid) through the Trainer's log, so
they land in the stage's DVCLive directory (``LiveCallback``:
``<metrics>/<stage>/plots/metrics/curve/*.tsv``) and in the trainer state's log history,
which a checkpoint keeps and a resumed run replays: no point is lost or logged twice.

The curve does not change training: the model is generated from in eval mode (no
dropout) under ``torch.inference_mode`` with the adapter active, every module's train/eval
flag is put back afterwards, and the torch RNG states (CPU and the current CUDA device)
are restored, so the trained weights are the same bytes with the curve on or off. Only
the main process evaluates; the others go on (no collective is involved: the generating
process uses the unwrapped model). A sharded (FSDP) model cannot generate on one process:
the curve is refused there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from tuneline.errors import InputError
from tuneline.modeling import Loaded
from tuneline.params import Params

PREFIX = "curve/"


@dataclasses.dataclass(frozen=True)
class DevSuite:
    """The development prompts of a curve: suite lines, their encoded prompts, the contract."""

    lines: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    contract: Any
    keys: tuple[str, ...]  # the logged keys, ``curve/...``


def load_dev_suite(params: Params, stage: str, loaded: Loaded) -> DevSuite:
    """The first ``<stage>.curve.limit`` lines of the development suite (``paths.dev_suite``),
    encoded in the model's format; InputError naming the param when it is missing or malformed."""
    from tuneline import tasks
    from tuneline.contract import load_contract, load_suite, task_checks
    from tuneline.judging import select_subset
    from tuneline.prompting import render

    curve = getattr(params, stage).curve
    param = "paths.dev_suite"
    path = params.paths.dev_suite
    if not path or not Path(path).is_file():
        raise InputError(
            f"{param}: {path!r} is not a file ({stage}.curve.every_n_steps is {curve.every_n_steps}; allowed: "
            f"a suite .jsonl like the probe suites, or {stage}.curve.every_n_steps: 0 to turn the curve off)"
        )
    try:
        suite = load_suite(path)
        lines = select_subset(suite, curve.limit, tasks.get(params.task).stratify_by, path, f"{stage}.curve.limit")
        prompt_ids = loaded.encode([render(line["instruction"], loaded.format) for line in lines])
    except InputError as exc:
        raise InputError(f"{param}: {exc}") from exc
    checks = task_checks(None, lines[0]["expect"])  # the check names the judge gives every line
    keys = ("parse_rate", "schema_valid_rate", *(f"{name}_accuracy" for name in checks), "truncated_rate")
    return DevSuite(lines, prompt_ids, load_contract(params.paths.schema_file), tuple(PREFIX + k for k in keys))


def curve_rates(suite: DevSuite, outputs: Sequence[Any]) -> dict[str, float]:
    """The logged rates of one evaluation: each ``binary_outcomes`` rate of the judged outputs."""
    from tuneline.judging import judge
    from tuneline.reporting import binary_outcomes

    rows = []
    for line, gen in zip(suite.lines, outputs, strict=True):
        judged = judge(gen.text, gen.finish_reason, line["expect"], suite.contract)
        rows.append(binary_outcomes({**judged, "finish_reason": gen.finish_reason}))
    rates = {}
    for key in suite.keys:
        scored = [row[key[len(PREFIX):]] for row in rows]
        rates[key] = round(sum(bool(v) for v in scored) / len(scored), 6)
    return rates


@contextlib.contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """``model`` in eval mode with no gradients, then every module's train/eval flag and the
    torch RNG states (CPU, current CUDA device) as they were."""
    import torch

    modes = [(module, module.training) for module in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng)


class CurveCallback(TrainerCallback):
    """Evaluate the contract on the development suite at step 0, every ``every`` steps and
    the last step, and log the rates through the Trainer's log (main process only)."""

    def __init__(self, trainer: Any, loaded: Loaded, suite: DevSuite, every: int, batch_size: int,
                 max_new_tokens: int):
        self.trainer = trainer
        self.loaded = loaded
        self.suite = suite
        self.every = every
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.timed: dict[int, float] = {}  # step -> seconds of its evaluation, in this run

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step == 0:  # a resumed run has its earlier points in the restored log
            self.evaluate(state, control, model)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.evaluate(state, control, model)

    def evaluate(self, state: Any, control: Any, model: Any) -> None:
        from tuneline.generation import generate

        if not state.is_world_process_zero or model is None:
            return
        began = time.perf_counter()
        device = str(next(model.parameters()).device)
        view = dataclasses.replace(self.loaded, model=model, device=device)
        with evaluating(model):
            outputs, _ = generate(
                view, self.suite.prompt_ids, batch_size=self.batch_size, max_new_tokens=self.max_new_tokens,
                progress=False,
            )
        rates = curve_rates(self.suite, [gen for (gen,) in outputs])
        # The base Trainer's log: the subclasses' own (TRL's) would fold their pending
        # training metrics into this entry and clear them. Logging clears the step's
        # ``should_log``; the step's own log (the loss) still has to happen after this.
        should_log = control.should_log
        Trainer.log(self.trainer, dict(rates))
        control.should_log = should_log
        self.timed[state.global_step] = time.perf_counter() - began

    def summary(self) -> Mapping[str, Any]:
        """The run record's account of the curve: points evaluated by this run, seconds."""
        return {"curve_points": len(self.timed), "curve_s": round(sum(self.timed.values()), 2)}


def attach_curve(params: Params, stage: str, trainer: Any, loaded: Loaded) -> CurveCallback | None:
    """The stage's curve callback added to ``trainer`` (None when ``every_n_steps`` is 0).
    Every process reads the suite, so a bad one stops them all before training."""
    curve = getattr(params, stage).curve
    if not curve.every_n_steps:
        return None
    if getattr(trainer, "is_fsdp_enabled", False):
        raise InputError(
            f"{stage}.curve.every_n_steps: {curve.every_n_steps} with compute.distributed fsdp: a sharded model "
            "cannot generate on one process (allowed: 0 under fsdp)"
        )
    suite = load_dev_suite(params, stage, loaded)
    max_new_tokens = curve.max_new_tokens or params.probe.max_new_tokens
    callback = CurveCallback(trainer, loaded, suite, curve.every_n_steps, curve.batch_size, max_new_tokens)
    trainer.add_callback(callback)
    return callback
