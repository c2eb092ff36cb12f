"""Build the held-out probe suite (``data/seed/probe_suite.jsonl``) for the default task.

The suite is a git-tracked seed file; this module is how it was made and how to remake it
after editing the knowledge base or the probe phrasings::

    python -m tuneline.datagen.probe_suite [--out data/seed/probe_suite.jsonl]

Prompts use only ``split: probe`` destinations and ``probe_phrasings.json`` (templates,
profiles and task wordings that training never uses). Every destination gets ``per_pair``
prompts per payload type, and every record carries ``expect`` (the payload type asked for
and the destination), which ``contract.task_checks`` scores.

Order: records are sorted by (variant, destination, payload type), so any prefix of the
file is stratified over payload types, and the first (#destinations x 5) records ask each
probe destination once for each payload type. A probe ``limit`` of N therefore takes a
stratified subset by reading the first N records.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
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
from tuneline.records import write_jsonl

SUITE_SEED = 20251122
PER_PAIR = 4
PROBE_DAYS = (2, 4)


def build_probe_suite(
    destinations: Sequence[dict[str, Any]],
    phrasings: Phrasings,
    *,
    per_pair: int = PER_PAIR,
    seed: int = SUITE_SEED,
) -> list[dict[str, Any]]:
    held_out = [d for d in destinations if d["split"] == "probe"]
    task_keys = sorted(phrasings.tasks)
    records = []
    for k in range(per_pair):
        for di, d in enumerate(held_out):
            for ptype in PAYLOAD_TYPES:
                rng = random.Random(f"{seed}:{d['name']}:{ptype}:{k}")
                templates = phrasings.templates[ptype]
                t_index = (di * per_pair + k) % len(templates)
                profile_id, profile_text = rng.choice(phrasings.profiles)
                task_key = task_keys[(di + k) % len(task_keys)]
                task_text = rng.choice(phrasings.tasks[task_key])
                days = rng.randint(*PROBE_DAYS)
                template = templates[t_index]
                instruction = render_instruction(
                    template, destination=d["name"], days=days, profile=profile_text, task=task_text
                )
                meta: dict[str, Any] = {
                    "destination": d["name"],
                    "payload_type": ptype,
                    "phrasing": f"{ptype}/{t_index}",
                    "region": d["region"],
                }
                if "{profile}" in template:
                    meta["profile"] = profile_id
                if ptype == "procedure":
                    meta["task"] = task_key
                if ptype == "itinerary":
                    meta["days"] = days
                records.append(
                    {
                        "id": f"probe-{slug(d['name'])}-{ptype}-{k}",
                        "instruction": instruction,
                        "expect": {"payload_type": ptype, "payload.destination": d["name"]},
                        "meta": meta,
                    }
                )
    return records


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-dir", default="data/seed")
    parser.add_argument("--out", default=None, help="default: <seed-dir>/probe_suite.jsonl")
    args = parser.parse_args(argv)
    seed_dir = Path(args.seed_dir)
    suite = build_probe_suite(
        load_destinations(seed_dir / "destinations.jsonl"),
        load_phrasings(seed_dir / "probe_phrasings.json"),
    )
    out = Path(args.out) if args.out else seed_dir / "probe_suite.jsonl"
    print(f"{out}: {write_jsonl(out, suite)} probe prompts")


if __name__ == "__main__":
    main()
