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
(its warning), not silently dropped. Two deliberate narrowings, each still a subset of the
contract: keys are written in the schema's ``properties`` order, and JSON is compact (no
whitespace, ``,`` and ``:``), the layout the training targets use.

Length: the guide knows nothing about ``max_new_tokens``. An output that reaches the limit
is unfinished JSON; it keeps finish reason ``length`` and the judge counts it as truncated
(not parsed, not valid), exactly as for free decoding, so ``truncated_rate`` is part of the
guided row's schema-valid rate. Every guided output that ends at a stop token is complete
JSON valid under the contract.

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


def build(loaded: Any, schema: Mapping[str, Any], source: str = "schema") -> JsonGuide:
    """Compile ``schema`` (rewritten by :func:`guide_schema`) for ``loaded``'s tokenizer;
    InputError if llguidance refuses it or ignores any of its keywords."""
    import hashlib
    import time

    import llguidance
    import llguidance.hf

    from tuneline.generation import stop_token_ids

    began = time.perf_counter()
    guided = guide_schema(schema, source)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(guided, overrides=COMPILE_OPTIONS)
    n_vocab = max(len(loaded.tokenizer), int(getattr(loaded.model.config, "vocab_size", 0) or 0))
    stops = stop_token_ids(loaded)
    tokenizer = llguidance.hf.from_tokenizer(loaded.tokenizer, n_vocab=n_vocab, eos_token=stops)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
    if is_error or messages:
        raise InputError(f"{source}: {LIBRARY} cannot guide with this schema: {'; '.join(messages)}")
    canonical = json.dumps(guided, sort_keys=True, ensure_ascii=False).encode("utf-8")
    record = {
        "library": LIBRARY,
        "version": llguidance_version(),
        "schema": "the contract, allOf if/then rewritten as anyOf (tuneline.guided.guide_schema)",
        "schema_sha256": hashlib.sha256(canonical).hexdigest(),
        "options": dict(COMPILE_OPTIONS),
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

