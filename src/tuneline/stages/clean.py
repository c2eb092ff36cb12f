"""clean: validate, normalise, deduplicate, length-check, leak-check and split the examples.

Reads:   ``paths.generated``/``sft.jsonl`` and ``preferences.jsonl``, ``paths.schema_file``,
         the probe suite (``probe.suite``, default ``paths.probe_suite``), the tokenizer in
         ``paths.base_model``.
Writes:  ``paths.clean``/``train.jsonl``, ``val.jsonl``, ``rejected.jsonl`` (every dropped
         record with its reason and details), ``lengths.jsonl`` (token counts of every
         record that was tokenized), ``preferences.jsonl`` (imported preference triples that
         passed the leakage and contamination checks); ``paths.metrics``/``clean.json``.
Params:  ``paths``, ``model.format``, ``clean``, ``sft.max_seq_len``.

Normalisation (applied once, before any filter): Unicode NFC everywhere; the instruction
keeps its line breaks but loses leading/trailing space on each line and runs of spaces
(at most one blank line in a row); every string inside the completion JSON is collapsed to
single-spaced text; the completion is rewritten as canonical JSON (``Contract.canonical_text``).

Filters, in this order; each returns keep or a reason, and a record stops at the first
reason (the reason names in ``rejected_by_reason``):

1. ``invalid_json``: the completion is not one strict JSON value (no NaN, no duplicate keys);
2. ``schema_invalid``: the completion fails the contract schema (every error path kept);
3. ``task_mismatch``: a ``meta.expect`` check fails (e.g. the payload type asked for);
4. ``duplicate``: same normalised instruction, system text and completion as a kept record;
5. ``near_duplicate``: word n-gram (``clean.ngram``) Jaccard of instruction + completion
   >= ``clean.near_duplicate_jaccard`` with a kept record (the first one is kept);
6. ``probe_leak``: the instruction equals a probe prompt (after normalisation) or has
   Jaccard >= ``clean.leakage_jaccard`` with one;
7. ``probe_destination``: with ``clean.exclude_probe_destinations``, the instruction or the
   completion names an entity the probe suite expects (any ``expect`` value at a path
   ending in ``destination``), as a whole word;
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

import hashlib
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tuneline.contract import Contract, load_contract, task_checks
from tuneline.datagen.similarity import SimilarityIndex, gram_order, shingles
from tuneline.errors import InputError
from tuneline.params import Params
from tuneline.prompting import render
from tuneline.provenance import sha256_file, stamp
from tuneline.records import loads_strict, read_jsonl, write_json, write_jsonl

REASONS = (
    "invalid_json",
    "schema_invalid",
    "task_mismatch",
    "duplicate",
    "near_duplicate",
    "probe_leak",
    "probe_destination",
    "chat_token",
    "over_length",
)
_SFT_FIELDS = {"prompt": str, "completion": str, "meta": dict}
_PREF_FIELDS = {"prompt": str, "chosen": str, "rejected": str}
err = Console(stderr=True)


@dataclass
class Candidate:
    """One record on its way through the filters."""

    record: dict[str, Any]
    instruction: str
    system: str | None
    completion: str  # canonical text once parsed, the raw text before
    value: Any = None
    grams: frozenset = frozenset()
    prompt: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    special_hits: list[int] = field(default_factory=list)

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Rejection = tuple[str, dict[str, Any]]
Filter = Callable[[Candidate], Rejection | None]


# -- normalisation -----------------------------------------------------------------------


def normalize_text(text: str) -> str:
    """NFC; strip each line; collapse runs of spaces/tabs; at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    lines = [re.sub(r"[ \t\f\v]+", " ", line).strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def normalize_value(value: Any) -> Any:
    """Every string in a JSON value collapsed to single-spaced NFC text."""
    if isinstance(value, str):
        return " ".join(unicodedata.normalize("NFC", value).split())
    if isinstance(value, list):
        return [normalize_value(v) for v in value]
    if isinstance(value, dict):
        return {normalize_value(k): normalize_value(v) for k, v in value.items()}
    return value


def _prompt_key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.casefold()))


