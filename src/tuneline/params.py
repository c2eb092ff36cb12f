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

The code defaults are the committed ``params.yaml``: a params file holding ``{}`` runs the
documented default pipeline. A file with no mapping (empty), duplicate keys at any depth,
booleans where numbers are expected and non-finite numbers anywhere are refused; output
paths are checked against each other, the inputs and the project (:func:`check_paths`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from tuneline.errors import InputError

# Numbers are strict: a YAML boolean is not 1 or 0 (an int is still a valid float).
PositiveInt = Annotated[int, Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, Strict(), Field(ge=0)]
PositiveFloat = Annotated[float, Strict(), Field(gt=0.0)]
NonNegativeFloat = Annotated[float, Strict(), Field(ge=0.0)]
Probability = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]
Fraction = Annotated[float, Strict(), Field(gt=0.0, lt=1.0)]
TopP = Annotated[float, Strict(), Field(gt=0.0, le=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class PathsParams(Section):
    seed_dir: str = "data/seed"
    schema_file: str = "data/seed/contract.schema.json"
    # Development prompts (tuning, learning curves): never probed for results, and like
    # every probe suite kept out of training by clean. None: no development suite.
    dev_suite: str | None = "data/seed/dev_suite.jsonl"
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
    """How many processes run a stage (see ``tuneline.launch``).

    ``num_processes`` is per machine (one per GPU); ``num_machines`` nodes run that many
    each, so training's effective batch is per-device batch x accumulation x
    ``num_processes`` x ``num_machines``. Which node this is and where the head listens
    are runtime settings read from the environment, never params (``launch.node``).
    """

    num_processes: PositiveInt = 1
    num_machines: PositiveInt = 1
    distributed: Literal["ddp", "fsdp"] = "ddp"


class LoraParams(Section):
    r: PositiveInt = 16
    alpha: PositiveInt = 32
    dropout: Annotated[float, Strict(), Field(ge=0.0, lt=1.0)] = 0.0  # dropout copies every input; short runs do not need it
    target_modules: str | list[str] = "all-linear"
    extra: dict[str, Any] = Field(default_factory=dict)


class TemplateSourceParams(Section):
    enabled: bool = True
    max_records: PositiveInt | None = None
    variants: PositiveInt = 3  # examples per (destination, payload type)
    natural_fraction: Probability = 0.5  # share of prompts in the casual register (datagen.travel)
    uncovered_language_variants: NonNegativeInt = 3  # phrasebook requests per uncovered language
    # phrases per phrasebook, drawn uniformly between these (both capped at the destination's
    # phrase list); max None: the whole list. 3-5 chosen on the development suite
    phrasebook_min_items: PositiveInt = 3
    phrasebook_max_items: PositiveInt | None = 5

    @model_validator(mode="after")
    def _phrasebook_range(self) -> TemplateSourceParams:
        if self.phrasebook_max_items is not None and self.phrasebook_max_items < self.phrasebook_min_items:
            raise ValueError(
                f"phrasebook_max_items {self.phrasebook_max_items} is below phrasebook_min_items "
                f"{self.phrasebook_min_items} (allowed: null or at least phrasebook_min_items)"
            )
        return self


class TeacherSourceParams(Section):
    enabled: bool = False
    model: str | None = None  # None: paths.base_model
    shots: NonNegativeInt = 2
    n_samples: PositiveInt = 1
    temperature: NonNegativeFloat = 0.7
    top_p: TopP = 0.95
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

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


class GenerateParams(Section):
    sources: GenerateSources = GenerateSources()


class CleanParams(Section):
    val_fraction: Fraction = 0.1
    over_length: Literal["drop", "truncate", "raise"] = "drop"
    near_duplicate_jaccard: TopP = 0.9
    ngram: PositiveInt = 3
    leakage_jaccard: TopP = 0.8
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
DPO_TRAINER: dict[str, Any] = {**SFT_TRAINER, "learning_rate": 0.0005}
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


class CurveParams(Section):
    """The contract's learning curve during training (``tuneline.training.curve``): every
    ``every_n_steps`` optimizer steps (and at step 0 and the last step; 0: off) greedy
    outputs on a stratified prefix of the development suite, judged as the probe judges."""

    every_n_steps: NonNegativeInt
    limit: PositiveInt | None = 10  # lines of paths.dev_suite; null: the whole suite
    batch_size: PositiveInt = 10
    max_new_tokens: PositiveInt | None = None  # null: probe.max_new_tokens


class SftParams(Section):
    max_seq_len: PositiveInt = 384
    padding_free: bool = False
    packing: bool = False
    eval_each_epoch: bool = True
    min_optimizer_steps: NonNegativeInt = 30
    strict_plan: bool = False
    max_records: PositiveInt | None = 464  # null: all (GPU scale)
    max_eval_records: PositiveInt | None = 16
    # Speed-ups with the same result (tuneline.training.fused_lora, .lean_step, .cpu_loss).
    fused_lora: bool = False
    sync_free_metrics: bool = False
    completion_logits_only: bool = True
    curve: CurveParams = CurveParams(every_n_steps=116)  # 3 points over the default 232 steps (0, 116, 232)
    lora: LoraParams = LoraParams()
    trainer: dict[str, Any] = Field(default_factory=lambda: dict(SFT_TRAINER))

    @field_validator("trainer", mode="before")
    @classmethod
    def _trainer_defaults(cls, value: Any) -> Any:
        return _trainer_with_defaults(SFT_TRAINER, value)


class PairsParams(Section):
    strategies: list[
        Literal[
            "drop_field", "array_root", "truncate", "invalid_json", "off_topic", "wrong_payload_type", "repeat_item",
            "run_on",
        ]
    ] = ["drop_field", "array_root", "truncate", "invalid_json", "off_topic", "wrong_payload_type", "repeat_item",
         "run_on"]
    negatives_per_record: PositiveInt = 1
    max_records: PositiveInt | None = None
    on_policy: bool = False
    on_policy_k: Annotated[int, Strict(), Field(ge=2)] = 4
    on_policy_max_prompts: PositiveInt = 32
    on_policy_temperature: PositiveFloat = 0.8
    on_policy_top_p: TopP = 0.95
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
    curve: CurveParams = CurveParams(every_n_steps=20)  # 2 points over the default 20 steps (0, 20)
    lora: LoraParams = LoraParams()
    trainer: dict[str, Any] = Field(default_factory=lambda: dict(DPO_TRAINER))

    @field_validator("trainer", mode="before")
    @classmethod
    def _trainer_defaults(cls, value: Any) -> Any:
        return _trainer_with_defaults(DPO_TRAINER, value)


GUIDE_SUFFIX = "+guided"  # a probe model decoded under the contract's JSON Schema (tuneline.guided)


def split_model(name: str) -> tuple[str, bool]:
    """(model name, guided): ``dpo+guided`` -> (``dpo``, True); ``dpo`` -> (``dpo``, False)."""
    if name.endswith(GUIDE_SUFFIX):
        return name[: -len(GUIDE_SUFFIX)], True
    return name, False


SUITE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


class SuiteParams(Section):
    """One probe suite: its file and how many of its prompts to probe (None: all; a
    stratified subset otherwise, ``stages.probe.select_subset``)."""

    path: str
    limit: PositiveInt | None = None


def _default_suites() -> dict[str, SuiteParams]:
    return {
        "heldout": SuiteParams(path="data/seed/probe_suite.jsonl", limit=60),
        "natural": SuiteParams(path="data/seed/natural_suite.jsonl", limit=30),
    }


class GuideParams(Section):
    """Guide-only bounds (tuneline.guided.bound_schema): every array, string and integer of
    the guide's schema gets at most these (a contract bound that is tighter is kept), so a
    guided model that loops in a list or a string is made to close it. The travel targets
    need at most 7 items and 150 characters; day numbers are at most 4."""

    max_items: PositiveInt = 8
    max_string_length: PositiveInt = 160
    max_integer: PositiveInt = 99  # |value|


class ProbeParams(Section):
    # name -> adapter dir; the base itself (or None) probes the bare base. A name ending in
    # "+guided" decodes that model under the contract's JSON Schema (tuneline.guided).
    models: dict[str, str | None] = Field(
        default_factory=lambda: {
            "base": "models/base", "sft": "models/sft", "dpo": "models/dpo", "dpo+guided": "models/dpo",
        }
    )
    # name -> suite: every probe stage probes each one and writes its outputs under
    # <metrics>/probe/<name>/ and <reports>/probe/<name>/ (names: lower-case letters,
    # digits, '_' and '-').
    suites: dict[str, SuiteParams] = Field(default_factory=_default_suites)
    batch_size: PositiveInt = 90  # the default subsets (60 + 30) in one batch: finished rows leave it
    max_new_tokens: PositiveInt = 320
    do_sample: bool = False
    temperature: PositiveFloat = 1.0
    top_p: TopP = 1.0
    stratify_by: list[str] | None = None  # expect keys; None: the task's (travel: payload_type)
    # Merge the adapter into the base weights before generating: the same function up to
    # float rounding, and no LoRA side matmuls per token. Never done for nf4 bases.
    merge_adapter: bool = True
    # A preallocated KV cache with a compiled decode step on CUDA (tuneline.generation).
    static_cache: bool = False
    guide: GuideParams = GuideParams()  # the bounds of a "+guided" row's schema

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, str | None]) -> dict[str, str | None]:
        for name in value:
            head, guided = split_model(name)
            if not head or "+" in head or ("+" in name and not guided):
                raise ValueError(
                    f"{name!r}: a '+' in a model name is allowed only in the suffix {GUIDE_SUFFIX!r} after a name"
                )
        return value

    @field_validator("suites")
    @classmethod
    def _suite_names(cls, value: dict[str, SuiteParams]) -> dict[str, SuiteParams]:
        if not value:
            raise ValueError("at least one suite is needed (name -> {path, limit})")
        for name in value:
            if not SUITE_NAME.fullmatch(name):
                raise ValueError(
                    f"suite name {name!r}: allowed are lower-case letters, digits, '_' and '-', "
                    "starting with a letter or digit (it names output directories)"
                )
        return value


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
        dev = self.paths.dev_suite
        for name, suite in self.probe.suites.items():
            if dev and os.path.normpath(suite.path) == os.path.normpath(dev):
                problems.append(
                    f"probe.suites.{name}.path: {suite.path!r} is paths.dev_suite, which is for tuning only and never "
                    "probed for results (allowed: another suite file; or set paths.dev_suite to another file or null)"
                )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def probe_suites(self) -> dict[str, str]:
        """Suite name -> file, in ``probe.suites`` order."""
        return {name: suite.path for name, suite in self.probe.suites.items()}

    @property
    def held_out_files(self) -> list[str]:
        """Every prompt file training must not see: the probe suites and the development suite."""
        files = list(self.probe_suites.values())
        if self.paths.dev_suite:
            files.append(self.paths.dev_suite)
        return list(dict.fromkeys(files))


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


