"""The default task's template generator: pocket travel-guide envelopes from the knowledge base.

This module and ``data/seed/`` are the only places that know about travel. It reads

- ``destinations.jsonl``: one destination a line (facts a traveller needs, and ``split``:
  ``train`` destinations feed training, ``probe`` destinations are held out for probing,
  ``dev`` ones for development prompts, never trained on);
- a phrasings file (``train_phrasings.json`` for training, ``probe_phrasings.json`` for the
  probe suite): traveller profiles, task wordings and instruction templates per payload type.

``template_examples`` expands destinations x payload types deterministically: for each pair
it draws ``variants`` distinct (phrasing, profile) combinations with a random generator
seeded by (seed, destination, payload type, variant), then builds the instruction and an
envelope whose wording, list lengths and order vary with the same generator. Facts come only
from the knowledge base.

Prompts as users write them: with ``natural_fraction`` > 0 a seeded share of examples takes
the phrasings file's ``natural`` templates (the ``casual`` register: questions, several
wordings each payload type answers, adverbial profiles, casual task wordings) instead of the
formal ones, and casual prompts are roughened by ``naturalise``: context said before or after
the request, common misspellings or a swapped, dropped or doubled letter, lower case, no
punctuation. The destination name (and a requested language) is never altered. Formal prompts
only sometimes get a context sentence. Each example records its ``register`` and ``style``
(the roughening applied, ``question`` when the request is a question).

Phrasebooks list ``phrasebook_items`` (min, max; default 3 to all) of the destination's
phrases, one per meaning, in knowledge-base order. For a language the
destination speaks but no phrase list in the knowledge base covers (``uncovered_languages``),
``uncovered_language_variants`` examples per language ask for it by name; their envelope
gives 1-3 phrases of the destination's covered language, says so, and notes that phrases in
the requested language could not be verified, rather than inventing them.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.records import RecordError, read_json, read_jsonl

PAYLOAD_TYPES = ("itinerary", "checklist", "budget", "phrasebook", "procedure")
SPLITS = ("train", "probe", "dev")
TASKS = {
    "transit_ticket": "Buy a public transport ticket",
    "airport": "Get from the airport to the centre",
    "emergency": "Get help in an emergency",
    "money": "Pay and get local cash",
    "power": "Charge your devices",
}
PLACEHOLDERS = {"destination", "days", "span", "profile", "task"}
LANGUAGE_PLACEHOLDERS = PLACEHOLDERS | {"language"}
REGISTERS = ("formal", "casual")
# How often each roughening is applied, by register (fixed; ``natural_fraction`` sets the
# register mix). Formal prompts keep their spelling and punctuation.
NOISE_SHARES = {
    "casual": {"context": 0.3, "typo": 0.3, "lower": 0.5, "no_punct": 0.4},
    "formal": {"context": 0.15},
}
_QUESTION_START = re.compile(
    r"^(?:how|what|whats|what's|which|where|when|is|are|can|could|would|should|do|does|any)\b",
    re.IGNORECASE,
)

_DESTINATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "country": str,
    "region": str,
    "split": str,
    "currency": dict,
    "languages": list,
    "plug_types": list,
    "emergency": list,
    "getting_around": list,
    "transit_payment": str,
    "airport_transfer": str,
    "sights": list,
    "daily_budget": dict,
    "phrase_language": str,
    "phrases": list,
    "best_seasons": list,
}


@dataclass(frozen=True)
class Natural:
    """How users write: the phrasings file's optional ``natural`` section."""

    profiles: dict[str, str]  # profile id -> adverbial wording ("with my partner")
    tasks: dict[str, tuple[str, ...]]  # task key -> casual wordings
    templates: dict[str, tuple[str, ...]]  # payload type -> casual templates
    language_templates: tuple[str, ...]  # phrasebook requests naming {language}
    before: tuple[str, ...]  # context said before the request
    after: tuple[str, ...]  # context said after it
    misspellings: dict[str, str]  # word -> common misspelling


@dataclass(frozen=True)
class Phrasings:
    profiles: tuple[tuple[str, str], ...]  # (id, text)
    tasks: dict[str, tuple[str, ...]]  # task key -> wordings
    templates: dict[str, tuple[str, ...]]  # payload type -> templates
    natural: Natural | None = None


@dataclass(frozen=True)
class Example:
    """One generated instruction with its envelope and what it asks for."""

    key: str
    instruction: str
    envelope: dict[str, Any]
    payload_type: str
    destination: str
    phrasing: str
    profile: str | None
    register: str = "formal"
    style: str = "plain"  # roughening applied, "+"-joined ("question+typo+lower"), or "plain"


