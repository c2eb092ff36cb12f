"""probe: generate on the held-out suite with one model and judge every output.

Reads:  the probe suite (``probe.suite``, default ``paths.probe_suite``), the contract
        schema (``paths.schema_file``), the base model (``paths.base_model``) and, unless
        the model is the base itself, its LoRA adapter directory (``probe.models[MODEL]``).
Writes: ``<metrics>/probe/<MODEL>.json``, ``<reports>/probe/<MODEL>.samples.jsonl`` (every
        output with its parse, validation and task-check results) and
        ``<reports>/probe/<MODEL>.failures.jsonl`` (failures grouped by cause).
Params: ``model``, ``paths``, ``seed`` and ``probe.*``.

One process loads the base once and applies the model's adapter on top (none for the
base); models are never loaded side by side. Prompts are rendered in the model's format
by ``tuneline.prompting.render`` and encoded by the loader (chat-token sentinel included),
then generated in length-sorted, left-padded batches, greedy unless ``probe.do_sample``,
stopping at EOS or after ``probe.max_new_tokens`` (``finish_reason`` ``eos`` or ``length``).

Each output is parsed leniently, validated against the contract schema unchanged, and
checked against the suite line's ``expect`` (dotted path -> expected value). With
``probe.limit`` the suite is cut to a deterministic subset stratified by the ``expect``
values named in ``probe.stratify_by``: within each stratum lines are ordered by the
sha256 of their id and strata are drawn round-robin, so the subset depends only on the
suite and the params.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneline.errors import InputError
from tuneline.params import Params
from tuneline.provenance import sha256_file, stamp
from tuneline.records import read_jsonl, write_json, write_jsonl
from tuneline.reporting import binary_outcomes, output_paths

SUITE_FIELDS: dict[str, type | tuple[type, ...]] = {"instruction": str, "expect": dict}
EXAMPLES_PER_CAUSE = 3


def adapter_dir(params: Params, model: str) -> str | None:
    """The adapter to apply for ``model``: None when it is the base model itself."""
    models = params.probe.models
    if model not in models:
        raise InputError(f"probe model {model!r}: not in probe.models (allowed: {', '.join(models)})")
    where = models[model]
    if where is None or Path(where).resolve() == Path(params.paths.base_model).resolve():
        return None
    return where


def load_suite(path: str | Path) -> list[dict[str, Any]]:
    """Suite lines, strictly; every line must expect the same dotted paths."""
    suite = read_jsonl(path, required=SUITE_FIELDS)
    keys = list(suite[0]["expect"])
    for number, line in enumerate(suite, start=1):
        if list(line["expect"]) != keys:
            raise InputError(
                f"{path}:{number}: expect keys {list(line['expect'])} differ from the first line's {keys}; "
                "every suite line must check the same fields"
            )
        if not line["instruction"].strip():
            raise InputError(f"{path}:{number}: instruction is empty")
    return suite


def _id_rank(record: Mapping[str, Any]) -> str:
    return hashlib.sha256(str(record["id"]).encode("utf-8")).hexdigest()


def select_subset(
    suite: Sequence[dict[str, Any]], limit: int | None, stratify_by: Sequence[str], source: str = "suite"
) -> list[dict[str, Any]]:
    """A deterministic subset of at most ``limit`` lines, stratified by expect values."""
    if limit is None or limit >= len(suite):
        return list(suite)
    for key in stratify_by:
        if key not in suite[0]["expect"]:
            raise InputError(
                f"probe.stratify_by: {key!r} is not an expect key of {source} "
                f"(allowed: {', '.join(suite[0]['expect']) or 'none'})"
            )
    strata: dict[tuple[str, ...], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for position, line in enumerate(suite):
        strata[tuple(str(line["expect"][k]) for k in stratify_by)].append((position, line))
    queues = [sorted(strata[k], key=lambda item: _id_rank(item[1])) for k in sorted(strata)]
    chosen: list[tuple[int, dict[str, Any]]] = []
    depth = 0
    while len(chosen) < limit:
        for queue in queues:
            if depth < len(queue) and len(chosen) < limit:
                chosen.append(queue[depth])
        depth += 1
    return [line for _, line in sorted(chosen, key=lambda item: item[0])]


@dataclass(frozen=True)
class Generation:
    text: str
    finish_reason: str  # "eos" or "length"
    n_tokens: int


def stop_token_ids(loaded: Any) -> list[int]:
    ids: set[int] = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    if not ids:
        raise InputError(f"{loaded.provenance.get('model')}: the tokenizer has no EOS token to stop generation at")
    return sorted(ids)


def generate(
    loaded: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    desc: str = "probe",
) -> tuple[list[Generation], float]:
    """Batched generation, left-padded, longest prompts first; returns (results, seconds)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    stops = stop_token_ids(loaded)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=stops,
        pad_token_id=pad_id,
        **sampling,
    )
    order = sorted(range(len(prompt_ids)), key=lambda i: (-len(prompt_ids[i]), i))
    results: list[Generation | None] = [None] * len(prompt_ids)
    elapsed = 0.0
    stop_set = set(stops)
    with tqdm(total=len(order), desc=desc, unit="prompt") as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                ids = prompt_ids[i]
                input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                attention[row, width - len(ids) :] = 1
            began = time.perf_counter()
            with torch.inference_mode():
                output = loaded.model.generate(
                    input_ids=input_ids.to(loaded.device),
                    attention_mask=attention.to(loaded.device),
                    generation_config=config,
                )
            elapsed += time.perf_counter() - began
            for row, i in enumerate(batch):
                new = output[row, width:].tolist()
                end = next((j for j, t in enumerate(new) if t in stop_set), None)
                if end is None:
                    kept, finish, count = new, "length", len(new)
                else:
                    kept, finish, count = new[:end], "eos", end + 1
                text = tokenizer.decode(kept, skip_special_tokens=True)
                results[i] = Generation(text=text, finish_reason=finish, n_tokens=count)
            bar.update(len(batch))
    return [r for r in results if r is not None], elapsed


