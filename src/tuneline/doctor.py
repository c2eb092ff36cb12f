"""``tuneline doctor``: what this machine has and what the params would run on.

Params that cannot be read or are invalid are reported after the table as the same error
``tuneline params check`` gives (exit 2)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tuneline.errors import TunelineError
from tuneline.modeling import EMBEDDED, cpu_has_bf16, dtype_name, embedded_gguf, resolve_dtype
from tuneline.params import check_runtime, load_params
from tuneline.provenance import library_versions


def report(params_path: Path, console: Console) -> None:
    import torch

    table = Table(title="tuneline doctor", show_header=True)
    table.add_column("check")
    table.add_column("status")
    for name, version in library_versions().items():
        table.add_row(name, version or "[red]not installed[/]")
    cuda = torch.cuda.is_available()
    table.add_row("CUDA", f"{torch.version.cuda} ({torch.cuda.device_count()} device(s))" if cuda else "not available")
    if cuda:
        table.add_row("GPU", torch.cuda.get_device_name(0))
    table.add_row("CPU bf16 matmuls", "native (AVX512-BF16 or AMX): model.dtype: bfloat16 is faster here, "
                  "float32 (auto) reproduces across CPUs" if cpu_has_bf16() else "emulated: float32 is the fast choice")
    table.add_row("bitsandbytes", "installed" if importlib.util.find_spec("bitsandbytes") else "not installed")
    table.add_row("liger-kernel", "installed" if importlib.util.find_spec("liger_kernel") else "not installed")
    table.add_row("dvc executable", shutil.which("dvc") or "[red]not on PATH[/]")
    for name in EMBEDDED:
        try:
            table.add_row(f"embedded model {name}", str(embedded_gguf(name)))
        except TunelineError as exc:
            table.add_row(f"embedded model {name}", f"[red]{exc}[/]")
    failed: TunelineError | None = None
    try:
        params = load_params(params_path)
    except TunelineError as exc:
        failed = exc
        table.add_row("params", f"[red]{params_path}: invalid (below)[/]")
    else:
        device = "cuda" if cuda and params.model.device != "cpu" else "cpu"
        dtype = dtype_name(resolve_dtype(params.model, device))
        table.add_row("params", f"{params_path}: ok")
        table.add_row("would run on", f"{device}, {dtype}, quantization {params.model.quantization}, "
                      f"{params.compute.num_processes} process(es), base {params.base.source}")
        for problem in check_runtime(params):
            table.add_row("runtime problem", f"[red]{problem}[/]")
    console.print(table)
    if failed is not None:
        raise failed  # the CLI prints it and exits with its code (2 for bad params)