# -- loading -----------------------------------------------------------------------------


def load_destinations(path: str | Path) -> list[dict[str, Any]]:
    """Read and check the knowledge base (``path:line`` errors)."""
    records = read_jsonl(path, required=_DESTINATION_FIELDS, id_field="name")
    for line, record in enumerate(records, start=1):
        problem = _destination_problem(record)
        if problem:
            raise RecordError(path, line, f"destination {record['name']!r}: {problem}")
    return records


def _destination_problem(d: dict[str, Any]) -> str | None:
    if d["split"] not in SPLITS:
        return f"split {d['split']!r} is not one of {list(SPLITS)}"
    if not {"code", "name"} <= set(d["currency"]):
        return "currency needs 'code' and 'name'"
    if not 3 <= len(d["sights"]) <= 6:
        return f"needs 3-6 sights, has {len(d['sights'])}"
    if not 4 <= len(d["phrases"]) <= 8:
        return f"needs 4-8 phrases, has {len(d['phrases'])}"
    if not all(isinstance(p, dict) and {"phrase", "meaning"} <= set(p) for p in d["phrases"]):
        return "each phrase needs 'phrase' and 'meaning'"
    budget = d["daily_budget"]
    for tier in ("budget", "mid_range"):
        pair = budget.get(tier)
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)
        ):
            return f"daily_budget.{tier} must be [low, high] integers"
    if not isinstance(budget.get("currency"), str):
        return "daily_budget.currency must be a currency code"
    for name in ("languages", "plug_types", "emergency", "getting_around", "best_seasons"):
        if not d[name] or not all(isinstance(v, str) and v for v in d[name]):
            return f"{name} must be a non-empty list of strings"
    return None


