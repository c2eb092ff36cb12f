"""Build the prompt suites of the default task from the knowledge base and phrasings files.

The suites are git-tracked seed files; this module is how they were made and how to remake
them after editing the knowledge base or a phrasings file::

    python -m tuneline.datagen.probe_suite [--seed-dir data/seed] [--out-dir DIR]

- ``probe_suite.jsonl`` (ids ``probe-``, the ``heldout`` probe suite): ``split: probe``
  destinations worded with ``probe_phrasings.json``, ``PER_PAIR`` prompts per destination
  and payload type, all in a formal register;
- ``natural_suite.jsonl`` (ids ``natural-``, the ``natural`` probe suite): the same
  destinations worded the way people type, from ``natural_phrasings.json``: a casual and a
  formal prompt per destination and payload type. Casual templates are lower case with
  loose punctuation, and each typo-able word of the request (``typos``) is misspelled with
  probability ``TYPO_P``; a request may get a sentence of context before or after it. Typos
  are applied before the destination is put in, so the destination is always verbatim;
- ``dev_suite.jsonl`` (ids ``dev-``): the ``split: dev`` destinations, for tuning and
  learning curves only (never probed for results), one prompt per destination and payload
  type in each style: the first probe-style (``probe_phrasings.json``), the second natural.

Every record is ``{id, instruction, expect, meta}``: ``expect`` (the payload type asked
for and the destination) is what ``contract.task_checks`` scores; ``meta`` says how it was
worded (``phrasing``; in the natural and dev suites ``register``, ``formal`` or ``casual``,
and in the dev suite ``style``, ``heldout`` or ``natural``; the held-out suite is formal).

Order: records are sorted by (variant, destination, payload type), so any prefix of a
file is stratified over payload types, and the first (#destinations x 5) records ask each
destination once for each payload type.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.datagen.travel import (
    PAYLOAD_TYPES,
    Phrasings,
    load_destinations,
    load_phrasings,
    render_instruction,
    slug,
)
from tuneline.errors import InputError
from tuneline.records import read_json, write_jsonl

SUITE_SEED = 20251122
PER_PAIR = 4
NATURAL_PER_PAIR = 2
PROBE_DAYS = (2, 4)
TYPO_P = 0.6
REGISTERS = ("casual", "formal")
CONTEXT_PLACES = ("none", "before", "after")

# suite name -> its file in the seed directory (``build_all``)
SUITE_FILES = {"heldout": "probe_suite.jsonl", "natural": "natural_suite.jsonl", "dev": "dev_suite.jsonl"}


@dataclass(frozen=True)
class NaturalPhrasings:
    """``natural_phrasings.json``: phrasings plus typos and context sentences per register."""

    phrasings: Phrasings
    typos: dict[str, str]  # word -> its misspelling
    contexts: dict[str, dict[str, tuple[str, ...]]]  # register -> before/after -> sentences

    def templates(self, ptype: str, register: str) -> list[tuple[int, str]]:
        """(index, template) of one payload type in one register (its first letter's case)."""
        return [
            (i, t) for i, t in enumerate(self.phrasings.templates[ptype]) if register_of(t) == register
        ]


def register_of(template: str) -> str:
    """``casual`` for a template starting in lower case, ``formal`` otherwise."""
    return "casual" if template[:1].islower() else "formal"


def load_natural_phrasings(path: str | Path) -> NaturalPhrasings:
    """Read and check ``natural_phrasings.json``: every payload type has templates in both
    registers, typos map words to other words, contexts exist for both registers."""
    phrasings = load_phrasings(path)
    data = read_json(path)
    typos = data.get("typos")
    if not isinstance(typos, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and k and v and k != v for k, v in typos.items()
    ):
        raise InputError(f"{path}: typos must be an object of word -> a different misspelling")
    contexts = data.get("contexts")
    found: dict[str, dict[str, tuple[str, ...]]] = {}
    for register in REGISTERS:
        places = contexts.get(register) if isinstance(contexts, dict) else None
        if not isinstance(places, dict):
            raise InputError(f"{path}: contexts.{register} must be an object with 'before' and 'after' lists")
        found[register] = {}
        for place in CONTEXT_PLACES[1:]:
            sentences = places.get(place)
            if not sentences or not all(isinstance(s, str) and s for s in sentences):
                raise InputError(f"{path}: contexts.{register}.{place} must be a non-empty list of strings")
            found[register][place] = tuple(sentences)
    natural = NaturalPhrasings(phrasings=phrasings, typos=dict(typos), contexts=found)
    for ptype in PAYLOAD_TYPES:
        for register in REGISTERS:
            if not natural.templates(ptype, register):
                raise InputError(
                    f"{path}: templates.{ptype}: no {register} template (casual ones start in lower case, "
                    "formal ones with a capital)"
                )
    return natural


def apply_typos(text: str, typos: dict[str, str], rng: random.Random) -> tuple[str, list[str]]:
    """Misspell each typo-able word of ``text`` with probability ``TYPO_P``; placeholders
    (``{destination}``) are never words of the map. Returns the text and the words changed."""
    changed: list[str] = []
    pattern = re.compile(r"(?<![\w'{])(" + "|".join(map(re.escape, sorted(typos, key=len, reverse=True))) + r")(?![\w'}])")

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        if rng.random() < TYPO_P:
            changed.append(word)
            return typos[word]
        return word

    return pattern.sub(swap, text), changed


def _meta(d: dict[str, Any], ptype: str, template: str, phrasing: str, profile_id: str, task_key: str,
          days: int) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "destination": d["name"],
        "payload_type": ptype,
        "phrasing": phrasing,
        "region": d["region"],
    }
    if "{profile}" in template:
        meta["profile"] = profile_id
    if ptype == "procedure":
        meta["task"] = task_key
    if ptype == "itinerary":
        meta["days"] = days
    return meta


