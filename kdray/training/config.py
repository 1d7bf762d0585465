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

from kdray.core.errors import KdrayError
from kdray.core.io import first_line
from kdray.core.values import coerce_value
from kdray.data.bundle import BAD_IMAGE_POLICIES, DATA_PATHS, VIEW_KINDS
from kdray.distill import HPARAMS, RESERVED_NAMES

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")
AMP_MODES = ("auto", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class RunConfig:
    """One run's configuration: the fields below, plus every hyperparameter a registered method
    declares (``cfg.temperature``, ``cfg.feed_weight``, ...), read through ``hparams``.

    Immutable: ``replace`` returns a new, re-validated config."""

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
    views: str = "auto"  # auto: pad_crop up to 64 px, resized_crop (ImageNet-style) above
    view_count: int = 256  # resized_crop: the finite set of views each sample owns (V)
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # resized_crop: area share range
    crop_ratio: list = field(default_factory=lambda: [0.75, 4 / 3])  # resized_crop: aspect range
    data_path: str = "auto"  # auto: in memory when the decoded set fits in_memory_limit_gb, else streamed
    in_memory_limit_gb: float = 4.0
    bad_images: str = "fail"  # an undecodable image: fail the run, or skip it (counted and said)
    student: str = "resnet8"
    teachers: Optional[str] = None  # a directory written by `kdray teachers train`
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
    # the training step's precision; auto: bf16 autocast on GPU and on CPUs with native bf16 (AVX512_BF16 /
    # AMX). Logged accuracies are measured in fp32 whatever it says (kdray.core.device.Precision).
    amp: str = "auto"
    channels_last: Optional[bool] = None  # None: on (GPU and CPU)
    sync_bn: Optional[bool] = None  # None: SyncBatchNorm when several GPU workers train (CUDA only)
    workers: int = 1  # Ray Train workers (1 = in-process)
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    # --- the methods' declared hyperparameters, by name (see kdray/distill/hparams.py) ------------
    hparams: dict = field(default_factory=dict, repr=False)

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not fields
        if name.startswith("__") or name not in HPARAMS:
            raise AttributeError(f"RunConfig has no key {name!r}")
        return self.__dict__.get("hparams", {}).get(name, HPARAMS[name].default)

    def to_dict(self) -> dict:
        """Every key, flat: the fields and every declared hyperparameter (defaults filled in)."""
        out = {f: getattr(self, f) for f in FIELDS}
        out.update({name: getattr(self, name) for name in HPARAMS})
        return {k: list(v) if isinstance(v, list) else v for k, v in out.items()}

    def replace(self, **changes) -> "RunConfig":
        return from_dict({**self.to_dict(), **changes})

    def resolved_alpha(self, default: float) -> float:
        return default if self.alpha is None else float(self.alpha)


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig) if f.name != "hparams"}
_HINTS = typing.get_type_hints(RunConfig)
RESERVED_NAMES.update(FIELDS, {"hparams"})  # a method may not declare a run-config key
CHOICES = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "amp": AMP_MODES, "views": VIEW_KINDS,
           "data_path": DATA_PATHS, "bad_images": BAD_IMAGE_POLICIES}
