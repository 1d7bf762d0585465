"""Typed, flat run configuration, validated once at the door.

Every value a sweep may vary is a flat field with a default, so a search space can name it.
YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import KdrayError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class RunConfig:
    # --- what to train -------------------------------------------------------------------
    method: str = "ekd"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    download: bool = True
    train_fraction: float = 1.0
    data_seed: int = 0  # seeds the validation split and the train_fraction subset
    val_fraction: float = 0.1
    image_size: Optional[int] = None  # None: the dataset's own default
    crop_padding: Optional[int] = None  # None: the dataset's default (4 at 32 px)
    hflip: Optional[bool] = None  # None: the dataset's default (off for digits)
    student: str = "resnet8"
    teachers: Optional[str] = None  # a directory written by `kdray teachers train`
    # --- method hyperparameters (see methods.md) -----------------------------------------
    branches: int = 3  # EKD: B
    split_stage: int = 1  # EKD: stages in the shared trunk
    temperature: float = 4.0  # T
    alpha: Optional[float] = None  # a; None: the method's default (0.9 kd/avg_kd/ekd, 0 feed)
    branch_alpha: Optional[list] = None  # EKD: one a per branch (length == branches)
    feat_weight: float = 0.0  # g (EKD feature term)
    ens_ce_weight: float = 1.0  # d (EKD ensemble CE)
    ens_kd_weight: float = 0.0  # e (EKD ensemble KD)
    feed_weight: float = 500.0  # b (FEED)
    generations: int = 2  # sequential FEED
    # --- optimisation --------------------------------------------------------------------
    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    lr_milestones: list = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of epochs
    lr_gamma: float = 0.1
    batch_size: int = 64
    eval_batch_size: int = 512
    precise_bn: bool = False  # recompute BatchNorm statistics on the train split before each evaluation
    seed: int = 0
    # --- runtime -------------------------------------------------------------------------
    device: str = "auto"
    amp: str = "auto"  # bf16 autocast on GPU when auto
    channels_last: Optional[bool] = None  # None: on for GPU
    sync_bn: Optional[bool] = None  # None: SyncBatchNorm when several GPU workers train (CUDA only)
    workers: int = 1  # Ray Train workers (1 = in-process)
    checkpoint_dir: Optional[str] = None
    resume: bool = False

    # ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})

    def resolved_alpha(self, default: float) -> float:
        return default if self.alpha is None else float(self.alpha)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
_HINTS = typing.get_type_hints(RunConfig)


def _base_type(name: str):
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = type(None) in typing.get_args(hint)
    if args:
        hint = args[0]
    return hint, optional


def unknown_key_error(key: str, where: str = "config") -> KdrayError:
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return KdrayError(
        f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(sorted(FIELDS))}"
    )


def coerce(key: str, value: Any, where: str = "config") -> Any:
    """Coerce one value to the field's type, or raise a one-line error naming the key."""
    if key not in FIELDS:
        raise unknown_key_error(key, where)
    typ, optional = _base_type(key)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise KdrayError(f"{where}: key {key!r} may not be empty")
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("1", "true", "yes", "on"):
                    return True
                if low in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError
            return str(value)
        if typ is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [float(v) for v in value]
    except (TypeError, ValueError):
        raise KdrayError(
            f"{where}: key {key!r} must be {typ.__name__}{' or null' if optional else ''}, "
            f"got {value!r}"
        ) from None
    return value


def _check_range(cfg: RunConfig, where: str) -> None:
    def bad(key, allowed):
        return KdrayError(f"{where}: {key}={getattr(cfg, key)!r} is out of range; allowed: {allowed}")

    if cfg.optimizer not in OPTIMIZERS:
        raise KdrayError(f"{where}: unknown optimizer {cfg.optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise KdrayError(f"{where}: unknown schedule {cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if cfg.amp not in AMP_MODES:
        raise KdrayError(f"{where}: unknown amp mode {cfg.amp!r}; allowed: {', '.join(AMP_MODES)}")
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise KdrayError(f"{where}: unknown device {cfg.device!r}; allowed: {', '.join(DEVICES)}, cuda:N")
    if not 0 < cfg.train_fraction <= 1:
        raise bad("train_fraction", "0 < train_fraction <= 1")
    if not 0 < cfg.val_fraction < 1:
        raise bad("val_fraction", "0 < val_fraction < 1")
    if not 1 <= cfg.branches <= 8:
        raise bad("branches", "1..8")
    if cfg.split_stage < 0:
        raise bad("split_stage", ">= 0")
    if not cfg.temperature > 0:
        raise bad("temperature", "> 0")
    for key in ("feat_weight", "ens_ce_weight", "ens_kd_weight", "feed_weight", "weight_decay", "momentum"):
        if getattr(cfg, key) < 0:
            raise bad(key, ">= 0")
    if cfg.alpha is not None and not 0 <= cfg.alpha <= 1:
        raise bad("alpha", "0..1")
    if cfg.branch_alpha is not None:
        if len(cfg.branch_alpha) != cfg.branches:
            raise KdrayError(
                f"{where}: branch_alpha has {len(cfg.branch_alpha)} values but branches={cfg.branches}; "
                "give one value per branch"
            )
        if any(not 0 <= a <= 1 for a in cfg.branch_alpha):
            raise bad("branch_alpha", "each value in 0..1")
    if cfg.generations < 1:
        raise bad("generations", ">= 1")
    if cfg.epochs < 1:
        raise bad("epochs", ">= 1")
    if not cfg.lr > 0:
        raise bad("lr", "> 0")
    if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise bad("batch_size", ">= 1")
    if cfg.workers < 1:
        raise bad("workers", ">= 1")
    if cfg.image_size is not None and cfg.image_size < 8:
        raise bad("image_size", ">= 8")
    if cfg.crop_padding is not None and cfg.crop_padding < 0:
        raise bad("crop_padding", ">= 0")


def from_dict(data: dict, where: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise KdrayError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    values = {}
    for key, value in data.items():
        values[key] = coerce(str(key), value, where)
    cfg = RunConfig(**values)
    _check_range(cfg, where)
    return cfg


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise KdrayError(f"{path}: file not found")
    try:
        with path.open() as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        loc = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise KdrayError(f"{path}: malformed YAML{loc}: {problem}") from None


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> RunConfig:
    """Build a RunConfig from an optional YAML file plus CLI overrides (None values ignored)."""
    data: dict = {}
    where = "config"
    if path is not None:
        where = str(path)
        loaded = load_yaml(path)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise KdrayError(f"{path}: expected a mapping of config keys, got {type(loaded).__name__}")
        for key in loaded:
            if key not in FIELDS:
                raise unknown_key_error(str(key), where)
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(data, where)