def load_phrasings(path: str | Path) -> Phrasings:
    """Read and check a phrasings file: every payload type has templates naming the destination."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object with 'profiles', 'tasks' and 'templates'")
    missing = [k for k in ("profiles", "tasks", "templates") if k not in data]
    if missing:
        raise InputError(
            f"{path}: missing key(s) {missing}; expected 'profiles', 'tasks' and 'templates'"
        )
    profiles = []
    for i, p in enumerate(data["profiles"]):
        if not (
            isinstance(p, dict) and isinstance(p.get("id"), str) and isinstance(p.get("text"), str)
        ):
            raise InputError(f"{path}: profiles[{i}] must be an object with string 'id' and 'text'")
        profiles.append((p["id"], p["text"]))
    tasks = {}
    for key, wordings in data["tasks"].items():
        if key not in TASKS:
            raise InputError(f"{path}: tasks.{key}: unknown task (allowed: {sorted(TASKS)})")
        if not wordings or not all(isinstance(w, str) and w for w in wordings):
            raise InputError(f"{path}: tasks.{key} must be a non-empty list of strings")
        tasks[key] = tuple(wordings)
    templates = {}
    for ptype in PAYLOAD_TYPES:
        found = data["templates"].get(ptype)
        if not found:
            raise InputError(
                f"{path}: templates.{ptype}: no templates (every payload type needs some)"
            )
        for i, template in enumerate(found):
            needed = {"destination", "task"} if ptype == "procedure" else {"destination"}
            _check_template(path, f"templates.{ptype}[{i}]", template, PLACEHOLDERS, needed)
        templates[ptype] = tuple(found)
    unknown = sorted(set(data["templates"]) - set(PAYLOAD_TYPES))
    if unknown:
        raise InputError(
            f"{path}: templates: unknown payload type(s) {unknown} (allowed: {list(PAYLOAD_TYPES)})"
        )
    if not tasks:
        raise InputError(f"{path}: tasks: at least one task is needed for procedure prompts")
    natural = None
    if "natural" in data:
        natural = _load_natural(path, data["natural"], [p[0] for p in profiles], sorted(tasks))
    return Phrasings(profiles=tuple(profiles), tasks=tasks, templates=templates, natural=natural)


def _check_template(
    path: str | Path, where: str, template: Any, allowed: set[str], needed: set[str]
) -> None:
    if not isinstance(template, str) or not template.strip():
        raise InputError(f"{path}: {where}: must be a non-empty string, got {template!r}")
    names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    if not names <= allowed:
        raise InputError(
            f"{path}: {where}: unknown placeholder(s) {sorted(names - allowed)} "
            f"(allowed: {sorted(allowed)})"
        )
    for name in sorted(needed - names):
        raise InputError(f"{path}: {where}: must contain {{{name}}}")


def _strings_list(path: str | Path, where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise InputError(f"{path}: {where}: must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _string_map(path: str | Path, where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(v, str) and v.strip() for v in value.values()
    ):
        raise InputError(f"{path}: {where}: must be an object of non-empty strings, got {value!r}")
    return dict(value)


def _load_natural(
    path: str | Path, data: Any, profile_ids: list[str], task_keys: list[str]
) -> Natural:
    """The ``natural`` section: every profile and task has a casual wording, every payload type
    casual templates."""
    if not isinstance(data, dict):
        raise InputError(f"{path}: natural: expected an object")
    keys = ("profiles", "tasks", "templates", "language_templates", "context", "misspellings")
    unknown = sorted(set(data) - set(keys))
    missing = [k for k in keys if k not in data]
    if unknown or missing:
        raise InputError(
            f"{path}: natural: unknown key(s) {unknown}, missing key(s) {missing}; expected {list(keys)}"
        )
    profiles = _string_map(path, "natural.profiles", data["profiles"])
    if sorted(profiles) != sorted(profile_ids):
        raise InputError(
            f"{path}: natural.profiles: needs a wording for exactly the profiles {sorted(profile_ids)}, "
            f"has {sorted(profiles)}"
        )
    raw_tasks = data["tasks"]
    if not isinstance(raw_tasks, dict) or sorted(raw_tasks) != task_keys:
        found = sorted(raw_tasks) if isinstance(raw_tasks, dict) else raw_tasks
        raise InputError(f"{path}: natural.tasks: needs wordings for exactly the tasks {task_keys}, has {found}")
    tasks = {k: _strings_list(path, f"natural.tasks.{k}", v) for k, v in raw_tasks.items()}
    raw_templates = data["templates"]
    if not isinstance(raw_templates, dict) or sorted(raw_templates) != sorted(PAYLOAD_TYPES):
        found = sorted(raw_templates) if isinstance(raw_templates, dict) else raw_templates
        raise InputError(
            f"{path}: natural.templates: needs templates for exactly {list(PAYLOAD_TYPES)}, has {found}"
        )
    templates = {}
    for ptype in PAYLOAD_TYPES:
        found = _strings_list(path, f"natural.templates.{ptype}", raw_templates[ptype])
        needed = {"destination", "task"} if ptype == "procedure" else {"destination"}
        for i, template in enumerate(found):
            _check_template(path, f"natural.templates.{ptype}[{i}]", template, PLACEHOLDERS, needed)
        templates[ptype] = found
    language_templates = _strings_list(path, "natural.language_templates", data["language_templates"])
    for i, template in enumerate(language_templates):
        _check_template(
            path, f"natural.language_templates[{i}]", template, LANGUAGE_PLACEHOLDERS, {"destination", "language"}
        )
    context = data["context"]
    if not isinstance(context, dict) or sorted(context) != ["after", "before"]:
        raise InputError(f"{path}: natural.context: expected an object with 'before' and 'after' lists")
    misspellings = _string_map(path, "natural.misspellings", data["misspellings"])
    for word, wrong in misspellings.items():
        if not (word.isalpha() and word == word.lower() and wrong != word):
            raise InputError(
                f"{path}: natural.misspellings.{word}: keys are lower-case words, each mapped to a different spelling"
            )
    return Natural(
        profiles=profiles,
        tasks=tasks,
        templates=templates,
        language_templates=language_templates,
        before=_strings_list(path, "natural.context.before", context["before"]),
        after=_strings_list(path, "natural.context.after", context["after"]),
        misspellings=misspellings,
    )


def uncovered_languages(d: dict[str, Any], destinations: Sequence[dict[str, Any]]) -> list[str]:
    """Languages ``d`` speaks (besides English) that no phrase list in the knowledge base covers."""
    covered = " ".join(x["phrase_language"] for x in destinations)
    spoken = [n for entry in d["languages"] for n in re.split(r"\s*[()]\s*", entry) if n]
    return [
        n
        for n in spoken
        if n != "English" and not re.search(rf"(?<!\w){re.escape(n)}(?!\w)", covered)
    ]


def slug(text: str) -> str:
    """ASCII id fragment: 'Kraków' -> 'krakow', 'Rio de Janeiro' -> 'rio-de-janeiro'."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")


# -- instructions ------------------------------------------------------------------------


def span_text(days: int) -> str:
    return "1 day" if days == 1 else f"{days} days"


def render_instruction(
    template: str, *, destination: str, days: int, profile: str, task: str, language: str = ""
) -> str:
    return template.format(
        destination=destination,
        days=days,
        span=span_text(days),
        profile=profile,
        task=task,
        language=language,
    )


def is_question(request: str) -> bool:
    return "?" in request or bool(_QUESTION_START.match(request.strip()))


