"""Typed, frozen configuration loaded from ``params.yaml``.

One dataclass per section of ``params.yaml``; :func:`load_config` checks every key and
type and raises :class:`ConfigError` naming the offending key (``train.lr``), so bad
params fail at load time rather than deep inside a stage.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from clipcap.errors import ClipcapError


class ConfigError(ClipcapError, ValueError):
    """A ``params.yaml`` key is missing, unknown or has a bad value."""


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "tuxpaint"
    source: Literal["tuxpaint", "folder"] = "tuxpaint"
    root: str | None = None
    batches_dir: str = "data"
    limit: int | None = None


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 0
    test_fraction: float = 0.1
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.test_fraction < 1:
            raise ConfigError("split.test_fraction must be between 0 and 1")
        if not 0 <= self.val_fraction < 1 - self.test_fraction:
            raise ConfigError("split.val_fraction must be >= 0 and leave room for training data")


@dataclass(frozen=True)
class ValidateConfig:
    min_caption_chars: int = 2
    max_caption_chars: int = 300
    min_image_side: int = 16


@dataclass(frozen=True)
class EncoderConfig:
    name: str = "efficientnet-lite0"
    batch_size: int = 32
    num_workers: int = 2


@dataclass(frozen=True)
class LMConfig:
    name: str = "smollm2-135m"
    tokenizer: str | None = None
    finetune: bool = False


@dataclass(frozen=True)
class MapperConfig:
    type: Literal["transformer", "mlp"] = "transformer"
    prefix_length: int = 10
    clip_length: int = 10
    num_layers: int = 8
    num_heads: int = 8
    mlp_ratio: float = 2.0
    center_embedding: bool = True
    normalize_embedding: bool = True

    def __post_init__(self) -> None:
        if self.prefix_length < 1:
            raise ConfigError("mapper.prefix_length must be >= 1")
        if self.clip_length < 1:
            raise ConfigError("mapper.clip_length must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    epochs: int = 10
    batch_size: int = 40
    lr: float = 2e-5
    warmup_steps: int = 5000
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_caption_tokens: int = 40
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError("train.epochs must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    num_beams: int = 5
    max_new_tokens: int = 20
    batch_size: int = 16
    num_samples: int = 20


@dataclass(frozen=True)
class RegisterConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "clipcap"
    metric: str = "CIDEr"


@dataclass(frozen=True)
class PathsConfig:
    artifacts: str = "artifacts"


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def _check_value(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` coerced to ``hint`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")  # pragma: no cover - programming error


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key (known keys in {prefix}: {', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        key = f"{prefix}.{name}"
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key)
        else:
            kwargs[name] = _check_value(key, value, hint)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a parsed ``params.yaml`` mapping."""
    if not isinstance(data, dict):
        raise ConfigError("params.yaml: expected a mapping of sections at the top level")
    hints = typing.get_type_hints(Config)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(hints)})")
    return Config(**{name: _build(hints[name], data.get(name), name) for name in hints})


def load_config(path: str | Path = "params.yaml") -> Config:
    """Load and check ``params.yaml``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: parameter file not found (run from the project root or pass --params)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return config_from_dict(data)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
