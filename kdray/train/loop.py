"""The training loop: one plain function for a config, runnable in-process or as a Ray Train
worker loop unchanged (it uses torch.distributed when a process group exists, nothing else).

``fit`` reads as an outline: prepare what every generation shares (data, teachers, loaders,
precision), then per generation build the student, method and optimizer, and per epoch
``train_epoch`` (the step loop), evaluate, checkpoint and report. Per epoch it reports every loss
term by name, train/val accuracy, the ensemble and per-branch accuracy, lr, epoch time and
images/s, and the trial-outcome fields ``epoch``, ``total_epochs`` and ``done``.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from kdray.core.errors import KdrayError
from kdray.data.sources import BatchLoader, DataBundle, load_data
from kdray.distill import Generation, Method, check_teacher_count, get_method
from kdray.models import build_student
from kdray.teachers.ensemble import LiveTeacherOutputs, TeacherEnsemble, load_teachers
from kdray.teachers.store import (
    DEFAULT_BUDGET_GB,
    StoredTeacherOutputs,
    StoreRequest,
    TeacherStore,
    ensure_store,
    mismatch,
)
from kdray.train.checkpoint import latest_checkpoint, load_training_state, save_epoch
from kdray.train.student_file import student_record

Reporter = Callable[[dict, Optional[str]], None]
TeacherOutputs = Callable[..., dict]  # (x, view keys) -> {"logits": [K,N,C], "feats": [...]}

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


# ---------------------------------------------------------------------------------------------
# small pieces
# ---------------------------------------------------------------------------------------------
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
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX): there bf16 autocast is
    about 2x faster than fp32; without it oneDNN emulates bf16 and it is 1.3-2x slower (measured by
    ``benchmarks/cpu_precision.py``). torch.cpu's feature probes are private; a torch without them
    counts as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, p)() for p in probes if hasattr(torch.cpu, p))
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Precision:
    """Where and how the step runs. ``amp: auto``: bf16 autocast on GPU and on CPUs with native
    bf16; ``channels_last`` unset: on (faster on GPU and, for these convnets, on AVX-512 CPUs:
    1.2-1.3x in fp32 here)."""

    device: torch.device
    use_amp: bool
    channels_last: bool

    @classmethod
    def for_config(cls, cfg, device: torch.device) -> "Precision":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return cls(device, cfg.amp == "bf16" or (cfg.amp == "auto" and fast_bf16),
                   device.type in ("cuda", "cpu") if cfg.channels_last is None else bool(cfg.channels_last))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------
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
    return _accuracy_metrics(stats, nb)


def _accuracy_metrics(stats: list, nb: int) -> dict:
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
    _average_bn_buffers_across_ranks(bns)


def _average_bn_buffers_across_ranks(bns: list) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    world = dist.get_world_size()
    for m in bns:
        for buf in (m.running_mean, m.running_var):
            dist.all_reduce(buf)
            buf.div_(world)


# ---------------------------------------------------------------------------------------------
# prepare: what every generation shares
# ---------------------------------------------------------------------------------------------
@dataclass
class Loaders:
    train: BatchLoader
    val: BatchLoader
    test: BatchLoader
    bn: Optional[BatchLoader]  # the un-augmented train split, for precise BatchNorm statistics


@dataclass
class Prepared:
    cfg: object
    data: DataBundle
    teachers: Optional[TeacherEnsemble]  # None until needed when a store serves the outputs
    precision: Precision
    loaders: Loaders
    rank: int
    world: int
    store: Optional[TeacherStore] = None
    note: Optional[str] = None  # what the run's log should say about its teacher outputs

    def ensemble(self) -> TeacherEnsemble:
        """The frozen ensemble, loaded on first need (a run whose store covers it never loads it)."""
        if self.teachers is None:
            self.teachers = _on_device(load_teachers(self.cfg.teachers, self.data.classes), self.precision)
        return self.teachers


def _on_device(teachers: TeacherEnsemble, precision: Precision) -> TeacherEnsemble:
    teachers = teachers.to(precision.device)
    return teachers.to(memory_format=torch.channels_last) if precision.channels_last else teachers


def _resolve_teachers(cfg, method_cls, data: DataBundle, teachers, precision: Precision, store):
    """The frozen ensemble on the training device, loaded from ``cfg.teachers`` unless given or
    unless a store gives the outputs (then it loads when a view is missing from the store)."""
    if method_cls.min_teachers == 0 and teachers is None:
        return None
    if store is not None:
        check_teacher_count(method_cls, store.info.count)
        return _on_device(teachers, precision) if teachers is not None else None
    if teachers is None:
        if not cfg.teachers:
            check_teacher_count(method_cls, 0)
        teachers = load_teachers(cfg.teachers, data.classes)
    check_teacher_count(method_cls, teachers.info.count)
    return _on_device(teachers, precision)


def make_loaders(cfg, data: DataBundle, precision: Precision, rank: int, world: int) -> Loaders:
    per_rank_batch = cfg.batch_size // world
    shard = dict(mean=data.mean, std=data.std, device=precision.device, rank=rank, world_size=world,
                 channels_last=precision.channels_last)
    train = BatchLoader(data.train, per_rank_batch, train=True, crop_padding=data.crop_padding,
                        hflip=data.hflip, seed=cfg.seed, **shard)
    return Loaders(
        train=train,
        val=BatchLoader(data.val, cfg.eval_batch_size, train=False, **shard),
        test=BatchLoader(data.test, cfg.eval_batch_size, train=False, **shard),
        bn=BatchLoader(data.train, per_rank_batch, train=False, **shard) if cfg.precise_bn else None,
    )


def prepare(cfg, data=None, teachers=None, device=None, store: Optional[TeacherStore] = None) -> Prepared:
    rank, world = _rank_and_world()
    if cfg.batch_size < world:
        raise KdrayError(f"batch_size {cfg.batch_size} is smaller than the number of workers {world}")
    precision = Precision.for_config(cfg, device or pick_device(cfg))
    data = data or load_data(cfg)
    method_cls = get_method(cfg.method)
    store = store if method_cls.min_teachers > 0 else None
    note = None
    why = store_mismatch(store, cfg, data, precision) if store is not None else None
    if why:
        store, note = None, f"teacher store not used ({why}): the teachers run live"
    teachers = _resolve_teachers(cfg, method_cls, data, teachers, precision, store)
    return Prepared(cfg, data, teachers, precision, make_loaders(cfg, data, precision, rank, world), rank, world,
                    store, note)


def store_mismatch(store: TeacherStore, cfg, data: DataBundle, precision: Precision) -> Optional[str]:
    """Why a given store cannot serve this run, or None (the teachers' manifest is compared where
    the run can read it: on a cluster node without the teacher files the store's key stands)."""
    manifest = None
    if cfg.teachers and (Path(cfg.teachers) / "manifest.json").is_file():
        from kdray.teachers.ensemble import read_manifest

        manifest = read_manifest(cfg.teachers)
    return mismatch(store, manifest, data, precision)


def teacher_view_epochs(cfg) -> tuple:
    """The train loader's epoch numbers in which the ensemble teaches (``set_epoch``'s values)."""
    plans = get_method(cfg.method).generations(cfg)
    return tuple(e + 1000 * p.index for p in plans if p.teacher != "previous" for e in range(cfg.epochs))


def open_teacher_store(cfg, *, data: Optional[DataBundle] = None, seeds=None, epochs=None, feats=None,
                       root=None, budget_gb: float = DEFAULT_BUDGET_GB, builder=None, device=None,
                       log=print) -> Optional[TeacherStore]:
    """The teacher store of ``cfg``'s teachers, data, views and precision (that of ``device``, the
    trials' device type), holding every view of ``seeds`` x ``epochs`` (default: the config's own);
    rows it lacks are computed and saved: by ``builder(ensemble, data, precision, feats)`` (a
    :data:`~kdray.teacher_store.Builder` factory, e.g. Ray tasks) or else here. None for a method
    without teachers."""
    method_cls = get_method(cfg.method)
    if method_cls.min_teachers == 0 or not cfg.teachers:
        return None
    precision = Precision.for_config(cfg, torch.device(device) if device else pick_device(cfg))
    here = precision if builder is None else Precision(torch.device("cpu"), precision.use_amp, precision.channels_last)
    data = data or load_data(cfg)
    ensemble = _on_device(load_teachers(cfg.teachers, data.classes), here)
    want_feats = method_cls.needs_teacher_feats(cfg) if feats is None else feats
    source = LiveTeacherOutputs(ensemble, here.autocast, want_feats)
    req = StoreRequest(Path(cfg.teachers), data, precision, tuple(seeds or (cfg.seed,)),
                       tuple(epochs or teacher_view_epochs(cfg)), want_feats, budget_gb,
                       Path(root) if root else None)
    build = builder(ensemble, data, precision, want_feats) if builder is not None else None
    return ensure_store(req, source, build=build, log=log)


# ---------------------------------------------------------------------------------------------
# one generation: student, method, optimizer, schedule, DDP
# ---------------------------------------------------------------------------------------------
@dataclass
class StepParts:
    """Everything one training step touches. ``wrapped`` is ``module`` or its DDP wrapper."""

    student: nn.Module
    method: Method
    module: TrainModule
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    teacher_outputs: Optional[TeacherOutputs]
    precision: Precision


def teacher_source(plan: Generation, prep: Prepared, feats: bool, prev_student_state: Optional[dict]):
    """Where a generation's teacher outputs come from: the store when one is given (and holds the
    feature maps the method needs), else the live ensemble; for a sequential generation the
    previous generation's student, frozen and live. None for a method without teachers."""
    autocast = prep.precision.autocast
    if plan.teacher == "previous":
        prev = build_student(prep.cfg.student, prep.data.num_classes)
        prev.load_state_dict(prev_student_state)
        return LiveTeacherOutputs(TeacherEnsemble([prev.model]).to(prep.precision.device), autocast, feats)
    if prep.store is not None and (prep.store.feats is not None or not feats):
        return StoredTeacherOutputs(prep.store, prep.precision.device, feats,
                                    live=lambda: LiveTeacherOutputs(prep.ensemble(), autocast, feats))
    if prep.teachers is None and prep.store is None:
        return None
    return LiveTeacherOutputs(prep.ensemble(), autocast, feats)


def describe_source(source, prep: Prepared) -> str:
    """One line for the run's log: where this generation's teacher outputs come from."""
    if isinstance(source, StoredTeacherOutputs):
        store = source.store
        return f"teacher outputs: store {store.meta.get('digest', '(in memory)')}, {store.coverage()}"
    if prep.store is not None:
        return "teacher outputs: live ensemble (feature maps online: the store holds none)"
    return "teacher outputs: live ensemble"


def _distributed(module: TrainModule, cfg, prep: Prepared) -> nn.Module:
    """``module`` as the step calls it: DDP-wrapped (SyncBatchNorm on GPU) when several ranks train."""
    if prep.world == 1:
        return module
    cuda = prep.precision.device.type == "cuda"
    if cfg.sync_bn or (cfg.sync_bn is None and cuda):
        if not cuda:
            raise KdrayError(SYNC_BN_NEEDS_CUDA)
        # BatchNorm statistics over the global batch, as one process would compute them.
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return nn.parallel.DistributedDataParallel(module, device_ids=[prep.precision.device.index] if cuda else None)


def build_generation(cfg, prep: Prepared, plan: Generation, prev_student_state=None) -> StepParts:
    method_cls = get_method(cfg.method)
    source = teacher_source(plan, prep, method_cls.needs_teacher_feats(cfg), prev_student_state)
    torch.manual_seed(cfg.seed + 1000 * plan.index)
    student = build_student(cfg.student, prep.data.num_classes, branches=cfg.branches,
                            split_stage=cfg.split_stage, multi_branch=method_cls.multi_branch)
    method = method_cls(cfg, student, source.info if source is not None else None)
    if source is not None and method.uses_teacher_feats and not source.feats:
        raise KdrayError(f"method {cfg.method!r} uses the teachers' feature maps, but its class does not say so "
                         "before it is built: override needs_teacher_feats(cfg) to return True when it will")
    module = TrainModule(student, method).to(prep.precision.device)
    if prep.precision.channels_last:
        module = module.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, [p for p in module.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(cfg, e))
    return StepParts(student, method, module, module, optimizer, scheduler, source, prep.precision)


# ---------------------------------------------------------------------------------------------
# the step loop
# ---------------------------------------------------------------------------------------------
@dataclass
class EpochTotals:
    """Per-epoch sums kept on the device: no host sync per step, one read at the epoch's end."""

    device: torch.device
    loss: torch.Tensor = None
    correct: torch.Tensor = None
    seen: int = 0
    terms: dict = field(default_factory=dict)

    def __post_init__(self):
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device)

    def add(self, loss, logits, y, terms: dict) -> None:
        bs = y.numel()
        self.seen += bs
        self.loss += loss.detach().float() * bs
        self.correct += (logits.detach().argmax(1) == y).sum()
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, torch.zeros((), device=self.device)) + v.detach().float() * bs