def _spans(text: str, protected: Sequence[str]) -> list[tuple[int, int]]:
    return [
        (m.start(), m.end())
        for name in protected
        if name
        for m in re.finditer(re.escape(name), text)
    ]


def _outside(text: str, protected: Sequence[str], change: Any) -> str:
    """``change`` applied to the text between protected names, never to them."""
    out, last = [], 0
    for start, end in sorted(_spans(text, protected)):
        if start < last:
            continue
        out += [change(text[last:start]), text[start:end]]
        last = end
    out.append(change(text[last:]))
    return "".join(out)


def _typo(word: str, misspellings: dict[str, str], rng: random.Random) -> str:
    wrong = misspellings.get(word.lower())
    if wrong is not None and rng.random() < 0.6:
        return wrong.capitalize() if word[:1].isupper() else wrong
    i = rng.randrange(1, len(word) - 1)
    op = rng.choice(("swap", "drop", "double"))
    if op == "swap" and word[i] != word[i + 1]:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + word[i + 1 :]


def naturalise(
    request: str,
    *,
    protected: Sequence[str],
    natural: Natural,
    register: str,
    rng: random.Random,
) -> tuple[str, list[str]]:
    """``request`` as a user might type it, and the roughening applied (see module docstring).

    Names in ``protected`` (the destination, a requested language) are never changed."""
    shares = NOISE_SHARES[register]
    applied = ["question"] if is_question(request) else []
    text = request
    if rng.random() < shares.get("context", 0.0):
        applied.append("context")
        if rng.random() < 0.5:
            said = rng.choice(natural.before)
            said = said[:1].upper() + said[1:] if register == "formal" else said
            text = f"{said} {text}"
        else:
            said = rng.choice(natural.after)
            said = said[:1].upper() + said[1:] if register == "formal" or text[-1:] in ".?!" else said
            text = f"{text} {said}" if text[-1:] in ".?!" else f"{text}, {said}"
    if rng.random() < shares.get("typo", 0.0):
        taken = _spans(text, protected)
        words = [
            m
            for m in re.finditer(r"[A-Za-z]+", text)
            if (len(m.group()) >= 4 or m.group().lower() in natural.misspellings)
            and not any(m.start() < end and start < m.end() for start, end in taken)
        ]
        if words:
            applied.append("typo")
            hit = rng.sample(words, min(len(words), 1 if rng.random() < 0.7 else 2))
            for m in sorted(hit, key=lambda m: -m.start()):
                word = m.group()
                wrong = _typo(word, natural.misspellings, rng) if len(word) >= 3 else word
                text = text[: m.start()] + wrong + text[m.end() :]
    if rng.random() < shares.get("lower", 0.0):
        applied.append("lower")
        text = _outside(text, protected, str.lower)
    if rng.random() < shares.get("no_punct", 0.0):
        applied.append("no_punct")
        text = _outside(text, protected, lambda part: re.sub(r"[.?!,']", "", part))
        text = re.sub(r" {2,}", " ", text).strip()
    return text, applied


def uses_profile(template: str) -> bool:
    return "{profile}" in template


# -- envelopes ---------------------------------------------------------------------------

_PROFILE_ASSUMPTION = {
    "solo": "Travelling alone.",
    "couple": "Travelling as a couple.",
    "family": "Travelling with young children.",
    "first_time": "A first visit to {dest}.",
    "student": "Keeping costs as low as possible.",
    "business": "Free time mostly in the evenings.",
    "slow": "A relaxed pace with few activities a day.",
}
_PROFILE_ITEM = {
    "solo": "Copy of your plans shared with someone at home",
    "couple": "Copies of both passports",
    "family": "Snacks, wipes and a small first-aid kit for the children",
    "first_time": "Address of your accommodation written down",
    "student": "Student card for discounts",
    "business": "Laptop charger and a spare adapter",
    "slow": "Refillable water bottle",
}
_PROFILE_TIP = {
    "family": "Look for family tickets at the big sights",
    "student": "Ask for student discounts with a valid card",
    "couple": "Share plates at markets to taste more for less",
    "slow": "A multi-day transport pass pays off only if you ride often",
}


def _amount(pair: Sequence[int], currency: str) -> str:
    return f"{pair[0]:,}-{pair[1]:,} {currency}"


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _pick(rng: random.Random, pool: Sequence[str], low: int, high: int) -> list[str]:
    k = min(len(pool), rng.randint(low, high))
    return rng.sample(list(pool), k)


