"""clean: validate, normalise, deduplicate, length-check, leak-check and split the examples.

Reads:   ``paths.generated``/``sft.jsonl`` and ``preferences.jsonl``, ``paths.schema_file``,
         every held-out prompt file (``Params.held_out_files``: each suite of
         ``probe.suites`` and the development suite ``paths.dev_suite``), the tokenizer in
         ``paths.base_model``.
Writes:  ``paths.clean``/``train.jsonl``, ``val.jsonl``, ``rejected.jsonl`` (every dropped
         record with its reason and details), ``lengths.jsonl`` (token counts of every
         record that was tokenized), ``preferences.jsonl`` (imported preference triples that
         passed the leakage and contamination checks); ``paths.metrics``/``clean.json``;
         the run record ``paths.reports``/``provenance/clean.json``.
Params:  ``task``, ``paths``, ``probe.suites.<name>.path``, ``model.format``, ``clean``,
         ``sft.max_seq_len``.

Normalisation (applied once, before any filter): Unicode NFC everywhere; the instruction
keeps its line breaks but loses leading/trailing space on each line and runs of spaces
(at most one blank line in a row); every string inside the completion JSON is collapsed to
single-spaced text; the completion is rewritten as canonical JSON (``Contract.canonical_text``).

Filters (``tuneline.filters``), in this order; each returns keep or a reason, and a record
stops at the first reason (the reason names in ``rejected_by_reason``). Filters 1-3 read one
``Contract.judge`` verdict (strict JSON):

1. ``invalid_json``: the completion is not one strict JSON value (no NaN, no duplicate keys);
2. ``schema_invalid``: the completion fails the contract schema (every error path kept);
3. ``task_mismatch``: a ``meta.expect`` check fails (e.g. the payload type asked for);
4. ``duplicate``: same normalised instruction, system text and completion as a kept record;
5. ``near_duplicate``: word n-gram (``clean.ngram``) Jaccard of instruction + completion
   >= ``clean.near_duplicate_jaccard`` with a kept record (the first one is kept);
6. ``probe_leak``: the instruction equals a held-out prompt (of any probe suite or the
   development suite; after normalisation) or has Jaccard >= ``clean.leakage_jaccard``
   with one;
7. the task's filters (``tuneline.tasks``): for ``task: travel``, ``probe_destination``:
   with ``clean.exclude_probe_destinations``, the instruction or the completion names an
   entity a held-out suite expects (any ``expect`` value at a path ending in
   ``destination``: the probe and the development destinations), as a whole word;
8. ``chat_token``: the encoded prompt text or completion contains a special token id of
   the tokenizer (chat markers, BOS/EOS) - contamination;
9. ``over_length``: prompt + completion + EOS tokens exceed ``sft.max_seq_len``. Policy
   ``clean.over_length``: ``drop`` rejects the record, ``truncate`` keeps it (the trainer
   will cut the end of the completion; such records are flagged ``truncated`` in
   ``lengths.jsonl``), ``raise`` stops the stage (exit 2). Either way the count and
   fraction of records whose completion would lose its end go to metrics and a warning.

Token counts use the base tokenizer in the training prompt format (``prompting.render``):
completion format encodes the rendered prompt text with ``add_special_tokens=False``; chat
format applies the tokenizer's template with the generation prompt. ``completion_tokens``
includes the one EOS token the trainer appends.

Split: a record goes to ``val`` when sha256(id) / 2**256 < ``clean.val_fraction``; if that
leaves ``val`` empty with two or more kept records, the record with the smallest hash moves
there. Reject budget: when fewer than ``clean.min_kept`` records survive or the rejected
fraction exceeds ``clean.max_rejected_fraction``, the stage fails with exit 2 naming the
top reasons, and writes nothing.

Output records keep TRL's prompt/completion layout: ``prompt`` is the rendered prompt (a
string in completion format, a message list in chat format), ``completion`` the canonical
completion text (an assistant message list in chat format); ``meta`` gains ``tokens``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tuneline import tasks
from tuneline.contract import load_contract
from tuneline.errors import InputError
from tuneline.filters import (
    Candidate,
    Filter,
    apply,
    candidate,
    check_budget,
    clean_preferences,
    contamination_filter,
    drop_near_duplicates,
    exact_duplicate_filter,
    leakage_filter,
    length_filter,
    length_line,
    measure,
    output_record,
    over_length,
    parse_filter,
    percentile,
    schema_filter,
    split,
    task_filter,
)
from tuneline.params import Params
from tuneline.provenance import sha256_file, write_run_provenance
from tuneline.records import read_jsonl, write_json, write_jsonl
from tuneline.similarity import SimilarityIndex, gram_order, shingles

REASONS = ("invalid_json", "schema_invalid", "task_mismatch", "duplicate", "near_duplicate", "probe_leak")
LATE_REASONS = ("chat_token", "over_length")


def reasons(task: tasks.Task) -> tuple[str, ...]:
    """Every rejection reason in filter order: the task's come after ``probe_leak``."""
    return (*REASONS, *task.clean_reasons, *LATE_REASONS)