def _format_error(err: dict[str, Any]) -> str | None:
    loc = tuple(err["loc"])
    path = ".".join(str(p) for p in loc) or "(root)"
    value = err.get("input")
    kind = err["type"]
    if kind == "finite_number":
        return None  # reported for every value in the file by _non_finite
    if kind == "extra_forbidden" and len(loc) == 2 and loc[0] in ("sft", "dpo") and loc[1] in MOVED_TO_TRAINER:
        return f"{path}: moved to {loc[0]}.trainer.{MOVED_TO_TRAINER[loc[1]]} (TRL's name for it)"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(Params, loc)
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{path}: unknown key{hint}"
    if kind == "missing":
        return f"{path}: required but missing"
    if kind in ("int_type", "float_type") and isinstance(value, bool):
        return f"{path}: {value!r} is a boolean, not {'an integer' if kind == 'int_type' else 'a number'}"
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "greater_than" and err.get("ctx", {}).get("gt") == 0 and isinstance(value, int):
        msg = "is not a positive integer"
    elif kind == "greater_than_equal" and err.get("ctx", {}).get("ge") == 0:
        msg = "must be >= 0"
    if kind == "value_error" and not loc:
        return msg
    return f"{path}: {value!r} {msg}" if value is not None and not isinstance(value, dict) else f"{path}: {msg}"


