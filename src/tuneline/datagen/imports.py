"""Parsers for a user's own data: alpaca, sharegpt, OpenAI messages, prompt/completion and
preference triples.

Layouts, chosen from the path:

- a text file holding one JSON array of records (``[...]``, the usual alpaca layout), or
  JSONL (one object a line); strict JSON (no trailing comma, no ``NaN``, no duplicate keys);
- ``.parquet`` or ``.csv``, read with ``datasets`` (``Dataset.from_parquet``/``from_csv``);
- a directory written by ``datasets``' ``save_to_disk`` (``datasets.load_from_disk``): a
  ``Dataset``, or a ``DatasetDict`` with one split or a ``train`` split.

Every record of a file has the same format, given in params or detected from the first
record's keys when exactly one format matches:

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
record as ``system``; the prompt format puts them before the instruction. A multi-turn
conversation is refused: the prompt format carries one instruction, and training on the
last turn without its history would teach answers to questions that were never asked.
A record may carry ``meta.expect`` (dotted path -> expected value: a string, number,
boolean or null) for task checks, and an ``id`` (string or integer, unique in the file).

Text files come from other tools, so two things are normalised rather than refused (the
pipeline's own files stay strict, ``tuneline.records``): a UTF-8 byte-order mark is
dropped and CRLF line ends become LF; ``Imported.normalised`` counts them. In columnar
sources (Parquet, CSV, datasets) a missing value and null are the same thing, so null
fields and null ``meta.expect`` entries are dropped.

Each record knows where it came from: ``line`` (where it starts in a text file) and
``record`` (its 1-based position in the file; for JSONL the same as the line). Anything
wrong stops the import with ``path:line: what was found, what was allowed`` (``record N:``
added for arrays, ``path: row N:`` for columnar sources).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.records import RecordError, loads_strict

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "preference")
COLUMNAR_SUFFIXES = (".parquet", ".csv")
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
_BOM = b"\xef\xbb\xbf"
_PARAM = "generate.sources.import.path"


@dataclass(frozen=True)
class Example:
    line: int | None
    instruction: str
    completion: str
    system: str | None = None
    expect: dict[str, Any] = field(default_factory=dict)
    original_id: Any = None
    record: int = 1


@dataclass(frozen=True)
class Preference:
    line: int | None
    prompt: str
    chosen: str
    rejected: str
    original_id: Any = None
    record: int = 1


@dataclass(frozen=True)
class Imported:
    path: str
    format: str
    examples: list[Example]
    preferences: list[Preference]
    layout: str = "jsonl"  # jsonl, json (one array), parquet, csv or datasets
    normalised: dict[str, Any] = field(default_factory=lambda: {"bom": False, "crlf_lines": 0})


@dataclass(frozen=True)
class Where:
    """Where one record is: a line of JSONL, an element of an array, or a row."""

    path: Path
    line: int | None
    record: int
    layout: str

    def error(self, message: str) -> InputError:
        if self.layout == "jsonl":
            return RecordError(self.path, self.line or 0, message)
        if self.layout == "json":
            return RecordError(self.path, self.line or 0, f"record {self.record}: {message}")
        return InputError(f"{self.path}: row {self.record}: {message}")

    def describe(self) -> str:
        if self.layout == "jsonl":
            return f"on line {self.line}"
        if self.layout == "json":
            return f"at record {self.record}, line {self.line}"
        return f"at row {self.record}"


def read_import(path: str | Path, fmt: str = "auto") -> Imported:
    """Read a user's file in one of ``FORMATS`` (or ``auto``) into examples and preferences."""
    path = Path(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise InputError(
            f"generate.sources.import.format: {fmt!r} is not one of {['auto', *FORMATS]}"
        )
    normalised = {"bom": False, "crlf_lines": 0}
    if path.is_dir() or path.suffix.lower() in COLUMNAR_SUFFIXES:
        layout, records = _columnar_records(path)
    else:
        text, normalised = _read_text(path)
        layout = "json" if text.lstrip().startswith("[") else "jsonl"
        records = _array_records(path, text) if layout == "json" else _jsonl_records(path, text)
    examples: list[Example] = []
    preferences: list[Preference] = []
    seen_ids: dict[Any, Where] = {}
    for where, record in records:
        if fmt == "auto":
            fmt = detect_format(where, record)
        missing = _SIGNATURES[fmt] - set(record)
        if missing:
            raise where.error(
                f"keys {sorted(record)} do not match format {fmt!r}: expected {_EXPECTED[fmt]}"
            )
        original_id = _original_id(where, record, seen_ids)
        if fmt == "preference":
            preferences.append(
                Preference(
                    where.line,
                    _text(where, record, "prompt"),
                    _text(where, record, "chosen"),
                    _text(where, record, "rejected"),
                    original_id,
                    where.record,
                )
            )
        else:
            examples.append(_example(where, record, fmt, original_id))
    if fmt == "auto":
        raise InputError(f"{path}: no records; expected a JSON array or JSONL of objects")
    return Imported(str(path), fmt, examples, preferences, layout, normalised)


def detect_format(where: Where, record: dict[str, Any]) -> str:
    matches = [f for f, keys in _SIGNATURES.items() if keys <= set(record)]
    if "preference" in matches and "prompt_completion" in matches:
        matches.remove("prompt_completion")  # a triple with a 'completion' key is still a triple
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{f}: {_EXPECTED[f]}" for f in FORMATS)
    if not matches:
        raise where.error(
            f"cannot detect the format from keys {sorted(record)}; expected one of: {expected}"
        )
    raise where.error(
        f"keys {sorted(record)} match several formats {matches}; set generate.sources.import.format"
    )


# -- text files: JSONL or one JSON array --------------------------------------------------


def _read_text(path: Path) -> tuple[str, dict[str, Any]]:
    """The file as text, a BOM dropped and CRLF made LF; invalid UTF-8 named by line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: import file not found ({_PARAM})") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the import file ({_PARAM}): {exc.strerror}") from exc
    bom = raw.startswith(_BOM)
    body = raw[len(_BOM) :] if bom else raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = exc.start + (len(_BOM) if bom else 0)
        line = raw.count(b"\n", 0, offset) + 1
        column = offset - (raw.rfind(b"\n", 0, offset) + 1)
        raise RecordError(
            path,
            line,
            f"invalid UTF-8 at byte {offset} (byte {column} of the line: "
            f"{body[exc.start : exc.end]!r}); save the file as UTF-8",
        ) from exc
    crlf = text.count("\r\n")
    if crlf:
        text = text.replace("\r\n", "\n")
    return text, {"bom": bom, "crlf_lines": crlf}


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[Where, dict[str, Any]]]:
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, start=1):
        where = Where(path, number, number, "jsonl")
        if not line.strip():
            raise where.error("blank line; expected one JSON object per line")
        try:
            value = loads_strict(line)
        except ValueError as exc:
            raise where.error(f"invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise where.error(f"expected a JSON object, got {type(value).__name__}")
        yield where, value


def _array_records(path: Path, text: str) -> Iterator[tuple[Where, dict[str, Any]]]:
    """Elements of one JSON array with the line each starts on, in one pass (lines are
    counted incrementally, so a large array is read in linear time)."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0

    def line_of(pos: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line

    pos = text.index("[") + 1
    number = 0
    comma: int | None = None  # position of the comma after the last element, if any
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise RecordError(
                path, line_of(pos), "unexpected end of file inside the JSON array (missing ']')"
            )
        ch = text[pos]
        expect_value = number == 0 or comma is not None
        if ch == "]":
            if comma is not None:
                raise RecordError(
                    path,
                    line_of(comma),
                    f"trailing comma after record {number}: the import is read as strict JSON; "
                    "remove the comma before ']'",
                )
            rest = text[pos + 1 :].strip()
            if rest:
                raise RecordError(
                    path,
                    line_of(pos + 1 + text[pos + 1 :].index(rest[0])),
                    "unexpected text after the JSON array",
                )
            return
        if ch == "," and not expect_value:
            comma = pos
            pos += 1
            continue
        if not expect_value:
            raise RecordError(
                path, line_of(pos), f"expected ',' or ']' after record {number}, found {ch!r}"
            )
        if ch == ",":
            raise RecordError(
                path, line_of(pos), f"found ',' where record {number + 1} should start; expected a JSON object"
            )
        number += 1
        where = Where(path, line_of(pos), number, "json")
        try:
            _, end = decoder.raw_decode(text, pos)
            value = loads_strict(text[pos:end])
        except json.JSONDecodeError as exc:
            raise RecordError(
                path, exc.lineno, f"record {number}: invalid JSON: {exc.msg} (column {exc.colno})"
            ) from exc
        except RecursionError as exc:
            raise where.error("invalid JSON: nesting is too deep") from exc
        except ValueError as exc:
            raise where.error(f"invalid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise where.error(f"expected a JSON object, got {type(value).__name__}")
        yield where, value
        pos = end
        comma = None


# -- columnar sources: Parquet, CSV, datasets.save_to_disk --------------------------------


def _columnar_records(path: Path) -> tuple[str, Iterator[tuple[Where, dict[str, Any]]]]:
    """Rows of a Parquet or CSV file or a ``save_to_disk`` directory, read with datasets."""
    if path.is_dir():
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if not any((path / m).is_file() for m in markers):
            raise InputError(
                f"{path}: is a directory; {_PARAM} must name a file (JSONL, a JSON array, "
                ".parquet or .csv) or a directory written by datasets' save_to_disk "
                f"(with one of {list(markers)})"
            )
        layout = "datasets"
    elif not path.is_file():
        raise InputError(f"{path}: import file not found ({_PARAM})")
    else:
        layout = path.suffix.lower().lstrip(".")
    import datasets

    datasets.disable_progress_bars()
    try:
        if layout == "datasets":
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                splits = list(loaded)
                if len(splits) != 1 and "train" not in splits:
                    raise InputError(
                        f"{path}: a DatasetDict with splits {splits}; expected one split or a "
                        "'train' split (save the split to import with save_to_disk)"
                    )
                loaded = loaded[splits[0] if len(splits) == 1 else "train"]
        else:
            with tempfile.TemporaryDirectory(prefix="tuneline-import-") as cache:
                reader = datasets.Dataset.from_parquet if layout == "parquet" else datasets.Dataset.from_csv
                loaded = reader(str(path), cache_dir=cache, keep_in_memory=True)
    except InputError:
        raise
    except Exception as exc:  # datasets and pyarrow raise many types for unreadable files
        raise InputError(f"{path}: cannot read it as {layout}: {type(exc).__name__}: {exc}") from exc

    def rows() -> Iterator[tuple[Where, dict[str, Any]]]:
        for number, row in enumerate(loaded, start=1):
            yield Where(path, None, number, layout), _drop_nulls(row)

    return layout, rows()


def _drop_nulls(row: dict[str, Any]) -> dict[str, Any]:
    """A columnar row without null fields (missing and null are one thing there), and
    without null ``meta.expect`` entries (a struct column fills absent keys with null)."""
    out = {k: v for k, v in row.items() if v is not None and v == v}  # v == v: not NaN
    meta = out.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if v is not None}
        if isinstance(meta.get("expect"), dict):
            meta["expect"] = {k: v for k, v in meta["expect"].items() if v is not None}
        out["meta"] = meta
    return out


# -- fields --------------------------------------------------------------------------------


def _original_id(where: Where, record: dict[str, Any], seen: dict[Any, Where]) -> Any:
    if "id" not in record:
        return None
    rid = record["id"]
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise where.error(f"'id' must be a string or integer, got {_short(rid)}")
    first = seen.get(rid)
    if first is not None:
        raise where.error(f"duplicate id {rid!r} (first {first.describe()})")
    seen[rid] = where
    return rid


def _text(where: Where, record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise where.error(f"{key!r} must be a non-empty string, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(where: Where, record: dict[str, Any]) -> dict[str, Any]:
    """``meta.expect``: dotted paths to one scalar each (what ``task_checks`` compares)."""
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise where.error(f"'meta' must be an object, got {_short(meta)}")
    expect = meta.get("expect", {})
    if not isinstance(expect, dict):
        raise where.error(
            f"'meta.expect' must be an object of dotted path -> value, got {_short(expect)}"
        )
    for key, value in expect.items():
        if not key.strip() or any(not part for part in key.split(".")):
            raise where.error(
                f"meta.expect has an empty path {key!r}; keys are dotted paths into the "
                "answer, such as 'payload.destination'"
            )
        if value is not None and not isinstance(value, str | int | float | bool):
            raise where.error(
                f"meta.expect.{key} is {_short(value)}; allowed: a string, number, boolean "
                "or null (a task check compares the value at the path with one value)"
            )
    return expect


def _example(where: Where, record: dict[str, Any], fmt: str, original_id: Any) -> Example:
    expect = _expect(where, record)
    if fmt == "alpaca":
        instruction = _text(where, record, "instruction")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise where.error(f"'input' must be a string, got {_short(extra)}")
        if extra.strip():
            instruction = f"{instruction}\n\n{extra}"
        return Example(
            where.line, instruction, _text(where, record, "output"), None, expect, original_id,
            where.record,
        )
    if fmt == "prompt_completion":
        return Example(
            where.line,
            _text(where, record, "prompt"),
            _text(where, record, "completion"),
            None,
            expect,
            original_id,
            where.record,
        )
    key, role_key, content_key = (
        ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
    )
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise where.error(f"{key!r} must be a non-empty list of turns")
    roles = []
    for i, turn in enumerate(turns):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get(role_key), str)
            or not isinstance(turn.get(content_key), str)
        ):
            raise where.error(
                f"{key}[{i}] must be an object with string {role_key!r} and {content_key!r}"
            )
        role = _ROLES.get(turn[role_key])
        if role is None:
            raise where.error(f"{key}[{i}].{role_key} is {turn[role_key]!r}; allowed: {sorted(_ROLES)}")
        roles.append(role)
    n_system = next((i for i, r in enumerate(roles) if r != "system"), len(roles))
    if roles[n_system:] != ["user", "assistant"]:
        reason = (
            "multi-turn conversations are not supported: the prompt format carries one "
            "instruction; split the conversation into single exchanges"
            if roles[n_system:].count("user") > 1
            else "expected any system turns, then one user turn and one assistant turn"
        )
        raise where.error(f"{key} roles are {roles}; {reason}")
    system = "\n\n".join(t[content_key] for t in turns[:n_system]) or None
    user, assistant = turns[n_system][content_key], turns[n_system + 1][content_key]
    if not user.strip() or not assistant.strip():
        raise where.error(f"{key}: the user and assistant turns must not be empty")
    return Example(where.line, user, assistant, system, expect, original_id, where.record)
