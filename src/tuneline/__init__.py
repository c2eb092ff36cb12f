"""tuneline: a reproducible LLM post-training pipeline driven by DVC."""

__version__ = "0.1.0"
