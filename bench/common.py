"""Shared pieces of the benchmarks: model shapes, data, timing, MFU, result tables."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Shapes of public configs; weights are random (throughput does not depend on them).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944),
    "qwen2.5-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                        intermediate_size=27648),
}
BF16_PEAK_TFLOPS = {"H100": 798.0, "H200": 790.0}  # measured 8192^3 bf16 matmul rates on the lent machines
# NVIDIA's datasheet bf16 dense peak (SXM), the convention of published MFU figures
BF16_DATASHEET_TFLOPS = {"H100": 989.0, "H200": 989.0}


def build_random_model(shape: str, tokenizer: Any, dtype: Any, device: str, attn: str = "sdpa") -> Any:
    """A random-initialized Qwen2 model of a public shape, with the tokenizer's vocabulary
    (``attn="sdpa_varlen"`` needs ``tuneline.attention.register()`` first)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=len(tokenizer), max_position_embeddings=32768, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **SHAPES[shape],
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model


def n_params(model: Any, trainable: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if (p.requires_grad or not trainable))


def lora_train_flops_per_token(model_cfg: Any, n_base_params: int, seq_len: float) -> float:
    """LoRA training FLOPs per token: 4N (forward + input-gradient backward, no base
    weight gradients) + attention 12 * L * hidden * T (forward + backward of QK^T and AV)."""
    return 4.0 * n_base_params + 12.0 * model_cfg.num_hidden_layers * model_cfg.hidden_size * seq_len


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def peak_tflops(datasheet: bool = False) -> float | None:
    """The device's bf16 peak: the measured matmul rate, or with ``datasheet`` NVIDIA's figure."""
    name = device_name()
    for key, value in (BF16_DATASHEET_TFLOPS if datasheet else BF16_PEAK_TFLOPS).items():
        if key in name:
            return value
    return None


@dataclass
class Timer:
    start: float = 0.0
    seconds: float = 0.0

    def __enter__(self) -> Timer:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def load_records(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    from tuneline.records import read_jsonl

    records = read_jsonl(path)
    return records[:limit] if limit else records


def write_result(name: str, rows: list[dict[str, Any]], setup: dict[str, Any], out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name, "date": datetime.now(UTC).strftime("%Y-%m-%d"), "device": device_name(),
        "setup": setup, "rows": rows,
    }
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    keys = list(rows[0]) if rows else []
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()])
    Console(width=200).print(table)
