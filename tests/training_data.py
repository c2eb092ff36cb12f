"""Small inputs for the training-stage tests: clean records built from the gold envelopes,
and params pointing a run at a temporary directory and the tiny model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneline.contract import load_contract
from tuneline.params import Params, parse_params
from tuneline.prompting import render
from tuneline.records import write_jsonl

REPO = Path(__file__).resolve().parents[1]
GOLD = REPO / "data" / "seed" / "gold.jsonl"
SCHEMA = REPO / "data" / "seed" / "contract.schema.json"


def gold() -> list[dict[str, Any]]:
    return [json.loads(line) for line in GOLD.read_text(encoding="utf-8").splitlines() if line.strip()]


def clean_records(fmt: str = "completion", repeat: int = 1) -> list[dict[str, Any]]:
    """Records in the shape ``clean`` writes (prompt rendered, completion canonical text)."""
    contract = load_contract(SCHEMA)
    records = []
    for copy in range(repeat):
        for g in gold():
            records.append(
                {
                    "id": f"{g['id']}-{copy}",
                    "prompt": render(g["instruction"], fmt),
                    "completion": contract.canonical_text(g["completion"]),
                    "meta": {
                        "instruction": g["instruction"],
                        "payload_type": g["payload_type"],
                        "destination": g["destination"],
                        "expect": {"payload_type": g["payload_type"], "payload.destination": g["destination"]},
                    },
                    "provenance": {"source": "gold", "line": copy},
                }
            )
    return records


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key, {}), value) if isinstance(value, dict) and key != "extra" else value
    return out


TINY = {
    "sft": {
        "max_seq_len": 2048, "min_optimizer_steps": 0, "lora": {"r": 4, "alpha": 8}, "curve": {"every_n_steps": 0},
        "trainer": {
            "num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "logging_steps": 1,
            "save_steps": 1000,
        },
    },
    "dpo": {
        "max_length": 2048, "min_optimizer_steps": 0, "lora": {"r": 4, "alpha": 8}, "curve": {"every_n_steps": 0},
        "trainer": {
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "num_train_epochs": 1,
            "logging_steps": 1, "save_steps": 1000,
        },
    },
}


def tiny_params(root: Path, model_dir: Path, overrides: dict[str, Any] | None = None) -> Params:
    """Params for a run under ``root`` with the tiny model as the base."""
    paths = {
        "schema_file": str(SCHEMA),
        "clean": str(root / "data/clean"),
        "generated": str(root / "data/generated"),
        "pairs": str(root / "data/pairs"),
        "base_model": str(model_dir),
        "sft_model": str(root / "models/sft"),
        "dpo_model": str(root / "models/dpo"),
        "checkpoints": str(root / "models/checkpoints"),
        "metrics": str(root / "metrics"),
        "reports": str(root / "reports"),
    }
    data = merge({"paths": paths, "model": {"device": "cpu"}, **TINY}, overrides or {})
    return parse_params(data)


def write_clean(params: Params, records: list[dict[str, Any]] | None = None, val: int = 2) -> None:
    records = records if records is not None else clean_records()
    clean = Path(params.paths.clean)
    write_jsonl(clean / "train.jsonl", records[val:] if val else records)
    if val:
        write_jsonl(clean / "val.jsonl", records[:val])
