"""Clean's library: candidates, filters, the split, preference cleaning and the reject budget.

Each filter takes a ``Candidate`` and returns None (keep) or (reason, detail).

``apply`` runs filters in order over candidates; a candidate stops at its first reason and
goes to ``rejected`` with it. The parse, schema and task filters read one
``Contract.judge`` verdict (strict JSON: training completions get no leniency). See
``tuneline.stages.clean`` for the order and what each reason means.
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

from tuneline.contract import Contract, Verdict
from tuneline.errors import InputError
from tuneline.prompting import render
from tuneline.similarity import SimilarityIndex, gram_order, shingles


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
    verdict: Verdict | None = None

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
    """Strict JSON (no leniency for training data), then normalised and judged once."""

    def check(c: Candidate) -> Rejection | None:
        expect = c.record["meta"].get("expect") or {}
        verdict = contract.judge(c.completion, expect, strict=True)
        if not verdict.parsed:
            return "invalid_json", {"error": verdict.parse_error}
        c.value = normalize_value(verdict.value)
        c.completion = contract.canonical_text(c.value)
        c.verdict = contract.judge_value(c.value, expect)
        return None

    return check


def schema_filter(c: Candidate) -> Rejection | None:
    errors = c.verdict.errors
    return ("schema_invalid", {"errors": errors}) if errors else None


def task_filter(c: Candidate) -> Rejection | None:
    expect = c.record["meta"].get("expect") or {}
    failed = sorted(name for name, ok in c.verdict.checks.items() if not ok)
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


def apply(
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


# -- the stage's steps -------------------------------------------------------------------

err = Console(stderr=True)


def candidate(record: dict[str, Any], path: Path, line: int) -> Candidate:
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


def warn_over_length(over: Sequence[Candidate], total: int, max_len: int, policy: str) -> None:
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


def check_budget(
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


def output_record(c: Candidate, fmt: str) -> dict[str, Any]:
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


def length_line(c: Candidate, max_len: int, rejected_ids: set[str]) -> dict[str, Any]:
    return {
        "id": c.id,
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.total_tokens,
        "over_length": c.total_tokens > max_len,
        "truncated": c.total_tokens > max_len and c.id not in rejected_ids,
        "kept": c.id not in rejected_ids,
    }


def clean_preferences(
    preferences: Sequence[dict[str, Any]],
    leak_filters: Sequence[Filter],
    tokenizer: Any,
    fmt: str,
    special: set[int],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Imported triples: the prompt gets the model's format; leakage and contamination apply."""
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
        for f in [*leak_filters, contamination_filter(tokenizer)]:
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
        # chosen/rejected stay plain text in both formats: dpo makes chat messages of them
        out = {"id": c.id, "prompt": c.prompt, "chosen": p["chosen"], "rejected": p["rejected"]}
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


def drop_near_duplicates(
    alive: list[Candidate], ngram: int, jaccard: float, rejected: list[dict[str, Any]]
) -> list[Candidate]:
    """The records that are not near duplicates (word ``ngram`` shingles of instruction and
    completion, Jaccard >= ``jaccard``) of an earlier one; the others go to ``rejected``."""
    for c in alive:
        c.grams = shingles(f"{c.instruction}\n{c.completion}", ngram)
    near = SimilarityIndex(jaccard, gram_order(c.grams for c in alive))
    return apply(alive, [near_duplicate_filter(near)], rejected)


def over_length(alive: list[Candidate], max_len: int, policy: str) -> list[Candidate]:
    """The records over ``max_len`` tokens, warned about; InputError under policy raise."""
    over = [c for c in alive if c.total_tokens > max_len]
    if over:
        warn_over_length(over, len(alive), max_len, policy)
        if policy == "raise":
            raise InputError(
                f"clean.over_length is 'raise': {len(over)} of {len(alive)} records ({len(over) / len(alive):.1%}) "
                f"exceed sft.max_seq_len={max_len} tokens (e.g. {', '.join(c.id for c in over[:5])}); raise "
                "sft.max_seq_len, shorten the completions, or set clean.over_length to drop or truncate"
            )
    return over
