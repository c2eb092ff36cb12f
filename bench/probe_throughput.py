"""probe throughput: tuneline's batched probe generation vs one prompt at a time.

Same prompts (the probe suite rendered in the model's format), same greedy decoding and
max_new_tokens, through the library's one generation loop (`tuneline.generation.generate`,
the loop probe runs). Reports generated tokens/s and
the ratio, side by side in one process. ``--modes`` picks the runs: ``single`` (batch 1),
``batched`` (today's probe: dynamic KV cache) and ``static`` (``probe.static_cache``: a
preallocated KV cache and, on CUDA, a compiled decode step). Every mode first runs the whole
prompt set once untimed (so compilation, cuBLAS heuristics and the allocator are warm for
each), then the modes are timed ``--repeats`` times in turn (A B A B ...), and each row
reports the median; speedups are against the first mode, and the identical-outputs count
compares every mode's outputs with the first's.

    python bench/probe_throughput.py --model models/base --n 64 --batch 32 --max-new 128
    python bench/probe_throughput.py --random-shape qwen2.5-1.5b --tokenizer models/base ...  (GPU)
"""

from __future__ import annotations

import argparse
import statistics

from common import build_random_model, print_table, write_result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/base", help="a model directory (real weights)")
    ap.add_argument("--random-shape", default=None, help="use a random model of this shape instead")
    ap.add_argument("--tokenizer", default="models/base")
    ap.add_argument("--suite", default="data/seed/probe_suite.jsonl")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new", type=int, default=96)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="model.dtype for --model (auto: bf16 on CUDA and on CPUs with native bf16)")
    ap.add_argument("--modes", default="single,batched", help="comma-separated, of: single, batched, static")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per mode, interleaved; median reported")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    import torch

    from tuneline import modeling
    from tuneline.contract import load_suite
    from tuneline.generation import generate
    from tuneline.modeling import Loaded
    from tuneline.params import ModelParams
    from tuneline.prompting import render

    if args.random_shape:
        tokenizer = modeling.load_tokenizer(args.tokenizer, "completion")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if device == "cuda" and args.dtype != "float32" else torch.float32
        model = build_random_model(args.random_shape, tokenizer, dtype, device).eval()
        loaded = Loaded(model=model, tokenizer=tokenizer, provenance={"model": args.random_shape},
                        format="completion", device=device)
        # Random weights rarely emit EOS; both runs then decode max_new tokens per prompt.
    else:
        loaded = modeling.load(args.model, ModelParams(format="completion", dtype=args.dtype))
    suite = load_suite(args.suite)[: args.n]
    prompt_ids = loaded.encode([render(item["instruction"], "completion") for item in suite])
    common = dict(max_new_tokens=args.max_new, do_sample=False, temperature=1.0, top_p=1.0)
    modes = {"single": ("one at a time", 1, False), "batched": (f"batched ({args.batch})", args.batch, False),
             "static": (f"batched ({args.batch}), static cache", args.batch, True)}
    chosen = args.modes.split(",")
    warm = {}
    for mode in chosen:  # untimed: compiles the static decode step, warms every path
        label, batch, static = modes[mode]
        _, warm[mode] = generate(loaded, prompt_ids, batch_size=batch, **common, desc=f"warm-up {mode}",
                                 static_cache=static)
    times: dict[str, list[float]] = {mode: [] for mode in chosen}
    outputs = {}
    tokens = {}
    for _ in range(args.repeats):
        for mode in chosen:
            label, batch, static = modes[mode]
            generated, seconds = generate(loaded, prompt_ids, batch_size=batch, **common, desc=label,
                                          static_cache=static)
            results = [r for (r,) in generated]
            texts = [r.text for r in results]
            if outputs.setdefault(label, texts) != texts:
                raise SystemExit(f"{label}: outputs changed between repeats")
            tokens[label] = sum(r.n_tokens for r in results)
            times[mode].append(seconds)
    rows = []
    for mode in chosen:
        label = modes[mode][0]
        seconds = statistics.median(times[mode])
        rows.append({"variant": label, "prompts": len(outputs[label]), "new_tokens": tokens[label],
                     "seconds": seconds, "tokens_per_s": tokens[label] / seconds,
                     "seconds_each": [round(t, 4) for t in times[mode]]})
    first = list(outputs.values())[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["identical_to_first"] = sum(a == b for a, b in zip(first, outputs[row["variant"]], strict=True))
    same = rows[-1]["identical_to_first"]
    print_table(f"probe throughput on {loaded.device}", rows)
    dtype = loaded.provenance.get("dtype") or str(loaded.model.dtype)
    print(f"identical outputs, {rows[-1]['variant']} vs {rows[0]['variant']}: {same}/{len(suite)} ({dtype}); "
          f"untimed first pass per mode (compile included): {warm}")
    name = f"probe_throughput_{loaded.device}" + ("" if args.dtype == "auto" else f"_{args.dtype}") + args.tag
    import transformers

    write_result(name, rows, {**vars(args), "identical_outputs": same, "dtype": dtype, "first_pass_s": warm,
                              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},
                 args.out)


if __name__ == "__main__":
    main()
