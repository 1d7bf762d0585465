#!/usr/bin/env python
"""Images/s of kdray's distillation step against a plain PyTorch reference loop, in one run.

Both sides train the same randomly initialised models (teacher archs and count, student arch,
method, optimizer) on the same uint8 training split with the same batch size and step count;
``--warmup`` steps per side are run first and left out of the timing (on a GPU the clock is read
only after ``torch.cuda.synchronize``).

student-only side -- kdray's step for the same student with method ce (no teacher at all): the
bound a teacher side can approach, never pass; the store side's ratio to it says how close it comes.

kdray side -- the step loop's own ``train_epoch`` (the function ``kdray.training.fit`` runs), over slices of
one epoch: the split held on the device in a :class:`BatchLoader` (batch-tensor
crop/flip/normalise), the :class:`TeacherEnsemble` (inference mode), then ``TrainModule(student,
method)`` forward/backward/optimizer step, with the engine's autocast (bf16 on GPU when ``amp`` is
auto) and channels_last (on GPU), and no per-step host sync (loss and accuracy are accumulated on
the device).

reference side -- a loop written the way KD repositories do it today: a ``torch.utils.data.Dataset``
that builds a PIL image per sample (``PIL.Image.fromarray``, like ``torchvision.datasets.CIFAR10``),
``transforms.Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), ToTensor(), Normalize])``,
a shuffling ``DataLoader(num_workers=--workers)``, fp32, teachers in eval mode under ``no_grad``,
and ``loss.item()`` plus accuracy ``.item()`` every step. The loss is computed by the same kdray
method class (a second, identically initialised instance), so the maths is identical.

Teachers are randomly initialised: throughput does not depend on trained weights.

Examples::

    # CPU, small (about 1-2 minutes on 2 cores)
    python benchmarks/step_throughput.py --teachers resnet20 --student resnet8 --steps 10
    # GPU: CIFAR-10 (JPEG copy), two resnet32x4 teachers -> resnet8x4 student, EKD
    python benchmarks/step_throughput.py --steps 200 --warmup 20 --json

``--dataset`` defaults to ``cifar10-jpeg`` when ``shared/datasets/cifar10-jpeg.tar.gz`` is found
(``/work/shared``, ``<repo>/../shared`` or ``<repo>/shared``): the tarball is extracted once to
``~/.cache/kdray/cifar10-jpeg`` and read with kdray's ``imagefolder`` loader (decoded once, then
cached); otherwise ``fake``. If the training split has fewer than ``(warmup + steps) * batch``
images it is tiled, so that each side runs inside one epoch (no DataLoader restart in the timing).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch
from torch import nn

from kdray.core.device import pick_device
from kdray.core.errors import KdrayError
from kdray.data.sources import DATASETS, load_data
from kdray.data.splits import Split
from kdray.distill import METHODS, Generation, check_teacher_count, get_method
from kdray.models import build_model, build_student
from kdray.teachers.ensemble import LiveTeacherOutputs, TeacherEnsemble
from kdray.training.config import from_dict
from kdray.training.generation import build_generation, make_optimizer
from kdray.training.loop import train_epoch
from kdray.training.prepare import prepare

TARBALL = "cifar10-jpeg.tar.gz"


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# data


def find_tarball() -> Path | None:
    for d in (Path("/work/shared/datasets"), REPO.parent / "shared" / "datasets", REPO / "shared" / "datasets"):
        if (d / TARBALL).is_file():
            return d / TARBALL
    return None


def cifar10_jpeg_dir(cache_root: Path) -> Path:
    """Extract the CIFAR-10 JPEG tarball once into ``cache_root/cifar10-jpeg`` and return it."""
    dest = cache_root / "cifar10-jpeg"
    marker = dest / ".extracted"
    if marker.is_file():
        return dest
    tarball = find_tarball()
    if tarball is None:
        raise SystemExit(f"--dataset cifar10-jpeg: {TARBALL} not found under /work/shared/datasets, "
                         f"{REPO.parent / 'shared/datasets'} or {REPO / 'shared/datasets'}")
    cache_root.mkdir(parents=True, exist_ok=True)
    log(f"extracting {tarball} to {dest} (once)")
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".cifar10-jpeg."))
    try:
        with tarfile.open(tarball, "r:gz") as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:  # Python < 3.11.4 / 3.10.12
                tf.extractall(tmp)
        (tmp / ".extracted").write_text(str(tarball) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def tile_split(split: Split, n: int) -> Split:
    """``split`` repeated until it holds at least ``n`` samples (unchanged when it already does)."""
    if len(split) >= n:
        return split
    reps = math.ceil(n / len(split))
    return Split(split.x.repeat(reps, 1, 1, 1).contiguous(), split.y.repeat(reps).contiguous())


class PILImages(torch.utils.data.Dataset):
    """The reference dataset: HWC uint8 array, one ``PIL.Image.fromarray`` + transform per sample
    (what ``torchvision.datasets.CIFAR10.__getitem__`` does)."""

    def __init__(self, split: Split, transform):
        self.data = split.x.permute(0, 2, 3, 1).contiguous().numpy()  # [N,H,W,3] uint8
        self.targets = split.y.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.data[i])
        return self.transform(img), self.targets[i]


# ---------------------------------------------------------------------------------------------
# models


def build_teachers(archs: list[str], count: int, num_classes: int, seed: int) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [build_model(archs[i % len(archs)], num_classes) for i in range(count)]


def build_student_and_method(cfg, method_cls, num_classes: int, teacher_info):
    """The reference side's student and method, initialised as the engine's generation 0 is."""
    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, num_classes, branches=cfg.branches,
                            split_stage=cfg.split_stage, multi_branch=method_cls.multi_branch)
    return student, method_cls(cfg, student, teacher_info)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# kdray side


def build_store(cfg, data, train: Split, teacher_models, device, epochs: int, per_epoch: int):
    """An in-memory teacher store holding the views of the first ``per_epoch`` samples of each of
    ``epochs`` epochs (what the timed rounds visit): (store, seconds it took, views computed)."""
    from kdray.teachers.store import empty_store, store_key
    from kdray.teachers.store_codec import LogitEncoding
    from kdray.teachers.store_fill import compute_rows, view_batch

    data = dataclasses.replace(data, train=train)
    prep = prepare(cfg, data=data, teachers=TeacherEnsemble(teacher_models), device=device)
    feats = get_method(cfg.method).needs_teacher_feats(cfg)
    source = LiveTeacherOutputs(prep.teachers, prep.precision.autocast, feats)
    views, loader = data.views, prep.loaders.train
    codes = []
    for e in range(epochs):
        loader.set_epoch(e)
        idx = loader.indices()[:per_epoch]
        codes.append(idx * views.count + views.view_ids(loader.seed, e, idx))
    codes = torch.unique(torch.cat(codes))
    t0 = time.perf_counter()
    sample = source(view_batch(data, views, codes[:1], prep.precision.channels_last).to(device))
    codec = LogitEncoding().resolve(int(sample["logits"].shape[-1]), sample["logits"].dtype)
    # the key of this data, views, precision and encoding: a store the run would refuse (another
    # key) would leave the "kdray+store" side running its teachers live (checked after timing)
    key = store_key({"teachers": []}, data, views, prep.precision, codec)
    store = empty_store(key, source.info, len(train), views, feats)
    store.add(codes, *compute_rows(source, data, views, codes, prep.precision.channels_last))
    return store, time.perf_counter() - t0, len(codes)


def _check_store_side_served(sides) -> None:
    """Exit 2 when the "kdray+store" side computed any teacher image live: it would not measure
    what it names."""
    for name, side in sides:
        live = getattr(side.parts.teacher_outputs, "images", 0) if name == "kdray+store" else 0
        if live:
            log(f"FAIL: the kdray+store side ran its teachers live on {live} images: it does not measure a store")
            raise SystemExit(2)


class KdraySide:
    """kdray's training step, called through the engine itself: ``kdray.training.prepare`` (device,
    autocast / channels_last policy, the frozen :class:`TeacherEnsemble` or a teacher store, the
    on-device :class:`BatchLoader`), ``kdray.training.generation.build_generation`` (student, method, optimizer) and
    ``kdray.training.loop.train_epoch`` over a slice of one epoch's batches -- the same function ``fit`` runs."""

    def __init__(self, cfg, data, train: Split, teacher_models, device, store=None):
        teachers = TeacherEnsemble(teacher_models) if teacher_models else None
        self.prep = prepare(cfg, data=dataclasses.replace(data, train=train), teachers=teachers,
                                   device=device, store=store)
        self.parts = build_generation(cfg, self.prep, Generation(0))
        self.device = device
        self.use_amp = self.prep.precision.use_amp
        self.channels_last = self.prep.precision.channels_last
        self.epoch = 0
        self.last_loss = float("nan")
        self.last_acc = float("nan")

    def run(self, warmup: int, steps: int) -> tuple[float, int]:
        """(seconds, images) of ``steps`` steps after ``warmup`` untimed ones, in one epoch."""
        loader = self.prep.loaders.train
        loader.set_epoch(self.epoch)
        self.epoch += 1
        batches = loader.with_views()
        train_epoch(self.parts, itertools.islice(batches, warmup))
        sync(self.device)
        t0 = time.perf_counter()
        totals = train_epoch(self.parts, itertools.islice(batches, steps))
        sync(self.device)
        elapsed = time.perf_counter() - t0
        if totals.seen != steps * loader.batch_size:
            raise SystemExit(f"kdray loader ran out after {totals.seen} images of {steps} steps")
        self.last_loss = totals.loss.item() / totals.seen  # one host read, after the clock
        self.last_acc = totals.correct.item() / totals.seen
        return elapsed, totals.seen


