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
class Phrasings:
    profiles: tuple[tuple[str, str], ...]  # (id, text)
    tasks: dict[str, tuple[str, ...]]  # task key -> wordings
    templates: dict[str, tuple[str, ...]]  # payload type -> templates


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
            names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            if not names <= PLACEHOLDERS:
                raise InputError(
                    f"{path}: templates.{ptype}[{i}]: unknown placeholder(s) {sorted(names - PLACEHOLDERS)} "
                    f"(allowed: {sorted(PLACEHOLDERS)})"
                )
            if "destination" not in names:
                raise InputError(f"{path}: templates.{ptype}[{i}]: must contain {{destination}}")
            if ptype == "procedure" and "task" not in names:
                raise InputError(f"{path}: templates.procedure[{i}]: must contain {{task}}")
        templates[ptype] = tuple(found)
    unknown = sorted(set(data["templates"]) - set(PAYLOAD_TYPES))
    if unknown:
        raise InputError(
            f"{path}: templates: unknown payload type(s) {unknown} (allowed: {list(PAYLOAD_TYPES)})"
        )
    if not tasks:
        raise InputError(f"{path}: tasks: at least one task is needed for procedure prompts")
    return Phrasings(profiles=tuple(profiles), tasks=tasks, templates=templates)


def slug(text: str) -> str:
    """ASCII id fragment: 'Kraków' -> 'krakow', 'Rio de Janeiro' -> 'rio-de-janeiro'."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", folded.lower()).strip("-")


# -- instructions ------------------------------------------------------------------------


def span_text(days: int) -> str:
    return "1 day" if days == 1 else f"{days} days"


def render_instruction(
    template: str, *, destination: str, days: int, profile: str, task: str
) -> str:
    return template.format(
        destination=destination, days=days, span=span_text(days), profile=profile, task=task
    )


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
) -> dict[str, Any]:
    """One envelope for destination ``d``; every fact comes from the knowledge base."""
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
        phrases = d["phrases"]
        k = rng.randint(min(4, len(phrases)), min(6, len(phrases)))
        picked = sorted(rng.sample(range(len(phrases)), k))
        payload = {
            "destination": name,
            "language": d["phrase_language"],
            "phrases": [
                {"phrase": phrases[i]["phrase"], "meaning": phrases[i]["meaning"]} for i in picked
            ],
        }
        lang = d["phrase_language"]
        summary = rng.choice(
            [
                f"Useful {lang} phrases for getting around {name}.",
                f"A short {lang} phrasebook for {name}{for_profile}.",
                f"Basic {lang} expressions that help in {name}.",
            ]
        )
        assumptions += [f"You speak little or no {lang}."]
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
) -> list[Example]:
    """Deterministic expansion over destinations x payload types x variants (see module docstring)."""
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
            for k, (t_index, p_index) in enumerate(chosen):
                rng = random.Random(f"{seed}:{d['name']}:{ptype}:{k}")
                template = templates[t_index]
                profile_id, profile_text = phrasings.profiles[p_index]
                if not uses_profile(template):
                    profile_id, profile_text = None, None
                days = rng.randint(*days_range)
                task_key = task_keys[(k + task_offset) % len(task_keys)]
                task_text = rng.choice(phrasings.tasks[task_key])
                instruction = render_instruction(
                    template,
                    destination=d["name"],
                    days=days,
                    profile=profile_text or "",
                    task=task_text,
                )
                envelope = build_envelope(
                    d,
                    ptype,
                    profile_id=profile_id,
                    profile_text=profile_text,
                    days=days,
                    task_key=task_key,
                    rng=rng,
                )
                examples.append(
                    Example(
                        key=f"{slug(d['name'])}-{ptype}-{k}",
                        instruction=instruction,
                        envelope=envelope,
                        payload_type=ptype,
                        destination=d["name"],
                        phrasing=f"{ptype}/{t_index}",
                        profile=profile_id,
                    )
                )
    return examples


def _spread(rng: random.Random, n: int, k: int) -> list[int]:
    """k indices below n: distinct while possible, then repeated in a fresh shuffle."""
    out: list[int] = []
    while len(out) < k:
        out += rng.sample(range(n), min(n, k - len(out)))
    return out