def _non_finite(data: Any, where: str = "") -> list[str]:
    """Every NaN or infinity in the params, wherever it is (no param takes one)."""
    if isinstance(data, float) and not math.isfinite(data):
        return [f"{where or '(root)'}: {data!r} is not a finite number (no param takes NaN or infinity)"]
    if isinstance(data, dict):
        return [p for key, value in data.items() for p in _non_finite(value, f"{where}.{key}" if where else str(key))]
    if isinstance(data, list | tuple):
        return [p for i, value in enumerate(data) for p in _non_finite(value, f"{where}[{i}]")]
    return []


def parse_params(
    data: Any, source: str = "params", *, root: str | Path | None = None, problems: list[str] | None = None
) -> Params:
    """Validate a params mapping; raise ParamsError listing every problem.

    ``root`` is the project directory (the one holding params.yaml): output paths must
    lie inside it. ``problems`` found while reading the file (duplicate keys) are
    reported with the rest.
    """
    problems = list(problems or [])
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(source, [*problems, f"(root): expected a mapping of sections, got {type(data).__name__}"])
    problems.extend(_non_finite(data))
    try:
        params = Params.model_validate(data)
    except ValidationError as exc:
        params = None
        for err in exc.errors():
            message = _format_error(err)
            if message is not None:
                problems.extend(message.split("; "))
    for stage, defaults in (("sft", SFT_TRAINER), ("dpo", DPO_TRAINER)):
        section = data.get(stage)
        trainer = section.get("trainer") if isinstance(section, dict) else None
        if isinstance(trainer, dict):
            problems.extend(_check_trainer_values(stage, {**defaults, **trainer}))
    if params is not None:
        problems.extend(check_paths(params, root))
    if problems or params is None:
        raise ParamsError(source, problems)
    problems = _check_passthrough(params) + _check_choices(params)
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
        ("sft.trainer", params.sft.trainer, "trl", "SFTConfig", SFT_TRAINER),
        ("dpo.trainer", params.dpo.trainer, "trl", "DPOConfig", DPO_TRAINER),
        ("sft.lora.extra", params.sft.lora.extra, "peft", "LoraConfig", {}),
        ("dpo.lora.extra", params.dpo.lora.extra, "peft", "LoraConfig", {}),
    ]
    for where, values, module, cls_name, known in checks:
        unknown = [key for key in values if key not in known]
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


