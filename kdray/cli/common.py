"""What the commands share: the working directory, the log, the option groups of train and
teachers, their config, tracking settings from the flags, and the one JSON line of --json."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from kdray.api import DEFAULT_WORKDIR, resolve_workdir
from kdray.core.console import to_stderr
from kdray.core.errors import KdrayError

log = to_stderr  # every command's progress lines go to stderr (stdout is for results and --json)


def workdir(args) -> Path:
    return resolve_workdir(getattr(args, "workdir", None))


def parse_set(items) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise KdrayError(f"--set {item!r} must look like KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


# --------------------------------------------------------------------------------------------
# shared option groups
# --------------------------------------------------------------------------------------------
def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits (embedded default), cifar10, cifar100, imagefolder, webdataset, fake")
    g.add_argument("--data-dir",
                   help="where the dataset lives (cifar: download root; imagefolder: the class-per-folder tree; "
                        "webdataset: the folder of .tar shards); a local path or a URI (s3://, gs://, hdfs://)")
    g.add_argument("--no-download", dest="download", action="store_const", const=False,
                   help="never download (cifar); fail with a message if the files are missing")
    g.add_argument("--train-fraction", type=float,
                   help="stratified fraction of the training split to use (0-1], for limited-data runs")
    g.add_argument("--val-fraction", type=float,
                   help="fraction of the training split held out for validation (default 0.1)")
    g.add_argument("--data-seed", type=int,
                   help="seed of the validation split and the train-fraction subset (default 0)")
    g.add_argument("--image-size", type=int, help="the models' input size in px (default 32)")
    g.add_argument("--data-path", choices=("auto", "memory", "stream"),
                   help="auto (default): hold the set decoded in memory when it fits --in-memory-limit-gb, else "
                        "stream it through Ray Data; memory or stream force a path")
    g.add_argument("--in-memory-limit-gb", type=float, metavar="GB",
                   help="the decoded size up to which auto holds a set in memory, per worker (default 4)")
    g.add_argument("--views", choices=("auto", "pad_crop", "resized_crop"),
                   help="training views: pad_crop (CIFAR-size) or resized_crop (ImageNet-style RandomResizedCrop "
                        "+ flip, resize + centre-crop eval); auto (default): pad_crop up to 64 px")
    g.add_argument("--view-count", type=int, metavar="V",
                   help="resized_crop: the finite set of views each sample is drawn from (default 256)")
    g.add_argument("--crop-scale", metavar="LOW,HIGH", help="resized_crop: area share range (default 0.08,1.0)")
    g.add_argument("--crop-ratio", metavar="LOW,HIGH", help="resized_crop: aspect range (default 0.75,1.333)")
    g.add_argument("--bad-images", choices=("fail", "skip"),
                   help="an undecodable image: fail (default) names it and stops; skip drops it, counted and said")


def add_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="training epochs (default 10)")
    g.add_argument("--batch-size", type=int, help="global batch size, split across workers (default 64)")
    g.add_argument("--lr", type=float, help="learning rate (default 0.05)")
    g.add_argument("--optimizer", help="sgd (default) or adamw")
    g.add_argument("--schedule", help="cosine (default), step or constant")
    g.add_argument("--weight-decay", type=float, help="weight decay (default 5e-4)")
    g.add_argument("--seed", type=int, help="seed for initialisation, shuffling and augmentation (default 0)")
    g.add_argument("--device", help="auto (default: cuda if visible), cpu, cuda, cuda:N")
    g.add_argument("--amp", help="training-step precision: auto (bf16 autocast on GPU and on CPUs with native "
                   "bf16), bf16, off; logged accuracies are always measured in fp32, as the exported model runs")
    g.add_argument("--config", help="YAML file of config keys (read with safe_load); flags override it")
    g.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="set any config key (repeatable), e.g. --set feat_weight=0.1")


def collect(args, keys) -> dict:
    return {k: getattr(args, k, None) for k in keys}


# --------------------------------------------------------------------------------------------
# the run config from the flags; the --json output
# --------------------------------------------------------------------------------------------
DATA_KEYS = ("dataset", "data_dir", "download", "train_fraction", "val_fraction", "data_seed", "image_size",
             "data_path", "in_memory_limit_gb", "views", "view_count", "crop_scale", "crop_ratio", "bad_images")


OPTIM_KEYS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "seed", "device", "amp")


RUN_KEYS = ("method", "student", "teachers", "workers")


def method_keys() -> tuple:
    """The run keys plus every hyperparameter the registered methods declare (each has a flag)."""
    from kdray.distill import HPARAMS

    return RUN_KEYS + tuple(HPARAMS)


def build_config(args, keys, extra=None):
    from kdray.training.config import load_config

    overrides = collect(args, keys)
    overrides.update(parse_set(getattr(args, "set", None)))
    overrides.update(extra or {})
    return load_config(getattr(args, "config", None), overrides)


def tracking_uri(args) -> str:
    from kdray.tracking.store import resolve_uri

    return resolve_uri(getattr(args, "tracking_uri", None), workdir(args))


def tracking_from_args(args, experiment_default: str = "kdray"):
    """None with --no-track; else the checked store, experiment and workdir for MLflow."""
    from kdray.tracking.state import tracking_settings

    return tracking_settings(not getattr(args, "no_track", False), getattr(args, "tracking_uri", None),
                             getattr(args, "experiment", None) or experiment_default, workdir(args))


WORKDIR_HELP = (f"kdray working directory for teachers, runs and local stores (default ./{DEFAULT_WORKDIR} or "
                "$KDRAY_WORKDIR); before or after the command")


TRACKING_HELP = ("MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db); "
                 "before or after the command")


def add_hparam_args(group) -> None:
    """One flag per hyperparameter the registered methods declare (``--feat-weight``, ...):
    its type, help and default come from the declaration (kdray/distill/hparams.py)."""
    from kdray.distill import HPARAMS, METHODS

    for name, p in sorted(HPARAMS.items()):
        users = ", ".join(m for m, cls in sorted(METHODS.items()) if p in cls.hparams)
        default = "" if p.default is None else f", default {p.default}"
        kind = str if p.type in (list, bool) else p.type  # lists as "0.5,0.7"; the config coerces both
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, metavar=name.upper(),
                           help=f"{p.help} ({users}{default}; allowed: {p.allowed()})")


def add_tracking_args(p: argparse.ArgumentParser, default_experiment: str = "kdray") -> None:
    g = p.add_argument_group("tracking (MLflow)")
    g.add_argument("--experiment", help=f"MLflow experiment name (default {default_experiment})")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///WORKDIR/mlflow.db)")
    g.add_argument("--no-track", action="store_true", help="do not log to MLflow")


_JSON_OUT = None  # the real stdout while a --json command runs (everything else goes to stderr)


@contextlib.contextmanager
def json_to_real_stdout():
    """While a --json command runs, stdout goes to stderr and only :func:`emit_json` reaches the
    real stdout (MLflow, Ray and Tune print "View run ..." links and tables there)."""
    global _JSON_OUT
    _JSON_OUT = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _JSON_OUT = None


def emit_json(obj, **kw) -> None:
    """The one JSON line a --json command prints: on the real stdout, whatever libraries print."""
    out = _JSON_OUT or sys.stdout
    out.write(json.dumps(obj, **kw) + "\n")
    out.flush()
