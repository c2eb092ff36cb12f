"""The output contract: lenient parsing, JSON Schema validation and task checks.

The contract is one JSON Schema file (``data/seed/contract.schema.json`` by default, a
param). The same functions judge training completions (``clean``) and model outputs
(``probe``); nothing here knows about the travel domain.

API
---
``load_contract(schema_path) -> Contract``
    Reads the schema, checks it against its own metaschema (``$schema``; Draft 2020-12
    when absent) and builds the validator once. A missing, unreadable or invalid schema
    raises ``InputError`` naming the file.

``Contract.validate(obj) -> list[str]``
    Every schema error as ``"$.path[0].field: message"``, sorted by path (array indices
    numerically) then message. An empty list means valid. Validation is never loosened:
    a model that fails it is fixed in the model, not here.

``Contract.canonical_text(obj) -> str``
    Canonical JSON text: compact separators, non-ASCII kept, object keys ordered by the
    order in which property names first appear in the schema (so ``summary`` leads and
    ``payload_type`` comes before ``payload``); names the schema does not mention follow,
    sorted. Equal values give equal text whatever their input key order.

``parse_lenient(text) -> Parsed``
    The one documented leniency for model output:

    1. If the text contains a markdown code fence, only the inside of the first fenced
       block is read (an unclosed fence reads to the end of the text).
    2. Prose before the first ``{`` or ``[`` is skipped.
    3. The first top-level JSON value there is decoded (``json.JSONDecoder.raw_decode``);
       whatever follows it is ignored, so of two objects the first wins.
    4. An object is preferred: if that first value is an array, the rest of the text is
       scanned for a later top-level object and the first one found is taken. Otherwise
       the array is returned with ``ok=True``; the schema then rejects it (root type).
    5. ``NaN``, ``Infinity`` and ``-Infinity`` are rejected (not JSON).

    A value cut off by the end of the text gives ``ok=False`` with an error starting
    ``"truncated JSON"``; other syntax errors start with ``"invalid JSON"``; text without
    any ``{`` or ``[`` gives ``"no JSON value found"``.

``task_checks(obj, expect) -> dict[str, bool]``
    ``expect`` maps dotted paths (``payload.destination``; integer components index
    arrays) to expected values. A check passes when the value at the path equals the
    expected one: strings compare case-insensitively with whitespace collapsed, other
    values by their JSON text (so ``3`` equals ``"3"``). A missing path fails. The result
    is keyed by the path's last component (``destination``), or by the full path when two
    paths share a last component.

``Contract.judge(text, expect, finish_reason=None, *, strict=False) -> Verdict``
    The one verdict on a text, used by ``probe`` (model outputs), ``pairs`` (chosen,
    rejected and on-policy samples) and ``clean`` (training completions): parse
    (``parse_lenient``; with ``strict`` one strict JSON value, ``records.loads_strict``),
    validate, run the task checks and name the failure cause. ``Contract.judge_value``
    judges an already parsed value the same way.

    A text that does not parse has no value at any path, so its task checks are all
    False (keyed as ``task_checks`` keys them), never missing; its schema ``errors`` are
    empty (the reason is ``parse_error``) and it is neither valid nor passing. ``cause``
    is ``failure_cause``'s category, or ``wrong_<check>`` (the first failing check) for a
    valid value that fails a task check. ``passes`` is valid with every check true;
    ``score`` is ``int(valid) + number of true checks`` (a ranking of samples).

``failure_cause(parsed, errors, finish_reason) -> str``
    One short category for grouping failures: ``ok``, ``truncated`` (generation hit the
    token limit, or the JSON was cut off), ``invalid_json``, ``wrong_root_type``,
    ``missing_field:<name>``, ``wrong_type:<path>`` (array indices shown as ``[*]``) or
    ``other``. With several schema errors, a missing field outranks a wrong type, which
    outranks anything else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jsonschema import exceptions as schema_exceptions
from jsonschema import validators

from tuneline.errors import InputError
from tuneline.records import read_jsonl

_SHORT = 60


@dataclass(frozen=True)
class Parsed:
    """The result of ``parse_lenient``: the value (or None), whether it parsed, and why not."""

    value: Any
    ok: bool
    error: str | None = None


@dataclass(frozen=True)
class Verdict:
    """How one text fares against the contract (see ``Contract.judge``)."""

    parsed: bool
    parse_error: str | None
    value: Any
    valid: bool
    errors: list[str]
    checks: dict[str, bool]
    fields_present: list[str]
    cause: str

    @property
    def passes(self) -> bool:
        return self.valid and all(self.checks.values())

    @property
    def score(self) -> int:
        return int(self.valid) + sum(self.checks.values())


@dataclass(frozen=True)
class Contract:
    """A loaded, checked schema with its validator (built once)."""

    path: Path
    schema: dict[str, Any]
    _validator: Any = field(repr=False, compare=False)
    _key_rank: dict[str, int] = field(repr=False, compare=False)

    def validate(self, obj: Any) -> list[str]:
        """All schema errors of ``obj`` as ``$.path: message`` lines, deterministically sorted."""
        found = {
            (_sort_key(err.absolute_path), f"{err.json_path}: {_message(err)}")
            for err in _leaf_errors(self._validator.iter_errors(obj))
        }
        return [text for _, text in sorted(found)]

    def judge(
        self, text: str, expect: Mapping[str, Any], finish_reason: str | None = None, *, strict: bool = False
    ) -> Verdict:
        """Parse, validate and task-check one text (see the module docstring)."""
        parsed = _parse_strict(text) if strict else parse_lenient(text)
        return self._verdict(parsed, expect, finish_reason)

    def judge_value(self, value: Any, expect: Mapping[str, Any], finish_reason: str | None = None) -> Verdict:
        """The verdict on an already parsed value."""
        return self._verdict(Parsed(value, True, None), expect, finish_reason)

    def _verdict(self, parsed: Parsed, expect: Mapping[str, Any], finish_reason: str | None) -> Verdict:
        errors = self.validate(parsed.value) if parsed.ok else []
        checks = task_checks(parsed.value if parsed.ok else None, expect)
        cause = failure_cause(parsed, errors, finish_reason)
        if cause == "ok":
            failed = [name for name, ok in checks.items() if not ok]
            if failed:
                cause = f"wrong_{failed[0]}"
        value = parsed.value
        root = self.schema.get("required", [])
        return Verdict(
            parsed=parsed.ok,
            parse_error=parsed.error,
            value=value,
            valid=parsed.ok and not errors,
            errors=errors,
            checks=checks,
            fields_present=[f for f in root if isinstance(value, dict) and f in value],
            cause=cause,
        )

    def is_valid(self, obj: Any) -> bool:
        return not self.validate(obj)

    def canonical_text(self, obj: Any) -> str:
        """Canonical JSON text of ``obj`` (see the module docstring)."""
        return json.dumps(
            _ordered(obj, self._key_rank),
            ensure_ascii=False,
            separators=(",", ":"),
            allow_nan=False,
        )


def load_contract(schema_path: str | Path) -> Contract:
    """Load and check a JSON Schema file; ``InputError`` naming the file when it is unusable."""
    path = Path(schema_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: contract schema not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read contract schema: {exc}") from exc
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}:{exc.lineno}: contract schema is not valid JSON: {exc.msg}"
        ) from exc
    if not isinstance(schema, dict):
        raise InputError(
            f"{path}: contract schema must be a JSON object, got {type(schema).__name__}"
        )
    cls = validators.validator_for(schema, default=validators.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except schema_exceptions.SchemaError as exc:
        where = exc.json_path if hasattr(exc, "json_path") else "$"
        raise InputError(
            f"{path}: not a valid {cls.__name__.removesuffix('Validator')} schema "
            f"at {where}: {exc.message}"
        ) from exc
    return Contract(
        path=path,
        schema=schema,
        _validator=cls(schema),
        _key_rank=_property_rank(schema),
    )


def parse_lenient(text: str) -> Parsed:
    """Parse model output leniently in the one documented way (see the module docstring)."""
    body = _unfence(text)
    start = _first_json_start(body, 0)
    if start is None:
        return Parsed(None, False, "no JSON value found (no '{' or '[' in the text)")
    decoder = json.JSONDecoder(parse_constant=_reject_constant)
    try:
        value, end = decoder.raw_decode(body, start)
    except json.JSONDecodeError as exc:
        if _cut_off(body, start):
            return Parsed(
                None, False, f"truncated JSON: the text ends inside the value ({exc.msg})"
            )
        return Parsed(None, False, f"invalid JSON at char {exc.pos - start}: {exc.msg}")
    except ValueError as exc:
        return Parsed(None, False, f"invalid JSON: {exc}")
    if isinstance(value, list):
        later = _later_object(body, end, decoder)
        if later is not None:
            value = later
    return Parsed(value, True, None)


def _parse_strict(text: str) -> Parsed:
    from tuneline.records import loads_strict

    try:
        return Parsed(loads_strict(text), True, None)
    except ValueError as exc:
        return Parsed(None, False, str(exc))


def task_checks(obj: Any, expect: Mapping[str, Any]) -> dict[str, bool]:
    """Check values at dotted paths against expectations; keys are metric names."""
    last = [path.rsplit(".", 1)[-1] for path in expect]
    results: dict[str, bool] = {}
    for path, name in zip(expect, last, strict=True):
        key = name if last.count(name) == 1 else path
        found, actual = _lookup(obj, path)
        results[key] = found and _normal(actual) == _normal(expect[path])
    return results


def failure_cause(parsed: Parsed, errors: Sequence[str], finish_reason: str | None) -> str:
    """A short category for why an output failed (``ok`` when it did not)."""
    if not parsed.ok:
        if finish_reason == "length" or (parsed.error or "").startswith("truncated"):
            return "truncated"
        return "invalid_json"
    if not isinstance(parsed.value, dict):
        return "wrong_root_type"
    if not errors:
        return "ok"
    split = [_split_error(e) for e in errors]
    for _, message in split:
        m = re.match(r"'((?:[^'\\]|\\.)*)' is a required property", message)
        if m:
            return f"missing_field:{m.group(1)}"
    for path, message in split:
        if " is not of type " in message:
            return "wrong_type:" + _INDEX.sub("[*]", path)
    if finish_reason == "length":
        return "truncated"
    return "other"


# -- helpers -----------------------------------------------------------------------------


def _leaf_errors(errors: Iterator[Any]) -> Iterator[Any]:
    """Unwrap anyOf/oneOf errors into their sub-errors so paths point at the real field."""
    for err in errors:
        if err.context:
            yield from _leaf_errors(iter(err.context))
        else:
            yield err


def _sort_key(path: Sequence[str | int]) -> tuple[tuple[int, int, str], ...]:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHORT else text[: _SHORT - 3] + "..."


def _message(err: Any) -> str:
    if err.validator == "pattern" and err.validator_value == "\\S":
        return f"{_short(err.instance)} must not be empty or blank"
    full = repr(err.instance)
    if err.message.startswith(full) and len(full) > _SHORT:
        return _short(err.instance) + err.message[len(full) :]
    return err.message


def _property_rank(schema: Any) -> dict[str, int]:
    rank: dict[str, int] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict):
                for name in props:
                    rank.setdefault(name, len(rank))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return rank


def _ordered(obj: Any, rank: dict[str, int]) -> Any:
    if isinstance(obj, dict):
        keys = sorted(obj, key=lambda k: (0, rank[k], "") if k in rank else (1, 0, k))
        return {k: _ordered(obj[k], rank) for k in keys}
    if isinstance(obj, list):
        return [_ordered(v, rank) for v in obj]
    return obj


_FENCE = re.compile(r"```[ \t]*[\w+.-]*[ \t]*\n?(.*?)(?:```|\Z)", re.S)


def _unfence(text: str) -> str:
    m = _FENCE.search(text)
    return m.group(1) if m else text


def _first_json_start(text: str, pos: int) -> int | None:
    starts = [i for i in (text.find("{", pos), text.find("[", pos)) if i >= 0]
    return min(starts) if starts else None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _cut_off(text: str, start: int) -> bool:
    """True when the text ends inside the value that starts at ``start`` (open string or bracket)."""
    depth = 0
    in_string = False
    escaped = False
    for ch in text[start:]:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return False
    return in_string or depth > 0


def _later_object(text: str, pos: int, decoder: json.JSONDecoder) -> dict[str, Any] | None:
    while (start := _first_json_start(text, pos)) is not None:
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            return None
        if isinstance(value, dict):
            return value
        pos = end
    return None


def _lookup(obj: Any, path: str) -> tuple[bool, Any]:
    node = obj
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def _normal(value: Any) -> str:
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


_INDEX = re.compile(r"\[\d+\]")
_ERROR_LINE = re.compile(r"^(\$(?:\.[^.\[:\s]+|\[\d+\]|\['(?:[^'\\]|\\.)*'\])*): (.*)$", re.S)


def _split_error(text: str) -> tuple[str, str]:
    m = _ERROR_LINE.match(text)
    return (m.group(1), m.group(2)) if m else ("$", text)


SUITE_FIELDS: dict[str, type | tuple[type, ...]] = {"instruction": str, "expect": dict}


def load_suite(path: str | Path) -> list[dict[str, Any]]:
    """Suite lines, strictly; every line must expect the same dotted paths."""
    suite = read_jsonl(path, required=SUITE_FIELDS)
    keys = list(suite[0]["expect"])
    for number, line in enumerate(suite, start=1):
        if sorted(line["expect"]) != sorted(keys):
            raise InputError(
                f"{path}:{number}: expect keys {list(line['expect'])} differ from the first line's {keys}; "
                "every suite line must check the same fields"
            )
        if not line["instruction"].strip():
            raise InputError(f"{path}:{number}: instruction is empty")
    return suite