def train_step(parts: StepParts, x: torch.Tensor, y: torch.Tensor, totals: EpochTotals, keys=None) -> None:
    """One optimizer step: teacher outputs (for the batch's views ``keys``), the method's loss
    terms summed, backward, update."""
    t_out = parts.teacher_outputs(x, keys) if parts.teacher_outputs is not None else None
    with parts.precision.autocast():
        logits, terms = parts.wrapped(x, y, t_out)
    loss = sum(terms.values())  # the engine never asks which method it runs
    parts.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parts.optimizer.step()
    totals.add(loss, logits, y, terms)


def train_epoch(parts: StepParts, batches: Iterable) -> EpochTotals:
    """Train on every ``(x, y, view keys)`` of ``batches`` (``BatchLoader.with_views()`` of an
    epoch, or any slice of one)."""
    parts.module.train()
    totals = EpochTotals(parts.precision.device)
    for x, y, keys in batches:
        train_step(parts, x, y, totals, keys)
    return totals


def reduce_epoch(totals: EpochTotals, epoch: int) -> dict:
    """The epoch's mean loss, accuracy and loss terms over every rank; NonFiniteLoss if any is not finite."""
    names = sorted(totals.terms)
    seen = torch.tensor(float(totals.seen), device=totals.device)
    red = _all_reduce(torch.stack([totals.loss, totals.correct, seen] + [totals.terms[k] for k in names])
                      .double()).tolist()
    n = max(red[2], 1.0)
    if not all(math.isfinite(v) for v in red):
        bad = ", ".join(f"{k}={red[3 + i] / n:.4g}" for i, k in enumerate(names))
        raise NonFiniteLoss(
            f"loss became non-finite in epoch {epoch} (terms: {bad}); lower the learning rate or loss weights"
        )
    return {"train_loss": red[0] / n, "train_acc": red[1] / n, "images": red[2],
            **{f"loss_{k}": red[3 + i] / n for i, k in enumerate(names)}}


