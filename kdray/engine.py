"""The training loop: one plain function for a config, runnable in-process or as a Ray Train
worker loop unchanged (it uses torch.distributed when a process group exists, nothing else).

Per epoch it reports every loss term by name, train/val accuracy, the ensemble and per-branch
accuracy, lr, epoch time and images/s; it writes a checkpoint each epoch and can resume from one.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import CKPT_FORMAT, STUDENT_FORMAT, atomic_save, safe_load
from .data import BatchLoader, DataBundle, load_data
from .distill import Method, check_teacher_count, get_method
from .errors import KdrayError
from .models import build_student
from .teachers import TeacherEnsemble, load_teachers

Reporter = Callable[[dict, Optional[str]], None]


SYNC_BN_NEEDS_CUDA = ("sync_bn: true needs GPU workers (torch's SyncBatchNorm is CUDA-only); "
                      "leave sync_bn unset or false on CPU")


class NonFiniteLoss(KdrayError):
    """The loss became NaN or infinite: the run stops with this reason."""


class TrainModule(nn.Module):
    """Student plus the method's trainable parts: the one module DDP wraps (teachers stay out)."""

    def __init__(self, student: nn.Module, method: Method):
        super().__init__()
        self.student = student
        self.method = method

    def forward(self, x, y, t_out):
        s_out = self.student(x)
        return self.method(y, s_out, t_out)


def pick_device(cfg) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            idx = torch.cuda.current_device() if dist.is_initialized() else 0
            return torch.device("cuda", idx)
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise KdrayError(f"device {cfg.device!r} asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(cfg.device)


def lr_factor(cfg, epoch: int) -> float:
    """Learning-rate multiplier for a 0-based epoch."""
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs))
    if cfg.schedule == "step":
        passed = sum(1 for m in cfg.lr_milestones if epoch >= round(m * cfg.epochs))
        return cfg.lr_gamma**passed
    return 1.0