# Values TRL/transformers take from a list of their own; the defaults need no import.
KNOWN_LOSS_TYPES = {"sigmoid"}
KNOWN_SCHEDULERS = {"cosine", "linear", "constant"}


def dpo_loss_types() -> list[str]:
    """The loss types TRL's DPOConfig lists (its ``loss_type`` field's documentation)."""
    import dataclasses

    from trl import DPOConfig

    field = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type")
    return re.findall(r"`'([a-z0-9_]+)'`", field.metadata.get("help", ""))


def lr_scheduler_types() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    return [s.value for s in SchedulerType]


def _check_choices(params: Params) -> list[str]:
    """TRL-valued choices checked against TRL's and transformers' own lists; those
    libraries are imported only for a value that is not a known default."""
    problems = []
    if params.dpo.loss_type not in KNOWN_LOSS_TYPES:
        allowed = dpo_loss_types()
        if allowed and params.dpo.loss_type not in allowed:
            problems.append(f"dpo.loss_type: {params.dpo.loss_type!r} is not a TRL DPO loss type (allowed: {', '.join(allowed)})")
    for stage in ("sft", "dpo"):
        value = getattr(params, stage).trainer.get("lr_scheduler_type")
        if value not in KNOWN_SCHEDULERS:
            allowed = lr_scheduler_types()
            if value not in allowed:
                problems.append(
                    f"{stage}.trainer.lr_scheduler_type: {value!r} is not a transformers scheduler "
                    f"(allowed: {', '.join(allowed)})"
                )
    return problems


# -- paths ---------------------------------------------------------------------------

# params.paths entries a stage writes (each replaced whole or written into by its stage).
OUTPUT_PATHS = (
    "generated", "clean", "pairs", "base_model", "sft_model", "dpo_model", "checkpoints", "metrics", "reports",
)


def _inputs(params: Params, base: Path) -> list[tuple[str, str]]:
    """``(param, value)`` of every path the stages read and do not write."""
    inputs = [(f"paths.{name}", getattr(params.paths, name)) for name in ("seed_dir", "schema_file", "dev_suite")]
    inputs += [(f"probe.suites.{name}.path", path) for name, path in params.probe_suites.items()]
    if params.generate.sources.imported.path:
        inputs.append(("generate.sources.import.path", params.generate.sources.imported.path))
    source = params.base.source
    if source and (base / source).exists():
        inputs.append(("base.source", source))
    return [(name, value) for name, value in inputs if value]


