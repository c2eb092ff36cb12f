"""The whole pipeline under `dvc repro` on a contract the tiny model can learn in seconds.

The generic task with a one-field schema (``{"a": "hello" | "thanks" | "please"}``, each
word one token of the tiny tokenizer), imported records whose answer is the word the
instruction asks for ("Say thanks to guest 17." -> ``{"a":"thanks"}``), and a probe suite
in the same wording with held-out guest numbers: clean's leakage filter refuses a probe
instruction verbatim or at word 3-gram Jaccard >= 0.8, and two of these instructions share
2 of 4 grams. The numbers are then real: the random base model never writes a valid
envelope, the SFT adapter does and answers the word asked for, compare calls the gain
significant, DPO moves off its reference and is probed, and a second `dvc repro` runs
nothing.

The tiny model cannot end a completion (its eos is also its pad token, whose embedding
row is zero, so the eos logit is always 0), so every output runs to ``probe.max_new_tokens``
and the probe's lenient parse reads the first JSON value.

The SFT settings and the thresholds were chosen on a dev suite of other held-out numbers
(``DEV_NUMBERS``, through ``write_contract_data(root, DEV_NUMBERS)``), never on the probe
suite.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from test_pipeline_e2e import _merge, _run, make_project, ran_stages

WORDS = ("hello", "thanks", "please")
SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "required": ["a"],
    "properties": {"a": {"enum": list(WORDS)}},
}
TRAIN_NUMBERS = range(10, 58)  # 48 records, 16 per word
PROBE_NUMBERS = range(100, 112)  # 12 held-out prompts
DEV_NUMBERS = range(200, 212)  # for tuning only


def instruction(word: str, number: int) -> str:
    return f"Say {word} to guest {number}."


CONTRACT_PARAMS = {
    "task": "generic",
    "paths": {"schema_file": "data/tiny/answer.schema.json", "dev_suite": "data/tiny/dev_suite.jsonl"},
    "probe": {"suites": {"heldout": {"path": "data/tiny/probe_suite.jsonl", "limit": None},
                         "natural": {"path": "data/tiny/natural_suite.jsonl", "limit": None}}},
    "generate": {"sources": {"template": {"enabled": False},
                             "import": {"enabled": True, "path": "data/seed/import/answers.jsonl"}}},
}


def write_contract_data(root: Path, probe_numbers: range = PROBE_NUMBERS) -> None:
    """The schema, import file and probe suite ``CONTRACT_PARAMS`` points at, under ``root``."""
    answer = {n: WORDS[n % len(WORDS)] for n in [*TRAIN_NUMBERS, *probe_numbers]}
    schema = root / CONTRACT_PARAMS["paths"]["schema_file"]
    schema.parent.mkdir(parents=True, exist_ok=True)
    schema.write_text(json.dumps(SCHEMA, indent=2) + "\n")
    rows = [
        {"instruction": instruction(answer[n], n), "output": json.dumps({"a": answer[n]}),
         "meta": {"expect": {"a": answer[n]}}}
        for n in TRAIN_NUMBERS
    ]
    imported = root / CONTRACT_PARAMS["generate"]["sources"]["import"]["path"]
    imported.parent.mkdir(parents=True, exist_ok=True)
    imported.write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = [{"id": f"q{n}", "instruction": instruction(answer[n], n), "expect": {"a": answer[n]}} for n in probe_numbers]
    suites = CONTRACT_PARAMS["probe"]["suites"]
    (root / suites["heldout"]["path"]).write_text("".join(json.dumps(s) + "\n" for s in suite))
    # the same requests as people type them: lower case, no full stop
    natural = [{**s, "id": f"n{s['id']}", "instruction": s["instruction"].lower().rstrip(".")} for s in suite]
    (root / suites["natural"]["path"]).write_text("".join(json.dumps(s) + "\n" for s in natural))
    dev = [{**s, "id": f"d{s['id']}", "instruction": f"quick one: {s['instruction']}"} for s in suite[:4]]
    (root / CONTRACT_PARAMS["paths"]["dev_suite"]).write_text("".join(json.dumps(s) + "\n" for s in dev))


CONTRACT_OVERRIDES = {
    "clean": {"min_kept": 20, "max_rejected_fraction": 0.2},
    "sft": {
        "max_seq_len": 64, "max_records": None, "max_eval_records": 8, "min_optimizer_steps": 0,
        "eval_each_epoch": False, "lora": {"r": 8, "alpha": 16},
        "trainer": {"num_train_epochs": 30, "learning_rate": 0.01, "warmup_steps": 0.0,
                    "per_device_train_batch_size": 8, "logging_steps": 10, "save_steps": 1000},
    },
    "pairs": {"strategies": ["drop_field", "array_root", "truncate", "invalid_json"], "max_records": 16},
    "dpo": {
        "max_length": 64, "max_pairs": 16, "min_optimizer_steps": 0, "lora": {"r": 8, "alpha": 16},
        "trainer": {"learning_rate": 0.001, "warmup_steps": 0.0, "per_device_train_batch_size": 4,
                    "logging_steps": 1, "save_steps": 1000},
    },
    "probe": {"max_new_tokens": 16, "batch_size": 12},
}


def test_dvc_repro_learns_a_tiny_contract(tiny_model_dir, tmp_path, monkeypatch):
    # one thread: the tiny model's matrices are too small to gain from more, and the
    # float reductions (so the greedy outputs) are the same on every machine
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    project = make_project(tmp_path, tiny_model_dir, _merge(CONTRACT_OVERRIDES, CONTRACT_PARAMS))
    write_contract_data(project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny contract"], project)

    first = _run(["dvc", "repro"], project)
    stages = ran_stages(first.stdout)
    assert {"base", "generate", "clean", "sft", "pairs", "dpo", "compare",
            "probe@base", "probe@sft", "probe@dpo"} <= stages, first.stdout

    def metrics(rel: str) -> dict:
        return json.loads((project / "metrics" / rel).read_text())

    # no record rejected: the suite's held-out numbers are not a probe leak
    clean = metrics("clean.json")
    assert clean["kept"] == len(TRAIN_NUMBERS) and clean["rejected_by_reason"]["probe_leak"] == 0, clean
    assert metrics("pairs.json")["pairs"] > 0

    n = len(PROBE_NUMBERS)
    base, sft, dpo = (metrics(f"probe/heldout/{name}.json") for name in ("base", "sft", "dpo"))
    assert base["n"] == sft["n"] == dpo["n"] == n
    assert base["schema_valid_rate"] == 0.0, base
    assert sft["schema_valid_rate"] >= 0.8, sft
    assert sft["a_accuracy"] >= 0.6, sft  # the answer follows the prompt, not one constant word

    assert metrics("probe/natural/sft.json")["n"] == n
    compare = metrics("compare.json")["heldout"]
    assert compare["sft"]["schema_valid_rate"]["k"] == round(sft["schema_valid_rate"] * n)
    gain = compare["sft_vs_base"]["schema_valid_rate"]
    assert gain["diff"] >= 0.8 and gain["only_other"] == 0 and gain["p_value"] < 0.05, gain
    report = (project / "reports" / "compare.md").read_text()
    assert re.search(r"\*\*sft vs base\*\*.* a higher schema valid rate \([^)]*: better\)", report), report

    # dpo moved the policy off its sft reference towards the chosen answers, was probed,
    # and is compared with sft
    dpo_train = {**json.loads((project / "reports/provenance/dpo.json").read_text())["run"], **metrics("dpo.json")}
    assert dpo_train["steps"] == 4 and dpo_train["final_loss"] < math.log(2), dpo_train
    assert dpo_train["reward_margin"] > 0, dpo_train
    assert set(compare["dpo_vs_sft"]) == set(compare["sft_vs_base"])

    second = _run(["dvc", "repro"], project)
    assert ran_stages(second.stdout) == set(), second.stdout
