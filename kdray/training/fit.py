"""A run of one config, end to end: one plain function, runnable in-process or as a Ray Train
worker loop unchanged (it uses torch.distributed when a process group exists, nothing else).

``fit`` reads as an outline: prepare what every generation shares (data, teachers, loaders,
precision), then per generation build the student, method and optimizer, and per epoch
``train_epoch`` (the step loop), evaluate, checkpoint and report. Per epoch it reports every loss
term by name, train/val accuracy, the ensemble and per-branch accuracy, lr, epoch time and
images/s, what the epoch cost (CPU, memory, the share of step time waiting for data, GPU;
:mod:`kdray.training.cost`), and the trial-outcome fields ``epoch``, ``total_epochs`` and
``done``; an interrupted run resumes from its latest checkpoint.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from kdray.core.console import to_stderr
from kdray.core.errors import KdrayError
from kdray.data.bundle import DataBundle
from kdray.distill import Generation, get_method
from kdray.models.measure import count_params, evaluate
from kdray.teachers.ensemble import TeacherEnsemble
from kdray.teachers.store import TeacherStore
from kdray.training.checkpoint import latest_checkpoint, load_training_state, save_epoch
from kdray.training.cost import EpochCost
from kdray.training.generation import StepParts, build_generation, describe_source, wrap_for_ranks
from kdray.training.loop import recompute_bn_stats, reduce_epoch, train_epoch
from kdray.training.prepare import Prepared, prepare
from kdray.training.student_file import student_record

Reporter = Callable[[dict, Optional[str]], None]


@dataclass
class RunState:
    """What survives from epoch to epoch and across an interruption (saved in each checkpoint)."""

    history: list = field(default_factory=list)
    generation: int = 0
    epoch_in_generation: int = 0
    prev_student: Optional[dict] = None
    gen_results: dict = field(default_factory=dict)
    saved: Optional[dict] = None  # the module / optimizer / scheduler states to restore, once
    epoch_walls: list = field(default_factory=list)  # this process's epoch wall times, for the ETA


def find_resume_state(cfg, root: Path, resume_dir: Optional[str], say) -> RunState:
    """The state to continue from: ``resume_dir``'s, with ``cfg.resume`` the latest checkpoint's
    under ``root``, else a fresh one."""
    if resume_dir is None and cfg.resume:
        found = latest_checkpoint(root)
        if found is None:
            say(f"resume: no checkpoint under {root}; starting fresh")
            return RunState()
        resume_dir = str(found)
    if resume_dir is None:
        return RunState()
    state = load_training_state(resume_dir)
    say(f"resuming from {resume_dir} (completed epoch {state['epoch']})")
    return RunState(history=list(state["history"]), generation=state["generation"],
                    epoch_in_generation=state["epoch_in_generation"], prev_student=state.get("prev_student"),
                    saved=state)


def _restore(parts: StepParts, run: RunState, plan: Generation) -> int:
    """Load the interrupted generation's states; the epoch to continue from."""
    if run.saved is None or plan.index != run.generation:
        return 0
    parts.module.load_state_dict(run.saved["module"])
    parts.optimizer.load_state_dict(run.saved["optimizer"])
    parts.scheduler.load_state_dict(run.saved["scheduler"])
    start = run.epoch_in_generation
    run.saved = None
    return start


def _ready_line(prep: Prepared, seconds: float) -> str:
    """What the run is about to train on, once its data, teachers and loaders are ready."""
    d, p = prep.data, prep.precision
    teachers = (f", {prep.teachers.info.count} teachers" if prep.teachers is not None
                else ", teachers from their store" if prep.store is not None else "")
    path = ", streamed through Ray Data" if d.streamed else ""
    precision = "bf16 steps, fp32 evaluation" if p.use_amp else "fp32"  # Precision.evaluation
    return (f"ready in {seconds:.1f}s: {len(d.train)} train / {len(d.val)} val / {len(d.test)} test images{path}, "
            f"{d.num_classes} classes{teachers}; {p.device.type}, {precision}"
            f"{', channels_last' if p.channels_last else ''}, {prep.world} worker(s)")


def _eta(run: RunState, epochs_left: int) -> str:
    """Time left at the mean wall time of this run's epochs so far."""
    walls = run.epoch_walls[-5:]
    if not walls or epochs_left <= 0:
        return ""
    seconds = int(round(epochs_left * sum(walls) / len(walls)))
    return f" ETA {seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f" ETA {seconds}s"