def make_optimizer(cfg, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate(student: nn.Module, loader: BatchLoader, autocast) -> dict:
    """Accuracy of the evaluated logits and of every branch, exact across ranks."""
    student.eval()
    nb = int(getattr(student, "num_branches", 1))
    dev = loader.device
    correct = torch.zeros(nb + 1, device=dev, dtype=torch.float64)
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    n = torch.zeros((), device=dev, dtype=torch.float64)
    for x, y in loader:
        with autocast():
            out = student(x)
        logits = out["logits"].float()
        correct[0] += (logits.argmax(1) == y).sum()
        if nb > 1:
            correct[1:] += (out["branch_logits"].float().argmax(2) == y.unsqueeze(0)).sum(1)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        n += y.numel()
    stats = _all_reduce(torch.cat([correct, loss_sum.view(1), n.view(1)])).tolist()
    total = max(stats[-1], 1.0)
    res = {"acc": stats[0] / total, "loss": stats[-2] / total}
    if nb > 1:
        branch = [c / total for c in stats[1 : nb + 1]]
        res.update({f"acc_b{b}": a for b, a in enumerate(branch)})
        res["acc_best_branch"] = max(branch)
        res["best_branch"] = int(max(range(nb), key=lambda b: branch[b]))
    return res


@torch.no_grad()
def recompute_bn_stats(student: nn.Module, loader: BatchLoader, autocast) -> None:
    """Precise BatchNorm statistics: each BatchNorm's running mean/var become the average over the
    whole (un-augmented) train split under the current weights, averaged across ranks, instead of
    the exponential average of the batches seen while the weights moved. On small data sets with
    few steps per epoch the exponential average lags the weights and eval-mode accuracy swings
    from epoch to epoch (digits at 25%: 0.21 val accuracy one epoch, 0.90 a few later), which
    misleads ASHA; with this it follows the weights (cf. pycls' precise BN)."""
    bns = [m for m in student.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches of this pass
    student.train()
    for x, _ in loader:
        with autocast():
            student(x)
    for m, mom in zip(bns, saved):
        m.momentum = mom
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for m in bns:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(world)


def student_record(student: nn.Module, cfg, data: DataBundle, metrics: dict) -> dict:
    """A self-describing deployable student (loadable with weights_only=True)."""
    return {
        "format": STUDENT_FORMAT,
        "arch": cfg.student,
        "num_classes": data.num_classes,
        "multi_branch": bool(getattr(student, "num_branches", 1) > 1 or get_method(cfg.method).multi_branch),
        "branches": int(getattr(student, "num_branches", 1)),
        "split_stage": int(getattr(student, "split_stage", cfg.split_stage)),
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "image_size": int(data.image_size),
        "dataset": cfg.dataset,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "state_dict": {k: v.detach().cpu() for k, v in student.state_dict().items()},
    }


def rebuild_student(record: dict) -> nn.Module:
    """Inverse of :func:`student_record`: the student module with its weights, in eval mode."""
    student = build_student(
        record["arch"], record["num_classes"], branches=record["branches"],
        split_stage=record["split_stage"], multi_branch=record["multi_branch"],
    )
    student.load_state_dict(record["state_dict"])
    return student.eval()


def _latest_checkpoint(root: Path) -> Optional[Path]:
    if not root.is_dir():
        return None
    for d in sorted(root.glob("epoch_*"), reverse=True):
        if (d / "checkpoint.pt").is_file():
            return d
    return None


def _fmt_progress(m: dict) -> str:
    terms = " ".join(f"{k[5:]}={m[k]:.4f}" for k in sorted(m) if k.startswith("loss_"))
    extra = f" best_branch={m['val_acc_best_branch']:.4f}" if "val_acc_best_branch" in m else ""
    gen = f"gen {m['generation'] + 1} " if m.get("generations", 1) > 1 else ""
    return (
        f"{gen}epoch {m['epoch_in_generation']}/{m['epochs']} loss={m['train_loss']:.4f} ({terms}) "
        f"train_acc={m['train_acc']:.4f} val_acc={m['val_acc']:.4f}{extra} lr={m['lr']:.4g} "
        f"{m['epoch_time_s']:.1f}s {m['images_per_s']:.0f} img/s"
    )


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
) -> dict:
    """Train ``cfg`` to the end and return ``{"metrics", "history", "student", "classes", ...}``.

    ``reporter(metrics, checkpoint_dir)`` is called on every rank after every epoch (the
    checkpoint directory only on rank 0). ``resume_dir`` is a checkpoint directory to continue
    from; with ``cfg.resume`` the latest one under the checkpoint root is used.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    say = log if rank == 0 else (lambda s: None)
    method_cls = get_method(cfg.method)
    device = device or pick_device(cfg)
    if cfg.batch_size < world:
        raise KdrayError(f"batch_size {cfg.batch_size} is smaller than the number of workers {world}")

    data = data or load_data(cfg)
    if teachers is None and method_cls.min_teachers > 0:
        if not cfg.teachers:
            check_teacher_count(method_cls, 0)
        teachers = load_teachers(cfg.teachers, data.classes, device)
    if teachers is not None:
        teachers = teachers.to(device)
        check_teacher_count(method_cls, teachers.info.count)
    cuda = device.type == "cuda"
    use_amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
    channels_last = cuda if cfg.channels_last is None else cfg.channels_last

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)

    if channels_last and teachers is not None:
        teachers = teachers.to(memory_format=torch.channels_last)

    per_rank_batch = cfg.batch_size // world
    train_loader = BatchLoader(
        data.train, per_rank_batch, mean=data.mean, std=data.std, device=device, train=True,
        crop_padding=data.crop_padding, hflip=data.hflip, seed=cfg.seed, rank=rank, world_size=world,
        channels_last=channels_last,
    )
    eval_kw = dict(mean=data.mean, std=data.std, device=device, train=False, rank=rank, world_size=world,
                   channels_last=channels_last)
    val_loader = BatchLoader(data.val, cfg.eval_batch_size, **eval_kw)
    bn_loader = BatchLoader(data.train, per_rank_batch, **eval_kw) if cfg.precise_bn else None
    test_loader = BatchLoader(data.test, cfg.eval_batch_size, **eval_kw)

    root = Path(checkpoint_root or cfg.checkpoint_dir or "kdray-work/checkpoints")
    state = None
    if resume_dir is None and cfg.resume:
        found = _latest_checkpoint(root)
        resume_dir = str(found) if found else None
        if found is None:
            say(f"resume: no checkpoint under {root}; starting fresh")
    if resume_dir is not None:
        state = safe_load(Path(resume_dir) / "checkpoint.pt", "checkpoint")
        if state.get("format") != CKPT_FORMAT:
            raise KdrayError(f"{resume_dir}: not a kdray checkpoint")
        say(f"resuming from {resume_dir} (completed epoch {state['epoch']})")

    plans = method_cls.generations(cfg)
    history: list[dict] = list(state["history"]) if state else []
    gen_results: dict[int, dict] = {}
    prev_student_state = state.get("prev_student") if state else None
    metrics: dict = {}
    student = None
    for plan in plans:
        if state is not None and plan.index < state["generation"]:
            continue  # finished before the interruption
        gen_teachers = teachers
        if plan.teacher == "previous":
            prev = build_student(cfg.student, data.num_classes)
            prev.load_state_dict(prev_student_state)
            gen_teachers = TeacherEnsemble([prev.model]).to(device)
        torch.manual_seed(cfg.seed + 1000 * plan.index)
        student = build_student(cfg.student, data.num_classes, branches=cfg.branches,
                                split_stage=cfg.split_stage, multi_branch=method_cls.multi_branch)
        method = method_cls(cfg, student, gen_teachers.info if gen_teachers is not None else None)
        module = TrainModule(student, method).to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(cfg, [p for p in module.parameters() if p.requires_grad])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
        start_epoch = 0
        if state is not None and plan.index == state["generation"]:
            module.load_state_dict(state["module"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch = state["epoch_in_generation"]
        params = count_params(student)
        wrapped = module
        if world > 1 and (cfg.sync_bn or (cfg.sync_bn is None and cuda)):
            if not cuda:
                raise KdrayError(SYNC_BN_NEEDS_CUDA)
            # BatchNorm statistics over the global batch, as one process would compute them.
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        if world > 1:
            wrapped = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if cuda else None)
        feats = method.uses_teacher_feats

        for epoch in range(start_epoch, cfg.epochs):
            train_loader.set_epoch(epoch + 1000 * plan.index)
            module.train()
            t0 = time.perf_counter()
            sums: dict[str, torch.Tensor] = {}
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            for x, y in train_loader:
                t_out = None
                if gen_teachers is not None:
                    with autocast():
                        t_out = gen_teachers(x, feats=feats)
                with autocast():
                    logits, terms = wrapped(x, y, t_out)
                loss = sum(terms.values())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bs = y.numel()
                seen += bs
                loss_sum += loss.detach().float() * bs
                correct += (logits.detach().argmax(1) == y).sum()
                for k, v in terms.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device)) + v.detach().float() * bs
            names = sorted(sums)
            red = _all_reduce(torch.stack([loss_sum, correct, torch.tensor(float(seen), device=device)]
                                          + [sums[k] for k in names]).double()).tolist()
            if cuda:
                torch.cuda.synchronize(device)
            epoch_time = time.perf_counter() - t0
            n = max(red[2], 1.0)
            if not all(math.isfinite(v) for v in red):
                bad = ", ".join(f"{k}={red[3 + i] / n:.4g}" for i, k in enumerate(names))
                raise NonFiniteLoss(
                    f"loss became non-finite in epoch {epoch + 1} (terms: {bad}); lower the learning rate or loss weights"
                )
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            if cfg.precise_bn:
                recompute_bn_stats(student, bn_loader, autocast)
            val = evaluate(student, val_loader, autocast)
            global_epoch = plan.index * cfg.epochs + epoch + 1
            metrics = {
                "epoch": global_epoch, "epoch_in_generation": epoch + 1, "epochs": cfg.epochs,
                "generation": plan.index, "generations": len(plans),
                "train_loss": red[0] / n, "train_acc": red[1] / n,
                **{f"loss_{k}": red[3 + i] / n for i, k in enumerate(names)},
                **{f"val_{k}": v for k, v in val.items()},
                "lr": lr, "epoch_time_s": epoch_time, "images_per_s": red[2] / epoch_time,
                "params": params,
            }
            if hasattr(student, "extract_branch"):
                metrics["branch_params"] = count_params(student.extract_branch(0))
            last_epoch = epoch + 1 == cfg.epochs
            if last_epoch:
                test = evaluate(student, test_loader, autocast)
                metrics.update({f"test_{k}": v for k, v in test.items()})
                gen_results[plan.index] = {"test_acc": test["acc"], "val_acc": val["acc"]}
                if len(plans) > 1:
                    for g, r in gen_results.items():
                        metrics[f"gen{g + 1}_test_acc"] = r["test_acc"]
            history.append({k: v for k, v in metrics.items()})
            say(_fmt_progress(metrics))

            ckpt_dir = None
            if rank == 0:
                done_gen = last_epoch and plan.index + 1 < len(plans)
                ckpt = {
                    "format": CKPT_FORMAT, "epoch": global_epoch,
                    "generation": plan.index + 1 if done_gen else plan.index,
                    "epoch_in_generation": 0 if done_gen else epoch + 1,
                    "module": module.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "prev_student": student.state_dict() if done_gen else prev_student_state,
                    "history": history, "config": cfg.to_dict(),
                }
                d = root / f"epoch_{global_epoch:04d}"
                atomic_save(ckpt, d / "checkpoint.pt")
                atomic_save(student_record(student, cfg, data, metrics), d / "student.pt")
                ckpt_dir = str(d)
                if keep_checkpoints > 0:
                    for old in sorted(root.glob("epoch_*"))[:-keep_checkpoints]:
                        shutil.rmtree(old, ignore_errors=True)
            if reporter is not None:
                reporter(dict(metrics), ckpt_dir)
        if plan.index + 1 < len(plans):
            prev_student_state = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
        state = None

    if student is None or not metrics:
        raise KdrayError("nothing to train: the checkpoint says every epoch is done already")
    if keep_checkpoints == 0 and rank == 0:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "metrics": metrics, "history": history, "student": student, "classes": list(data.classes),
        "image_size": data.image_size, "checkpoint_dir": str(root),
    }
