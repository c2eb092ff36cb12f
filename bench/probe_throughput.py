"""probe throughput: tuneline's batched probe generation vs one prompt at a time.

Same prompts (the probe suite rendered in the model's format), same greedy decoding and
max_new_tokens, through the library's one generation loop (`tuneline.generation.generate`,
the loop probe runs). Reports generated tokens/s and
the ratio, side by side in one process. ``--modes`` picks the runs: ``single`` (batch 1),
``batched`` (today's probe: dynamic KV cache) and ``static`` (``probe.static_cache``: a
preallocated KV cache and, on CUDA, a compiled decode step; warmed up once on the same
shape first, so compilation is not timed); speedups are against the first mode, and the
identical-outputs count compares every mode with the first.

    python bench/probe_throughput.py --model models/base --n 64 --batch 32 --max-new 128
    python bench/probe_throughput.py --random-shape qwen2.5-1.5b --tokenizer models/base ...  (GPU)
"""

from __future__ import annotations

import argparse

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
    generate(loaded, prompt_ids[:2], batch_size=2, **common, desc="warm-up")
    modes = {"single": ("one at a time", 1, False), "batched": (f"batched ({args.batch})", args.batch, False),
             "static": (f"batched ({args.batch}), static cache", args.batch, True)}
    rows = []
    outputs = {}
    warm = {}
    for mode in args.modes.split(","):
        label, batch, static = modes[mode]
        if static:  # compile the decode step for this shape before timing
            _, warm[mode] = generate(loaded, prompt_ids, batch_size=batch, **common, desc="compile", static_cache=True)
        generated, seconds = generate(loaded, prompt_ids, batch_size=batch, **common, desc=label, static_cache=static)
        results = [r for (r,) in generated]
        tokens = sum(r.n_tokens for r in results)
        outputs[label] = [r.text for r in results]
        rows.append({"variant": label, "prompts": len(results), "new_tokens": tokens, "seconds": seconds,
                     "tokens_per_s": tokens / seconds})
    first = list(outputs.values())[0]
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
        row["identical_to_first"] = sum(a == b for a, b in zip(first, outputs[row["variant"]], strict=True))
    same = rows[-1]["identical_to_first"]
    print_table(f"probe throughput on {loaded.device}", rows)
    dtype = loaded.provenance.get("dtype") or str(loaded.model.dtype)
    print(f"identical outputs, {rows[-1]['variant']} vs {rows[0]['variant']}: {same}/{len(suite)} ({dtype}); "
          f"first static call (compile included): {warm}")
    name = f"probe_throughput_{loaded.device}" + ("" if args.dtype == "auto" else f"_{args.dtype}") + args.tag
    import transformers

    write_result(name, rows, {**vars(args), "identical_outputs": same, "dtype": dtype, "compile_call_s": warm,
                              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}},
                 args.out)


if __name__ == "__main__":
    main()
