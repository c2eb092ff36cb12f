"""Parsers for a user's own data: alpaca, sharegpt, OpenAI messages, prompt/completion and
preference triples.

A file is either one JSON array of records (``[...]``, the usual alpaca layout) or JSONL
(one object a line). Every record of a file has the same format, given in params or
detected from the first record's keys when exactly one format matches:

=================  =========================================================================
format             record
=================  =========================================================================
alpaca             ``instruction``, ``output`` and optional ``input`` (appended to the
                   instruction after a blank line)
sharegpt           ``conversations``: ``[{"from", "value"}]``; roles system, human/user,
                   gpt/assistant
messages           ``messages``: ``[{"role", "content"}]``; roles system, user, assistant
prompt_completion  ``prompt`` and ``completion`` strings
preference         ``prompt``, ``chosen`` and ``rejected`` strings (kept for the pairs stage)
=================  =========================================================================

Conversations must be one exchange: any system turns, then one user turn, then one
assistant turn. System turns are kept (joined with a blank line) and travel with the
record as ``system``; the prompt format puts them before the instruction. A record may
carry ``meta.expect`` (dotted path -> expected value) for task checks.

Anything else stops the import with ``file:line: what was found, what was expected``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.records import RecordError, iter_jsonl, loads_strict

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "preference")
_SIGNATURES = {
    "alpaca": {"instruction", "output"},
    "sharegpt": {"conversations"},
    "messages": {"messages"},
    "preference": {"prompt", "chosen", "rejected"},
    "prompt_completion": {"prompt", "completion"},
}
_EXPECTED = {
    "alpaca": "'instruction' and 'output' strings (optional 'input')",
    "sharegpt": "'conversations': a list of {'from', 'value'} turns",
    "messages": "'messages': a list of {'role', 'content'} turns",
    "prompt_completion": "'prompt' and 'completion' strings",
    "preference": "'prompt', 'chosen' and 'rejected' strings",
}
_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


@dataclass(frozen=True)
class Example:
    line: int
    instruction: str
    completion: str
    system: str | None = None
    expect: dict[str, Any] = field(default_factory=dict)
    original_id: Any = None


@dataclass(frozen=True)
class Preference:
    line: int
    prompt: str
    chosen: str
    rejected: str
    original_id: Any = None


@dataclass(frozen=True)
class Imported:
    path: str
    format: str
    examples: list[Example]
    preferences: list[Preference]


def read_import(path: str | Path, fmt: str = "auto") -> Imported:
    """Read a user's file in one of ``FORMATS`` (or ``auto``) into examples and preferences."""
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(
            f"generate.sources.import.format: {fmt!r} is not one of {['auto', *FORMATS]}"
        )
    records = list(_records(path))
    if not records:
        raise InputError(f"{path}: no records; expected a JSON array or JSONL of objects")
    if fmt == "auto":
        fmt = detect_format(path, *records[0])
    examples: list[Example] = []
    preferences: list[Preference] = []
    for line, record in records:
        missing = _SIGNATURES[fmt] - set(record)
        if missing:
            raise RecordError(
                path,
                line,
                f"keys {sorted(record)} do not match format {fmt!r}: expected {_EXPECTED[fmt]}",
            )
        if fmt == "preference":
            preferences.append(
                Preference(
                    line,
                    _text(path, line, record, "prompt"),
                    _text(path, line, record, "chosen"),
                    _text(path, line, record, "rejected"),
                    record.get("id"),
                )
            )
        else:
            examples.append(_example(path, line, record, fmt))
    return Imported(str(path), fmt, examples, preferences)


