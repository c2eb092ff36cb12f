"""Benchmark-only start-up hook (on PYTHONPATH for bench/multi_gpu.py's FSDP runs).

BENCH_GPU_CAP_GB caps what PyTorch's allocator may take on this process's GPU (the one
LOCAL_RANK names, else 0), emulating a smaller GPU; BENCH_PEAK_DIR receives each
process's peak allocated GPU memory at exit. Without them this file does nothing.
"""

import os

if os.environ.get("BENCH_GPU_CAP_GB") and os.environ.get("BENCH_CAP_ALL") != "0":
    import atexit
    import json

    import torch

    if torch.cuda.is_available():
        _index = int(os.environ.get("LOCAL_RANK", "0"))
        _total = torch.cuda.get_device_properties(_index).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, float(os.environ["BENCH_GPU_CAP_GB"]) * 2**30 / _total), _index
        )

        def _report() -> None:
            directory = os.environ.get("BENCH_PEAK_DIR")
            if directory:
                peak = torch.cuda.max_memory_allocated(_index) / 2**30
                path = os.path.join(directory, f"peak-{os.getpid()}.json")
                with open(path, "w") as fh:
                    json.dump({"rank": os.environ.get("RANK"), "gpu": _index, "peak_gb": round(peak, 2)}, fh)

        atexit.register(_report)
