"""Count the probe outputs of each run of bench/isa_repro.sh that differ from the native run
of the same dtype. Usage: python bench/isa_summary.py OUT_DIR"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from tuneline.records import read_jsonl


def outputs(path: Path) -> dict[str, str]:
    """id -> output of a probe samples file, read by the project's strict JSONL reader."""
    return {s["id"]: s["output"] for s in read_jsonl(path)}


def main() -> None:
    out = Path(sys.argv[1])
    rows = list(csv.DictReader((out / "isa_repro.tsv").open(encoding="utf-8"), delimiter="\t"))
    print("| dtype | setting | sft adapter | dpo adapter | probe@base | probe@sft | probe@dpo | seconds |")
    print("|---|---|---|---|---|---|---|---:|")
    for row in rows:
        ref = next(r for r in rows if r["dtype"] == row["dtype"] and r["setting"] == "native")
        cells = []
        for key in ("sft_adapter", "dpo_adapter"):
            cells.append("same" if row[key] == ref[key] else "differs")
        for model in ("base", "sft", "dpo"):
            mine = outputs(out / f"{row['dtype']}-{row['setting']}" / f"{model}.samples.jsonl")
            native = outputs(out / f"{ref['dtype']}-native" / f"{model}.samples.jsonl")
            differ = sum(mine[i] != native[i] for i in native)
            cells.append(f"{len(native) - differ}/{len(native)} same")
        print(f"| {row['dtype']} | {row['setting']} | " + " | ".join(cells) + f" | {row['seconds']} |")


if __name__ == "__main__":
    main()