_SFT_FIELDS = {"prompt": str, "completion": str, "meta": dict}
_PREF_FIELDS = {"prompt": str, "chosen": str, "rejected": str}


# -- the stage ---------------------------------------------------------------------------


def run(params: Params) -> dict[str, Any]:
    from tuneline import modeling

    cp = params.clean
    fmt = params.model.format
    generated = Path(params.paths.generated)
    contract = load_contract(params.paths.schema_file)
    probe = held_out_prompts(params)
    records = read_jsonl(generated / "sft.jsonl", required=_SFT_FIELDS, allow_empty=True)
    pref_path = generated / "preferences.jsonl"
    preferences = (
        read_jsonl(pref_path, required=_PREF_FIELDS, allow_empty=True) if pref_path.exists() else []
    )
    tokenizer = _tokenizer(params.paths.base_model, fmt)
    special = modeling.chat_special_ids(tokenizer)

    candidates = [
        candidate(r, generated / "sft.jsonl", line) for line, r in enumerate(records, start=1)
    ]
    rejected: list[dict[str, Any]] = []
    alive = apply(
        candidates,
        [parse_filter(contract), schema_filter, task_filter, exact_duplicate_filter()],
        rejected,
    )

    alive = drop_near_duplicates(alive, cp.ngram, cp.near_duplicate_jaccard, rejected)
    leak_filters = _leak_filters(params, probe, alive)
    alive = apply(alive, leak_filters, rejected)

    measure(alive, tokenizer, fmt, special)
    alive = apply(alive, [contamination_filter(tokenizer)], rejected)
    max_len = params.sft.max_seq_len
    over = over_length(alive, max_len, cp.over_length)
    kept = apply(alive, [length_filter(max_len, cp.over_length)], rejected)

    check_budget(len(candidates), kept, rejected, cp.min_kept, cp.max_rejected_fraction)

    pref_kept, pref_rejected = clean_preferences(preferences, leak_filters, tokenizer, fmt, special)
    train, val = split(kept, cp.val_fraction)
    tokenized = [c for c in candidates if c.prompt is not None]
    out = Path(params.paths.clean)
    write_jsonl(out / "train.jsonl", [output_record(c, fmt) for c in train])
    write_jsonl(out / "val.jsonl", [output_record(c, fmt) for c in val])
    write_jsonl(out / "rejected.jsonl", rejected + pref_rejected)
    rejected_ids = {r["id"] for r in rejected}
    write_jsonl(out / "lengths.jsonl", [length_line(c, max_len, rejected_ids) for c in tokenized])
    write_jsonl(out / "preferences.jsonl", pref_kept)

    metrics = _metrics(
        params, candidates, kept, train, val, rejected, over, alive, pref_kept, pref_rejected, preferences
    )
    write_json(Path(params.paths.metrics) / "clean.json", metrics)
    write_run_provenance(
        params,
        "clean",
        {
            "contract_sha256": sha256_file(params.paths.schema_file),
            "held_out_sha256": {path: sha256_file(path) for path in params.held_out_files},
            "format": params.model.format,
        },
    )
    return metrics


def held_out_prompts(params: Params) -> list[dict[str, Any]]:
    """The prompts of every held-out file (``Params.held_out_files``), in order."""
    prompts: list[dict[str, Any]] = []
    seen: dict[Any, str] = {}
    for path in params.held_out_files:
        for line, record in enumerate(read_jsonl(path, required={"instruction": str}), start=1):
            if record["id"] in seen:
                raise InputError(f"{path}:{line}: id {record['id']!r} is also in {seen[record['id']]}; held-out "
                                 "prompt ids must be unique across the suites")
            seen[record["id"]] = str(path)
            prompts.append(record)
    return prompts


