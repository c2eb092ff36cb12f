"""tuneline: a reproducible LLM post-training pipeline driven by DVC."""

import os

# MKL, PyTorch's CPU BLAS, divides a float32 matmul's work by the thread count on AVX512
# CPUs, and rounds differently with 1 and 2 threads; its strict conditional numerical
# reproducibility mode does not. MKL reads this once, when it starts: torch imported before
# tuneline keeps the caller's setting. A value the caller set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