def _fmt_progress(m: dict) -> str:
    """The epoch's one progress line."""
    terms = " ".join(f"{k[5:]}={m[k]:.4f}" for k in sorted(m) if k.startswith("loss_"))
    extra = f" best_branch={m['val_acc_best_branch']:.4f}" if "val_acc_best_branch" in m else ""
    gen = f"gen {m['generation'] + 1} " if m.get("generations", 1) > 1 else ""
    return (
        f"{gen}epoch {m['epoch_in_generation']}/{m['epochs']} loss={m['train_loss']:.4f} ({terms}) "
        f"train_acc={m['train_acc']:.4f} val_acc={m['val_acc']:.4f}{extra} lr={m['lr']:.4g} "
        f"{m['epoch_time_s']:.1f}s {m['images_per_s']:.0f} img/s"
    )


def epoch_metrics(cfg, parts: StepParts, prep: Prepared, plan: Generation, plans: list, epoch: int,
                  train: dict, lr: float, epoch_time: float, run: RunState) -> dict:
    """Evaluate after an epoch (test too after a generation's last) and name every number. Every
    accuracy is measured in fp32 whatever ``amp`` (``Precision.evaluation``: the precision of the
    student that is saved, exported and registered, so it reproduces the logged accuracy)."""
    loaders, precision = prep.loaders, prep.precision
    if cfg.precise_bn:
        recompute_bn_stats(parts.student, loaders.bn, precision.autocast)
    val = evaluate(parts.student, loaders.val, precision.evaluation)
    global_epoch = plan.index * cfg.epochs + epoch + 1
    total = cfg.epochs * len(plans)
    metrics = {
        "epoch": global_epoch, "total_epochs": total, "done": global_epoch >= total,
        "epoch_in_generation": epoch + 1, "epochs": cfg.epochs, "generation": plan.index,
        "generations": len(plans), "train_loss": train["train_loss"], "train_acc": train["train_acc"],
        **{k: v for k, v in train.items() if k.startswith("loss_")},
        **{f"val_{k}": v for k, v in val.items()},
        "lr": lr, "epoch_time_s": epoch_time, "images_per_s": train["images"] / epoch_time,
        "params": count_params(parts.student),
        # images the teachers ran on in this process so far (0 per epoch when a store serves them)
        "teacher_images": getattr(parts.teacher_outputs, "images", 0),
    }
    if hasattr(parts.student, "extract_branch"):
        metrics["branch_params"] = count_params(parts.student.extract_branch(0))
    if epoch + 1 == cfg.epochs:
        metrics.update(_final_test_metrics(parts, prep, plan, plans, val, run))
    return metrics


def _final_test_metrics(parts: StepParts, prep: Prepared, plan: Generation, plans: list, val: dict,
                        run: RunState) -> dict:
    test = evaluate(parts.student, prep.loaders.test, prep.precision.evaluation)
    run.gen_results[plan.index] = {"test_acc": test["acc"], "val_acc": val["acc"]}
    out = {f"test_{k}": v for k, v in test.items()}
    if len(plans) > 1:
        out.update({f"gen{g + 1}_test_acc": r["test_acc"] for g, r in run.gen_results.items()})
    return out


def save_checkpoint(cfg, parts: StepParts, prep: Prepared, run: RunState, metrics: dict, root: Path,
                    keep: int) -> str:
    """Rank 0 writes the epoch's state; a generation's end hands its student to the next one."""
    last_plan = metrics["generation"] + 1 >= metrics["generations"]
    done_gen = metrics["epoch_in_generation"] == cfg.epochs and not last_plan
    state = {
        "epoch": metrics["epoch"],
        "generation": metrics["generation"] + 1 if done_gen else metrics["generation"],
        "epoch_in_generation": 0 if done_gen else metrics["epoch_in_generation"],
        "module": parts.module.state_dict(), "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "prev_student": parts.student.state_dict() if done_gen else run.prev_student,
        "history": run.history, "config": cfg.to_dict(),
    }
    record = student_record(parts.student, cfg, prep.data, metrics, multi_branch=get_method(cfg.method).multi_branch,
                            evaluated_on=prep.precision.device.type)
    return str(save_epoch(root, metrics["epoch"], state, record, keep))