def _common(
    d: dict[str, Any], profile_id: str | None, profile_text: str | None, rng: random.Random
) -> tuple[list[str], str]:
    if profile_id is None or profile_text is None:
        assumption = "No travel group given; adjust the plan to yours."
    else:
        # profiles added to the phrasings file without a tailored line get a plain one
        fallback = f"Travelling as {profile_text}."
        assumption = _PROFILE_ASSUMPTION.get(profile_id, fallback).format(dest=d["name"])
    season = rng.choice(d["best_seasons"])
    return [assumption], season


def build_envelope(
    d: dict[str, Any],
    payload_type: str,
    *,
    profile_id: str | None,
    profile_text: str | None,
    days: int,
    task_key: str,
    rng: random.Random,
    language: str | None = None,
    phrasebook_items: tuple[int, int | None] = (3, None),
) -> dict[str, Any]:
    """One envelope for destination ``d``; every fact comes from the knowledge base.

    ``language`` (phrasebooks only): the language asked for, when it is not the one the
    knowledge base has phrases for. ``phrasebook_items``: how many phrases a phrasebook lists
    (min, max; None: all), each capped at the destination's list."""
    name = d["name"]
    for_profile = f" for {profile_text}" if profile_text else ""
    assumptions, season = _common(d, profile_id, profile_text, rng)
    sights = list(d["sights"])
    map_step = "Mark {} and {} on an offline map.".format(*rng.sample(sights, 2))
    check_hours = "Check current opening times and prices for the sights you plan to visit."
    if payload_type == "itinerary":
        payload = {"destination": name, "days": _days(d, days, profile_id, rng)}
        first = payload["days"][0]["activities"][0].removeprefix("Visit ")
        summary = rng.choice(
            [
                f"A {span_text(days)} plan for {name}{for_profile}, starting with {first}.",
                f"{span_text(days).capitalize()} in {name}{for_profile}, one day at a time.",
                f"Day-by-day ideas for {span_text(days)} in {name}{for_profile}.",
            ]
        )
        assumptions += _pick(
            rng,
            ["Staying in a central area.", "Moderate walking each day.", f"Visiting in {season}."],
            0,
            1,
        )
        uncertainty = _pick(
            rng,
            [
                "Travel times between sights depend on traffic and crowds.",
                "Opening hours and ticket prices change; check them before you go.",
            ],
            1,
            1,
        )
        next_steps = _pick(
            rng,
            [
                f"{d['transit_payment']}.",
                map_step,
                "Book timed tickets for the busiest sights in advance.",
            ],
            1,
            2,
        )
        verification = [check_hours]
    elif payload_type == "checklist":
        items = [
            f"Plug adapter for type{'s' if len(d['plug_types']) > 1 else ''} {_join(d['plug_types'])}",
            f"Some {d['currency']['name']} ({d['currency']['code']}) in cash and a bank card",
            f"Emergency number saved: {d['emergency'][0]}",
            f"Clothes for {season}",
            "Comfortable walking shoes",
            "Passport and travel insurance details",
            "Phone with offline maps",
        ]
        chosen = items[:2] + rng.sample(items[2:], rng.randint(2, 4))
        if profile_id in _PROFILE_ITEM:
            chosen.append(_PROFILE_ITEM[profile_id])
        rng.shuffle(chosen)
        payload = {"destination": name, "items": chosen}
        summary = rng.choice(
            [
                f"Packing and preparation checklist for {name}{for_profile}.",
                f"What to bring and arrange before travelling to {name}{for_profile}.",
                f"Essentials for a trip to {name}{for_profile}, from plugs to payments.",
            ]
        )
        assumptions += _pick(rng, [f"A trip in {season}.", "A stay of about a week."], 0, 1)
        uncertainty = ["Weather varies; check the forecast a few days before you leave."]
        next_steps = _pick(
            rng, ["Pack a day early and tick off each item.", f"{d['transit_payment']}."], 1, 1
        )
        verification = _pick(
            rng,
            [
                f"Confirm the plug type at your accommodation ({_join(d['plug_types'])}).",
                "Check entry and visa rules for your passport.",
            ],
            1,
            1,
        )
    elif payload_type == "budget":
        b = d["daily_budget"]
        cur = b["currency"]
        low, mid = _amount(b["budget"], cur), _amount(b["mid_range"], cur)
        tips = [
            f"Transport: {_lower_first(d['transit_payment'])}",
            "Eat your main meal at lunchtime or at markets",
            f"Carry some {d['currency']['code']} cash for small purchases",
            "Walk between nearby sights",
        ]
        chosen = rng.sample(tips, rng.randint(1, 3))
        if profile_id in _PROFILE_TIP:
            chosen.append(_PROFILE_TIP[profile_id])
        payload = {
            "destination": name,
            "currency": cur,
            "daily": {"budget": low, "mid_range": mid},
            "tips": chosen,
        }
        summary = rng.choice(
            [
                f"A day in {name} costs roughly {low} on a budget and {mid} mid-range.",
                f"Daily costs in {name}{for_profile}: budget and mid-range ranges per person.",
                f"Typical per-person daily spending in {name}, with ways to save.",
            ]
        )
        assumptions += _pick(
            rng,
            ["Prices per person per day.", "Excludes flights and long-distance transport."],
            1,
            1,
        )
        if cur != d["currency"]["code"]:
            uncertainty = [
                f"Figures are in {cur} because local prices change quickly; you pay in {d['currency']['code']}."
            ]
        else:
            uncertainty = _pick(
                rng,
                ["These are rough estimates; prices change.", "Prices rise in peak season."],
                1,
                1,
            )
        next_steps = ["Set a daily spending limit and track it."]
        verification = _pick(
            rng,
            [
                "Compare current accommodation prices for your dates.",
                f"Check today's exchange rate for {d['currency']['code']}.",
            ],
            1,
            1,
        )
    elif payload_type == "phrasebook":
        phrases = _distinct_meanings(d["phrases"])
        known = d["phrase_language"]
        if language is not None and language != known:
            # a language the knowledge base has no phrases for: a few phrases of the covered
            # language, said to be that, instead of invented ones
            picked = sorted(rng.sample(range(len(phrases)), rng.randint(1, min(3, len(phrases)))))
            payload = {
                "destination": name,
                "language": language,
                "phrases": [
                    {
                        "phrase": phrases[i]["phrase"],
                        "meaning": f"{phrases[i]['meaning']} (in {known})",
                    }
                    for i in picked
                ],
            }
            summary = rng.choice(
                [
                    f"No verified {language} phrases for {name}; a few {known} basics instead.",
                    f"I cannot vouch for {language} phrases, so these are {known} basics for {name}.",
                ]
            )
            assumptions += [f"You speak little or no {language}."]
            uncertainty = [
                f"The {language} phrases could not be verified, so none are given; "
                f"the list holds {known} phrases, which are also understood in {name}."
            ]
            next_steps = [f"Ask a local to teach you a greeting in {language}."]
            verification = [f"Check {language} phrases with a native speaker or a good dictionary."]
        else:
            low, high = phrasebook_items
            high = len(phrases) if high is None else min(high, len(phrases))
            k = rng.randint(min(low, high), high)
            picked = sorted(rng.sample(range(len(phrases)), k))
            payload = {
                "destination": name,
                "language": known,
                "phrases": [
                    {"phrase": phrases[i]["phrase"], "meaning": phrases[i]["meaning"]} for i in picked
                ],
            }
            summary = rng.choice(
                [
                    f"Useful {known} phrases for getting around {name}.",
                    f"A short {known} phrasebook for {name}{for_profile}.",
                    f"Basic {known} expressions that help in {name}.",
                ]
            )
            assumptions += [f"You speak little or no {known}."]
            uncertainty = ["Spelling is simplified and pronunciation varies."]
            next_steps = _pick(
                rng,
                ["Practise the greetings before you arrive.", "Save the phrases on your phone."],
                1,
                1,
            )
            verification = ["Listen to the pronunciation in a dictionary app."]
    elif payload_type == "procedure":
        task = TASKS[task_key]
        steps = _steps(d, task_key, rng)
        payload = {"destination": name, "task": task, "steps": steps}
        summary = rng.choice(
            [
                f"How to {_lower_first(task)} in {name}, step by step.",
                f"Steps to {_lower_first(task)} in {name}{for_profile}.",
                f"{task} in {name}: what to do, in order.",
            ]
        )
        assumptions += _pick(
            rng,
            ["You have a phone with mobile data.", "You carry a bank card that works abroad."],
            0,
            1,
        )
        uncertainty = [
            "Emergency numbers can differ by service; confirm them on arrival."
            if task_key == "emergency"
            else "Fares, rules and apps change; check the current details."
        ]
        next_steps = _pick(
            rng, ["Save these steps offline.", f"Save {d['emergency'][0]} in your phone."], 1, 1
        )
        verification = ["Check the operator's or official website before you travel."]
    else:
        raise InputError(f"payload type {payload_type!r} is not one of {list(PAYLOAD_TYPES)}")
    return {
        "summary": summary,
        "assumptions": assumptions,
        "uncertainty_notes": uncertainty,
        "next_steps": next_steps,
        "verification_steps": verification,
        "payload_type": payload_type,
        "payload": payload,
    }


