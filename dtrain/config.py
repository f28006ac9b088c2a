"""The run configuration: where the shipped YAML files live, and the schema they obey.

Hydra composes ``conf/config.yaml`` with its groups and the command-line overrides;
:func:`validate` then checks the composed config against :class:`RunConfig` before
anything else happens (no data read, no model built): every key typed, ranges and
choices enforced, unknown keys refused (``+trainer.epoch=3`` included), and the few rules
that tie keys together. A problem is one line naming the key, the value and what is
allowed (:class:`ConfigError`). The checks are pydantic models, one per config group.

The YAML files ship inside the wheel as ``dtrain/conf`` (``pyproject.toml`` maps the
repository's ``conf/`` there); :func:`config_dir` finds whichever copy exists.
"""
from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from omegaconf import DictConfig, OmegaConf
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    model_validator,
)

from dtrain.data.registry import DATASET_NAMES
from dtrain.nn.init import INITIALIZERS


def config_dir() -> Path:
    """The directory of the shipped configs: ``dtrain/conf`` in an installed wheel, the
    repository's ``conf/`` in a source checkout."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def load_model_spec(name: str) -> dict[str, Any]:
    """The spec of a shipped model, ``conf/model/<name>.yaml``, as a plain dict.

    A model file may be ``@package _global_`` (to select its own optimizer defaults, as
    alexnet does); its spec is then under the ``model`` key.
    """
    models = config_dir() / "model"
    path = models / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in models.glob("*.yaml"))
        raise ValueError(f"unknown model {name!r}; {models} has {known}")
    cfg = OmegaConf.load(path)
    if "model" in cfg:
        cfg = cfg.model
    return OmegaConf.to_container(cfg, resolve=True)


def run_identity(cfg: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """What defines a run's model and data: the model spec, the dtype, and the data set
    with its subset and shape options. ``trainer.resume=auto`` continues only a run whose
    stored config has the same identity; the optimizer, schedule and logging may differ."""
    raw = cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg
    data = raw.get("data") or {}
    return {"model": raw.get("model"), "dtype": raw.get("dtype", "float32"),
            "data": {key: data.get(key) for key in ("name", "train_size", "test_size", "image_shape", "num_classes")}}


class ConfigError(ValueError):
    """A composed config breaks the schema; the message is one line naming the key."""


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]


class Section(BaseModel):
    """A config group: every key declared, nothing else accepted, ints never taken for bools."""

    model_config = ConfigDict(extra="forbid", strict=False, validate_default=True)


class ModelConfig(Section):
    name: str
    input_shape: tuple[PositiveInt, PositiveInt, PositiveInt]
    init: Literal[tuple(INITIALIZERS)] = "kaiming_normal"  # type: ignore[valid-type]
    layers: list[dict[str, Any]] = Field(min_length=1)


class DataConfig(Section):
    name: Literal[DATASET_NAMES]  # type: ignore[valid-type]
    root: str = "data"
    download: StrictBool = True
    cache_dir: str | None = None
    mirrors: list[str] | None = None
    fallback: Literal[DATASET_NAMES] | None = None  # type: ignore[valid-type]
    train_size: PositiveInt | None = None
    test_size: PositiveInt | None = None
    augment: StrictBool = False
    prefetch: NonNegativeInt | None = None
    image_shape: tuple[PositiveInt, PositiveInt, PositiveInt] | None = None
    num_classes: Annotated[int, Field(ge=2)] | None = None
    holdout: Fraction = 0.1  # of the training set, evaluated on when the test set has no labels

    @model_validator(mode="after")
    def _options_fit_the_dataset(self) -> DataConfig:
        if self.name != "synthetic" and (self.image_shape is not None or self.num_classes is not None):
            raise ValueError(f"image_shape and num_classes apply to data=synthetic only, not data={self.name}")
        if self.mirrors is not None and self.name not in ("mnist", "fashion_mnist"):
            raise ValueError(f"mirrors apply to data=mnist and data=fashion_mnist only, not data={self.name}")
        return self


class ScheduleConfig(Section):
    kind: Literal["constant", "step", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    step_size: PositiveInt = 1000
    gamma: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1
    min_lr: NonNegativeFloat = 0.0


class _Optim(Section):
    lr: PositiveFloat
    weight_decay: NonNegativeFloat = 0.0
    schedule: ScheduleConfig = ScheduleConfig()


class SGDConfig(_Optim):
    name: Literal["sgd"]
    momentum: Fraction = 0.0
    nesterov: StrictBool = False
    dampening: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0


class AdamConfig(_Optim):
    name: Literal["adam", "adamw"]
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    decoupled: StrictBool = False


class RMSpropConfig(_Optim):
    name: Literal["rmsprop"]
    alpha: Fraction = 0.99
    eps: PositiveFloat = 1e-8
    momentum: Fraction = 0.0
    centered: StrictBool = False


OptimConfig = Annotated[SGDConfig | AdamConfig | RMSpropConfig, Field(discriminator="name")]


class TrainerConfig(Section):
    mode: Literal["train", "eval", "predict", "export"] = "train"
    epochs: PositiveInt = 10
    max_steps: PositiveInt | None = None
    batch_size: PositiveInt = 64
    eval_batch_size: PositiveInt = 500
    resume: str | None = None
    checkpoint: str | None = None
    checkpoint_every: NonNegativeInt = 500
    keep_last: PositiveInt = 3
    on_nonfinite: Literal["stop", "skip"] = "stop"
    split: Literal["train", "test"] = "test"
    predictions: str = "predictions.csv"
    export_format: Literal["pt2", "pt", "safetensors"] = "pt2"
    progress: StrictBool = True


class LoggingConfig(Section):
    tensorboard: StrictBool = True
    log_interval: PositiveInt = 10
    hist_interval: NonNegativeInt = 200
    images: StrictBool = True
    timeline: StrictBool = False


class RowPartitionConfig(Section):
    devices: list[Annotated[int, Field(ge=0)] | str] = []


class ParallelConfig(Section):
    backend: Literal["auto", "nccl", "mpi", "single"] = "auto"
    bucket_mb: PositiveFloat = 25.0
    mpi_piece_mb: NonNegativeFloat = 8.0
    overlap: StrictBool | Literal["auto"] = "auto"
    deterministic: StrictBool = False
    deterministic_chunks: PositiveInt = 6
    sync_batchnorm: StrictBool = False
    check_interval: NonNegativeInt = 100
    timeout_s: PositiveFloat | None = 300.0
    devices_per_rank: PositiveInt = 1
    row_partition: RowPartitionConfig = RowPartitionConfig()


class PrecisionConfig(Section):
    compute: Literal["float32", "float16"] = "float32"
    loss_scale: Literal["dynamic"] | PositiveFloat = "dynamic"
    init_scale: PositiveFloat = 65536.0
    growth_factor: Annotated[float, Field(gt=1, allow_inf_nan=False)] = 2.0
    backoff_factor: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 0.5
    growth_interval: PositiveInt = 2000
    tf32: StrictBool = False

    @property
    def mixed(self) -> bool:
        """Whether forward/backward run in float16 on a compute twin."""
        return self.compute == "float16"

    @property
    def dynamic(self) -> bool:
        return self.loss_scale == "dynamic"


class RunConfig(Section):
    """Everything one run is configured by (``conf/config.yaml`` and its groups)."""

    seed: NonNegativeInt = 0
    device: Literal["auto", "cpu", "gpu"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    threads: PositiveInt | None = None
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig = TrainerConfig()
    logging: LoggingConfig = LoggingConfig()
    parallel: ParallelConfig = ParallelConfig()
    precision: PrecisionConfig = PrecisionConfig()

    @model_validator(mode="after")
    def _keys_that_go_together(self) -> RunConfig:
        if self.precision.compute == "float16" and self.dtype != "float32":
            raise _Rule("dtype", self.dtype, "precision.compute=float16 keeps float32 master weights: use "
                        "dtype=float32")
        if self.precision.tf32 and self.device == "cpu":
            raise _Rule("precision.tf32", True, "TF32 is a GPU tensor-core mode: use device=gpu or auto")
        p, t = self.parallel, self.trainer
        if p.deterministic and t.batch_size % p.deterministic_chunks:
            raise _Rule("trainer.batch_size", t.batch_size, f"deterministic mode cuts it into "
                        f"parallel.deterministic_chunks={p.deterministic_chunks} micro-batches: use a multiple")
        if p.deterministic and p.sync_batchnorm:
            raise _Rule("parallel.sync_batchnorm", True, "deterministic mode normalizes each micro-batch by its own "
                        "statistics and applies every micro-batch's running statistics on every rank in one order; "
                        "set parallel.sync_batchnorm=false")
        if self.optim.schedule.min_lr > self.optim.lr:
            raise _Rule("optim.schedule.min_lr", self.optim.schedule.min_lr, f"at most optim.lr={self.optim.lr}")
        return self


class _Rule(ValueError):
    """A rule between keys, reported against ``key``."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(allowed)
        self.key, self.value, self.allowed = key, value, allowed