def run_generation(cfg, prep: Prepared, parts: StepParts, plan: Generation, plans: list, run: RunState,
                   start_epoch: int, *, root: Path, keep: int, reporter, say) -> dict:
    """Train one generation's epochs from ``start_epoch``: each evaluated, logged, checkpointed (rank
    0) and reported; the last epoch's metrics."""
    metrics: dict = {}
    cost = EpochCost(prep.precision.device)
    for epoch in range(start_epoch, cfg.epochs):
        prep.loaders.train.set_epoch(plan.view_epoch(epoch))
        cost.start()
        t0 = time.perf_counter()
        train = reduce_epoch(train_epoch(parts, cost.batches(prep.loaders.train.with_views())), epoch + 1)
        if prep.precision.device.type == "cuda":
            torch.cuda.synchronize(prep.precision.device)  # the epoch's time includes its queued kernels
        epoch_time = time.perf_counter() - t0
        costs = cost.stop(epoch_time)
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scheduler.step()
        metrics = dict(epoch_metrics(cfg, parts, prep, plan, plans, epoch, train, lr, epoch_time, run), **costs)
        run.history.append(dict(metrics))
        run.epoch_walls.append(time.perf_counter() - t0)
        say(_fmt_progress(metrics) + _eta(run, metrics["total_epochs"] - metrics["epoch"]))
        ckpt_dir = save_checkpoint(cfg, parts, prep, run, metrics, root, keep) if prep.rank == 0 else None
        if reporter is not None:  # the whole epoch: training, evaluation and the checkpoint
            reporter(dict(metrics, epoch_wall_s=time.perf_counter() - t0), ckpt_dir)
    return metrics


def fit(
    cfg,
    *,
    data: Optional[DataBundle] = None,
    teachers: Optional[TeacherEnsemble] = None,
    reporter: Optional[Reporter] = None,
    resume_dir: Optional[str] = None,
    checkpoint_root: Optional[str] = None,
    keep_checkpoints: int = 2,
    device: Optional[torch.device] = None,
    log: Optional[Callable[[str], None]] = None,
    teacher_store: Optional[TeacherStore] = None,
) -> dict:
    """Train ``cfg`` to the end and return ``{"metrics", "history", "student", "classes", ...}``.

    ``reporter(metrics, checkpoint_dir)`` is called on every rank after every epoch (the
    checkpoint directory only on rank 0). ``resume_dir`` is a checkpoint directory to continue
    from; with ``cfg.resume`` the latest one under the checkpoint root is used. ``teacher_store``
    gives the teachers' outputs (``kdray.teachers.source.open_teacher_store``); without it they run live.
    """
    t_start = time.perf_counter()
    prep = prepare(cfg, data, teachers, device, teacher_store)
    log = log or to_stderr
    say = log if prep.rank == 0 else (lambda s: None)
    say(_ready_line(prep, time.perf_counter() - t_start))
    if prep.note:
        say(prep.note)
    root = Path(checkpoint_root or cfg.checkpoint_dir or "kdray-work/checkpoints")
    run = find_resume_state(cfg, root, resume_dir, say)
    plans = get_method(cfg.method).generations(cfg)
    metrics, parts = {}, None
    for plan in plans[run.generation:]:  # generations finished before an interruption are skipped
        parts = build_generation(cfg, prep, plan, run.prev_student)
        if parts.teacher_outputs is not None:
            say(describe_source(parts.teacher_outputs, prep))
        start = _restore(parts, run, plan)
        parts.wrapped = wrap_for_ranks(parts.module, cfg, prep)
        metrics = run_generation(cfg, prep, parts, plan, plans, run, start, root=root, keep=keep_checkpoints,
                                 reporter=reporter, say=say) or metrics
        if plan.index + 1 < len(plans):
            run.prev_student = {k: v.detach().cpu().clone() for k, v in parts.student.state_dict().items()}
    if parts is None or not metrics:
        raise KdrayError("nothing to train: the checkpoint says every epoch is done already")
    if keep_checkpoints == 0 and prep.rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return {"metrics": metrics, "history": run.history, "student": parts.student,
            "classes": list(prep.data.classes), "image_size": prep.data.image_size, "checkpoint_dir": str(root)}
