"""Probe trained models on the whole of every probe suite, where the default run probes subsets.

The same stages as the default run (``tuneline base``, ``tuneline probe <model>`` for every
``probe.models`` entry, ``tuneline compare``) in a workspace of their own, with
``probe.suites.*.limit: null`` and the given adapters: the models a version committed
(``models/sft``, ``models/dpo``, e.g. from ``dvc pull`` or a copy of that run's outputs).
It is what ``dvc exp run -S probe.suites.heldout.limit=null -S
probe.suites.natural.limit=null`` measures, without git or DVC on the machine, so a GPU
host can do it in minutes. The metrics, compare report and samples go to ``--out``.

    python bench/full_suites.py --sft models/sft --dpo models/dpo --root /tmp/full \\
        --out bench/results/full_suites [--set probe.batch_size=130]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import yaml
from dev_sweep import ROOT, override, tuneline, workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, type=Path, help="the sft adapter directory")
    ap.add_argument("--dpo", required=True, type=Path, help="the dpo adapter directory")
    ap.add_argument("--root", required=True, type=Path, help="where the workspace goes")
    ap.add_argument("--out", required=True, type=Path, help="metrics and reports are copied here")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=JSON value, e.g. probe.batch_size=130")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--models", nargs="*", help="probe.models names to probe, in this order (default: all)")
    args = ap.parse_args()

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for suite in params["probe"]["suites"].values():
        suite["limit"] = None
    for item in args.set:
        key, _, value = item.partition("=")
        override(params, key, json.loads(value))
    ws = workspace(args.root, "full", params, None)
    for name, src in (("sft", args.sft), ("dpo", args.dpo)):
        link = ws / "models" / name
        if not link.exists():
            link.symlink_to(src.resolve())
    log = ws / "log.txt"
    seconds = {"base": tuneline("base", ws, log, args.threads)}
    for model in args.models or params["probe"]["models"]:
        seconds[f"probe {model}"] = tuneline(["probe", model], ws, log, args.threads)
    if not args.models:  # compare needs every model
        seconds["compare"] = tuneline("compare", ws, log, args.threads)

    args.out.mkdir(parents=True, exist_ok=True)
    for part in ("metrics/probe", "reports/probe", "reports/provenance/probe"):  # the last: the run records
        if (args.out / part).exists():
            shutil.rmtree(args.out / part)
        if (ws / part).exists():
            shutil.copytree(ws / part, args.out / part)
    for name in ("metrics/compare.json", "reports/compare.md", "reports/compare_rates.json"):
        if not (ws / name).exists():
            continue
        (args.out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ws / name, args.out / name)
    (args.out / "seconds.json").write_text(json.dumps({k: round(v, 1) for k, v in seconds.items()}, indent=1) + "\n")
    print(json.dumps(seconds))


if __name__ == "__main__":
    main()
