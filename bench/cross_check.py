"""Which probe outputs of other runs are byte-identical to the committed run's.

For each results directory (as bench/full_suites.py writes them: reports/probe/<suite>/
<model>.samples.jsonl), every prompt the committed run probed (reports/probe/, the default
subsets) is looked up by id and its output compared. Prints a Markdown table.

    python bench/cross_check.py bench/results/full_suites bench/results/cross_cpu
"""

from __future__ import annotations

import sys
from pathlib import Path

from tuneline.records import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def outputs(path: Path) -> dict[str, str]:
    """id -> output of a probe samples file, read by the project's strict JSONL reader."""
    return {s["id"]: s["output"] for s in read_jsonl(path)}


def main() -> None:
    committed = ROOT / "reports" / "probe"
    print("| results | suite | model | same output as the committed run |")
    print("|---|---|---|---:|")
    for other in map(Path, sys.argv[1:]):
        for samples in sorted((other / "reports" / "probe").glob("*/*.samples.jsonl")):
            mine = committed / samples.parent.name / samples.name
            if not mine.is_file():
                continue
            ours, theirs = outputs(mine), outputs(samples)
            missing = [i for i in ours if i not in theirs]
            if missing:
                raise SystemExit(f"{samples}: {len(missing)} of the committed prompts are missing, e.g. {missing[0]}")
            same = sum(ours[i] == theirs[i] for i in ours)
            model = samples.name.removesuffix(".samples.jsonl")
            print(f"| {other} | {samples.parent.name} | {model} | {same}/{len(ours)} |")


if __name__ == "__main__":
    main()