#: the range of each numeric field: (test, what is allowed)
RANGES = {
    "train_fraction": (lambda v: 0 < v <= 1, "0 < train_fraction <= 1"),
    "val_fraction": (lambda v: 0 < v < 1, "0 < val_fraction < 1"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "momentum": (lambda v: v >= 0, ">= 0"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "eval_batch_size": (lambda v: v >= 1, ">= 1"),
    "workers": (lambda v: v >= 1, ">= 1"),
    "image_size": (lambda v: v is None or v >= 8, ">= 8"),
    "crop_padding": (lambda v: v is None or v >= 0, ">= 0"),
    "view_count": (lambda v: v >= 1, ">= 1"),
    "crop_scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1"),
    "crop_ratio": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[low, high] with 0 < low <= high"),
    "in_memory_limit_gb": (lambda v: v >= 0, ">= 0"),
}


def all_keys() -> list[str]:
    """Every key a config, a space or ``--set`` may name: the fields and the declared hyperparameters."""
    return sorted(set(FIELDS) | set(HPARAMS))


def is_key(key: str) -> bool:
    return key in FIELDS or key in HPARAMS


def unknown_key_error(key: str, where: str = "config") -> KdrayError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return KdrayError(f"{where}: unknown key {key!r}{hint}; allowed keys: {', '.join(all_keys())}")


def _field_type(name: str) -> tuple[type, bool]:
    hint = _HINTS[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), type(None) in typing.get_args(hint)


def coerce(key: str, value: Any, where: str = "config") -> Any:
    """One value checked for its key: coerced to the field's type, or a declared hyperparameter's
    type and range; a one-line KdrayError naming the key otherwise."""
    if key in HPARAMS:
        return HPARAMS[key].check(value, where)
    if key not in FIELDS:
        raise unknown_key_error(key, where)
    return coerce_value(key, *_field_type(key), value, where)


def _check_fields(cfg: RunConfig, where: str) -> None:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise KdrayError(f"{where}: unknown {key} {getattr(cfg, key)!r}; allowed: {', '.join(allowed)}")
    if cfg.device not in DEVICES and not cfg.device.startswith("cuda:"):
        raise KdrayError(f"{where}: unknown device {cfg.device!r}; allowed: {', '.join(DEVICES)}, cuda:N")
    for key, (ok, allowed) in RANGES.items():
        if not ok(getattr(cfg, key)):
            raise KdrayError(f"{where}: {key}={getattr(cfg, key)!r} is out of range; allowed: {allowed}")


def _check_per_branch(cfg: RunConfig, where: str) -> None:
    """A per-branch hyperparameter (EKD's branch_alpha) has one value per branch."""
    for p in HPARAMS.values():
        values = getattr(cfg, p.name)
        if p.per_branch and values is not None and len(values) != cfg.branches:
            raise KdrayError(
                f"{where}: {p.name} has {len(values)} values but branches={cfg.branches}; give one value per branch"
            )


def from_dict(data: dict, where: str = "config") -> RunConfig:
    """The validated config of a flat mapping: unknown keys, wrong types and ranges are refused."""
    if not isinstance(data, dict):
        raise KdrayError(f"{where}: expected a mapping of keys to values, got {type(data).__name__}")
    values = {str(k): coerce(str(k), v, where) for k, v in data.items()}
    fields = {k: v for k, v in values.items() if k in FIELDS}
    hparams = {name: values.get(name, p.default) for name, p in HPARAMS.items()}
    cfg = RunConfig(**fields, hparams=hparams)
    _check_fields(cfg, where)
    _check_per_branch(cfg, where)
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
        problem = getattr(exc, "problem", None) or first_line(exc)
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
            if not is_key(str(key)):
                raise unknown_key_error(str(key), where)
        data.update(loaded)
    for key, value in (overrides or {}).items():
        if value is not None:
            data[key] = value
    return from_dict(data, where)


def tracked_config(cfg) -> dict:
    """The config values a run logs as MLflow params: the run's fields and its own method's
    hyperparameters (not those of every registered method: FEED's ``feed_weight`` is no EKD
    run's), a per-branch list as one value per branch (``branch_alpha_0``, ...: the names a
    sweep's Optuna trials use) and left out when unset."""
    from kdray.distill import get_method

    own = {p.name for p in get_method(cfg.method).hparams}
    out = {}
    for key, value in cfg.to_dict().items():
        declared = HPARAMS.get(key)
        if declared is None:
            out[key] = value
        elif key in own and declared.per_branch:
            out.update({f"{key}_{b}": v for b, v in enumerate(value or [])})
        elif key in own:
            out[key] = value
    return out


SYNC_BN_NEEDS_CUDA = ("sync_bn: true needs GPU workers (torch's SyncBatchNorm is CUDA-only); "
                      "leave sync_bn unset or false on CPU")
