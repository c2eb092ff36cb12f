"""Schema-guided decoding: a probe row whose every token is masked to the contract's JSON.

A probe model named ``<name>+guided`` in ``probe.models`` (``dpo+guided: models/dpo``) is
the same model as ``<name>``, decoded under a token mask built by llguidance from the
contract's JSON Schema. Its metrics, samples and run record carry the ``+guided`` name;
the free-decoding rows are unchanged and stay the headline. The judge is the same
(``Contract.judge``): the guide only narrows what the model may write.

The schema the guide compiles is the contract with one mechanical rewrite
(:func:`guide_schema`): llguidance does not implement ``if``/``then``, so an ``allOf`` of
``{"if": {"properties": {K: {"const": V}}, "required": [K]}, "then": {"properties": P}}``
becomes an ``anyOf`` of ``{"properties": {K: {"const": V}, **P}}``, one branch per value.
That is the same set of documents only when the root requires ``K``, declares it as an
``enum`` and the ``const`` values are exactly that enum, once each; anything else is an
InputError. Every other keyword of the contract (``$ref``/``$defs``, ``enum``, ``const``,
``required``, ``additionalProperties: false``, ``minItems``, ``minLength``, ``minimum``,
``pattern``) is compiled by llguidance; a keyword it does not implement is an InputError
(its warning), not silently dropped. Deliberate narrowings, each still a subset of the
contract: keys are written in the schema's ``properties`` order, JSON is compact (no
whitespace, ``,`` and ``:``), the layout the training targets use, and every array, string
and integer is bounded (:func:`bound_schema`, ``probe.guide``).

Bounds: a small model can loop inside a list (a phrasebook repeating one phrase), and an
unbounded list never closes. The guide gives every array ``maxItems: probe.guide.max_items``
(8), every string ``maxLength: max_string_length`` (160) and every integer ``|value| <=
max_integer`` (99), keeping a tighter contract bound; a contract lower bound above them is
an InputError. The travel targets (every template envelope and the gold) need at most 7
items, 150 characters and day 4, so the bounds cut no legitimate answer
(tests/test_guided.py checks every target). llguidance 1.9.1 enforces ``maxItems`` and
``maxLength`` (counting an escape as one character): a looping model is made to close.

Length: with the bounds every guided document is finite, at most
:func:`max_document_bytes` bytes (``max_document_bytes`` in the run record's ``guide``); for
the travel contract 102,500 bytes, far above ``probe.max_new_tokens`` (320). So the bounds
alone make a loop close but do not make it close in time. The closing rule does (on when
``build`` is given ``max_new_tokens`` and the schema's shortest document and a stop token
fit it; ``closing`` in the record): each row's document so far is followed byte by byte
(:class:`Completer`), and before a token is taken the rule checks that, after it, the
shortest completion of the document (tokenized) and a stop token still fit the tokens left.
If not, the row writes that shortest completion instead, one forced token a step, then
stops. The shortest completion finishes the open value (a string with its closing quote, up
to its ``minLength``; an ``enum`` value by its shortest extension; a number as it stands),
then writes each open object's missing required keys with their shortest values and each
open array's missing ``minItems``, then the closing brackets. At step 0 the shortest
document fits (checked at build), and each step keeps that true, so every guided output ends
at a stop token within ``max_new_tokens``, complete and valid under the contract:
``complete_by_construction: true``. The check needs the token the decode will take, which
is the argmax of the masked logits when decoding is greedy and the guide's processor is the
last one; under sampling (``greedy=False``) the draw comes after the guide, the rule checks
the argmax rather than the drawn token, and the record says ``complete_by_construction:
false``. A closed output is complete but cut short (a list ends early, a string is ``x``);
``closed_rows`` in the probe's record counts them. An output that reaches the limit without
the rule (a budget under the shortest document, or ``build`` without ``max_new_tokens``) is
unfinished JSON; it keeps finish reason ``length`` and the judge counts it as truncated.

Batched generation keeps one matcher per row; a row whose document is complete may only
write a stop token (transformers then pads it). The mask is applied before temperature and top-p.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tuneline.errors import InputError

LIBRARY = "llguidance"
# compact JSON, keys in schema order: the layout of the training targets
COMPILE_OPTIONS = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def llguidance_version() -> str:
    import llguidance

    return llguidance.__version__


def guide_schema(schema: Mapping[str, Any], source: str = "schema") -> dict[str, Any]:
    """The contract with its root ``allOf`` of ``if``/``then`` on one enum key rewritten as an
    equivalent ``anyOf``; a schema without a root ``allOf`` is returned as it is."""
    out = copy.deepcopy(dict(schema))
    branches = out.pop("allOf", None)
    if branches is None:
        return out
    if "anyOf" in out:
        raise InputError(f"{source}: a root 'anyOf' beside 'allOf' cannot be rewritten for the guide")
    key: str | None = None
    seen: list[Any] = []
    rewritten = []
    for i, branch in enumerate(branches):
        where = f"{source}: allOf[{i}]"
        cond, then = branch.get("if"), branch.get("then")
        if set(branch) != {"if", "then"} or not isinstance(cond, Mapping) or not isinstance(then, Mapping):
            raise InputError(f"{where}: only {{'if', 'then'}} branches can be rewritten for the guide, got {sorted(branch)}")
        props = cond.get("properties")
        if (
            set(cond) != {"properties", "required"}
            or not isinstance(props, Mapping)
            or len(props) != 1
            or cond["required"] != list(props)
            or set(next(iter(props.values()))) != {"const"}
        ):
            raise InputError(f"{where}.if: allowed: {{'properties': {{KEY: {{'const': VALUE}}}}, 'required': [KEY]}}")
        name = next(iter(props))
        if key not in (None, name):
            raise InputError(f"{where}.if: conditions on {key!r} and {name!r}; allowed: one key for every branch")
        key = name
        if set(then) != {"properties"} or not isinstance(then["properties"], Mapping) or key in then["properties"]:
            raise InputError(f"{where}.then: allowed: {{'properties': {{...}}}} not naming {key!r}")
        value = props[key]["const"]
        seen.append(value)
        rewritten.append({"properties": {key: {"const": value}, **copy.deepcopy(dict(then["properties"]))}})
    enum = out.get("properties", {}).get(key, {}).get("enum")
    if key not in out.get("required", []) or enum is None or sorted(map(json.dumps, seen)) != sorted(map(json.dumps, enum)):
        raise InputError(
            f"{source}: the allOf conditions on {key!r} ({seen}) are equivalent to an anyOf only when the root "
            f"requires {key!r} and declares exactly these values as its enum (enum: {enum})"
        )
    out["anyOf"] = rewritten
    return out


# keywords whose value is one subschema / a list of them / a name -> subschema mapping
_ONE = ("items", "additionalProperties", "not", "contains", "propertyNames", "if", "then", "else")
_LIST = ("anyOf", "allOf", "oneOf", "prefixItems")
_MAP = ("properties", "$defs", "definitions", "patternProperties")


def _types(node: Mapping[str, Any]) -> set[str]:
    kind = node.get("type")
    return {kind} if isinstance(kind, str) else set(kind or ())


def bound_schema(schema: Mapping[str, Any], bounds: Any, source: str = "schema") -> dict[str, Any]:
    """``schema`` with every array, string and integer (by ``type``) bounded for the guide: ``maxItems``
    at most ``bounds.max_items``, ``maxLength`` at most ``bounds.max_string_length`` and
    ``minimum``/``maximum`` within ``-bounds.max_integer``..``bounds.max_integer``; a bound
    the schema already has that is tighter is kept. Only bounds are added, so every document
    the result accepts is accepted by ``schema``. A lower bound above the guide's upper
    bound (``minItems``, ``minLength``, ``minimum``) is an InputError naming the subschema."""
    out = copy.deepcopy(dict(schema))
    problems: list[str] = []

    def tighten(node: dict[str, Any], where: str, low: str, high: str, limit: int, param: str) -> None:
        node[high] = min(node.get(high, limit), limit)
        if node.get(low, 0) > node[high]:
            problems.append(f"{where}: {low} {node[low]} > {param} {limit} (the guide's bound; raise {param})")

    def walk(node: Any, where: str) -> None:
        if not isinstance(node, dict):
            return
        kinds = _types(node)
        if "array" in kinds:
            tighten(node, where, "minItems", "maxItems", bounds.max_items, "probe.guide.max_items")
        if "string" in kinds:
            tighten(node, where, "minLength", "maxLength", bounds.max_string_length, "probe.guide.max_string_length")
        if "integer" in kinds:
            tighten(node, where, "minimum", "maximum", bounds.max_integer, "probe.guide.max_integer")
            node["minimum"] = max(node.get("minimum", -bounds.max_integer), -bounds.max_integer)
            if node["minimum"] > node["maximum"]:
                problems.append(f"{where}: minimum {node['minimum']} > probe.guide.max_integer {bounds.max_integer}")
        for key in _ONE:
            walk(node.get(key), f"{where}.{key}")
        for key in _LIST:
            for i, sub in enumerate(node.get(key) or ()):
                walk(sub, f"{where}.{key}[{i}]")
        for key in _MAP:
            for name, sub in (node.get(key) or {}).items():
                walk(sub, f"{where}.{key}.{name}")

    walk(out, source)
    if problems:
        raise InputError("; ".join(dict.fromkeys(problems)))
    return out


# The most bytes one character of a JSON string takes as llguidance writes it: raw UTF-8 is
# at most 4, an escape at most 6 (``\u001f``); llguidance 1.9.1 escapes only control
# characters (no surrogate pairs) and counts an escape as one character of ``maxLength``
# (tests/test_guided.py checks both).
BYTES_PER_CHAR = 6


def _encoded(value: Any) -> int:
    return max(
        len(json.dumps(value, ensure_ascii=ascii, separators=(",", ":")).encode("utf-8")) for ascii in (True, False)
    )


def max_document_bytes(schema: Mapping[str, Any]) -> int | None:
    """An upper bound on the bytes of any compact JSON document (``COMPILE_OPTIONS``) that
    ``schema`` accepts, or None where it has none (an unbounded array, string or integer, a
    number, an object open to other keys, a recursive ``$ref``). Subschemas that apply
    together (siblings of ``anyOf``/``allOf``/``$ref``) bound it by the tightest of each;
    every declared property counts, required or not."""
    root = dict(schema)

    def resolve(node: Any, chain: frozenset[str]) -> tuple[list[Any], frozenset[str]]:
        """``node`` as the subschemas that apply together (its ``$ref`` and ``allOf`` expanded)."""
        if node is True or node == {}:
            return [], frozenset()
        if not isinstance(node, Mapping):
            raise _Unbounded
        rest = {k: v for k, v in node.items() if k not in ("$ref", "allOf")}
        out, used = [rest], frozenset()
        ref = node.get("$ref")
        if ref is not None:
            if not isinstance(ref, str) or not ref.startswith("#/") or ref in chain:
                raise _Unbounded  # remote or recursive
            target: Any = root
            for part in ref[2:].split("/"):
                target = target[part]
            more, deeper = resolve(target, chain | {ref})
            out, used = out + more, used | deeper | {ref}
        for sub in node.get("allOf", ()):
            more, deeper = resolve(sub, chain)
            out, used = out + more, used | deeper
        return out, used

    def bound(conj: list[Any], chain: frozenset[str]) -> int:
        flat: list[Mapping[str, Any]] = []
        used: frozenset[str] = frozenset()
        for node in conj:
            more, refs = resolve(node, chain)
            flat, used = flat + more, used | refs
        chain = chain | used  # what the subschemas below may not refer back to
        for i, node in enumerate(flat):
            for key in ("anyOf", "oneOf"):
                if key in node:
                    rest = [*flat[:i], {k: v for k, v in node.items() if k != key}, *flat[i + 1:]]
                    return max(bound([*rest, branch], chain) for branch in node[key])
        values = [n["enum"] if "enum" in n else [n["const"]] for n in flat if "enum" in n or "const" in n]
        if values:
            return max((_encoded(v) for v in values[0]), default=0)
        declared = [_types(n) | ({"integer"} if "number" in _types(n) else set()) for n in flat if "type" in n]
        if not declared:
            raise _Unbounded
        return max((kind_bound(kind, flat, chain) for kind in set.intersection(*declared)), default=0)

    def least(flat: list[Mapping[str, Any]], key: str) -> int:
        found = [n[key] for n in flat if key in n]
        if not found:
            raise _Unbounded
        return min(found)

    def kind_bound(kind: str, flat: list[Mapping[str, Any]], chain: frozenset[str]) -> int:
        if kind == "null":
            return 4
        if kind == "boolean":
            return 5
        if kind == "string":
            return 2 + BYTES_PER_CHAR * least(flat, "maxLength")
        if kind == "integer":
            high = least(flat, "maximum")
            low = -least([{"m": -n["minimum"]} for n in flat if "minimum" in n], "m")
            return max(len(str(int(high))), len(str(int(low))), 2 if low <= 0 else 1)  # "-0"
        if kind == "array":
            if any("prefixItems" in n or "contains" in n for n in flat):
                raise _Unbounded
            n_items = least(flat, "maxItems")
            if n_items == 0:
                return 2
            items = [n["items"] for n in flat if "items" in n]
            if not items:
                raise _Unbounded
            return 2 + n_items * bound(items, chain) + n_items - 1
        if kind == "object":
            closed = [n for n in flat if n.get("additionalProperties") is False]
            if not closed or any("patternProperties" in n for n in closed):
                raise _Unbounded
            keys = set.intersection(*(set(n.get("properties", {})) for n in closed))
            if not keys:
                return 2
            sizes = [_encoded(k) + 1 + bound([n["properties"][k] for n in flat if k in n.get("properties", {})], chain)
                     for k in keys]
            return 2 + sum(sizes) + len(keys) - 1
        raise _Unbounded  # number: any number of digits

    try:
        return bound([root], frozenset())
    except _Unbounded:
        return None


class _Unbounded(Exception):
    """A part of the schema that accepts documents of any length."""


@dataclass
class JsonGuide:
    """The compiled guide for one model's tokenizer: ``processors(rows)`` is the factory
    ``tuneline.generation.generate`` calls once per batch (``logits_processor``).
    ``completer`` and ``budget`` (``max_new_tokens``) are set when the closing rule is on;
    ``closed`` counts the rows it has closed."""

    grammar: str
    tokenizer: Any  # llguidance.LLTokenizer
    stop_ids: list[int]
    record: dict[str, Any] = field(default_factory=dict)
    completer: Completer | None = None
    budget: int | None = None
    closed: int = 0
    _bytes: dict[int, bytes] = field(default_factory=dict)

    def processors(self, rows: int) -> Any:
        from transformers import LogitsProcessorList

        return LogitsProcessorList([_MaskProcessor(self, rows)])

    def token_bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self.tokenizer.decode_bytes([token])
        return self._bytes[token]


def build(
    loaded: Any,
    schema: Mapping[str, Any],
    source: str = "schema",
    bounds: Any = None,
    max_new_tokens: int | None = None,
    greedy: bool = True,
) -> JsonGuide:
    """Compile ``schema`` (rewritten by :func:`guide_schema`, bounded by :func:`bound_schema`
    with ``bounds``, a ``GuideParams``; None: its defaults) for ``loaded``'s tokenizer;
    InputError if llguidance refuses it or ignores any of its keywords. Given
    ``max_new_tokens``, the closing rule is on when the shortest document fits it (see the
    module's docstring). The record names the bounds, :func:`max_document_bytes`, the closing
    rule and whether every guided output ends within ``max_new_tokens`` by construction:
    when the closing rule is on and decoding is ``greedy`` (the rule sees the token the
    decode takes), or when the longest document fits."""
    import hashlib
    import time

    import llguidance
    import llguidance.hf

    from tuneline.generation import stop_token_ids
    from tuneline.params import GuideParams

    began = time.perf_counter()
    bounds = bounds if bounds is not None else GuideParams()
    guided = bound_schema(guide_schema(schema, source), bounds, source)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(guided, overrides=COMPILE_OPTIONS)
    n_vocab = max(len(loaded.tokenizer), int(getattr(loaded.model.config, "vocab_size", 0) or 0))
    stops = stop_token_ids(loaded)
    tokenizer = llguidance.hf.from_tokenizer(loaded.tokenizer, n_vocab=n_vocab, eos_token=stops)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error or messages:
        raise InputError(f"{source}: {LIBRARY} cannot guide with this schema: {'; '.join(messages)}")
    canonical = json.dumps(guided, sort_keys=True, ensure_ascii=False).encode("utf-8")
    most = max_document_bytes(guided)
    completer, closing = _closing(guided, tokenizer, max_new_tokens)
    record = {
        "library": LIBRARY,
        "version": llguidance_version(),
        "schema": "the contract, allOf if/then rewritten as anyOf (tuneline.guided.guide_schema), "
        "every array, string and integer bounded (tuneline.guided.bound_schema)",
        "schema_sha256": hashlib.sha256(canonical).hexdigest(),
        "options": dict(COMPILE_OPTIONS),
        "bounds": bounds.model_dump(),
        # a token is at least one byte, and the stop token is one more
        "max_document_bytes": most,
        "max_new_tokens": max_new_tokens,
        "closing": closing,
        "greedy": greedy,
        "complete_by_construction": None if max_new_tokens is None else (
            (most is not None and most + 1 <= max_new_tokens) or (completer is not None and greedy)
        ),
        "setup_s": round(time.perf_counter() - began, 3),
    }
    return JsonGuide(grammar=grammar, tokenizer=tokenizer, stop_ids=stops, record=record,
                     completer=completer, budget=max_new_tokens if completer else None)


# -- the closing rule: every guided output ends within max_new_tokens ---------------------------


def _closing(guided: Mapping[str, Any], tokenizer: Any, max_new_tokens: int | None) -> tuple[Completer | None, dict[str, Any]]:
    """The closing rule for ``guided`` under a budget of ``max_new_tokens``, and its record:
    on (``active``) when the schema is one :class:`Completer` completes and its shortest
    document and a stop token fit the budget; otherwise ``reason`` says why not."""
    record: dict[str, Any] = {"active": False, "shortest_document_tokens": None, "reason": None}
    try:
        completer = Completer(guided)
    except Unclosable as error:
        record["reason"] = f"the closing rule cannot complete this schema: {error}"
        return None, record
    shortest = len(tokenizer.tokenize_bytes(completer.completion(completer.start)))
    record["shortest_document_tokens"] = shortest
    if max_new_tokens is None:
        record["reason"] = "no max_new_tokens given"
    elif shortest + 1 > max_new_tokens:
        record["reason"] = f"the shortest document and a stop token take {shortest + 1} tokens > max_new_tokens {max_new_tokens}"
    else:
        record["active"] = True
        return completer, record
    return None, record



# Keywords the closing rule understands (any other keyword of the guide schema turns it off:
# the record says which); annotations are ignored.
_CLOSABLE = {
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
    "minLength", "maxLength", "pattern", "minimum", "maximum", "enum", "const",
    "$ref", "allOf", "anyOf", "$defs", "definitions",
    "$schema", "$id", "$comment", "title", "description", "default", "examples",
}
_TYPE_ORDER = ("null", "boolean", "integer", "number", "string", "array", "object")


class Unclosable(Exception):
    """A guide schema the closing rule cannot complete documents of (its message says why)."""


def _compact(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


class Completer:
    """The shortest completion the closing rule writes for a prefix of a compact JSON document
    under ``schema`` (a guide schema: :func:`guide_schema` then :func:`bound_schema`).

    ``feed(state, data)`` advances a :class:`_State` (a stack of open values) by bytes the
    guide allowed; ``completion(state)`` returns the bytes that finish the document from that
    state: the open string, number or literal finished (an escape's hex digits with ``0``, a
    UTF-8 character with its smallest continuation, a string up to its ``minLength`` and
    ``pattern`` with ``x``, an ``enum`` value by its shortest extension), then at each open
    object the required keys not yet written, in ``properties`` order, each with its
    shortest value, and at each open array the items up to ``minItems``, then the closing
    bracket. Under ``anyOf`` a scalar's value keeps only the branches that allow it, and the
    cheapest remaining branch is completed. The shortest value of a subschema is its shortest
    ``enum``/``const`` value, else of its types the shortest of ``null``, ``false``, ``0``
    (clamped into ``minimum``..``maximum``), a string of ``minLength`` ``x``, ``minItems``
    shortest items, an object of its required keys."""

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.root = dict(schema)
        # by the ids of schema nodes; each memo keeps its nodes alive, so an id is never reused
        self._minimal: dict[tuple[int, ...], tuple[Any, bytes]] = {}
        self._alternatives: dict[tuple[int, ...], tuple[Any, list[Any]]] = {}
        self.start = _State([_Frame("value", self.alternatives((self.root,)))])
        self._check(self.start.stack[0].alts)  # Unclosable now rather than mid-decode
        self.completion(self.start)

    def _check(self, alts: list[tuple[dict[str, Any], ...]]) -> None:
        """Expand every subschema a document can reach (each once), so that a keyword the rule
        does not know is found when the guide is built."""
        seen: set[tuple[int, ...]] = set()
        todo = list(alts)
        while todo:
            alt = todo.pop()
            key = tuple(id(n) for n in alt)
            if key in seen:
                continue
            seen.add(key)
            self._minimal_one(alt)
            kinds = self._types(alt) if self._values(alt) is None else []
            if "object" in kinds and not any(n.get("additionalProperties") is False for n in alt):
                raise Unclosable("an object open to keys it does not declare (no 'additionalProperties': false)")
            for name in self.keys(alt)[0]:
                todo += self.property_alternatives(alt, name)
            if any("items" in n for n in alt):
                todo += self.item_alternatives([alt])

    # -- the schema ----------------------------------------------------------------------------
    def alternatives(self, nodes: tuple[Any, ...]) -> list[tuple[dict[str, Any], ...]]:
        """The alternatives of subschemas that apply together: each a tuple of plain nodes
        (``$ref`` and ``allOf`` expanded, one branch of each ``anyOf`` taken)."""
        key = tuple(id(n) for n in nodes)
        if key not in self._alternatives:
            self._alternatives[key] = (nodes, self._expand(nodes))
        return self._alternatives[key][1]

    def _expand(self, nodes: tuple[Any, ...]) -> list[tuple[dict[str, Any], ...]]:
        flat: list[dict[str, Any]] = []

        def expand(node: Any, chain: frozenset[str]) -> None:
            if node is True:
                return
            if not isinstance(node, Mapping):
                raise Unclosable(f"subschema {node!r}")
            unknown = sorted(set(node) - _CLOSABLE)
            if unknown:
                raise Unclosable(f"keyword {unknown[0]!r}")
            flat.append({k: v for k, v in node.items() if k not in ("$ref", "allOf")})
            ref = node.get("$ref")
            if ref is not None:
                if not isinstance(ref, str) or not ref.startswith("#/") or ref in chain:
                    raise Unclosable(f"$ref {ref!r} (remote or recursive)")
                target: Any = self.root
                for part in ref[2:].split("/"):
                    target = target[part]
                expand(target, chain | {ref})
            for sub in node.get("allOf", ()):
                expand(sub, chain)

        for node in nodes:
            expand(node, frozenset())
        for i, node in enumerate(flat):
            if "anyOf" in node:
                rest = (*flat[:i], {k: v for k, v in node.items() if k != "anyOf"}, *flat[i + 1:])
                return [alt for branch in node["anyOf"] for alt in self.alternatives((*rest, branch))]
        return [tuple(flat)]

    @staticmethod
    def _bound(alt: tuple[dict[str, Any], ...], key: str, pick: Any, default: Any) -> Any:
        found = [n[key] for n in alt if key in n]
        return pick(found) if found else default

    def _values(self, alt: tuple[dict[str, Any], ...]) -> list[Any] | None:
        """The values an ``enum``/``const`` allows (all of them agreeing), None if unlimited."""
        sets = [n["enum"] if "enum" in n else [n["const"]] for n in alt if "enum" in n or "const" in n]
        if not sets:
            return None
        return [v for v in sets[0] if all(any(_compact(v) == _compact(w) for w in s) for s in sets[1:])]

    def _types(self, alt: tuple[dict[str, Any], ...]) -> list[str]:
        declared = [_types(n) | ({"integer"} if "number" in _types(n) else set()) for n in alt if "type" in n]
        if not declared:
            raise Unclosable("a subschema with neither 'type' nor 'enum'/'const'")
        kinds = set.intersection(*declared)
        return [k for k in _TYPE_ORDER if k in kinds]

    def property_alternatives(self, alt: tuple[dict[str, Any], ...], key: str) -> list[tuple[dict[str, Any], ...]]:
        return self.alternatives(tuple(n["properties"][key] for n in alt if key in n.get("properties", {})))

    def keys(self, alt: tuple[dict[str, Any], ...]) -> tuple[list[str], set[str]]:
        """Declared keys in the order they are written (``properties`` order), and the required ones."""
        order: list[str] = []
        for n in alt:
            order += [k for k in n.get("properties", {}) if k not in order]
        required = {k for n in alt for k in n.get("required", ())}
        missing = required - set(order)
        if missing:
            raise Unclosable(f"required key {sorted(missing)[0]!r} not in 'properties'")
        return order, required

    def minimal(self, alts: list[tuple[dict[str, Any], ...]]) -> bytes:
        """The shortest value any of ``alts`` accepts."""
        return min((self._minimal_one(alt) for alt in alts), key=len)

    def _minimal_one(self, alt: tuple[dict[str, Any], ...]) -> bytes:
        cache_key = tuple(id(n) for n in alt)
        if cache_key in self._minimal:
            return self._minimal[cache_key][1]
        values = self._values(alt)
        if values is not None:
            if not values:
                raise Unclosable("an 'enum'/'const' no value satisfies")
            out = min((_compact(v) for v in values), key=len)
        else:
            out = min((self._minimal_kind(kind, alt) for kind in self._types(alt)), key=len)
        self._minimal[cache_key] = (alt, out)
        return out

    def _minimal_kind(self, kind: str, alt: tuple[dict[str, Any], ...]) -> bytes:
        if kind == "null":
            return b"null"
        if kind == "boolean":
            return b"false"
        if kind in ("integer", "number"):
            return str(self._integer(alt, 0)).encode()
        if kind == "string":
            return b'"' + self._string_tail(alt, b"") + b'"'
        if kind == "array":
            count = self._bound(alt, "minItems", max, 0)
            if count == 0:
                return b"[]"
            item = self.minimal(self.alternatives(tuple(n["items"] for n in alt if "items" in n)))
            return b"[" + b",".join([item] * count) + b"]"
        order, required = self.keys(alt)
        members = [_compact(k) + b":" + self.minimal(self.property_alternatives(alt, k)) for k in order if k in required]
        return b"{" + b",".join(members) + b"}"

    def _integer(self, alt: tuple[dict[str, Any], ...], value: int) -> int:
        low = self._bound(alt, "minimum", max, None)
        high = self._bound(alt, "maximum", min, None)
        if low is not None and high is not None and low > high:
            raise Unclosable(f"minimum {low} > maximum {high}")
        value = value if low is None else max(value, int(-(-low // 1)))
        return value if high is None else min(value, int(high // 1))

    def _string_tail(self, alt: tuple[dict[str, Any], ...], content: bytes) -> bytes:
        """``x`` characters that bring the string ``content`` (raw JSON, escapes included) up to
        its ``minLength`` and ``pattern``s."""
        import re

        text = json.loads(b'"' + content + b'"')
        need = max(self._bound(alt, "minLength", max, 0) - len(text), 0)
        most = self._bound(alt, "maxLength", min, None)
        patterns = [n["pattern"] for n in alt if "pattern" in n]
        while most is None or len(text) + need <= most:
            if all(re.search(p, text + "x" * need) for p in patterns):
                return b"x" * need
            need += 1
            if need > 64:
                break
        raise Unclosable(f"no string of 'x' after {text!r} matches {patterns}")

    # -- the prefix --------------------------------------------------------------------------------
    def feed(self, state: _State, data: bytes) -> None:
        """Advance ``state`` by ``data``, bytes of compact JSON the guide allowed; ValueError
        on a byte the guide cannot have allowed."""
        for byte in data:
            self._byte(state, byte)

    def _byte(self, state: _State, b: int) -> None:
        if not state.stack:
            raise ValueError(f"byte {bytes([b])!r} after the end of the document")
        top = state.stack[-1]
        if top.kind == "string":
            if top.escape == -1:  # after a backslash
                top.escape = 4 if b == ord("u") else 0
            elif top.escape > 0:  # a hex digit of \uXXXX
                top.escape -= 1
            elif b == ord("\\"):
                top.escape = -1
            elif b == ord('"'):
                state.stack.pop()
                self._ended(state, top)
                return
            top.text.append(b)
            return
        if top.kind in ("number", "literal"):
            if (top.kind == "number" and b in b"0123456789-+.eE") or (top.kind == "literal" and b in b"truefalsn"):
                top.text.append(b)
                return
            state.stack.pop()
            self._ended(state, top)
            self._byte(state, b)
            return
        if top.kind == "value":  # the root, before its first byte
            state.stack.pop()
            self._open(state, top.alts, b)
            return
        if top.kind == "object":
            self._object_byte(state, top, b)
            return
        if top.phase in ("start", "next") and not (top.phase == "start" and b == ord("]")):  # an item starts
            top.count += 1
            top.phase = "after"
            self._open(state, self.item_alternatives(top.alts), b)
        elif top.phase == "after" and b == ord(","):
            top.phase = "next"
        elif top.phase in ("start", "after") and b == ord("]"):
            state.stack.pop()
            self._ended(state, top)
        else:
            raise ValueError(f"byte {bytes([b])!r} in an array ({top.phase})")

    def _object_byte(self, state: _State, top: _Frame, b: int) -> None:
        if top.phase in ("start", "next") and b == ord('"'):
            top.phase, top.text = "key", bytearray()
        elif top.phase == "key":
            if b == ord('"') and top.escape == 0:
                top.key, top.phase = json.loads(b'"' + bytes(top.text) + b'"'), "colon"
            else:
                top.escape = -1 if b == ord("\\") and top.escape == 0 else 0
                top.text.append(b)
        elif top.phase == "colon" and b == ord(":"):
            top.phase = "value"
        elif top.phase == "value":
            top.phase = "after"
            self._open(state, [a for alt in top.alts for a in self.property_alternatives(alt, top.key)], b)
        elif top.phase == "after" and b == ord(","):
            top.phase = "next"
        elif top.phase in ("start", "after") and b == ord("}"):
            state.stack.pop()
            self._ended(state, top)
        else:
            raise ValueError(f"byte {bytes([b])!r} in an object ({top.phase})")

    def item_alternatives(self, alts: list[Any]) -> list[tuple[dict[str, Any], ...]]:
        out: list[tuple[dict[str, Any], ...]] = []
        for alt in alts:
            items = tuple(n["items"] for n in alt if "items" in n)
            if not items:
                raise Unclosable("an array without 'items'")
            out += self.alternatives(items)
        return out

    def _open(self, state: _State, alts: list[Any], b: int) -> None:
        c = chr(b)
        if c == "{":
            state.stack.append(_Frame("object", alts, phase="start"))
        elif c == "[":
            state.stack.append(_Frame("array", alts, phase="start"))
        elif c == '"':
            state.stack.append(_Frame("string", alts))
        elif c.isdigit() or c == "-":
            state.stack.append(_Frame("number", alts, text=bytearray([b])))
        elif c in "tfn":
            state.stack.append(_Frame("literal", alts, text=bytearray([b])))
        else:
            raise ValueError(f"byte {bytes([b])!r} where a value starts")

    def _ended(self, state: _State, frame: _Frame) -> None:
        """A value was written in full: an object keeps the branches that allow it."""
        if not state.stack:
            state.done = True
            return
        parent = state.stack[-1]
        if parent.kind == "object":
            if frame.kind in ("string", "number", "literal"):
                parent.alts = self._keep(parent, _scalar(frame))
            parent.seen.append(parent.key)

    def _keep(self, frame: _Frame, value: Any) -> list[Any]:
        """``frame``'s (an object's) branches whose member ``frame.key`` allows ``value``."""
        if value is _OPAQUE:
            return frame.alts
        kept = [alt for alt in frame.alts if self._allows(self.property_alternatives(alt, frame.key), value)]
        return kept or frame.alts

    def _allows(self, alts: list[Any], value: Any) -> bool:
        for alt in alts:
            values = self._values(alt)
            if values is None or any(_compact(v) == _compact(value) for v in values):
                return True
        return False

    # -- the completion ----------------------------------------------------------------------------
    def completion(self, state: _State) -> bytes:
        """The bytes that end the document from ``state`` (empty once it is complete)."""
        if state.done:
            return b""
        out, value = b"", _OPAQUE
        for frame in reversed(state.stack):
            alts = self._keep(frame, value) if frame.kind == "object" and frame.phase == "after" else frame.alts
            tail, value = self._finish(frame, alts)
            out += tail
        return out

    def _finish(self, frame: _Frame, alts: list[Any]) -> tuple[bytes, Any]:
        """The bytes that end ``frame`` (the values open inside it already ended) and, for a
        scalar, the value it then holds (else ``_OPAQUE``)."""
        if frame.kind == "value":
            return self.minimal(alts), _OPAQUE
        if frame.kind == "string":
            return self._finish_string(frame, alts)
        if frame.kind == "number":
            text = frame.text.decode()
            for extra in ("", "0", "1", "00", "10"):
                try:
                    value = json.loads(text + extra)
                except json.JSONDecodeError:
                    continue
                if any(self._number_ok(alt, value) for alt in alts):
                    return extra.encode(), value
            raise Unclosable(f"the number {text!r} cannot be finished")
        if frame.kind == "literal":
            text = frame.text.decode()
            word = next((w for w in ("true", "false", "null") if w.startswith(text)), None)
            if word is None:
                raise Unclosable(f"the literal {text!r}")
            return word[len(text):].encode(), json.loads(word)
        if frame.kind == "array":
            item = self.item_alternatives(alts)
            count = frame.count + (frame.phase == "next")
            parts = [self.minimal(item)] if frame.phase == "next" else []
            parts += [self.minimal(item)] * max(self._bound(alts[0], "minItems", max, 0) - count, 0)
            lead = b"," if frame.count and frame.phase != "next" and parts else b""
            return lead + b",".join(parts) + b"]", _OPAQUE
        return min((self._finish_object(frame, alt) for alt in alts), key=len), _OPAQUE

    def _number_ok(self, alt: tuple[dict[str, Any], ...], value: Any) -> bool:
        kinds = self._types(alt) if any("type" in n for n in alt) else ["number"]
        if value != int(value) and "number" not in kinds:
            return False
        low = self._bound(alt, "minimum", max, None)
        high = self._bound(alt, "maximum", min, None)
        return (low is None or value >= low) and (high is None or value <= high)

    def _finish_string(self, frame: _Frame, alts: list[Any]) -> tuple[bytes, Any]:
        tail = b"n" if frame.escape == -1 else b"0" * max(frame.escape, 0)  # \n, or \u00..0
        content = bytes(frame.text) + tail
        tail += _utf8_cut(content)  # a UTF-8 character cut inside: its smallest continuation
        content = bytes(frame.text) + tail
        best: tuple[bytes, Any] | None = None
        for alt in alts:
            values = self._values(alt)
            if values is not None:
                options = [(_compact(v)[1 + len(frame.text):], v) for v in values
                           if isinstance(v, str) and _compact(v)[1:-1].startswith(content)]
            elif "string" in self._types(alt):
                rest = tail + self._string_tail(alt, content)
                options = [(rest + b'"', json.loads(b'"' + bytes(frame.text) + rest + b'"'))]
            else:
                options = []
            for option in options:
                if best is None or len(option[0]) < len(best[0]):
                    best = option
        if best is None:
            raise Unclosable(f"the string {content!r} cannot be finished")
        return best

    def _finish_object(self, frame: _Frame, alt: tuple[dict[str, Any], ...]) -> bytes:
        order, required = self.keys(alt)
        last = max((order.index(k) for k in frame.seen if k in order), default=-1)

        def member(key: str) -> bytes:
            return _compact(key) + b":" + self.minimal(self.property_alternatives(alt, key))

        def required_after(position: int) -> list[bytes]:
            return [member(k) for k in order[position + 1:] if k in required]

        if frame.phase == "start":
            return b",".join(required_after(-1)) + b"}"
        if frame.phase == "after":  # the member frame.key ended (its value by the frames above)
            return b"".join(b"," + m for m in required_after(order.index(frame.key))) + b"}"
        if frame.phase in ("colon", "value"):
            value = self.minimal(self.property_alternatives(alt, frame.key))
            rest = required_after(order.index(frame.key))
            return (b":" if frame.phase == "colon" else b"") + value + b"".join(b"," + m for m in rest) + b"}"
        # "next" (a key must follow the comma) or "key" (inside one): keys after the last one
        # written, up to and including the next required key, whose name extends what is typed
        typed = bytes(frame.text) if frame.phase == "key" else None
        options = []
        for position in range(last + 1, len(order)):
            key = order[position]
            name = _compact(key)[1:]  # after the opening quote
            if typed is None or name.startswith(typed):
                head = (b'"' + name) if typed is None else name[len(typed):]
                value = self.minimal(self.property_alternatives(alt, key))
                options.append(head + b":" + value + b"".join(b"," + m for m in required_after(position)) + b"}")
            if key in required:
                break
        if not options:
            raise Unclosable(f"no key after {order[last] if last >= 0 else 'the start'!r} extends {typed!r}")
        return min(options, key=len)


def _scalar(frame: _Frame) -> Any:
    text = bytes(frame.text)
    return json.loads(b'"' + text + b'"' if frame.kind == "string" else text)


_OPAQUE = object()  # a container's value: it keeps every branch of its parent


def _utf8_cut(data: bytes) -> bytes:
    """The smallest bytes that complete a UTF-8 character cut at the end of ``data``."""
    for back in range(1, min(4, len(data)) + 1):
        lead = data[-back]
        if lead & 0xC0 == 0x80:
            continue
        size = 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4 if lead >> 3 == 0b11110 else 1
        missing = size - back
        if missing <= 0:
            return b""
        first = {0xE0: 0xA0, 0xF0: 0x90}.get(lead, 0x80)
        return bytes([first if back == 1 else 0x80] + [0x80] * (missing - 1))
    return b""


@dataclass
class _Frame:
    kind: str  # value (the root before it starts), object, key, array, string, number, literal
    alts: list[Any]
    phase: str = ""  # object: start, key, colon, value, after, next; array: start, after, next
    text: bytearray = field(default_factory=bytearray)
    escape: int = 0  # string or key: -1 after a backslash, k > 0: k hex digits of \\uXXXX to come
    key: str | None = None
    seen: list[str] = field(default_factory=list)
    count: int = 0

    def copy(self) -> _Frame:
        return _Frame(self.kind, self.alts, self.phase, bytearray(self.text), self.escape, self.key, list(self.seen), self.count)


@dataclass
class _State:
    stack: list[_Frame]
    done: bool = False

    def copy(self) -> _State:
        return _State([f.copy() for f in self.stack], self.done)


def _bit(position: int) -> int:
    """Bit ``position`` of an int32 mask word (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)


