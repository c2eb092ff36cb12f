"""Choose hyperparameters and data mixes on the development suite, never on a probe suite.

Each configuration is the project's params.yaml with dotted overrides. It runs the real
stages (``tuneline generate``, ``clean``, ``sft``, ``pairs``, ``dpo``) in a workspace of its
own under ``--root``, sharing one converted base model, with the contract's learning curve
on the whole development suite (``paths.dev_suite``, destinations in neither probe suite).
The score of a configuration is the curve's last point after sft and after dpo
(``metrics/<stage>/plots/metrics/curve/*.tsv``); the probe suites are not read.

    python bench/dev_sweep.py --grid bench/grids/dev.json --root /tmp/sweep --jobs 4 \\
        --out bench/results/dev_sweep.json

A grid is a JSON list of ``{"name": ..., "set": {"sft.trainer.learning_rate": 0.004}}``;
every configuration also gets ``--common`` overrides (the curve settings below by default).
Runs on whatever ``model.device: auto`` finds: one GPU takes several configurations at once.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "clean", "sft", "pairs", "dpo")
CURVE = {  # the whole development suite, a few points per stage
    "sft.curve.limit": None, "sft.curve.every_n_steps": 42, "sft.curve.batch_size": 50,
    "dpo.curve.limit": None, "dpo.curve.every_n_steps": 1000, "dpo.curve.batch_size": 50,
}
KEYS = ("schema_valid_rate", "payload_type_accuracy", "parse_rate", "truncated_rate")


def override(params: dict[str, Any], dotted: str, value: Any) -> None:
    node = params
    *head, last = dotted.split(".")
    for part in head:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"--grid: {dotted}: no section {part!r} in params.yaml")
        node = node[part]
    if last not in node and head[-1:] not in (["trainer"], ["extra"]):  # those take any field of their library
        raise SystemExit(f"--grid: {dotted}: no key {last!r} in params.yaml")
    node[last] = value


def tuneline(stage: str | list[str], cwd: Path, log: Path, threads: int) -> float:
    """Run ``tuneline <stage>`` (or ``tuneline *stage``) in ``cwd``, its output appended to ``log``."""
    argv = [stage] if isinstance(stage, str) else list(stage)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n=== {' '.join(argv)}\n")
        fh.flush()
        done = subprocess.run([sys.executable, "-c", "from tuneline.cli import main; main()", *argv],
                              cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"{cwd.name}: tuneline {' '.join(argv)} exited {done.returncode} (see {log})")
    return time.perf_counter() - start


def curve(ws: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    from tuneline.curves import read_curve

    out = {}
    for key in KEYS:
        rows = read_curve(ws / "metrics" / stage / "plots" / "metrics" / "curve" / f"{key}.tsv")
        if rows:
            out[key] = [(int(step), value) for step, value in rows]
    return out


def workspace(root: Path, name: str, params: dict[str, Any], base: Path | None) -> Path:
    ws = root / name
    (ws / "data").mkdir(parents=True, exist_ok=True)
    (ws / "models").mkdir(exist_ok=True)
    seed = ws / "data" / "seed"
    if not seed.exists():
        seed.symlink_to(ROOT / "data" / "seed")
    if base is not None and not (ws / "models" / "base").exists():
        (ws / "models" / "base").symlink_to(base)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return ws


def run_one(root: Path, config: dict[str, Any], defaults: dict[str, Any], common: dict[str, Any],
            base: Path, threads: int, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    params = copy.deepcopy(defaults)
    for key, value in {**common, **config.get("set", {})}.items():
        override(params, key, value)
    ws = workspace(root, config["name"], params, base)
    log = ws / "log.txt"
    seconds = {}
    try:
        for stage in stages:
            seconds[stage] = round(tuneline(stage, ws, log, threads), 1)
    except RuntimeError as exc:
        return {"name": config["name"], "set": config.get("set", {}), "error": str(exc), "seconds": seconds}
    result = {"name": config["name"], "set": config.get("set", {}), "seconds": seconds}
    for stage in ("sft", "dpo"):
        if stage not in stages:
            continue
        points = curve(ws, stage)
        result[stage] = {key: pts[-1][1] for key, pts in points.items()}
        result[stage]["curve"] = points.get("schema_valid_rate", [])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", required=True, help="JSON file: [{name, set: {dotted.key: value}}]")
    ap.add_argument("--root", required=True, type=Path, help="where the workspaces go")
    ap.add_argument("--jobs", type=int, default=1, help="configurations at once")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per configuration")
    ap.add_argument("--common", default=json.dumps(CURVE), help="JSON overrides for every configuration")
    ap.add_argument("--only", nargs="*", help="names of the grid to run")
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    ap.add_argument("--until", choices=STAGES[2:], default=STAGES[-1],
                    help="the last stage to run (sft: score sft alone, at about two thirds of the time)")
    args = ap.parse_args()
    stages = STAGES[: STAGES.index(args.until) + 1]

    grid = json.loads(Path(args.grid).read_text())
    if args.only:
        grid = [c for c in grid if c["name"] in args.only]
    defaults = yaml.safe_load((ROOT / "params.yaml").read_text())
    common = json.loads(args.common)
    args.root.mkdir(parents=True, exist_ok=True)
    shared = workspace(args.root, "_base", defaults, None)
    if not (shared / "models" / "base" / "config.json").exists():
        tuneline("base", shared, shared / "log.txt", args.threads)
    base = (shared / "models" / "base").resolve()

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    setup = {"grid": args.grid, "common": common, "jobs": args.jobs, "threads": args.threads, "stages": list(stages),
             "device": device, "torch": torch.__version__,
             "score": "the learning curve's last point on the development suite (paths.dev_suite)"}

    def write(results: list[dict[str, Any]]) -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"setup": setup, "results": results}, indent=1) + "\n")

    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args.root, c, defaults, common, base, args.threads, stages)
                   for c in grid]
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results.append(r)
            print(json.dumps(r), flush=True)
            if args.out:  # as they finish, so a run cut short keeps what it measured
                write(results)
    order = {c["name"]: i for i, c in enumerate(grid)}
    results.sort(key=lambda r: order[r["name"]])
    print(f"\n{'config':<22}{'sft valid':>10}{'sft type':>9}{'sft trunc':>10}{'dpo valid':>10}{'dpo type':>9}"
          f"{'dpo trunc':>10}{'sft s':>7}{'dpo s':>7}")
    nan = float("nan")
    for r in results:
        if "error" in r:
            print(f"{r['name']:<22} ERROR {r['error']}")
            continue
        s, d = r["sft"], r.get("dpo", {})
        print(f"{r['name']:<22}{s.get('schema_valid_rate', nan):>10.2f}{s.get('payload_type_accuracy', nan):>9.2f}"
              f"{s.get('truncated_rate', nan):>10.2f}{d.get('schema_valid_rate', nan):>10.2f}"
              f"{d.get('payload_type_accuracy', nan):>9.2f}{d.get('truncated_rate', nan):>10.2f}"
              f"{r['seconds'].get('sft', 0):>7.0f}{r['seconds'].get('dpo', 0):>7.0f}")
    if args.out:
        write(results)


if __name__ == "__main__":
    main()