def judge(output: str, finish_reason: str, expect: Mapping[str, Any], contract: Any) -> dict[str, Any]:
    """Parse, validate and check one output; the judged fields of a sample."""
    from tuneline.contract import failure_cause, parse_lenient, task_checks

    parsed = parse_lenient(output)
    errors = contract.validate(parsed.value) if parsed.ok else []
    checks = task_checks(parsed.value if parsed.ok else None, expect)
    cause = failure_cause(parsed, errors, finish_reason)
    if cause == "ok":
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            cause = f"wrong_{failed[0]}"
    root_fields = contract.schema.get("required", [])
    return {
        "parsed": parsed.ok,
        "parse_error": parsed.error,
        "valid": parsed.ok and not errors,
        "errors": errors,
        "checks": checks,
        "fields_present": [f for f in root_fields if isinstance(parsed.value, dict) and f in parsed.value],
        "cause": cause,
    }


def group_failures(samples: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One record per failure cause, most frequent first, with ids and a few examples."""
    by_cause: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for sample in samples:
        if sample["cause"] != "ok":
            by_cause[sample["cause"]].append(sample)
    groups = []
    for cause, members in sorted(by_cause.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        groups.append(
            {
                "id": cause,
                "cause": cause,
                "count": len(members),
                "ids": [s["id"] for s in members],
                "examples": [
                    {
                        "id": s["id"],
                        "output": s["output"][:400],
                        "parse_error": s["parse_error"],
                        "errors": s["errors"][:5],
                        "finish_reason": s["finish_reason"],
                    }
                    for s in members[:EXAMPLES_PER_CAUSE]
                ],
            }
        )
    return groups


def summarize(samples: Sequence[Mapping[str, Any]], root_fields: Sequence[str], seconds: float) -> dict[str, Any]:
    n = len(samples)
    rows = [binary_outcomes(s) for s in samples]
    metrics: dict[str, Any] = {"n": n}
    for name in rows[0]:
        metrics[name] = round(sum(r[name] for r in rows) / n, 6)
    metrics["field_presence"] = {
        field: round(sum(field in s["fields_present"] for s in samples) / n, 6) for field in root_fields
    }
    tokens = sum(s["n_tokens"] for s in samples)
    metrics["mean_new_tokens"] = round(tokens / n, 3)
    metrics["tokens_per_s"] = round(tokens / seconds, 2) if seconds > 0 else 0.0
    metrics["generation_s"] = round(seconds, 3)
    metrics["failure_causes"] = dict(sorted(Counter(s["cause"] for s in samples).items()))
    return metrics


def run(params: Params, model: str) -> dict[str, Any]:
    from tuneline.contract import load_contract
    from tuneline.prompting import render
    from tuneline.training import load_for_eval

    pp = params.probe
    adapter = adapter_dir(params, model)
    suite_path = params.probe_suite
    suite = select_subset(load_suite(suite_path), pp.limit, pp.stratify_by, suite_path)
    contract = load_contract(params.paths.schema_file)
    paths = output_paths(params, model)

    # One base per process; an adapter trained on top of a parent (dpo on sft) gets its
    # parent merged first, exactly as in training; the top adapter is merged too unless
    # probe.merge_adapter is false.
    loaded = load_for_eval(params, adapter, adapter_name=model, merge=pp.merge_adapter)
    prompts = [render(line["instruction"], loaded.format) for line in suite]
    prompt_ids = loaded.encode(prompts)
    if pp.do_sample:
        import torch

        torch.manual_seed(params.seed)
    generations, seconds = generate(
        loaded,
        prompt_ids,
        batch_size=pp.batch_size,
        max_new_tokens=pp.max_new_tokens,
        do_sample=pp.do_sample,
        temperature=pp.temperature,
        top_p=pp.top_p,
        desc=f"probe {model}",
    )

    samples = []
    for line, prompt, gen in zip(suite, prompts, generations, strict=True):
        sample = {
            "id": line["id"],
            "model": model,
            "prompt": prompt,
            "expect": line["expect"],
            "output": gen.text,
            "finish_reason": gen.finish_reason,
            "n_tokens": gen.n_tokens,
            **judge(gen.text, gen.finish_reason, line["expect"], contract),
        }
        if "meta" in line:
            sample["meta"] = line["meta"]
        samples.append(sample)

    metrics = summarize(samples, contract.schema.get("required", []), seconds)
    metrics["model"] = model
    metrics["suite_sha256"] = sha256_file(suite_path)
    metrics["contract_sha256"] = sha256_file(params.paths.schema_file)
    metrics["provenance"] = stamp(
        model=loaded.provenance,
        suite=str(suite_path),
        n_suite_selected=len(suite),
        contract=str(params.paths.schema_file),
        decoding={
            "do_sample": pp.do_sample,
            "temperature": pp.temperature if pp.do_sample else None,
            "top_p": pp.top_p if pp.do_sample else None,
            "max_new_tokens": pp.max_new_tokens,
            "batch_size": pp.batch_size,
            "seed": params.seed,
        },
    )
    write_jsonl(paths.samples, samples)
    write_jsonl(paths.failures, group_failures(samples))
    write_json(paths.metrics, metrics)
    return metrics