# ---------------------------------------------------------------------------------------------
# the run: resume, epochs, generations
# ---------------------------------------------------------------------------------------------
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
    return (f"ready in {seconds:.1f}s: {len(d.train)} train / {len(d.val)} val / {len(d.test)} test images, "
            f"{d.num_classes} classes{teachers}; {p.device.type}, {'bf16' if p.use_amp else 'fp32'}"
            f"{', channels_last' if p.channels_last else ''}, {prep.world} worker(s)")


def _eta(run: "RunState", epochs_left: int) -> str:
    """Time left at the mean wall time of this run's epochs so far."""
    walls = run.epoch_walls[-5:]
    if not walls or epochs_left <= 0:
        return ""
    seconds = int(round(epochs_left * sum(walls) / len(walls)))
    return f" ETA {seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f" ETA {seconds}s"


def _fmt_progress(m: dict) -> str:
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
    """Evaluate after an epoch (test too after a generation's last) and name every number."""
    loaders, autocast = prep.loaders, prep.precision.autocast
    if cfg.precise_bn:
        recompute_bn_stats(parts.student, loaders.bn, autocast)
    val = evaluate(parts.student, loaders.val, autocast)
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
    test = evaluate(parts.student, prep.loaders.test, prep.precision.autocast)
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
    record = student_record(parts.student, cfg, prep.data, metrics, multi_branch=get_method(cfg.method).multi_branch)
    return str(save_epoch(root, metrics["epoch"], state, record, keep))


def run_generation(cfg, prep: Prepared, parts: StepParts, plan: Generation, plans: list, run: RunState,
                   start_epoch: int, *, root: Path, keep: int, reporter, say) -> dict:
    metrics: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        prep.loaders.train.set_epoch(epoch + 1000 * plan.index)
        t0 = time.perf_counter()
        train = reduce_epoch(train_epoch(parts, prep.loaders.train.with_views()), epoch + 1)
        if prep.precision.device.type == "cuda":
            torch.cuda.synchronize(prep.precision.device)  # the epoch's time includes its queued kernels
        epoch_time = time.perf_counter() - t0
        lr = parts.optimizer.param_groups[0]["lr"]
        parts.scheduler.step()
        metrics = epoch_metrics(cfg, parts, prep, plan, plans, epoch, train, lr, epoch_time, run)
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
    gives the teachers' outputs (``kdray.teacher_store``); without it they run live.
    """
    t_start = time.perf_counter()
    prep = prepare(cfg, data, teachers, device, teacher_store)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
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
        parts.wrapped = _distributed(parts.module, cfg, prep)
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