def _record(prefix: str, d: dict[str, Any], ptype: str, k: int, instruction: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{slug(d['name'])}-{ptype}-{k}",
        "instruction": instruction,
        "expect": {"payload_type": ptype, "payload.destination": d["name"]},
        "meta": meta,
    }


def probe_style_record(
    d: dict[str, Any], di: int, ptype: str, k: int, phrasings: Phrasings, *, per_pair: int, seed: int, prefix: str
) -> dict[str, Any]:
    """One probe-style prompt (``probe_phrasings.json``; its register is formal)."""
    task_keys = sorted(phrasings.tasks)
    rng = random.Random(f"{seed}:{d['name']}:{ptype}:{k}")
    templates = phrasings.templates[ptype]
    t_index = (di * per_pair + k) % len(templates)
    profile_id, profile_text = rng.choice(phrasings.profiles)
    task_key = task_keys[(di + k) % len(task_keys)]
    task_text = rng.choice(phrasings.tasks[task_key])
    days = rng.randint(*PROBE_DAYS)
    template = templates[t_index]
    instruction = render_instruction(template, destination=d["name"], days=days, profile=profile_text, task=task_text)
    meta = _meta(d, ptype, template, f"{ptype}/{t_index}", profile_id, task_key, days)
    return _record(prefix, d, ptype, k, instruction, meta)


def natural_record(
    d: dict[str, Any], di: int, ptype: str, k: int, natural: NaturalPhrasings, *, seed: int, prefix: str
) -> dict[str, Any]:
    """One natural prompt: the register alternates over (destination, payload type,
    variant); casual ones get typos; either may get a context sentence before or after."""
    phrasings = natural.phrasings
    rng = random.Random(f"{seed}:natural:{d['name']}:{ptype}:{k}")
    register = REGISTERS[(di + PAYLOAD_TYPES.index(ptype) + k) % 2]
    t_index, template = rng.choice(natural.templates(ptype, register))
    profile_id, profile_text = rng.choice(phrasings.profiles)
    task_keys = sorted(phrasings.tasks)
    task_key = task_keys[(di + k) % len(task_keys)]
    task_text = rng.choice(phrasings.tasks[task_key])
    days = rng.randint(*PROBE_DAYS)
    place = rng.choice(CONTEXT_PLACES)
    request = template
    if place != "none":
        sentence = rng.choice(natural.contexts[register][place])
        request = f"{sentence} {template}" if place == "before" else f"{template} {sentence}"
    # everything but the destination first, so that typos can never reach it
    text = render_instruction(request, destination="{destination}", days=days, profile=profile_text, task=task_text)
    typos: list[str] = []
    if register == "casual":
        text, typos = apply_typos(text, natural.typos, rng)
    instruction = text.replace("{destination}", d["name"])
    meta = _meta(d, ptype, template, f"{ptype}/{t_index}", profile_id, task_key, days)
    meta["register"] = register
    meta["context"] = place
    if typos:
        meta["typos"] = typos
    return _record(prefix, d, ptype, k, instruction, meta)


