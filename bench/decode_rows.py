"""Greedy decoding that drops each finished row (tuneline.generation) against transformers'
own ``generate`` on the same batches, side by side in one process: seconds, tokens per
second and whether every output is identical.

Both loops get the same prompts, in the same length-sorted, left-padded batches, with the
same stop tokens and ``max_new_tokens``; the transformers row is ``model.generate`` with
its dynamic KV cache, where a finished row stays in the batch (padded) until the batch's
longest output ends. Prompts are the probe suites of the workspace's params (their subsets,
or every prompt with ``--full``), rendered and encoded as the probe does.

    python bench/decode_rows.py --workspace . --adapter models/dpo --batch 30 90 \\
        --threads 2 --out bench/results/decode_rows_cpu.json

``--workspace``: a directory with ``params.yaml`` and the run's ``models/base`` (the
repository after ``dvc repro``, or a workspace where ``tuneline base`` ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import yaml
from dev_sweep import override


def transformers_loop(loaded: Any, prompt_ids: list[list[int]], batch_size: int, max_new_tokens: int) -> tuple[list[Any], float]:
    """``model.generate`` on tuneline's batches (longest prompt first, left-padded)."""
    import torch
    from transformers import GenerationConfig

    from tuneline.generation import stop_token_ids

    stops = stop_token_ids(loaded)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else stops[0]
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
                              pad_token_id=pad, return_dict_in_generate=True)
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    results: list[Any] = [None] * len(prompt_ids)
    elapsed = 0.0
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        width = max(len(prompt_ids[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
            attention[row, width - len(prompt_ids[i]):] = 1
        began = time.perf_counter()
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=input_ids.to(loaded.device),
                                        attention_mask=attention.to(loaded.device), generation_config=config)
            new = out.sequences[:, width:].tolist()
        elapsed += time.perf_counter() - began
        for row, i in enumerate(batch):
            results[i] = finished(loaded.tokenizer, new[row], set(stops))
    return results, elapsed


def generation_at(rev: str) -> Any:
    """``tuneline.generation`` as it was at git revision ``rev`` of this repository (or in the
    file ``rev``), loaded as a module of its own beside today's; it imports the rest of
    tuneline from today's tree."""
    import importlib.util
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    if Path(rev).is_file():  # a copy of that file, where the checkout has no git history
        source = Path(rev).read_text()
    else:
        source = subprocess.run(["git", "show", f"{rev}:src/tuneline/generation.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    name = f"tuneline_generation_at_{Path(rev).stem}"
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, f"generation.py@{rev}", "exec"), module.__dict__)
    return module


def finished(tokenizer: Any, new: list[int], stops: set[int]) -> tuple[str, int, str]:
    """(text, tokens counted, finish reason) by tuneline.generation's rule: the text ends before
    the first stop token, which is counted; without one every token counts (``length``)."""
    end = next((k for k, token in enumerate(new) if token in stops), None)
    if end is None:
        return tokenizer.decode(new, skip_special_tokens=True), len(new), "length"
    return tokenizer.decode(new[:end], skip_special_tokens=True), end + 1, "eos"


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", type=Path, default=Path("."))
    ap.add_argument("--adapter", help="the adapter to probe (its parents merged first); default: the base")
    ap.add_argument("--batch", type=int, nargs="+", default=[30, 90])
    ap.add_argument("--full", action="store_true", help="every prompt of each suite, not the params' subsets")
    ap.add_argument("--set", action="append", default=[], help="dotted.key=JSON value, e.g. model.dtype='\"float32\"'")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--before", metavar="REV",
                    help="also time tuneline's generation loop as it was at this git revision (e.g. 294fa7f, "
                         "before its KV cache was preallocated), or in this copy of generation.py")
    args = ap.parse_args()

    import torch

    from tuneline import tasks
    from tuneline.contract import load_suite
    from tuneline.generation import generate
    from tuneline.judging import select_subset
    from tuneline.modeling import load_for_eval
    from tuneline.params import parse_params
    from tuneline.prompting import render

    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out.resolve() if args.out else None
    os.chdir(args.workspace)
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        override(raw, key, json.loads(value))
    params = parse_params(raw)
    strata = tasks.get(params.task).stratify_by if params.probe.stratify_by is None else params.probe.stratify_by
    lines = [line for suite in params.probe.suites.values()
             for line in select_subset(load_suite(suite.path), None if args.full else suite.limit, strata, suite.path)]
    loaded = load_for_eval(params, args.adapter, merge=True)
    ids = loaded.encode([render(line["instruction"], loaded.format) for line in lines])
    max_new = params.probe.max_new_tokens
    rows = []
    before = generation_at(args.before) if args.before else None

    def as_tuples(outputs: list[Any]) -> list[tuple[str, int, str]]:
        return [(g.text, g.n_tokens, g.finish_reason) for (g,) in outputs]

    for batch_size in args.batch:
        theirs, their_s = transformers_loop(loaded, ids, batch_size, max_new)
        timed = [("transformers generate", theirs, their_s)]
        if before is not None:  # the loop as it was at --before
            then, then_s = before.generate(loaded, ids, batch_size=batch_size, max_new_tokens=max_new, progress=False)
            timed.append((f"tuneline at {args.before}", as_tuples(then), then_s))
        ours, our_s = generate(loaded, ids, batch_size=batch_size, max_new_tokens=max_new, progress=False)
        timed.append(("tuneline (finished rows leave)", as_tuples(ours), our_s))
        tokens = sum(n for _, n, _ in theirs)
        for loop, outputs, seconds in timed:
            same = sum(a == b for a, b in zip(theirs, outputs, strict=True))
            rows.append({"batch_size": batch_size, "loop": loop, "seconds": round(seconds, 1),
                         "tokens_per_s": round(tokens / seconds, 1), "identical": f"{same}/{len(lines)}"})
        print(f"batch {batch_size}: " + ", ".join(f"{loop} {seconds:.1f} s" for loop, _, seconds in timed), flush=True)
    device = torch.cuda.get_device_name() if str(loaded.device).startswith("cuda") else cpu_name()
    setup = {"adapter": args.adapter or "base", "before": args.before, "prompts": len(lines), "full_suites": args.full,
             "tokens": sum(n for _, n, _ in theirs), "max_new_tokens": max_new, "dtype": str(loaded.model.dtype),
             "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
             "transformers": __import__("transformers").__version__}
    print(json.dumps(setup))
    print("| batch | loop | seconds | tokens/s | identical |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['batch_size']} | {row['loop']} | {row['seconds']} | {row['tokens_per_s']} | {row['identical']} |")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"setup": setup, "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
