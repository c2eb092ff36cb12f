"""Training records: a strict JSONL read with a seeded subsample, in file order."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tuneline.records import TypeSpec, read_jsonl


def read_sample(path: Path, required: dict[str, TypeSpec], limit: int | None, seed: int) -> list[dict[str, Any]]:
    """The records of ``path`` (each with its ``_line``), or ``limit`` of them drawn with
    ``seed`` and kept in file order."""
    records = read_jsonl(path, required=required)
    for number, record in enumerate(records, start=1):
        record["_line"] = number
    if limit is not None and limit < len(records):
        records = sorted(random.Random(seed).sample(records, limit), key=lambda r: r["_line"])
    return records