def _build(
    destinations: Sequence[dict[str, Any]], split: str, per_pair: int, make: Callable[[dict[str, Any], int, str, int], dict[str, Any]]
) -> list[dict[str, Any]]:
    chosen = [d for d in destinations if d["split"] == split]
    return [make(d, di, ptype, k) for k in range(per_pair) for di, d in enumerate(chosen) for ptype in PAYLOAD_TYPES]


def build_probe_suite(
    destinations: Sequence[dict[str, Any]],
    phrasings: Phrasings,
    *,
    per_pair: int = PER_PAIR,
    seed: int = SUITE_SEED,
) -> list[dict[str, Any]]:
    """The held-out suite: ``split: probe`` destinations, probe phrasings."""
    return _build(
        destinations, "probe", per_pair,
        lambda d, di, ptype, k: probe_style_record(d, di, ptype, k, phrasings, per_pair=per_pair, seed=seed,
                                                   prefix="probe"),
    )


def build_natural_suite(
    destinations: Sequence[dict[str, Any]],
    natural: NaturalPhrasings,
    *,
    per_pair: int = NATURAL_PER_PAIR,
    seed: int = SUITE_SEED,
) -> list[dict[str, Any]]:
    """The natural-prompt suite: ``split: probe`` destinations, natural phrasings."""
    return _build(
        destinations, "probe", per_pair,
        lambda d, di, ptype, k: natural_record(d, di, ptype, k, natural, seed=seed, prefix="natural"),
    )


def build_dev_suite(
    destinations: Sequence[dict[str, Any]],
    phrasings: Phrasings,
    natural: NaturalPhrasings,
    *,
    seed: int = SUITE_SEED,
) -> list[dict[str, Any]]:
    """The development suite: ``split: dev`` destinations; variant 0 probe-style, 1 natural."""

    def make(d: dict[str, Any], di: int, ptype: str, k: int) -> dict[str, Any]:
        if k == 0:
            record = probe_style_record(d, di, ptype, k, phrasings, per_pair=2, seed=seed, prefix="dev")
            record["meta"]["register"] = "formal"
        else:
            record = natural_record(d, di, ptype, k, natural, seed=seed, prefix="dev")
        record["meta"]["style"] = "heldout" if k == 0 else "natural"
        return record

    return _build(destinations, "dev", 2, make)


def build_all(seed_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every suite of ``SUITE_FILES`` from the seed directory's knowledge base and phrasings."""
    seed_dir = Path(seed_dir)
    destinations = load_destinations(seed_dir / "destinations.jsonl")
    probe = load_phrasings(seed_dir / "probe_phrasings.json")
    natural = load_natural_phrasings(seed_dir / "natural_phrasings.json")
    return {
        "heldout": build_probe_suite(destinations, probe),
        "natural": build_natural_suite(destinations, natural),
        "dev": build_dev_suite(destinations, probe, natural),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-dir", default="data/seed")
    parser.add_argument("--out-dir", default=None, help="default: the seed directory")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir or args.seed_dir)
    for name, suite in build_all(args.seed_dir).items():
        out = out_dir / SUITE_FILES[name]
        print(f"{out}: {write_jsonl(out, suite)} {name} prompts")


if __name__ == "__main__":
    main()
