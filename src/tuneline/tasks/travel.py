"""The travel task: pocket travel-guide envelopes (the default task).

Everything the pipeline does only for travel lives here or in ``tuneline.datagen.travel``
(the template generator) and ``data/seed/``:

- generate: template examples from ``destinations.jsonl`` x ``train_phrasings.json``, their
  records (``meta.expect`` = payload type and destination) and teacher shots from
  ``gold.jsonl`` that never show the request's own destination;
- clean: ``probe_destination`` (with ``clean.exclude_probe_destinations``), a record naming
  an entity a held-out suite (every probe suite and the development suite) expects at a
  path ending in ``destination``, as a whole word;
- pairs: ``off_topic`` and ``wrong_payload_type`` negatives;
- probe: a limited suite is stratified by ``payload_type``.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.contract import Contract, task_checks
from tuneline.datagen import teacher, travel
from tuneline.filters import Candidate, Filter, Rejection
from tuneline.provenance import sha256_file
from tuneline.tasks import Task

KNOWLEDGE_BASE = "destinations.jsonl"
PHRASINGS = "train_phrasings.json"
GOLD_FIELDS = {"instruction": str, "payload_type": str, "destination": str, "completion": dict}


# -- generate ----------------------------------------------------------------------------


def examples(params: Any) -> list[travel.Example]:
    seed_dir = Path(params.paths.seed_dir)
    template = params.generate.sources.template
    return travel.template_examples(
        travel.load_destinations(seed_dir / KNOWLEDGE_BASE),
        travel.load_phrasings(seed_dir / PHRASINGS),
        seed=params.seed,
        variants=template.variants,
        natural_fraction=template.natural_fraction,
        uncovered_language_variants=template.uncovered_language_variants,
        phrasebook_items=(template.phrasebook_min_items, template.phrasebook_max_items),
    )


def generator_version() -> str:
    return "travel-" + sha256_file(travel.__file__)[:12]


def example_meta(e: travel.Example, source: str) -> dict[str, Any]:
    return {
        "instruction": e.instruction,
        "source": source,
        "payload_type": e.payload_type,
        "destination": e.destination,
        "expect": {"payload_type": e.payload_type, "payload.destination": e.destination},
        "phrasing": e.phrasing,
        "profile": e.profile,
    }


@functools.lru_cache(maxsize=4)
def _template_provenance(seed_dir: Path, seed: int) -> tuple[tuple[str, Any], ...]:
    return (
        ("source", "template"),
        ("generator", generator_version()),
        ("seed", seed),
        ("knowledge_base_sha256", sha256_file(seed_dir / KNOWLEDGE_BASE)),
        ("phrasings_sha256", sha256_file(seed_dir / PHRASINGS)),
    )


def template_record(e: travel.Example, params: Any, contract: Contract) -> dict[str, Any]:
    provenance = dict(_template_provenance(Path(params.paths.seed_dir).resolve(), params.seed))
    return {
        "id": f"tpl-{e.key}",
        "prompt": e.instruction,
        "completion": contract.canonical_text(e.envelope),
        "meta": {**example_meta(e, "template"), "register": e.register, "style": e.style},
        "provenance": provenance,
    }


def shots(gold: Sequence[dict[str, Any]], k: int, e: travel.Example, seed: int) -> list[dict[str, Any]]:
    """Gold shots for one request: seeded per request, never showing its own destination."""
    pool = [g for g in gold if g["destination"] != e.destination]
    return teacher.pick_shots(pool, k, e.payload_type, random.Random(f"{seed}:shots:{e.key}"))


# -- clean -------------------------------------------------------------------------------


def probe_entities(probe: Sequence[dict[str, Any]]) -> list[str]:
    """Values the held-out prompts (every probe suite and the development suite) expect at
    paths ending in 'destination'."""
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


def clean_filters(probe: Sequence[dict[str, Any]], params: Any) -> list[Filter]:
    if not params.clean.exclude_probe_destinations:
        return []
    return [destination_filter(probe_entities(probe))]


# -- pairs -------------------------------------------------------------------------------


def _others(record: dict[str, Any], pool: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in pool if r["completion"] != record["completion"]]


def off_topic(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """Another record's valid envelope that fails this record's task checks (another
    destination), preferring one of the same payload type so only the topic is wrong."""
    expect = record["meta"].get("expect", {})
    topic_keys = [k for k in expect if k != "payload_type"]
    if not topic_keys:
        return None
    sub = {k: expect[k] for k in topic_keys}
    candidates = [r for r in _others(record, pool) if not all(task_checks(json.loads(r["completion"]), sub).values())]
    same_type = [r for r in candidates if r["meta"].get("payload_type") == record["meta"].get("payload_type")]
    chosen = same_type or candidates
    return rng.choice(chosen)["completion"] if chosen else None


def wrong_payload_type(record: dict[str, Any], pool: list[dict[str, Any]], contract: Contract, rng: random.Random) -> str | None:
    """An envelope of another payload type: another record's for the same topic when one
    exists, else this envelope relabelled with another allowed payload type."""
    expect = record["meta"].get("expect", {})
    if "payload_type" not in expect:
        return None
    topic = {k: v for k, v in expect.items() if k != "payload_type"}
    others = [
        r for r in _others(record, pool)
        if not task_checks(json.loads(r["completion"]), {"payload_type": expect["payload_type"]})["payload_type"]
    ]
    same_topic = [r for r in others if all(task_checks(json.loads(r["completion"]), topic).values())]
    if same_topic:
        return rng.choice(same_topic)["completion"]
    allowed = contract.schema.get("properties", {}).get("payload_type", {}).get("enum", [])
    choices = [t for t in allowed if t != expect["payload_type"]]
    if not choices:
        return rng.choice(others)["completion"] if others else None
    obj = json.loads(record["completion"])
    obj["payload_type"] = rng.choice(choices)
    return contract.canonical_text(obj)


# -- probe: facts against the knowledge base ---------------------------------------------
#
# A parsed, schema-valid envelope can still state wrong facts (euros for Kraków). The
# facts it states that the knowledge base holds are checked against the entry of the
# destination the prompt asked for (``expect["payload.destination"]``):
#
# - currency: the budget's ``payload.currency`` field, and currency names, codes and
#   symbols anywhere in the text (the KB's currencies plus a few common ones). A word that
#   can mean several currencies ("dollar", "peso", "$") is right when one of them is;
# - language: the phrasebook's ``payload.language`` field, and language names in the text
#   where they are said to be spoken ("speak little or no X", "X phrases"); English is
#   checked only in the field, since "Do you speak English?" is a phrase, not a claim;
# - country: country names in the text (the KB's countries and a few aliases).
#
# The currency a destination's daily budget is given in (USD where local prices change
# quickly) is right for it too, and the KB's sight names are names, not statements
# ("Little India" says nothing about Singapore's country).
#
# Names match as whole words; currency names (and their ASCII spellings) case-insensitively,
# codes, countries and languages in the text only as written ("Polish", not "polish").
# A currency's words are not read again as a language or a country ("Polish złoty").

FACT_KINDS = ("currency", "language", "country")
FACT_CONTEXT_WORDS = ("phrases", "phrase", "expressions", "words", "phrasebook", "greetings", "language")

# Currency words that name a currency's unit and nothing else in travel English; the
# ambiguous ones ("won", "real", "sol", "rand", "pound", "dong": Seoul's Insa-dong) count only in
# a full name, as a code or a symbol.
CURRENCY_UNITS = frozenset({
    "euro", "dollar", "peso", "rupee", "rupiah", "zloty", "koruna", "krona", "krone", "forint", "dinar",
    "dirham", "shilling", "yen", "baht", "ringgit", "lira", "sterling", "yuan", "franc",
})
CURRENCY_PLURALS = {
    "lira": ("lire",), "krona": ("kronor", "kronur"), "krone": ("kroner",), "koruna": ("korun", "koruny"),
    "zloty": ("zlotys", "zlotych"), "real": ("reais",), "sol": ("soles",),
}
# Common currencies no destination uses (stating one is always wrong), and other names of
# the KB's own.
COMMON_CURRENCIES = {"USD": ("US dollar", "U.S. dollar", "American dollar"), "CNY": ("Chinese yuan", "renminbi", "yuan"),
                     "CHF": ("Swiss franc", "franc"), "GBP": ("British pound",)}
CURRENCY_SYMBOLS = {"€": ("EUR",), "£": ("GBP", "EGP"), "¥": ("JPY", "CNY"), "₩": ("KRW",), "₹": ("INR", "NPR"),
                    "฿": ("THB",), "₫": ("VND",), "zł": ("PLN",), "Kč": ("CZK",)}
LANGUAGE_ALIASES = {
    "Chinese": ("Mandarin", "Cantonese"), "Kiswahili": ("Swahili",), "Castilian": ("Spanish",), "Maori": ("Māori",),
    "Hokkien": ("Taiwanese Hokkien",), "Taiwanese": ("Taiwanese Hokkien",), "Gaelic": ("Irish", "Scottish Gaelic"),
    "Singlish": ("English",), "Bahasa": ("Malay", "Indonesian"),
}
# Languages no destination uses: stating one is always wrong.
OTHER_LANGUAGES = ("Russian", "Norwegian", "Finnish", "Hebrew", "Persian", "Tagalog", "Urdu", "Bengali", "Ukrainian")
COUNTRY_ALIASES = {
    "Czech Republic": "Czechia", "Turkey": "Türkiye", "Turkiye": "Türkiye", "UAE": "United Arab Emirates",
    "UK": "United Kingdom", "Britain": "United Kingdom", "Great Britain": "United Kingdom",
    "England": "United Kingdom", "Scotland": "United Kingdom", "Korea": "South Korea", "Republic of Korea": "South Korea",
    "Hong Kong": "China (Hong Kong SAR)", "China": "China (Hong Kong SAR)", "Holland": "Netherlands",
    "the Netherlands": "Netherlands",
}


def _ascii(text: str) -> str:
    """``text`` without diacritics (``złoty`` -> ``zloty``, ``króna`` -> ``krona``)."""
    import unicodedata

    text = text.replace("ł", "l").replace("Ł", "L")
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _alternation(words: Any) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=lambda w: (-len(w), w)))


@dataclass(frozen=True)
class Found:
    kind: str
    stated: str  # as written
    means: frozenset[str]  # the KB values it is consistent with (codes, language or country names)
    path: str


class FactBase:
    """The knowledge base as the facts a payload can state (see the comment above)."""

    def __init__(self, destinations: Sequence[dict[str, Any]]):
        self.entries = {_ascii(d["name"]).casefold(): d for d in destinations}
        currency_words: dict[str, set[str]] = defaultdict(set)
        codes: set[str] = set(COMMON_CURRENCIES)
        for code, names in [(d["currency"]["code"], (d["currency"]["name"],)) for d in destinations] + [
            (c, n) for c, n in COMMON_CURRENCIES.items()
        ]:
            codes.add(code)
            for name in names:
                for form in {name, _ascii(name)}:
                    currency_words[form.casefold()].add(code)
                unit = _ascii(name).split()[-1].casefold()
                if unit in CURRENCY_UNITS or len(name.split()) == 1:
                    for form in (unit, unit + "s", *CURRENCY_PLURALS.get(unit, ())):
                        currency_words[form].add(code)
                for form in (unit + "s", *CURRENCY_PLURALS.get(unit, ())):  # "Canadian dollars", "Peruvian soles"
                    currency_words[" ".join([*_ascii(name).casefold().split()[:-1], form])].add(code)
        dollar_like = {c for w, cs in currency_words.items() if w in ("dollar", "peso") for c in cs}
        self.currency_words = {w: frozenset(cs) for w, cs in currency_words.items()}
        self.currency_symbols = {**{s: frozenset(cs) for s, cs in CURRENCY_SYMBOLS.items()}, "$": frozenset(dollar_like)}
        self.codes = frozenset(codes)
        self._words = re.compile(rf"(?<!\w)(?:{_alternation(self.currency_words)})(?!\w)", re.IGNORECASE)
        self._codes = re.compile(rf"(?<![A-Za-z])(?:{_alternation(self.codes)})(?![A-Za-z])")
        self._symbols = re.compile(_alternation(self.currency_symbols))

        self.languages: dict[str, frozenset[str]] = {}
        for d in destinations:
            for entry in d["languages"]:
                for name in re.split(r"\s*[()]\s*", entry):
                    if name:
                        self.languages[name] = frozenset({name})
        for name, means in LANGUAGE_ALIASES.items():
            self.languages.setdefault(name, frozenset(means))
        for name in OTHER_LANGUAGES:
            self.languages.setdefault(name, frozenset({name}))
        names = _alternation(self.languages)
        self._language_any = re.compile(rf"(?<!\w)(?:{names})(?!\w)", re.IGNORECASE)
        text_names = _alternation(n for n in self.languages if n != "English")
        self._language_said = re.compile(
            rf"\b(?:speak|speaks|spoken|speaking|learn)\s+(?:[^\W\d_]+\s+){{0,3}}?({text_names})(?!\w)"
            rf"|(?<!\w)({text_names})\s+(?:{'|'.join(FACT_CONTEXT_WORDS)})\b"
        )
        self.countries = {d["country"]: frozenset({d["country"]}) for d in destinations}
        for alias, country in COUNTRY_ALIASES.items():
            if country in self.countries:
                self.countries.setdefault(alias, frozenset({country}))
        self._countries = re.compile(rf"(?<!\w)(?:{_alternation(self.countries)})(?!\w)")
        self._sights = re.compile(rf"(?<!\w)(?:{_alternation(s for d in destinations for s in d['sights'])})(?!\w)")

    def entry(self, destination: Any) -> dict[str, Any] | None:
        return self.entries.get(_ascii(str(destination)).casefold()) if isinstance(destination, str) else None

    def expected(self, entry: Mapping[str, Any]) -> dict[str, frozenset[str]]:
        """The KB values each kind of stated fact must match for ``entry``."""
        languages = {name for e in entry["languages"] for name in re.split(r"\s*[()]\s*", e) if name}
        languages |= {m.group(0) for m in self._language_any.finditer(entry["phrase_language"])}
        return {
            "currency": frozenset({entry["currency"]["code"], entry["daily_budget"]["currency"]}),
            "language": frozenset(languages),
            "country": frozenset({entry["country"]}),
        }

    def currencies(self, text: str, path: str, *, field: bool = False) -> list[tuple[int, int, Found]]:
        """Currencies named in ``text`` with their spans; in a currency field codes match in any case."""
        found: list[tuple[int, int, Found]] = []
        taken = [False] * len(text)
        codes = re.compile(self._codes.pattern, re.IGNORECASE) if field else self._codes
        for pattern, table in ((self._words, self.currency_words), (codes, None), (self._symbols, self.currency_symbols)):
            for m in pattern.finditer(text):
                if any(taken[m.start():m.end()]):
                    continue
                stated = m.group(0)
                if table is None:
                    means = frozenset({stated.upper()})
                else:
                    key = stated if table is self.currency_symbols else _ascii(stated).casefold()
                    means = table[key]
                found.append((m.start(), m.end(), Found("currency", stated, means, path)))
                taken[m.start():m.end()] = [True] * (m.end() - m.start())
        return found

    def statements(self, obj: Any) -> list[Found]:
        """Every checkable fact ``obj`` (an envelope) states, in document order."""
        found: list[Found] = []
        for path, text in _strings(obj):
            if path.endswith(".destination"):
                continue
            text = self._sights.sub(lambda m: " " * len(m.group(0)), text)
            spans = self.currencies(text, path, field=path == "$.payload.currency")
            if path == "$.payload.currency" and not spans:
                found.append(Found("currency", text, frozenset(), path))
            masked = list(text)
            for start, end, fact in sorted(spans, key=lambda s: s[0]):
                found.append(fact)
                masked[start:end] = " " * (end - start)
            rest = "".join(masked)
            if path == "$.payload.language":
                names = [m.group(0) for m in self._language_any.finditer(rest)]
                key = {n.casefold(): n for n in self.languages}
                found += [Found("language", n, self.languages[key[n.casefold()]], path) for n in names]
                if not names:
                    found.append(Found("language", text, frozenset(), path))
            else:
                for m in self._language_said.finditer(rest):
                    name = m.group(1) or m.group(2)
                    found.append(Found("language", name, self.languages[name], path))
            found += [Found("country", m.group(0), self.countries[m.group(0)], path) for m in self._countries.finditer(rest)]
        return found

    def check(self, obj: Any, destination: Any) -> dict[str, Any] | None:
        """``{"checked": n, "wrong": [{kind, stated, expected, path}]}`` for the facts ``obj``
        states about ``destination``; None when the KB does not know the destination."""
        entry = self.entry(destination)
        if entry is None:
            return None
        expected = self.expected(entry)
        shown = {
            "currency": f"{entry['currency']['code']} ({entry['currency']['name']})",
            "language": ", ".join(sorted(expected["language"])),
            "country": entry["country"],
        }
        facts = self.statements(obj)
        wrong: list[dict[str, str]] = []
        for fact in facts:
            if fact.means & expected[fact.kind]:
                continue
            item = {"kind": fact.kind, "stated": fact.stated, "expected": shown[fact.kind], "path": fact.path}
            if item not in wrong:
                wrong.append(item)
        return {"checked": len(facts), "wrong": wrong}


def _strings(obj: Any, path: str = "$") -> list[tuple[str, str]]:
    """``(json path, text)`` of every string in ``obj``, in document order."""
    if isinstance(obj, str):
        return [(path, obj)]
    if isinstance(obj, dict):
        return [item for key, value in obj.items() for item in _strings(value, f"{path}.{key}")]
    if isinstance(obj, list):
        return [item for i, value in enumerate(obj) for item in _strings(value, f"{path}[{i}]")]
    return []


@functools.lru_cache(maxsize=4)
def fact_base(path: Path) -> FactBase:
    return FactBase(travel.load_destinations(path))


def fact_checker(params: Any) -> Callable[[Any, Mapping[str, Any]], dict[str, Any] | None]:
    """The probe's facts check: (parsed envelope, the prompt's ``expect``) -> the facts
    result, None when the destination is not in the knowledge base."""
    base = fact_base(Path(params.paths.seed_dir).resolve() / KNOWLEDGE_BASE)

    def check(obj: Any, expect: Mapping[str, Any]) -> dict[str, Any] | None:
        return base.check(obj, expect.get("payload.destination"))

    return check


TASK = Task(
    name="travel",
    stratify_by=("payload_type",),
    clean_reasons=("probe_destination",),
    clean_filters=clean_filters,
    negatives={"off_topic": off_topic, "wrong_payload_type": wrong_payload_type},
    examples=examples,
    template_record=template_record,
    example_meta=example_meta,
    gold_fields=GOLD_FIELDS,
    shots=shots,
    facts=fact_checker,
)