# -- filters -----------------------------------------------------------------------------


def parse_filter(contract: Contract) -> Filter:
    def check(c: Candidate) -> Rejection | None:
        try:
            value = loads_strict(c.completion)
        except ValueError as exc:
            return "invalid_json", {"error": str(exc)}
        c.value = normalize_value(value)
        c.completion = contract.canonical_text(c.value)
        return None

    return check


def schema_filter(contract: Contract) -> Filter:
    def check(c: Candidate) -> Rejection | None:
        errors = contract.validate(c.value)
        return ("schema_invalid", {"errors": errors}) if errors else None

    return check


def task_filter(c: Candidate) -> Rejection | None:
    expect = c.record["meta"].get("expect") or {}
    if not expect:
        return None
    checks = task_checks(c.value, expect)
    failed = sorted(name for name, ok in checks.items() if not ok)
    return ("task_mismatch", {"failed": failed, "expect": expect}) if failed else None


def exact_duplicate_filter() -> Filter:
    seen: dict[str, str] = {}

    def check(c: Candidate) -> Rejection | None:
        key = hashlib.sha256(
            "\x00".join([_prompt_key(c.instruction), c.system or "", c.completion]).encode("utf-8")
        ).hexdigest()
        if key in seen:
            return "duplicate", {"duplicate_of": seen[key]}
        seen[key] = c.id
        return None

    return check


def near_duplicate_filter(index: SimilarityIndex) -> Filter:
    def check(c: Candidate) -> Rejection | None:
        hit = index.best(c.grams)
        if hit is not None:
            return "near_duplicate", {"duplicate_of": hit[0], "jaccard": round(hit[1], 4)}
        index.add(c.id, c.grams)
        return None

    return check


def leakage_filter(probe: Sequence[dict[str, Any]], index: SimilarityIndex, n: int) -> Filter:
    exact = {_prompt_key(p["instruction"]): p["id"] for p in probe}

    def check(c: Candidate) -> Rejection | None:
        probe_id = exact.get(_prompt_key(c.instruction))
        if probe_id is not None:
            return "probe_leak", {"probe_id": probe_id, "match": "exact"}
        hit = index.best(shingles(c.instruction, n))
        if hit is not None:
            return "probe_leak", {"probe_id": hit[0], "match": "near", "jaccard": round(hit[1], 4)}
        return None

    return check


def probe_entities(probe: Sequence[dict[str, Any]]) -> list[str]:
    """Values the probe suite expects at paths ending in 'destination'."""
    found = {
        str(v)
        for p in probe
        for k, v in (p.get("expect") or {}).items()
        if k.rsplit(".", 1)[-1] == "destination" and str(v).strip()
    }
    return sorted(found)


def destination_filter(entities: Sequence[str]) -> Filter:
    patterns = [(e, re.compile(rf"(?<!\w){re.escape(e.casefold())}(?!\w)")) for e in entities]

    def check(c: Candidate) -> Rejection | None:
        text = f"{c.instruction}\n{c.completion}".casefold()
        for entity, pattern in patterns:
            if pattern.search(text):
                return "probe_destination", {"destination": entity}
        return None

    return check


def contamination_filter(tokenizer: Any) -> Filter:
    def check(c: Candidate) -> Rejection | None:
        if c.special_hits:
            names = [tokenizer.convert_ids_to_tokens(i) for i in c.special_hits]
            return "chat_token", {"token_ids": c.special_hits, "tokens": names}
        return None

    return check


def length_filter(max_seq_len: int, policy: str) -> Filter:
    def check(c: Candidate) -> Rejection | None:
        if c.total_tokens > max_seq_len and policy == "drop":
            return "over_length", {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "max_seq_len": max_seq_len,
            }
        return None

    return check


# -- tokenization ------------------------------------------------------------------------


