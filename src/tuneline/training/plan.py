"""The plan: records, tokens, steps per epoch, optimizer steps, effective batch, epochs
and warmup, printed and written to metrics before the first step; a loud warning under
``min_optimizer_steps``, an ``InputError`` when ``strict_plan`` is set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from tuneline.errors import InputError

console = Console(stderr=True)


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
    """The schedule the Trainer will run, computed the way transformers computes it.

    ``tokens_total`` (the run's ``tokens_seen``) is the tokens the model reads, padding
    left out and every record at its truncated length, over the planned epochs.
    """
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


def plan_for_trainer(
    trainer: Any,
    *,
    eval_records: int,
    tokens_per_epoch: int,
    completion_tokens_per_epoch: int,
    truncated: int,
    max_seq_len: int,
) -> Plan:
    """The plan of a built trainer: batch, accumulation, processes, epochs and warmup as
    its arguments hold them."""
    args = trainer.args
    return make_plan(
        records=len(trainer.train_dataset),
        eval_records=eval_records,
        tokens_per_epoch=tokens_per_epoch,
        completion_tokens_per_epoch=completion_tokens_per_epoch,
        truncated=truncated,
        max_seq_len=max_seq_len,
        per_device_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=args.world_size,
        epochs=float(args.num_train_epochs),
        warmup=float(args.warmup_steps),
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
        warnings.append(text)
    if plan.optimizer_steps <= plan.warmup_steps:
        warnings.append(
            f"{stage}.trainer.warmup_steps: warmup takes {plan.warmup_steps} of {plan.optimizer_steps} optimizer "
            "steps, so the learning rate never reaches its peak (the first step always runs at 0)"
        )
    if plan.truncated:
        warnings.append(
            f"{stage}: {plan.truncated} of {plan.records} records are longer than {plan.max_seq_len} tokens and "
            "lose their end (and terminator) to truncation"
        )
    if show:
        for text in warnings:
            console.print(f"[bold red]WARNING[/] {text}", highlight=False)
    return warnings
