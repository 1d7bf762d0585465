"""Training teacher ensembles with the engine (plain CE), above it: ``kdray teachers train`` and
the teachers a sweep trains once. A teacher directory is found again by the hash of its whole
recipe, so two recipes that differ anywhere never share teachers."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from kdray.core.errors import KdrayError
from kdray.core.io import atomic_save, atomic_write, sha256_file
from kdray.models import build_model
from kdray.teachers.manifest import MANIFEST, write_manifest
from kdray.tracking.state import TrackingSettings
from kdray.training.config import tracked_config
from kdray.training.fit import fit

#: config keys that do not change what a teacher learns (where it runs, how it is evaluated or logged)
NOT_IN_RECIPE = ("method", "student", "teachers", "checkpoint_dir", "resume", "workers", "device",
                 "eval_batch_size")


def recipe(cfg, archs: list[str], count: int) -> dict:
    """Everything that decides the teachers: architectures, count and every training key
    (data, split seed and fractions, augmentation, optimizer, lr, schedule, epochs, seed, ...)."""
    from kdray.distill import (
        HPARAMS,  # CE reads no method hyperparameter: they are not part of it
    )

    keys = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IN_RECIPE and k not in HPARAMS}
    return {"arch": list(archs), "count": int(count), **keys}


def recipe_key(cfg, archs: list[str], count: int) -> str:
    text = json.dumps(recipe(cfg, archs, count), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _finished(out: Path, index: int, key: str) -> dict | None:
    """Teacher ``index`` of recipe ``key`` as an earlier, interrupted ``train_teachers`` left it
    (its record and a weights file whose sha256 matches), else None."""
    record_file = out / f"teacher_{index}.json"
    try:
        record = json.loads(record_file.read_text())
        weights = out / record["entry"]["file"]
        if record.get("recipe_key") == key and sha256_file(weights) == record["entry"]["sha256"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


TEACHER_EXPERIMENT = "kdray-teachers"


def _open_teacher_run(tracking: Optional[TrackingSettings], tcfg, name: str, log):
    """An MLflow run (kind ``teacher``) for one teacher, in ``tracking``'s experiment (default
    kdray-teachers, apart from the students' sweeps); None when tracking is off."""
    if not tracking:
        return None
    from kdray.tracking.runs import RunLogger, start_run, versions
    from kdray.tracking.store import experiment_id

    exp_id = experiment_id(tracking.uri, tracking.experiment or TEACHER_EXPERIMENT, tracking.workdir)
    run_id = start_run(tracking.uri, exp_id, run_name=name, cfg=tcfg, kind="teacher",
                       params=tracked_config(tcfg), extra_tags=versions())
    log(f"tracking: teacher run {run_id}")
    return RunLogger(tracking.uri, run_id)


def _train_one(cfg, arch: str, index: int, count: int, out: Path, key: str, log,
               tracking: Optional[TrackingSettings] = None) -> dict:
    done = _finished(out, index, key)
    if done is not None:
        log(f"teacher {index + 1}/{count}: {arch} already trained (test acc {done['entry']['test_acc']:.4f}); kept")
        return done
    work = out / f".work_teacher_{index}-{key}"  # keyed: never resume another recipe's epochs
    # resume=True: an interrupted teacher continues from its last epoch checkpoint in ``work``
    tcfg = cfg.replace(method="ce", student=arch, seed=cfg.seed + index, teachers=None,
                       checkpoint_dir=str(work), resume=work.is_dir())
    log(f"teacher {index + 1}/{count}: {arch} seed {tcfg.seed}, {tcfg.epochs} epochs on {cfg.dataset}")
    t0 = time.time()
    run = _open_teacher_run(tracking, tcfg, f"teacher-{index}-{arch}-s{tcfg.seed}", log)
    try:
        result = fit(tcfg, log=log, keep_checkpoints=1, reporter=run.epoch if run else None)
    except BaseException as exc:
        if run is not None:
            from kdray.core.outcome import failure_reason

            run.failed(failure_reason(exc))
        raise
    file = out / f"teacher_{index}.pt"
    atomic_save(result["student"].model.state_dict(), file)
    m = result["metrics"]
    entry = {"file": file.name, "arch": arch, "seed": tcfg.seed, "epochs": tcfg.epochs,
             "val_acc": m["val_acc"], "test_acc": m["test_acc"], "params": m["params"],
             "sha256": sha256_file(file), "train_time_s": round(time.time() - t0, 2)}
    if run is not None:
        entry["mlflow_run_id"] = run.run_id
    record = {"recipe_key": key, "entry": entry, "classes": result["classes"], "image_size": result["image_size"]}
    atomic_write(out / f"teacher_{index}.json", json.dumps(record, indent=2, default=str))
    shutil.rmtree(work, ignore_errors=True)
    return record


def train_teachers(cfg, archs: list[str], count: int, out: str | Path, log: Callable[[str], None] = print,
                   tracking: Optional[TrackingSettings] = None) -> dict:
    """Train ``count`` teachers (archs cycled, seed cfg.seed + i) with plain CE; write the manifest.

    Interrupted, it continues where it stopped when run again with the same recipe: finished
    teachers are kept (``teacher_<i>.json`` records them until the manifest exists) and the one in
    training resumes from its last epoch. ``tracking`` (a ``TrackingSettings``):
    each teacher is an MLflow run of kind ``teacher``, its id in the manifest."""
    if count < 1:
        raise KdrayError(f"--count {count} is out of range; allowed: >= 1")
    for arch in archs:
        build_model(arch, 2)  # fail on an unknown arch before any training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    key = recipe_key(cfg, archs, count)
    trained = [_train_one(cfg, archs[i % len(archs)], i, count, out, key, log, tracking) for i in range(count)]
    # the manifest last: a folder without one is never used
    manifest = write_manifest(out, cfg, image_size=trained[-1]["image_size"], classes=trained[-1]["classes"],
                              teachers=[t["entry"] for t in trained], recipe=recipe(cfg, archs, count))
    for i in range(count):
        (out / f"teacher_{i}.json").unlink(missing_ok=True)  # the manifest now holds what they held
    return manifest


def ensure_teachers(cfg, archs: list[str], count: int, root: Path, log: Callable[[str], None],
                    tracking: Optional[dict] = None) -> str:
    """The teachers of this recipe under ``root`` (trained now if missing); their directory."""
    out = Path(root) / f"{cfg.dataset}-{recipe_key(cfg, archs, count)}"
    if (out / MANIFEST).is_file():
        log(f"teachers: using {out}")
        return str(out.resolve())
    log(f"teachers: training {count} x {archs} for {cfg.epochs} epochs once for this sweep")
    train_teachers(cfg, archs, count, out, log=log, tracking=tracking)
    return str(out.resolve())
