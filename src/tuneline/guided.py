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
:func:`max_document_bytes` bytes (``max_document_bytes`` in the run record's ``guide``), and a
byte-level BPE token is at least one byte, so a budget of ``max_document_bytes + 1`` tokens
(the stop token) would hold every guided output by construction (``complete_by_construction``
in the record). For the travel contract that bound is 102,500 bytes (4 lists of 8 strings of
160 characters of up to 6 bytes each, and an itinerary of 8 days), far above
``probe.max_new_tokens`` (320), so the record says ``complete_by_construction: false``: the
bounds make a loop close, they do not prove it closes within the budget. An output that still
reaches the limit is unfinished JSON; it keeps finish reason ``length`` and the judge counts
it as truncated (not parsed, not valid), exactly as for free decoding, so ``truncated_rate``
is part of the guided row's schema-valid rate. Every guided output that ends at a stop token
is complete JSON valid under the contract.

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
    ``tuneline.generation.generate`` calls once per batch (``logits_processor``)."""

    grammar: str
    tokenizer: Any  # llguidance.LLTokenizer
    stop_ids: list[int]
    record: dict[str, Any] = field(default_factory=dict)

    def processors(self, rows: int) -> Any:
        from transformers import LogitsProcessorList

        return LogitsProcessorList([_MaskProcessor(self, rows)])


def build(
    loaded: Any,
    schema: Mapping[str, Any],
    source: str = "schema",
    bounds: Any = None,
    max_new_tokens: int | None = None,
) -> JsonGuide:
    """Compile ``schema`` (rewritten by :func:`guide_schema`, bounded by :func:`bound_schema`
    with ``bounds``, a ``GuideParams``; None: its defaults) for ``loaded``'s tokenizer;
    InputError if llguidance refuses it or ignores any of its keywords. The record names the
    bounds, :func:`max_document_bytes` and, given ``max_new_tokens``, whether every guided
    output ends within it by construction."""
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
        "complete_by_construction": None if max_new_tokens is None else most is not None and most + 1 <= max_new_tokens,
        "setup_s": round(time.perf_counter() - began, 3),
    }
    return JsonGuide(grammar=grammar, tokenizer=tokenizer, stop_ids=stops, record=record)


def _bit(position: int) -> int:
    """Bit ``position`` of an int32 mask word (bit 31 is the sign bit)."""
    return (1 << position) - (1 << 32 if position == 31 else 0)


class _MaskProcessor:
    """One llguidance matcher per row of a batch; each step consumes the row's last token
    and masks the logits to the tokens the schema allows next."""

    def __init__(self, guide: JsonGuide, rows: int) -> None:
        import llguidance

        self.matchers = [llguidance.LLMatcher(guide.tokenizer, guide.grammar, log_level=0) for _ in range(rows)]
        self.executor = llguidance.LLExecutor()
        self.n_vocab = guide.tokenizer.vocab_size
        self.stop_ids = guide.stop_ids
        self.started = False

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
        return scores.masked_fill(~allowed[:, :width].to(scores.device), float("-inf"))