# ---------------------------------------------------------------------------------------------
# reference side


class ReferenceSide:
    """The plain loop: PIL Dataset + DataLoader + per-sample transforms, fp32, ``.item()`` per step."""

    def __init__(self, cfg, data, train: Split, teacher_models, device, workers: int):
        from torchvision import transforms

        method_cls = get_method(cfg.method)
        self.device = device
        size = data.image_size
        tf = [transforms.RandomCrop(size, padding=data.crop_padding)] if data.crop_padding > 0 else []
        if data.hflip:
            tf.append(transforms.RandomHorizontalFlip())
        tf += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
        self.dataset = PILImages(train, transforms.Compose(tf))
        self.batch_size = cfg.batch_size
        self.workers = workers
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.teachers = [t.to(device).eval() for t in teacher_models]
        for t in self.teachers:
            for p in t.parameters():
                p.requires_grad_(False)
        info = TeacherEnsemble(teacher_models).info if teacher_models else None  # count + feat channels only
        self.student, self.method = build_student_and_method(cfg, method_cls, data.num_classes, info)
        self.student.to(device)
        self.method.to(device)
        self.feats = self.method.uses_teacher_feats
        params = [p for p in list(self.student.parameters()) + list(self.method.parameters()) if p.requires_grad]
        self.optimizer = make_optimizer(cfg, params)
        self.last_loss = float("nan")
        self.last_acc = float("nan")

    def run(self, warmup: int, steps: int) -> tuple[float, int]:
        device = self.device
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=True, num_workers=self.workers,
            generator=self.generator,
        )
        self.student.train()
        self.method.train()
        loss_total = acc_total = 0.0
        seen = 0
        t0 = None
        step = 0
        for images, target in loader:
            if step == warmup:
                sync(device)
                t0 = time.perf_counter()
                loss_total = acc_total = 0.0
                seen = 0
            images = images.to(device)
            target = target.to(device)
            with torch.no_grad():
                if self.feats:
                    outs = [t.forward_features(images) for t in self.teachers]
                    t_out = {"logits": torch.stack([o[0] for o in outs]), "feats": [o[1][-1] for o in outs]}
                elif self.teachers:
                    t_out = {"logits": torch.stack([t(images) for t in self.teachers]), "feats": []}
                else:
                    t_out = None
            s_out = self.student(images)
            logits, terms = self.method(target, s_out, t_out)
            loss = sum(terms.values())
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            bs = target.size(0)
            loss_total += loss.item() * bs  # AverageMeter-style logging: a host sync every step
            acc_total += (logits.argmax(1) == target).float().mean().item() * bs
            seen += bs
            step += 1
            if step == warmup + steps:
                break
        sync(device)
        elapsed = time.perf_counter() - t0
        del loader  # shut the workers down outside the timing
        if step != warmup + steps:
            raise SystemExit(f"reference loader ran out after {step} steps")
        self.last_loss = loss_total / max(seen, 1)
        self.last_acc = acc_total / max(seen, 1)
        return elapsed, seen


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    default_ds = "cifar10-jpeg" if find_tarball() is not None else "fake"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default=default_ds, choices=("cifar10-jpeg",) + DATASETS,
                   help=f"default here: {default_ds}")
    p.add_argument("--data-dir", default=None, help="for imagefolder / cifar10 (kdray's --data-dir)")
    p.add_argument("--cache-dir", default="~/.cache/kdray", help="where cifar10-jpeg is extracted")
    p.add_argument("--teachers", default="resnet32x4", help="teacher arch(s), comma-separated, cycled")
    p.add_argument("--teachers-count", type=int, default=2)
    p.add_argument("--student", default="resnet8x4")
    p.add_argument("--method", default="ekd", choices=sorted(METHODS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the clock starts")
    p.add_argument("--repeats", type=int, default=1, help="timed rounds per side (alternating); median reported")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "off"), help="kdray side only (engine default)")
    p.add_argument("--workers", type=int, default=2, help="reference DataLoader num_workers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-store", dest="store", action="store_false",
                   help="leave out the kdray side whose teacher outputs come from a teacher store")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.repeats < 1 or args.workers < 0:
        p.error("need --steps >= 1, --warmup >= 0, --batch-size >= 1, --repeats >= 1, --workers >= 0")
    if args.teachers_count < 0:
        p.error("--teachers-count must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset, data_dir = args.dataset, args.data_dir
    if dataset == "cifar10-jpeg":
        dataset, data_dir = "imagefolder", str(cifar10_jpeg_dir(Path(args.cache_dir).expanduser()))
    method_cls = get_method(args.method)
    try:
        cfg = from_dict({
            "method": args.method, "dataset": dataset, "data_dir": data_dir, "download": False,
            "student": args.student, "batch_size": args.batch_size, "seed": args.seed,
            "device": args.device, "amp": args.amp,
        }, where="step_throughput")
        device = pick_device(cfg)
        count = args.teachers_count if method_cls.min_teachers > 0 else 0
        check_teacher_count(method_cls, count)

        t = time.perf_counter()
        data = load_data(cfg)
        log(f"data: {args.dataset} train split {len(data.train)} images "
            f"{data.image_size}px, {data.num_classes} classes ({time.perf_counter() - t:.1f}s)")
        per_round = (args.warmup + args.steps) * args.batch_size
        train = tile_split(data.train, per_round)
        if len(train) != len(data.train):
            log(f"train split tiled to {len(train)} images so that {args.warmup}+{args.steps} steps fit one epoch")

        archs = [a for a in args.teachers.split(",") if a]
        teachers = build_teachers(archs, count, data.num_classes, args.seed)
        ref_teachers = build_teachers(archs, count, data.num_classes, args.seed)  # identical weights
        kd_side = KdraySide(cfg, data, train, teachers, device)
        ref_side = ReferenceSide(cfg, data, train, ref_teachers, device, args.workers)
        sides = [("kdray", kd_side), ("reference", ref_side)]
        store_info = None
        if args.store and count:
            store, build_s, n_views = build_store(cfg, data, train, teachers, device, args.repeats, per_round)
            log(f"teacher store: {n_views} views x {count} teachers in {build_s:.1f}s (untimed; "
                f"shared by every trial of a sweep)")
            store_side = KdraySide(cfg, data, train, teachers, device, store=store)
            if store_side.prep.store is None:
                raise SystemExit(f"step_throughput: the store side would run its teachers live "
                                 f"({store_side.prep.note})")
            sides.insert(0, ("kdray+store", store_side))
            store_info = {"views": n_views, "build_s": round(build_s, 2), "bytes": store.nbytes}
        if count:  # the bound of any teacher side: the student's own step, no teacher at all (ce)
            sides.append(("student-only", KdraySide(cfg.replace(method="ce"), data, train, None, device)))
    except KdrayError as exc:
        raise SystemExit(f"step_throughput: {exc}") from None

    rates: dict[str, list[float]] = {name: [] for name, _ in sides}
    for r in range(args.repeats):
        for name, side in sides:
            secs, n = side.run(args.warmup, args.steps)
            rates[name].append(n / secs)
            log(f"round {r + 1}/{args.repeats} {name}: {n} images in {secs:.2f}s = {n / secs:.1f} img/s "
                f"(mean loss {side.last_loss:.4f}, acc {side.last_acc:.3f})")
    _check_store_side_served(sides)
    kd_ips = statistics.median(rates["kdray"])
    ref_ips = statistics.median(rates["reference"])
    ratio = kd_ips / ref_ips
    store_ips = statistics.median(rates["kdray+store"]) if "kdray+store" in rates else None

    dev_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    )
    result = {
        "device": str(device), "device_name": dev_name,
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # other jobs on the machine skew CPU figures
        "config": {
            "dataset": args.dataset, "train_images": len(data.train), "image_size": data.image_size,
            "teachers": [archs[i % len(archs)] for i in range(count)], "student": args.student,
            "method": args.method, "branches": cfg.branches if method_cls.multi_branch else 1,
            "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
            "repeats": args.repeats, "workers": args.workers,
            "kdray_amp": "bf16" if kd_side.use_amp else "off", "kdray_channels_last": kd_side.channels_last,
        },
        "kdray_img_s": round(kd_ips, 2),
        "reference_img_s": round(ref_ips, 2),
        "ratio": round(ratio, 3),
        "kdray_img_s_rounds": [round(v, 2) for v in rates["kdray"]],
        "reference_img_s_rounds": [round(v, 2) for v in rates["reference"]],
    }
    if store_ips is not None:
        result.update({"kdray_store_img_s": round(store_ips, 2), "store_ratio": round(store_ips / ref_ips, 3),
                       "store": store_info, "store_live_teacher_images": 0})
    student_ips = statistics.median(rates["student-only"]) if "student-only" in rates else None
    if student_ips is not None:
        result["student_only_img_s"] = round(student_ips, 2)
        if store_ips is not None:  # how close the store side comes to its bound
            result["store_vs_student_only"] = round(store_ips / student_ips, 3)
    if args.json:
        print(json.dumps(result))
    else:
        c = result["config"]
        print(f"device: {result['device']} ({dev_name}), torch {result['torch']}, {result['threads']} threads, "
              f"load average {result['load_avg_1m']} on {result['cpu_count']} CPUs")
        print(f"config: {c['dataset']} ({c['train_images']} train images, {c['image_size']}px), "
              f"teachers {'+'.join(c['teachers']) or '-'} -> student {c['student']} ({c['method']}, "
              f"{c['branches']} branch(es)), batch {c['batch_size']}, {c['steps']} steps after {c['warmup']} "
              f"warm-up x {c['repeats']} round(s), reference workers {c['workers']}, "
              f"kdray amp {c['kdray_amp']} channels_last {c['kdray_channels_last']}")
        print(f"kdray:     {kd_ips:10.1f} img/s")
        print(f"reference: {ref_ips:10.1f} img/s")
        print(f"ratio:     {ratio:10.2f}x (kdray / reference)")
        if store_ips is not None:
            print(f"kdray+store: {store_ips:8.1f} img/s  ratio {store_ips / ref_ips:.2f}x (kdray with a teacher "
                  f"store / reference; store built once in {store_info['build_s']}s)")
        if student_ips is not None:
            bound = f"; kdray+store at {store_ips / student_ips:.2f}x of it" if store_ips is not None else ""
            print(f"student only (ce, no teacher: the bound): {student_ips:8.1f} img/s{bound}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