def measure(candidates: Sequence[Candidate], tokenizer: Any, fmt: str, special: set[int]) -> None:
    """Render prompts and count tokens (prompt and completion separately), in batches."""
    if not candidates:
        return
    for c in candidates:
        c.prompt = render(c.instruction, fmt, system=c.system)
    completions = tokenizer([c.completion for c in candidates], add_special_tokens=False)[
        "input_ids"
    ]
    if fmt == "completion":
        prompts = tokenizer([c.prompt for c in candidates], add_special_tokens=False)["input_ids"]
        content = prompts
    else:
        prompts = [
            tokenizer.apply_chat_template(
                c.prompt, add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for c in candidates
        ]
        texts = ["\n".join(m["content"] for m in c.prompt) for c in candidates]
        content = tokenizer(texts, add_special_tokens=False)["input_ids"]
    for c, p_ids, c_ids, text_ids in zip(candidates, prompts, completions, content, strict=True):
        c.prompt_tokens = len(p_ids)
        c.completion_tokens = len(c_ids) + 1  # the EOS the trainer appends
        c.special_hits = sorted({i for i in (*text_ids, *c_ids) if i in special})


# -- the stage ---------------------------------------------------------------------------


def run(params: Params) -> dict[str, Any]:
    from tuneline import modeling

    cp = params.clean
    fmt = params.model.format
    generated = Path(params.paths.generated)
    contract = load_contract(params.paths.schema_file)
    probe = read_jsonl(params.probe_suite, required={"instruction": str})
    records = read_jsonl(generated / "sft.jsonl", required=_SFT_FIELDS, allow_empty=True)
    pref_path = generated / "preferences.jsonl"
    preferences = (
        read_jsonl(pref_path, required=_PREF_FIELDS, allow_empty=True) if pref_path.exists() else []
    )
    tokenizer = _tokenizer(params.paths.base_model, fmt)
    special = modeling.chat_special_ids(tokenizer)

    candidates = [
        _candidate(r, generated / "sft.jsonl", line) for line, r in enumerate(records, start=1)
    ]
    rejected: list[dict[str, Any]] = []
    alive = _apply(
        candidates,
        [parse_filter(contract), schema_filter(contract), task_filter, exact_duplicate_filter()],
        rejected,
    )

    for c in alive:
        c.grams = shingles(f"{c.instruction}\n{c.completion}", cp.ngram)
    near = SimilarityIndex(cp.near_duplicate_jaccard, gram_order(c.grams for c in alive))
    alive = _apply(alive, [near_duplicate_filter(near)], rejected)

    probe_grams = {p["id"]: shingles(p["instruction"], cp.ngram) for p in probe}
    leak_index = SimilarityIndex(
        cp.leakage_jaccard,
        gram_order([*probe_grams.values(), *(shingles(c.instruction, cp.ngram) for c in alive)]),
    )
    for probe_id, grams in probe_grams.items():
        leak_index.add(probe_id, grams)
    leak_filters = [leakage_filter(probe, leak_index, cp.ngram)]
    if cp.exclude_probe_destinations:
        leak_filters.append(destination_filter(probe_entities(probe)))
    alive = _apply(alive, leak_filters, rejected)

    measure(alive, tokenizer, fmt, special)
    alive = _apply(alive, [contamination_filter(tokenizer)], rejected)
    max_len = params.sft.max_seq_len
    over = [c for c in alive if c.total_tokens > max_len]
    over_fraction = len(over) / len(alive) if alive else 0.0
    if over:
        _warn_over_length(over, len(alive), max_len, cp.over_length)
        if cp.over_length == "raise":
            raise InputError(
                f"clean.over_length is 'raise': {len(over)} of {len(alive)} records ({over_fraction:.1%}) exceed "
                f"sft.max_seq_len={max_len} tokens (e.g. {', '.join(c.id for c in over[:5])}); raise "
                "sft.max_seq_len, shorten the completions, or set clean.over_length to drop or truncate"
            )
    kept = _apply(alive, [length_filter(max_len, cp.over_length)], rejected)

    _check_budget(len(candidates), kept, rejected, cp.min_kept, cp.max_rejected_fraction)

    pref_kept, pref_rejected = _clean_preferences(
        preferences, probe, leak_index, cp, tokenizer, fmt, special
    )
    train, val = split(kept, cp.val_fraction)
    tokenized = [c for c in candidates if c.prompt is not None]
    out = Path(params.paths.clean)
    write_jsonl(out / "train.jsonl", [_output(c, fmt) for c in train])
    write_jsonl(out / "val.jsonl", [_output(c, fmt) for c in val])
    write_jsonl(out / "rejected.jsonl", rejected + pref_rejected)
    write_jsonl(
        out / "lengths.jsonl",
        [_length_line(c, max_len, {r["id"] for r in rejected}) for c in tokenized],
    )
    write_jsonl(out / "preferences.jsonl", pref_kept)

    metrics = _metrics(
        params,
        candidates,
        kept,
        train,
        val,
        rejected,
        over,
        alive,
        pref_kept,
        pref_rejected,
        preferences,
    )
    write_json(Path(params.paths.metrics) / "clean.json", metrics)
    return metrics


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


def _candidate(record: dict[str, Any], path: Path, line: int) -> Candidate:
    meta = record["meta"]
    instruction = meta.get("instruction", record["prompt"])
    system = meta.get("system")
    if not isinstance(instruction, str) or (system is not None and not isinstance(system, str)):
        raise InputError(f"{path}:{line}: meta.instruction and meta.system must be strings")
    return Candidate(
        record=record,
        instruction=normalize_text(instruction),
        system=normalize_text(system) if system else None,
        completion=record["completion"],
    )


def _apply(
    candidates: Iterable[Candidate], filters: Sequence[Filter], rejected: list[dict[str, Any]]
) -> list[Candidate]:
    kept = []
    for c in candidates:
        for f in filters:
            rejection = f(c)
            if rejection is not None:
                reason, detail = rejection
                rejected.append(
                    {"id": c.id, "reason": reason, "detail": detail, "record": c.record}
                )
                break
        else:
            kept.append(c)
    return kept


def _warn_over_length(over: Sequence[Candidate], total: int, max_len: int, policy: str) -> None:
    action = {
        "drop": "dropped",
        "truncate": "kept; the trainer will cut their ends",
        "raise": "refused",
    }[policy]
    err.print(
        f"[yellow]warning:[/] {len(over)} of {total} records ({len(over) / total:.1%}) are longer than "
        f"sft.max_seq_len={max_len} tokens, so their completions would lose their end "
        f"(clean.over_length={policy}: {action})",
        highlight=False,
    )


def _check_budget(
    total: int,
    kept: Sequence[Candidate],
    rejected: Sequence[dict[str, Any]],
    min_kept: int,
    max_fraction: float,
) -> None:
    fraction = len(rejected) / total if total else 0.0
    problems = []
    if len(kept) < min_kept:
        problems.append(f"only {len(kept)} of {total} records kept (clean.min_kept: {min_kept})")
    if fraction > max_fraction:
        problems.append(f"{fraction:.1%} rejected (clean.max_rejected_fraction: {max_fraction})")
    if not problems:
        return
    counts = Counter(r["reason"] for r in rejected)
    example = {}
    for r in rejected:
        example.setdefault(r["reason"], r)
    top = []
    for reason, n in counts.most_common(3):
        first = example[reason]
        detail = first["detail"]
        hint = (
            detail.get("errors", [detail.get("error") or detail.get("duplicate_of") or ""])[0]
            if detail
            else ""
        )
        top.append(f"{reason}: {n} (e.g. {first['id']}{': ' + str(hint) if hint else ''})")
    reasons = "; ".join(top) if top else "no records rejected"
    raise InputError(
        f"clean: reject budget exceeded: {' and '.join(problems)}; top reasons: {reasons}"
    )


def split(
    kept: Sequence[Candidate], val_fraction: float
) -> tuple[list[Candidate], list[Candidate]]:
    """Deterministic train/val split by id hash (see the module docstring)."""

    def unit(c: Candidate) -> float:
        return int(hashlib.sha256(c.id.encode("utf-8")).hexdigest(), 16) / 2**256

    val_ids = {c.id for c in kept if unit(c) < val_fraction}
    if not val_ids and len(kept) >= 2:
        val_ids = {min(kept, key=unit).id}
    return [c for c in kept if c.id not in val_ids], [c for c in kept if c.id in val_ids]


def _output(c: Candidate, fmt: str) -> dict[str, Any]:
    meta = dict(c.record["meta"])
    meta["instruction"] = c.instruction
    if c.system:
        meta["system"] = c.system
    meta["tokens"] = {"prompt": c.prompt_tokens, "completion": c.completion_tokens}
    completion: Any = (
        c.completion if fmt == "completion" else [{"role": "assistant", "content": c.completion}]
    )
    out = {"id": c.id, "prompt": c.prompt, "completion": completion, "meta": meta}
    if "provenance" in c.record:
        out["provenance"] = c.record["provenance"]
    return out


def _length_line(c: Candidate, max_len: int, rejected_ids: set[str]) -> dict[str, Any]:
    return {
        "id": c.id,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.total_tokens,
        "over_length": c.total_tokens > max_len,
        "truncated": c.total_tokens > max_len and c.id not in rejected_ids,
        "kept": c.id not in rejected_ids,
    }


def _clean_preferences(
    preferences: Sequence[dict[str, Any]],
    probe: Sequence[dict[str, Any]],
    leak_index: SimilarityIndex,
    cp: Any,
    tokenizer: Any,
    fmt: str,
    special: set[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Imported triples: the prompt gets the model's format; leakage and contamination apply."""
    filters: list[Filter] = [leakage_filter(probe, leak_index, cp.ngram)]
    if cp.exclude_probe_destinations:
        filters.append(destination_filter(probe_entities(probe)))
    kept, rejected = [], []
    for p in preferences:
        c = Candidate(
            record=p, instruction=normalize_text(p["prompt"]), system=None, completion=p["chosen"]
        )
        c.prompt = render(c.instruction, fmt)
        texts = [c.instruction, p["chosen"], p["rejected"]]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        c.special_hits = sorted({i for row in ids for i in row if i in special})
        reason = None
        for f in [*filters, contamination_filter(tokenizer)]:
            reason = f(c)
            if reason is not None:
                break
        if reason is not None:
            rejected.append(
                {
                    "id": c.id,
                    "reason": reason[0],
                    "detail": reason[1],
                    "record": p,
                    "kind": "preference",
                }
            )
            continue
        out = {"id": c.id, "prompt": c.prompt, "chosen": p["chosen"], "rejected": p["rejected"]}
        if fmt == "chat":
            out["chosen"] = [{"role": "assistant", "content": p["chosen"]}]
            out["rejected"] = [{"role": "assistant", "content": p["rejected"]}]
        out["meta"] = {**p.get("meta", {}), "instruction": c.instruction}
        if "provenance" in p:
            out["provenance"] = p["provenance"]
        kept.append(out)
    return kept, rejected


def percentile(values: Sequence[int], q: float) -> int:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


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
    leaks = by_reason["probe_leak"] + by_reason["probe_destination"]
    pref_reasons = Counter(r["reason"] for r in pref_rejected)
    metrics: dict[str, Any] = {
        "input": len(candidates),
        "kept": len(kept),
        "train": len(train),
        "val": len(val),
        "rejected": len(rejected),
        "rejected_fraction": round(len(rejected) / len(candidates), 6) if candidates else 0.0,
        "rejected_by_reason": {reason: by_reason[reason] for reason in REASONS},
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
        "leakage_hits": leaks + pref_reasons["probe_leak"] + pref_reasons["probe_destination"],
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
        "provenance": stamp(
            contract_sha256=sha256_file(params.paths.schema_file),
            probe_suite_sha256=sha256_file(params.probe_suite),
            format=params.model.format,
        ),
    }
    return metrics
