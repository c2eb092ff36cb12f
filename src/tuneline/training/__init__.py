"""Training LoRA adapters: the pieces the sft and dpo stages share, one home per job.

- ``arguments``: ``lora_config``, ``trainer_args`` (TrainingArguments fields).
- ``plan``: ``Plan``, ``make_plan``, ``plan_for_trainer``, ``announce_plan``.
- ``callbacks``: ``GuardCallback``, ``ThroughputCallback``, ``MarkerCallback``, ``StartCallback``
  and the weights-changed check.
- ``checkpoints``: run fingerprints, resume, finish.
- ``distributed``: main process, barriers, shared datasets, FSDP state.
- ``outputs``: the model directory, model card, plots, metrics helpers.
- ``data``: ``read_sample``, the records a stage trains on.
- ``loop``: ``train_adapter``, the one loop both stages run.
- ``sft``, ``dpo``: each method's tokenization, TRL trainer and plan (imported as
  ``tuneline.training.sft`` / ``.dpo``, not re-exported).

Loading (the base, adapter stacks for training and evaluation) is ``tuneline.modeling``'s.
"""

from tuneline.training.arguments import liger_available, lora_config, trainer_args
from tuneline.training.callbacks import (
    GuardCallback,
    MarkerCallback,
    StartCallback,
    ThroughputCallback,
    check_weights_changed,
    trainable_snapshot,
)
from tuneline.training.checkpoints import (
    FINISHED,
    MARKER,
    fingerprint,
    finish_checkpoints,
    manifest,
    pick_checkpoint,
    resume_checkpoint,
    train_with_checkpoints,
)
from tuneline.training.data import read_sample
from tuneline.training.distributed import (
    drop_shared_dataset,
    is_local_main_process,
    is_main_process,
    shared_dataset,
    trained_model,
    wait_for_everyone,
)
from tuneline.training.loop import Job, train_adapter
from tuneline.training.outputs import (
    base_provenance,
    data_hashes,
    epoch_losses,
    last_logged,
    model_card,
    split_metrics,
    write_model_dir,
)
from tuneline.training.plan import Plan, announce_plan, make_plan, plan_for_trainer

__all__ = [
    "FINISHED", "MARKER", "GuardCallback", "Job", "MarkerCallback", "Plan", "StartCallback", "ThroughputCallback",
    "announce_plan", "base_provenance", "check_weights_changed", "data_hashes", "drop_shared_dataset", "epoch_losses", "last_logged",
    "fingerprint", "finish_checkpoints", "is_local_main_process", "is_main_process", "liger_available",
    "lora_config", "make_plan", "manifest", "model_card",
    "pick_checkpoint", "plan_for_trainer", "read_sample", "resume_checkpoint", "shared_dataset", "train_adapter",
    "train_with_checkpoints", "trainable_snapshot", "trained_model", "trainer_args", "wait_for_everyone",
    "write_model_dir", "split_metrics",
]