def _distinct_meanings(phrases: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """The phrase list with one phrase per meaning (the first), in knowledge-base order."""
    seen: set[str] = set()
    out = []
    for p in phrases:
        meaning = " ".join(p["meaning"].casefold().split())
        if meaning not in seen:
            seen.add(meaning)
            out.append(p)
    return out


def _join(values: Sequence[str]) -> str:
    values = list(values)
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


_EXTRAS = [
    "Lunch at a local market",
    "Evening walk and dinner nearby",
    "Coffee break in a quiet square",
    "Sunset at a viewpoint",
    "Try a local speciality for dinner",
    "Free time to rest",
]


def _days(
    d: dict[str, Any], days: int, profile_id: str | None, rng: random.Random
) -> list[dict[str, Any]]:
    """Sights dealt out over the days without repeats; short days get one extra activity."""
    sights = rng.sample(list(d["sights"]), len(d["sights"]))
    extras = rng.sample(_EXTRAS, len(_EXTRAS))
    per_day = 2 if (days >= 2 or profile_id in ("family", "slow")) else 3
    plan = []
    for i in range(days):
        picked = sights[i::days][:per_day]
        activities = [f"Visit {picked[0]}", *picked[1:]]
        if len(picked) < 2 or rng.random() < 0.4:
            activities.append(extras[i % len(extras)])
        title = (
            picked[0] if len(picked) == 1 or rng.random() < 0.5 else f"{picked[0]} and {picked[1]}"
        )
        plan.append({"day": i + 1, "title": title, "activities": activities})
    return plan


def _steps(d: dict[str, Any], task_key: str, rng: random.Random) -> list[str]:
    code, cur_name = d["currency"]["code"], d["currency"]["name"]
    if task_key == "transit_ticket":
        steps = [
            f"Choose your mode: {_lower_first(d['getting_around'][0])} or {_lower_first(d['getting_around'][1])}",
            d["transit_payment"],
            "Keep your ticket or card until the end of the ride",
        ]
        if rng.random() < 0.5:
            steps.insert(2, "Ask staff or check the operator's app if unsure about fares")
    elif task_key == "airport":
        steps = [
            "Follow the signs for onward transport",
            f"Take {d['airport_transfer']}",
            f"Have {code} or a bank card ready to pay",
        ]
        if rng.random() < 0.5:
            steps.append("Check the last departure if you land late")
    elif task_key == "emergency":
        steps = [
            f"Call {_join(d['emergency'])}",
            "Say where you are: street, landmark or map pin",
            "Explain what happened and follow the operator's instructions",
        ]
        if rng.random() < 0.5:
            steps.append("Contact your insurer or embassy afterwards")
    elif task_key == "money":
        steps = [
            f"Pay in {cur_name} ({code})",
            "Withdraw cash from bank ATMs rather than exchange kiosks",
            "Keep small notes for markets and tips",
        ]
        if rng.random() < 0.5:
            steps.insert(1, "Tell your bank you are travelling")
    elif task_key == "power":
        plugs = _join(d["plug_types"])
        steps = [
            f"Check the sockets: {d['name']} uses plug type{'s' if len(d['plug_types']) > 1 else ''} {plugs}",
            "Bring a matching adapter or a universal one",
            "Check that your chargers accept the local voltage",
        ]
    else:
        raise InputError(f"task {task_key!r} is not one of {sorted(TASKS)}")
    return steps


# -- expansion ---------------------------------------------------------------------------


def template_examples(
    destinations: Sequence[dict[str, Any]],
    phrasings: Phrasings,
    *,
    seed: int,
    variants: int,
    split: str = "train",
    days_range: tuple[int, int] = (1, 4),
    natural_fraction: float = 0.0,
    uncovered_language_variants: int = 0,
    phrasebook_items: tuple[int, int | None] = (3, None),
) -> list[Example]:
    """Deterministic expansion over destinations x payload types x variants (see module docstring).

    ``destinations`` is the whole knowledge base (its phrase lists decide which languages are
    uncovered); only those of ``split`` are expanded."""
    natural = phrasings.natural
    if natural is None and (natural_fraction > 0 or uncovered_language_variants > 0):
        raise InputError(
            "generate.sources.template.natural_fraction / uncovered_language_variants: "
            f"{natural_fraction} / {uncovered_language_variants} need a 'natural' section in the "
            "phrasings file (set both to 0 to use the formal templates only)"
        )
    examples = []
    task_keys = sorted(phrasings.tasks)
    for d in destinations:
        if d["split"] != split:
            continue
        for ptype in PAYLOAD_TYPES:
            templates = phrasings.templates[ptype]
            base_rng = random.Random(f"{seed}:{d['name']}:{ptype}")
            chosen = list(
                zip(
                    _spread(base_rng, len(templates), variants),
                    _spread(base_rng, len(phrasings.profiles), variants),
                    strict=True,
                )
            )
            task_offset = base_rng.randrange(len(task_keys))
            # the register draw has its own generator: formal examples stay as they were
            register_rng = random.Random(f"{seed}:{d['name']}:{ptype}:register")
            casual = [register_rng.random() < natural_fraction for _ in range(variants)]
            casual_index = (
                _spread(register_rng, len(natural.templates[ptype]), variants) if natural else []
            )
            for k, (t_index, p_index) in enumerate(chosen):
                rng = random.Random(f"{seed}:{d['name']}:{ptype}:{k}")
                register = "casual" if casual[k] else "formal"
                if natural is not None and casual[k]:
                    template = natural.templates[ptype][casual_index[k]]
                    phrasing = f"{ptype}/natural/{casual_index[k]}"
                else:
                    template = templates[t_index]
                    phrasing = f"{ptype}/{t_index}"
                profile_id, profile_text = phrasings.profiles[p_index]
                if not uses_profile(template):
                    profile_id, profile_text = None, None
                days = rng.randint(*days_range)
                task_key = task_keys[(k + task_offset) % len(task_keys)]
                wordings = natural.tasks if (natural is not None and casual[k]) else phrasings.tasks
                task_text = rng.choice(wordings[task_key])
                said_profile = profile_text or ""
                if natural is not None and casual[k] and profile_id is not None:
                    said_profile = natural.profiles[profile_id]
                instruction = render_instruction(
                    template,
                    destination=d["name"],
                    days=days,
                    profile=said_profile,
                    task=task_text,
                )
                style: list[str] = []
                if natural is not None:
                    instruction, style = naturalise(
                        instruction,
                        protected=[d["name"]],
                        natural=natural,
                        register=register,
                        rng=random.Random(f"{seed}:{d['name']}:{ptype}:{k}:style"),
                    )
                envelope = build_envelope(
                    d,
                    ptype,
                    profile_id=profile_id,
                    profile_text=profile_text,
                    days=days,
                    task_key=task_key,
                    rng=rng,
                    phrasebook_items=phrasebook_items,
                )
                examples.append(
                    Example(
                        key=f"{slug(d['name'])}-{ptype}-{k}",
                        instruction=instruction,
                        envelope=envelope,
                        payload_type=ptype,
                        destination=d["name"],
                        phrasing=phrasing,
                        profile=profile_id,
                        register=register,
                        style="+".join(style) or "plain",
                    )
                )
        if natural is not None and uncovered_language_variants:
            examples += _uncovered_language_examples(
                d, destinations, natural, seed=seed, variants=uncovered_language_variants,
                natural_fraction=natural_fraction,
            )
    return examples


def _uncovered_language_examples(
    d: dict[str, Any],
    destinations: Sequence[dict[str, Any]],
    natural: Natural,
    *,
    seed: int,
    variants: int,
    natural_fraction: float,
) -> list[Example]:
    """Phrasebook requests naming a language the knowledge base has no phrases for."""
    out = []
    templates = natural.language_templates
    for language in uncovered_languages(d, destinations):
        base_rng = random.Random(f"{seed}:{d['name']}:phrasebook:{language}")
        for k, t_index in enumerate(_spread(base_rng, len(templates), variants)):
            rng = random.Random(f"{seed}:{d['name']}:phrasebook:{language}:{k}")
            register = "casual" if base_rng.random() < natural_fraction else "formal"
            instruction = render_instruction(
                templates[t_index], destination=d["name"], days=1, profile="", task="", language=language
            )
            instruction, style = naturalise(
                instruction,
                protected=[d["name"], language],
                natural=natural,
                register=register,
                rng=random.Random(f"{seed}:{d['name']}:phrasebook:{language}:{k}:style"),
            )
            envelope = build_envelope(
                d, "phrasebook", profile_id=None, profile_text=None, days=1, task_key="",
                rng=rng, language=language,
            )
            out.append(
                Example(
                    key=f"{slug(d['name'])}-phrasebook-{slug(language)}-{k}",
                    instruction=instruction,
                    envelope=envelope,
                    payload_type="phrasebook",
                    destination=d["name"],
                    phrasing=f"phrasebook/language/{t_index}",
                    profile=None,
                    register=register,
                    style="+".join(["uncovered_language", *style]),
                )
            )
    return out


def _spread(rng: random.Random, n: int, k: int) -> list[int]:
    """k indices below n: distinct while possible, then repeated in a fresh shuffle."""
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(n), min(n, k - len(out)))
    return out