def _leak_filters(params: Params, probe: list[dict[str, Any]], alive: list[Candidate]) -> list[Filter]:
    """Probe leakage (exact or near instruction) and then the task's own leak filters."""
    cp = params.clean
    probe_grams = {p["id"]: shingles(p["instruction"], cp.ngram) for p in probe}
    leak_index = SimilarityIndex(
        cp.leakage_jaccard,
        gram_order([*probe_grams.values(), *(shingles(c.instruction, cp.ngram) for c in alive)]),
    )
    for probe_id, grams in probe_grams.items():
        leak_index.add(probe_id, grams)
    task = tasks.get(params.task)
    return [leakage_filter(probe, leak_index, cp.ngram), *task.clean_filters(probe, params)]


def _tokenizer(path: str, fmt: str) -> Any:
    """The base model's tokenizer (only the tokenizer files are read)."""
    from tuneline import modeling

    if not Path(path).is_dir():
        raise InputError(
            f"{path}: base model directory not found (paths.base_model); run `tuneline base` "
            "(or `dvc repro base`) first: clean counts tokens with the base tokenizer"
        )
    try:
        return modeling.load_tokenizer(path, fmt)
    except OSError as exc:
        raise InputError(f"{path}: cannot load the base tokenizer: {exc}") from exc


def _metrics(
    params: Params,
    candidates: Sequence[Candidate],
    kept: Sequence[Candidate],
    train: Sequence[Candidate],
    val: Sequence[Candidate],
    rejected: Sequence[dict[str, Any]],
    over: Sequence[Candidate],
    measured: Sequence[Candidate],
    pref_kept: Sequence[dict[str, Any]],
    pref_rejected: Sequence[dict[str, Any]],
    preferences: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    by_reason = Counter(r["reason"] for r in rejected)
    prompt_tokens = [c.prompt_tokens for c in kept]
    completion_tokens = [c.completion_tokens for c in kept]
    total_tokens = [c.total_tokens for c in kept]
    leak_reasons = ("probe_leak", *tasks.get(params.task).clean_reasons)
    leaks = sum(by_reason[r] for r in leak_reasons)
    pref_reasons = Counter(r["reason"] for r in pref_rejected)
    metrics: dict[str, Any] = {
        "input": len(candidates),
        "kept": len(kept),
        "train": len(train),
        "val": len(val),
        "rejected": len(rejected),
        "rejected_fraction": round(len(rejected) / len(candidates), 6) if candidates else 0.0,
        "rejected_by_reason": {reason: by_reason[reason] for reason in reasons(tasks.get(params.task))},
        "over_length_policy": params.clean.over_length,
        "max_seq_len": params.sft.max_seq_len,
        "over_length": len(over),
        "truncated": sum(1 for c in kept if c.total_tokens > params.sft.max_seq_len),
        "truncated_fraction": round(len(over) / len(measured), 6) if measured else 0.0,
        "prompt_tokens_p50": percentile(prompt_tokens, 50),
        "prompt_tokens_p95": percentile(prompt_tokens, 95),
        "prompt_tokens_max": max(prompt_tokens, default=0),
        "completion_tokens_p50": percentile(completion_tokens, 50),
        "completion_tokens_p95": percentile(completion_tokens, 95),
        "completion_tokens_max": max(completion_tokens, default=0),
        "total_tokens_p95": percentile(total_tokens, 95),
        "total_tokens_max": max(total_tokens, default=0),
        "train_tokens": sum(c.total_tokens for c in train),
        "leakage_hits": leaks + sum(pref_reasons[r] for r in leak_reasons),
        "contamination_hits": by_reason["chat_token"] + pref_reasons["chat_token"],
        "kept_by_source": dict(
            sorted(Counter(c.record["meta"].get("source", "unknown") for c in kept).items())
        ),
        "kept_by_payload_type": dict(
            sorted(Counter(c.record["meta"].get("payload_type") or "unknown" for c in kept).items())
        ),
        "preferences": {
            "input": len(preferences),
            "kept": len(pref_kept),
            "rejected": len(pref_rejected),
        },
    }
    return metrics