def validate(cfg: DictConfig | dict[str, Any]) -> RunConfig:
    """The composed config as a checked :class:`RunConfig`; :class:`ConfigError` otherwise."""
    raw = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    precision = raw.get("precision")
    if isinstance(precision, dict) and precision.get("compute") == "bfloat16":
        raise ConfigError("precision.compute='bfloat16': not supported, neither NumPy nor CuPy has a bfloat16 "
                          "array type; use precision.compute=float16 (with dynamic loss scaling)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err, raw)) from None


def _one_line(err: ValidationError, raw: dict[str, Any]) -> str:
    """The first problem of ``err`` as ``key=value: what is allowed``.

    pydantic reports a value that fits no member of a union (``overlap: bool | 'auto'``)
    once per member, under the member's tag; those reports are merged into one.
    """
    problems = err.errors(include_url=False)
    rule = next((p["ctx"]["error"] for p in problems if isinstance(p.get("ctx", {}).get("error"), _Rule)), None)
    if rule is not None:
        return f"{rule.key}={rule.value!r}: {rule.allowed}"
    first = _config_path(problems[0])
    same = [p for p in problems if _config_path(p) == first]
    while first and first[-1].isdigit():  # an item of a list or tuple: report the whole value
        first = first[:-1]
    key = ".".join(first) or "the config"
    value = _lookup(raw, first)
    if same[0]["type"] == "extra_forbidden":
        section = ".".join(first[:-1])
        allowed = _section_keys(first[:-1], raw)
        return (f"unknown config key {key}={same[0]['input']!r}; {section or 'the config'} has "
                f"{', '.join(allowed)}")
    messages = list(dict.fromkeys(_message(p) for p in same))
    return f"{key}={value!r}: {' or '.join(messages)}"


def _message(problem: dict[str, Any]) -> str:
    message = problem["msg"]
    message = message.removeprefix("Value error, ")
    where = [str(part) for part in problem["loc"] if isinstance(part, int)]
    return f"item {where[-1]}: {message}" if where and problem["type"] == "missing" else message


def _config_path(problem: dict[str, Any]) -> list[str]:
    """The problem's location without pydantic's union-member tags: keys and indices."""
    loc, unknown_key = problem["loc"], problem["type"] == "extra_forbidden"
    path: list[str] = []
    model: Any = RunConfig
    for position, part in enumerate(loc):
        if isinstance(part, int):
            path.append(str(part))
            continue
        fields = _fields(model)
        if part in fields or (unknown_key and position == len(loc) - 1):
            path.append(part)
            model = fields.get(part)
    return path


def _fields(model: Any) -> dict[str, Any]:
    """Field name -> sub-model (a section, a tuple of alternative sections, or None) of a
    section or of alternative sections (their fields merged)."""
    if isinstance(model, tuple):
        return {name: sub for m in model for name, sub in _fields(m).items()}
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {name: _sub_model(f.annotation) for name, f in model.model_fields.items()}
    return {}


def _sub_model(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else ()
    if members and all(isinstance(m, type) and issubclass(m, BaseModel) for m in members):
        return members
    return None


def _lookup(raw: Any, path: list[str]) -> Any:
    for part in path:
        if isinstance(raw, dict) and part in raw:
            raw = raw[part]
        elif isinstance(raw, list) and part.isdigit() and int(part) < len(raw):
            raw = raw[int(part)]
        else:
            return None
    return raw


def _section_keys(path: list[str], raw: dict[str, Any]) -> list[str]:
    """The keys the schema allows under ``path`` (``trainer``, ``optim.schedule``, ...); for
    ``optim``, those of the optimizer named in ``raw``."""
    model: Any = RunConfig
    for part in path:
        model = _fields(model).get(part)
    if isinstance(model, tuple):  # the optimizers: the one named in the config
        name = _lookup(raw, path + ["name"])
        model = next((m for m in model if name in get_args(m.model_fields["name"].annotation)), model)
    return list(_fields(model))
