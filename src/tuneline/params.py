"""Typed, frozen, strict params: one section per stage plus shared ``seed``, ``paths``,
``model`` and ``compute``.

``load_params`` reads ``params.yaml`` and reports every problem at once, each as
``<param path>: <value> — <what is allowed>``, raising :class:`ParamsError` (exit 2)
before anything heavy is imported or any model is loaded.

Trainer and LoRA settings that TRL and peft type themselves are passed through
(``sft.trainer``, ``sft.lora.extra``) and checked against the fields those libraries
declare, rather than re-declared here: the TrainingArguments settings of sft and dpo
(learning rate, batch, epochs, schedule...) live in ``<stage>.trainer`` under TRL's names,
laid over ``SFT_TRAINER``/``DPO_TRAINER``.

The code defaults are the committed ``params.yaml``: an empty params file runs the
documented default pipeline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from tuneline.errors import InputError

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PathsParams(Section):
    seed_dir: str = "data/seed"
    schema_file: str = "data/seed/contract.schema.json"
    probe_suite: str = "data/seed/probe_suite.jsonl"
    generated: str = "data/generated"
    clean: str = "data/clean"
    pairs: str = "data/pairs"
    base_model: str = "models/base"
    sft_model: str = "models/sft"
    dpo_model: str = "models/dpo"
    checkpoints: str = "models/checkpoints"
    metrics: str = "metrics"
    reports: str = "reports"


class ModelParams(Section):
    """How every stage loads the materialized base model (``paths.base_model``)."""

    format: Literal["completion", "chat"] = "completion"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "nf4"] = "none"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # sdpa_varlen: SDPA, with varlen flash attention for padding-free rows (tuneline.attention)
    attn_implementation: Literal["sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = "sdpa"

    @model_validator(mode="after")
    def _nf4_needs_cuda(self) -> ModelParams:
        if self.quantization == "nf4" and self.device == "cpu":
            raise ValueError("quantization 'nf4' needs CUDA (bitsandbytes); with device 'cpu' use quantization 'none'")
        if self.quantization == "nf4" and self.dtype == "float32":
            raise ValueError("quantization 'nf4' computes in bfloat16/float16; dtype 'float32' is not allowed with it")
        return self


class BaseParams(Section):
    """Where the base model comes from: the embedded model, a local directory or a hub id."""

    source: str = "smollm2-135m"
    revision: str | None = None
    allow_download: bool = False


class ComputeParams(Section):
    num_processes: PositiveInt = 1
    distributed: Literal["ddp", "fsdp"] = "ddp"


class LoraParams(Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0  # dropout copies every input; short runs do not need it
    target_modules: str | list[str] = "all-linear"
    extra: dict[str, Any] = Field(default_factory=dict)


class TemplateSourceParams(Section):
    enabled: bool = True
    max_records: PositiveInt | None = None
    variants: PositiveInt = 3  # examples per (destination, payload type)


class TeacherSourceParams(Section):
    enabled: bool = False
    model: str | None = None  # None: paths.base_model
    shots: NonNegativeInt = 2
    n_samples: PositiveInt = 1
    temperature: NonNegativeFloat = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    max_new_tokens: PositiveInt = 384
    batch_size: PositiveInt = 8
    max_prompts: PositiveInt | None = 32
    max_records: PositiveInt | None = None


class ImportSourceParams(Section):
    enabled: bool = False
    path: str | None = None
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "preference"] = "auto"
    max_records: PositiveInt | None = None

    @model_validator(mode="after")
    def _path_when_enabled(self) -> ImportSourceParams:
        if self.enabled and not self.path:
            raise ValueError("import source is enabled but 'path' is not set")
        return self


class GenerateSources(Section):
    template: TemplateSourceParams = TemplateSourceParams()
    teacher: TeacherSourceParams = TeacherSourceParams()
    imported: ImportSourceParams = Field(default=ImportSourceParams(), alias="import")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class GenerateParams(Section):
    sources: GenerateSources = GenerateSources()


class CleanParams(Section):
    val_fraction: Fraction = 0.1
    over_length: Literal["drop", "truncate", "raise"] = "drop"
    near_duplicate_jaccard: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    ngram: PositiveInt = 3
    leakage_jaccard: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    exclude_probe_destinations: bool = True
    min_kept: PositiveInt = 50
    max_rejected_fraction: Probability = 0.5


# TrainingArguments settings of the training stages: each stage's ``trainer`` dict is laid
# over these (a key given there wins, the rest keep these values). Names are TRL's
# (SFTConfig/DPOConfig); ``warmup_steps`` under 1 is a fraction of the optimizer steps.
# ``per_device_eval_batch_size`` follows ``per_device_train_batch_size`` unless given.
SFT_TRAINER: dict[str, Any] = {
    "num_train_epochs": 1.0,
    "learning_rate": 0.002,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "gradient_checkpointing": False,
    "logging_steps": 2,
    "save_steps": 8,
}
DPO_TRAINER: dict[str, Any] = {**SFT_TRAINER, "learning_rate": 0.0001}
# Keys these sections had before their TrainingArguments settings moved into ``trainer``.
MOVED_TO_TRAINER = {
    "num_epochs": "num_train_epochs",
    "learning_rate": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "warmup_ratio": "warmup_steps",
    "per_device_batch_size": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "weight_decay": "weight_decay",
    "max_grad_norm": "max_grad_norm",
    "gradient_checkpointing": "gradient_checkpointing",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
}
# Settings that must be positive (the rest of the defaults' numbers must be >= 0).
_POSITIVE = {"num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
             "gradient_accumulation_steps", "logging_steps", "save_steps"}


def _trainer_with_defaults(defaults: dict[str, Any], value: Any) -> Any:
    return {**defaults, **value} if isinstance(value, dict) else value


def _check_trainer_values(stage: str, values: dict[str, Any]) -> list[str]:
    """Type and range of the settings ``SFT_TRAINER`` names (TRL checks the others)."""
    problems = []
    for key, default in SFT_TRAINER.items():
        value = values.get(key)
        where = f"{stage}.trainer.{key}: {value!r}"
        if isinstance(default, bool) or isinstance(default, str):
            if type(value) is not type(default):
                problems.append(f"{where} is not a {type(default).__name__}")
        elif isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(default, int) and not isinstance(value, int)
        ):
            problems.append(f"{where} is not {'an integer' if isinstance(default, int) else 'a number'}")
        elif (key in _POSITIVE and value <= 0) or value < 0:
            problems.append(f"{where} must be {'> 0' if key in _POSITIVE else '>= 0'}")
    return problems


class SftParams(Section):
    max_seq_len: PositiveInt = 384
    padding_free: bool = False
    packing: bool = False
    eval_each_epoch: bool = True
    min_optimizer_steps: NonNegativeInt = 30
    strict_plan: bool = False
    max_records: PositiveInt | None = 336  # null: all (GPU scale)
    max_eval_records: PositiveInt | None = 16
    lora: LoraParams = LoraParams()
    trainer: dict[str, Any] = Field(default_factory=lambda: dict(SFT_TRAINER))

    @field_validator("trainer", mode="before")
    @classmethod
    def _trainer_defaults(cls, value: Any) -> Any:
        return _trainer_with_defaults(SFT_TRAINER, value)


class PairsParams(Section):
    strategies: list[
        Literal["drop_field", "array_root", "truncate", "invalid_json", "off_topic", "wrong_payload_type", "repeat_item"]
    ] = ["drop_field", "array_root", "truncate", "invalid_json", "off_topic", "wrong_payload_type", "repeat_item"]
    negatives_per_record: PositiveInt = 1
    max_records: PositiveInt | None = None
    on_policy: bool = False
    on_policy_k: Annotated[int, Field(ge=2)] = 4
    on_policy_max_prompts: PositiveInt = 32
    on_policy_temperature: PositiveFloat = 0.8
    on_policy_top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.95
    on_policy_max_new_tokens: PositiveInt = 320
    on_policy_batch_size: PositiveInt = 8
    include_imported: bool = True


class DpoParams(Section):
    beta: PositiveFloat = 0.1
    loss_type: str = "sigmoid"
    max_length: PositiveInt = 448
    precompute_ref_log_probs: bool = True
    min_optimizer_steps: NonNegativeInt = 16
    strict_plan: bool = False
    max_pairs: PositiveInt | None = 40  # null: all (GPU scale)
    lora: LoraParams = LoraParams()
    trainer: dict[str, Any] = Field(default_factory=lambda: dict(DPO_TRAINER))

    @field_validator("trainer", mode="before")
    @classmethod
    def _trainer_defaults(cls, value: Any) -> Any:
        return _trainer_with_defaults(DPO_TRAINER, value)


class ProbeParams(Section):
    # name -> adapter dir; the base itself (or None) probes the bare base
    models: dict[str, str | None] = Field(
        default_factory=lambda: {"base": "models/base", "sft": "models/sft", "dpo": "models/dpo"}
    )
    limit: PositiveInt | None = 60
    batch_size: PositiveInt = 30
    max_new_tokens: PositiveInt = 320
    do_sample: bool = False
    temperature: PositiveFloat = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    stratify_by: list[str] | None = None  # expect keys; None: the task's (travel: payload_type)
    # Merge the adapter into the base weights before generating: the same function up to
    # float rounding, and no LoRA side matmuls per token. Never done for nf4 bases.
    merge_adapter: bool = True


class CompareParams(Section):
    baseline: str = "base"
    pairs: list[tuple[str, str]] = Field(default_factory=lambda: [("dpo", "sft")])
    confidence: Fraction = 0.95
    min_effect: Fraction = 0.10  # difference the power note is about
    power: Fraction = 0.80


class ArchiveParams(Section):
    keep: list[str] = Field(
        default_factory=lambda: [
            "src/**", "tests/**", "docs/**", "bench/**", "data/seed/**", "README*", "LICENSE*", "BENCHMARKS.md",
            "pyproject.toml", "Makefile", ".ci/**", ".dvc/**", ".dvcignore", ".gitignore",
            "dvc.yaml", "dvc.lock", "params.yaml", ".github/**", "archive/**",
        ]
    )


class Params(Section):
    seed: NonNegativeInt = 0
    task: Literal["travel", "generic"] = "travel"  # tuneline.tasks: the domain plug-in
    paths: PathsParams = PathsParams()
    model: ModelParams = ModelParams()
    compute: ComputeParams = ComputeParams()
    base: BaseParams = BaseParams()
    generate: GenerateParams = GenerateParams()
    clean: CleanParams = CleanParams()
    sft: SftParams = SftParams()
    pairs: PairsParams = PairsParams()
    dpo: DpoParams = DpoParams()
    probe: ProbeParams = ProbeParams()
    compare: CompareParams = CompareParams()
    archive: ArchiveParams = ArchiveParams()

    @model_validator(mode="after")
    def _cross_checks(self) -> Params:
        problems = []
        names = set(self.probe.models)
        if self.compare.baseline not in names:
            problems.append(
                f"compare.baseline: {self.compare.baseline!r} is not a probe model (allowed: {sorted(names)})"
            )
        for i, pair in enumerate(self.compare.pairs):
            for name in pair:
                if name not in names:
                    problems.append(f"compare.pairs[{i}]: {name!r} is not a probe model (allowed: {sorted(names)})")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def probe_suite(self) -> str:
        return self.paths.probe_suite


class ParamsError(InputError):
    """Every problem found in a params file, one per line."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} invalid param(s):\n{lines}")


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) or next(
            (f for f in current.model_fields.values() if f.alias == part), None
        )
        if field is None:
            return None
        current = field.annotation
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(f.alias or name for name, f in current.model_fields.items())
    return None