def _resolve(base: Path, value: str) -> Path:
    return Path(os.path.normpath(base / os.path.expanduser(value)))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_paths(params: Params, root: str | Path | None = None) -> list[str]:
    """Problems with the output paths: empty, the same as or nested in another output,
    equal to or above an input, ``src/`` or the project, or (given ``root``, the
    directory holding params.yaml) outside the project. Relative paths are relative to
    ``root`` (the working directory when none is given)."""
    base = Path(os.path.abspath(root if root is not None else os.getcwd()))
    allowed = "allowed: a non-empty relative path inside the project, apart from every other output and input"
    problems = []
    outputs: list[tuple[str, str, Path]] = []
    for name in OUTPUT_PATHS:
        value = getattr(params.paths, name)
        where = f"paths.{name}: {value!r}"
        if not value.strip():
            problems.append(f"{where} is empty, which would write into the project root ({allowed})")
            continue
        path = _resolve(base, value)
        if root is not None and not _within(path, base):
            problems.append(f"{where} is outside the project {base} ({allowed})")
            continue
        if _within(base, path):
            problems.append(f"{where} is the project directory{' or above it' if path != base else ''} ({allowed})")
            continue
        if _within(base / "src", path):
            problems.append(f"{where} would replace the source directory {base / 'src'} ({allowed})")
            continue
        outputs.append((name, value, path))
    for i, (name, value, path) in enumerate(outputs):
        for other, other_value, other_path in outputs[:i]:
            if path == other_path:
                problems.append(f"paths.{name}: {value!r} is the same directory as paths.{other} ({allowed})")
            elif _within(path, other_path) or _within(other_path, path):
                inner, outer = (name, other) if _within(path, other_path) else (other, name)
                problems.append(
                    f"paths.{name}: {value!r} and paths.{other}: {other_value!r} are nested (paths.{inner} is inside "
                    f"paths.{outer}, which its stage replaces) ({allowed})"
                )
        for input_name, input_value in _inputs(params, base):
            if _within(_resolve(base, input_value), path):
                problems.append(
                    f"paths.{name}: {value!r} is {input_name} ({input_value!r}) or a directory above it, which its "
                    f"stage would overwrite ({allowed})"
                )
    return problems


# -- reading the file ----------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, noting every key given twice in one mapping (DVC refuses them)."""

    def __init__(self, stream: Any, source: str):
        super().__init__(stream)
        self.source = source
        self.duplicates: list[tuple[int, str]] = []

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
                if key is None or isinstance(key, list | dict):
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    self.duplicates.append((
                        line,
                        f"{self.source}:{line}: duplicate key {key!r} (first at {self.source}:{seen[key]}); "
                        "each key may appear once per mapping",
                    ))
                else:
                    seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: Path) -> tuple[Any, list[str]]:
    """The YAML document of a params file and its duplicate-key problems; a clear
    InputError for a missing file, a directory, or text that is not UTF-8 YAML."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a params file (give the path of params.yaml)")
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise InputError(f"{path}: params file not found (run from the project root)") from exc
    except OSError as exc:
        raise InputError(f"{path}: cannot read the params file: {exc.strerror or exc}") from exc
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")) or (len(raw) > 1 and b"\x00" in raw[:2]):
        raise InputError(f"{path}: the params file is UTF-16 encoded; save it as UTF-8")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{path}: not UTF-8 text (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); a params file is UTF-8 YAML"
        ) from exc
    if "\x00" in text:
        raise InputError(f"{path}: holds NUL bytes (a binary file?); a params file is UTF-8 YAML")
    loader = _UniqueKeyLoader(text, str(path))
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise InputError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    finally:
        loader.dispose()
    if data is None:
        raise InputError(f"{path}: the params file is empty (no mapping); write `{{}}` for the defaults")
    return data, [text for _, text in sorted(loader.duplicates)]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml`` (output paths must lie in its directory)."""
    path = Path(path)
    data, duplicates = read_params_file(path)
    return parse_params(data, str(path), root=path.resolve().parent, problems=duplicates)


def check_runtime(params: Params) -> list[str]:
    """Problems that depend on this machine (e.g. nf4 or device 'cuda' without CUDA).

    torch is imported only when the params ask for CUDA (nf4, device 'cuda', several
    processes), so `tuneline params check` of CPU params stays quick."""
    if not (
        params.model.quantization == "nf4" or params.model.device == "cuda" or params.compute.num_processes > 1
    ):
        return []
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