def detect_format(path: Path, line: int, record: dict[str, Any]) -> str:
    matches = [f for f, keys in _SIGNATURES.items() if keys <= set(record)]
    if "preference" in matches and "prompt_completion" in matches:
        matches.remove("prompt_completion")  # a triple with a 'completion' key is still a triple
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{f}: {_EXPECTED[f]}" for f in FORMATS)
    if not matches:
        raise RecordError(
            path,
            line,
            f"cannot detect the format from keys {sorted(record)}; expected one of: {expected}",
        )
    raise RecordError(
        path,
        line,
        f"keys {sorted(record)} match several formats {matches}; set generate.sources.import.format",
    )


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: import file not found (generate.sources.import.path)") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: invalid UTF-8 at byte {exc.start}") from exc
    if text.lstrip().startswith("["):
        yield from _array_records(path, text)
    else:
        yield from enumerate(iter_jsonl(path, id_field=None), start=1)


def _array_records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Elements of one JSON array with the line each starts on."""
    decoder = json.JSONDecoder()

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    pos = text.index("[") + 1
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise RecordError(
                path, line_of(pos), "unexpected end of file inside the JSON array (missing ']')"
            )
        ch = text[pos]
        if ch == "]":
            rest = text[pos + 1 :].strip()
            if rest:
                raise RecordError(
                    path,
                    line_of(pos + 1 + text[pos + 1 :].index(rest[0])),
                    "unexpected text after the JSON array",
                )
            return
        if ch == "," and not expect_value:
            pos += 1
            expect_value = True
            continue
        if not expect_value:
            raise RecordError(
                path, line_of(pos), f"expected ',' or ']' between array elements, found {ch!r}"
            )
        try:
            _, end = decoder.raw_decode(text, pos)
            value = loads_strict(text[pos:end])
        except ValueError as exc:
            raise RecordError(path, line_of(pos), f"invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise RecordError(
                path, line_of(pos), f"expected a JSON object, got {type(value).__name__}"
            )
        yield line_of(pos), value
        pos = end
        expect_value = False


def _text(path: Path, line: int, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(path, line, f"{key!r} must be a non-empty string, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(path: Path, line: int, record: dict[str, Any]) -> dict[str, Any]:
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise RecordError(path, line, f"'meta' must be an object, got {_short(meta)}")
    expect = meta.get("expect", {})
    if not isinstance(expect, dict):
        raise RecordError(
            path,
            line,
            f"'meta.expect' must be an object of dotted path -> value, got {_short(expect)}",
        )
    return expect


def _example(path: Path, line: int, record: dict[str, Any], fmt: str) -> Example:
    expect = _expect(path, line, record)
    if fmt == "alpaca":
        instruction = _text(path, line, record, "instruction")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise RecordError(path, line, f"'input' must be a string, got {_short(extra)}")
        if extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        return Example(
            line, instruction, _text(path, line, record, "output"), None, expect, record.get("id")
        )
    if fmt == "prompt_completion":
        return Example(
            line,
            _text(path, line, record, "prompt"),
            _text(path, line, record, "completion"),
            None,
            expect,
            record.get("id"),
        )
    key, role_key, content_key = (
        ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    )
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(path, line, f"{key!r} must be a non-empty list of turns")
    roles = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get(role_key), str)
            or not isinstance(turn.get(content_key), str)
        ):
            raise RecordError(
                path,
                line,
                f"{key}[{i}] must be an object with string {role_key!r} and {content_key!r}",
            )
        role = _ROLES.get(turn[role_key])
        if role is None:
            raise RecordError(
                path,
                line,
                f"{key}[{i}].{role_key} is {turn[role_key]!r}; allowed: {sorted(_ROLES)}",
            )
        roles.append(role)
    n_system = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
    if roles[n_system:] != ["user", "assistant"]:
        raise RecordError(
            path,
            line,
            f"{key} roles are {roles}; expected any system turns, then one user turn and one "
            "assistant turn (multi-turn conversations are not supported)",
        )
    system = "\n\n".join(t[content_key] for t in turns[:n_system]) or None
    user, assistant = turns[n_system][content_key], turns[n_system + 1][content_key]
    if not user.strip() or not assistant.strip():
        raise RecordError(path, line, f"{key}: the user and assistant turns must not be empty")
    return Example(line, user, assistant, system, expect, record.get("id"))