class _MaskProcessor:
    """One llguidance matcher per row of a batch; each step consumes the row's last token
    and masks the logits to the tokens the schema allows next. With the closing rule on, it
    also follows each row's document (:class:`Completer`) and, where the token the masked
    logits pick (their argmax) would leave too few tokens to finish the document, masks the
    row to the shortest completion instead, one token a step, then the stop token."""

    def __init__(self, guide: JsonGuide, rows: int) -> None:
        import llguidance

        self.guide = guide
        self.matchers = [llguidance.LLMatcher(guide.tokenizer, guide.grammar, log_level=0) for _ in range(rows)]
        self.executor = llguidance.LLExecutor()
        self.n_vocab = guide.tokenizer.vocab_size
        self.stop_ids = guide.stop_ids
        self.started = False
        self.step = 0
        completer = guide.completer
        self.states = [completer.start.copy() for _ in range(rows)] if completer else []
        self.forced: list[list[int]] = [[] for _ in range(rows)]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        if self.started:
            last = input_ids[:, -1].tolist()  # one device sync per step
            for row, matcher in enumerate(self.matchers):
                if not matcher.is_stopped():
                    matcher.consume_token(last[row])
                    if matcher.is_error():
                        raise RuntimeError(f"{LIBRARY}: row {row}: {matcher.get_error()}")
                    if self.states and last[row] not in self.stop_ids:
                        self.guide.completer.feed(self.states[row], self.guide.token_bytes(last[row]))
        self.started = True
        live = [(m, row) for row, m in enumerate(self.matchers) if not m.is_stopped()]
        bitmask = allocate_token_bitmask(len(self.matchers), self.n_vocab)
        if live:
            fill_next_token_bitmask_par(self.executor, live, bitmask)
        for row, matcher in enumerate(self.matchers):
            if matcher.is_stopped():  # the document is complete: a stop token only
                bitmask[row] = 0
                for token in self.stop_ids:
                    bitmask[row, token // 32] |= _bit(token % 32)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).reshape(len(self.matchers), -1).bool()
        width = scores.shape[-1]
        if allowed.shape[1] < width:
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
        masked = scores.masked_fill(~allowed[:, :width].to(scores.device), float("-inf"))
        if self.states:
            self._close(masked, allowed, [row for _, row in live])
        self.step += 1
        return masked

    def _close(self, masked: Any, allowed: Any, live: list[int]) -> None:
        """Keep every live row able to finish its document in the tokens left: the invariant is
        that the row's shortest completion and a stop token fit them (true at step 0, as the
        shortest document fits the budget). If the token the row would take breaks it, the
        row writes its shortest completion instead."""
        completer, guide = self.guide.completer, self.guide
        left = guide.budget - self.step  # tokens this row may still write, this one included
        picks = masked.argmax(dim=-1).tolist()
        for row in live:
            if not self.forced[row]:
                token = picks[row]
                if token in self.stop_ids:
                    continue
                after = self.states[row].copy()
                completer.feed(after, guide.token_bytes(token))
                rest = completer.completion(after)
                # a token is at least one byte: the byte count bounds the token count
                if len(rest) + 1 <= left - 1 or len(guide.tokenizer.tokenize_bytes(rest)) + 1 <= left - 1:
                    continue
                self.forced[row] = list(guide.tokenizer.tokenize_bytes(completer.completion(self.states[row])))
                guide.closed += 1
                if not self.forced[row]:
                    raise RuntimeError(f"{LIBRARY}: row {row}: the document is complete but a stop token is not allowed")
            token = self.forced[row].pop(0)
            if not bool(allowed[row, token]):
                raise RuntimeError(
                    f"{LIBRARY}: row {row}: the closing rule's token {guide.token_bytes(token)!r} is not allowed by the guide"
                )
            masked[row] = float("-inf")
            masked[row, token] = 0.0