def _format_error(err: dict[str, Any]) -> str:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(root)"
    value = err.get("input")
    kind = err["type"]
    if kind == "extra_forbidden" and len(loc) == 2 and loc[0] in ("sft", "dpo") and loc[1] in MOVED_TO_TRAINER:
        return f"{path}: moved to {loc[0]}.trainer.{MOVED_TO_TRAINER[loc[1]]} (TRL's name for it)"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(Params, loc)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required but missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "greater_than" and err.get("ctx", {}).get("gt") == 0 and isinstance(value, int):
        msg = "is not a positive integer"
    elif kind == "greater_than_equal" and err.get("ctx", {}).get("ge") == 0:
        msg = "must be >= 0"
    if kind == "value_error" and not loc:
        return msg
    return f"{path}: {value!r} {msg}" if value is not None and not isinstance(value, dict) else f"{path}: {msg}"


def parse_params(data: Any, source: str = "params") -> Params:
    """Validate a params mapping; raise ParamsError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(source, [f"(root): expected a mapping of sections, got {type(data).__name__}"])
    problems: list[str] = []
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        params = None
        for err in exc.errors():
            problems.extend(_format_error(err).split("; "))
    for stage, defaults in (("sft", SFT_TRAINER), ("dpo", DPO_TRAINER)):
        section = data.get(stage)
        trainer = section.get("trainer") if isinstance(section, dict) else None
        if isinstance(trainer, dict):
            problems.extend(_check_trainer_values(stage, {**defaults, **trainer}))
    if problems or params is None:
        raise ParamsError(source, problems)
    problems = _check_passthrough(params)
    if problems:
        raise ParamsError(source, problems)
    return params


def _check_passthrough(params: Params) -> list[str]:
    """Names in pass-through dicts must be fields of the TRL/peft config they feed.

    The names of the stages' default trainer settings are known fields; TRL (slow to
    import) is imported only for other names, so checking the default params stays fast.
    """
    problems: list[str] = []
    checks = [
        ("sft.trainer", params.sft.trainer, "trl", "SFTConfig"),
        ("dpo.trainer", params.dpo.trainer, "trl", "DPOConfig"),
        ("sft.lora.extra", params.sft.lora.extra, "peft", "LoraConfig"),
        ("dpo.lora.extra", params.dpo.lora.extra, "peft", "LoraConfig"),
    ]
    for where, values, module, cls_name in checks:
        unknown = [key for key in values if key not in SFT_TRAINER]
        if not unknown:
            continue
        import dataclasses
        import importlib

        cls = getattr(importlib.import_module(module), cls_name)
        allowed = {f.name for f in dataclasses.fields(cls)}
        for key in unknown:
            if key not in allowed:
                problems.append(f"{where}.{key}: not a field of {module}.{cls_name}")
    return problems


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise InputError(f"{path}: params file not found (run from the project root)") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from exc
    return parse_params(data, str(path))


def check_runtime(params: Params) -> list[str]:
    """Problems that depend on this machine (e.g. nf4 or device 'cuda' without CUDA)."""
    import torch

    problems = []
    has_cuda = torch.cuda.is_available()
    if params.model.quantization == "nf4" and not has_cuda:
        problems.append("model.quantization: 'nf4' needs a CUDA GPU with bitsandbytes; this machine has no CUDA (use 'none')")
    if params.model.device == "cuda" and not has_cuda:
        problems.append("model.device: 'cuda' requested but torch.cuda.is_available() is False (use 'auto' or 'cpu')")
    if params.compute.num_processes > 1 and has_cuda and params.compute.num_processes > torch.cuda.device_count():
        problems.append(
            f"compute.num_processes: {params.compute.num_processes} exceeds the {torch.cuda.device_count()} visible GPU(s)"
        )
    return problems
