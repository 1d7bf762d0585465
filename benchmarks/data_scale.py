#!/usr/bin/env python
"""Memory and images/s of kdray's data paths as the image set grows, against torchvision's
``ImageFolder`` + ``DataLoader``, in one run.

For each tree size N (default 4 k, 8 k and 16 k images at 224 px) and each mode, one fresh
subprocess (``--child MODE N``) loads the tree and draws training batches of ``[B,3,224,224]``
normalised float32 images, ImageNet-style views (RandomResizedCrop, scale [0.08, 1], ratio
[3/4, 4/3], horizontal flip, from images stored at 256 px):

stream -- kdray's streaming path (``data_path: stream``): the tree catalogued, Ray Data tasks read,
decode and cut the views (:class:`kdray.data.stream.StreamLoader`); a local Ray (``init_ray``) is
started first, its start time reported apart.

memory -- kdray's in-memory path (``data_path: memory``): the whole tree decoded once at 256 px
into the driver (kdray's decode cache is turned off, so every run decodes: the time to the first
batch includes the decode), views cut by :class:`kdray.data.loader.BatchLoader`. Skipped ("does
not fit") when N x 3 x 256 x 256 bytes exceed ``--memory-limit-gb``.

dataloader -- ``torchvision.datasets.ImageFolder`` + ``DataLoader(shuffle=True, num_workers=--workers
(default: the CPUs this process may use), persistent_workers=False)`` with ``Resize(256),
CenterCrop(256), RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3)), RandomHorizontalFlip,
ToTensor, Normalize``: the same work per image as kdray's views.

The parent samples, at ``--sample-hz`` (10 Hz), the resident set size (RSS) of the child and of
every process below it: the driver (the child itself), its workers (Ray worker processes --
``ray::...`` / ``default_worker.py`` -- for ``stream``; the DataLoader's forked workers for
``dataloader``), and Ray's own processes (raylet, GCS, dashboard, agents) reported apart. Reported:
the driver's peak, the largest per-process peak among the workers, the peak of the workers' sum,
and the peak of driver + workers together (also as private memory: RSS less shared pages). RSS
counts shared pages in every process that maps them (libraries, forked workers' copy-on-write
pages, Ray's object store), so sums over processes overstate what the machine spends; the target
compares the same sum across sizes. The child reports the time from
"load the data" to the first batch in hand, and steady images/s over ``--images`` further images
(the first batch left out).

Targets (PASS/FAIL lines always; ``--strict`` exits 1 on a FAIL): streaming's driver + workers peak
grows by at most 10 % from the smallest to the largest size; streaming gives at least 0.9x the
DataLoader's images/s at every size. Exit 2 when a mode did not measure what it names (``stream``
did not stream, ``memory`` streamed).

Trees are generated once under ``--cache`` (default ``~/.cache/kdray/bench-trees/N224-<n>/``):
CIFAR-10 JPEG train images (``shared/datasets/cifar10-jpeg.tar.gz``) upsampled with PIL bicubic to
224 px and saved as JPEG quality 90, class per folder, classes balanced; written to a temporary
folder and renamed when complete, reused afterwards.

Examples::

    # the full benchmark (quiet machine; trees made on first use)
    python benchmarks/data_scale.py --json data_scale.json
    # a tiny smoke run (about a minute on 2 cores)
    python benchmarks/data_scale.py --quick
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

TARBALL = "cifar10-jpeg.tar.gz"
CIFAR10_CLASSES = sorted(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
MODES = ("stream", "memory", "dataloader")
RESULT_TAG = "DATA_SCALE_RESULT "
TREE_VERSION = 1
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the DataLoader's Normalize (ImageNet's)
MEMORY_GROWTH_TARGET = 0.10  # streaming's driver + workers peak, smallest -> largest size
SPEED_TARGET = 0.9  # streaming img/s / DataLoader img/s


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def base_side(image_size: int) -> int:
    return int(round(image_size / 0.875))  # kdray's resized_crop base size (256 for 224)


# ---------------------------------------------------------------------------------------------
# image trees


def find_tarball() -> Path | None:
    for d in (Path("/work/shared/datasets"), REPO.parent / "shared" / "datasets", REPO / "shared" / "datasets"):
        if (d / TARBALL).is_file():
            return d / TARBALL
    return None


def tree_dir(cache: Path, n: int, size: int) -> Path:
    return cache / f"N{size}-{n}"


def class_quota(n: int) -> list[int]:
    """Images per class (CIFAR10_CLASSES order) of an n-image tree: balanced, the first n % 10 one more."""
    k = len(CIFAR10_CLASSES)
    return [n // k + (c < n % k) for c in range(k)]


def _marker(n: int, size: int, quality: int) -> dict:
    return {"version": TREE_VERSION, "images": n, "image_size": size, "quality": quality, "source": TARBALL}


def tree_complete(path: Path, n: int, size: int, quality: int) -> bool:
    try:
        if json.loads((path / ".complete").read_text()) != _marker(n, size, quality):
            return False
        return sum(len(os.listdir(path / c)) for c in CIFAR10_CLASSES) == n
    except (OSError, ValueError):
        return False


def make_trees(sizes: list[int], image_size: int, cache: Path, quality: int = 90) -> None:
    """Generate every tree of ``sizes`` not yet complete under ``cache``, in one pass over the tarball
    (more passes, mirrored copies named ``*_rK``, only if a tree needs more than the tarball holds)."""
    from PIL import Image

    pending = [n for n in sorted(set(sizes)) if not tree_complete(tree_dir(cache, n, image_size), n, image_size,
                                                                    quality)]
    for n in sorted(set(sizes)):
        if n not in pending:
            log(f"tree {tree_dir(cache, n, image_size)}: complete, reused")
    if not pending:
        return
    tarball = find_tarball()
    if tarball is None:
        raise SystemExit(f"data_scale: {TARBALL} not found under /work/shared/datasets, "
                         f"{REPO.parent / 'shared/datasets'} or {REPO / 'shared/datasets'}")
    cache.mkdir(parents=True, exist_ok=True)
    quota = {n: class_quota(n) for n in pending}
    written = {n: [0] * len(CIFAR10_CLASSES) for n in pending}
    tmp = {n: Path(tempfile.mkdtemp(dir=cache, prefix=f".N{image_size}-{n}.")) for n in pending}
    total, done = sum(pending), 0
    log(f"generating {len(pending)} tree(s) of {pending} images at {image_size}px from {tarball} into {cache}")
    t0 = last = time.perf_counter()
    try:
        for c in CIFAR10_CLASSES:
            for n in pending:
                (tmp[n] / c).mkdir()
        rounds = 0
        while done < total:
            before = done
            with tarfile.open(tarball, "r:gz") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if not member.isfile() or len(parts) != 3 or parts[0] != "train" or not parts[2].endswith(".jpg") \
                            or parts[1] not in CIFAR10_CLASSES:
                        continue
                    c = CIFAR10_CLASSES.index(parts[1])
                    need = [n for n in pending if written[n][c] < quota[n][c]]
                    if not need:
                        if done == total:
                            break
                        continue
                    with Image.open(io.BytesIO(tar.extractfile(member).read())) as im:
                        img = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
                    if rounds % 2:
                        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=quality)
                    name = Path(parts[2]).stem + (f"_r{rounds}" if rounds else "") + ".jpg"
                    for n in need:
                        (tmp[n] / parts[1] / name).write_bytes(buf.getvalue())
                        written[n][c] += 1
                        done += 1
                    now = time.perf_counter()
                    if now - last >= 5 or done == total:
                        rate = done / max(now - t0, 1e-9)
                        log(f"trees: {done}/{total} images written, {rate:.0f}/s, ETA {(total - done) / rate:.0f} s")
                        last = now
            rounds += 1
            if done == before:
                raise SystemExit(f"data_scale: {tarball} holds no train/<class>/*.jpg images of the CIFAR-10 classes")
        for n in pending:
            (tmp[n] / ".complete").write_text(json.dumps(_marker(n, image_size, quality)))
            os.chmod(tmp[n], 0o755)  # mkdtemp makes it 0700
            dest = tree_dir(cache, n, image_size)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp[n], dest)
        log(f"trees written in {time.perf_counter() - t0:.0f} s")
    finally:
        for path in tmp.values():
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)


def warm_page_cache(root: Path) -> None:
    """Read every file of the tree once, so no mode pays the first read from disk."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                while fh.read(1 << 20):
                    pass


# ---------------------------------------------------------------------------------------------
# the child: one mode at one size


def _stream_or_memory(mode: str, root: Path, args, t_start: float) -> dict:
    import torch

    from kdray.core.device import Precision
    from kdray.data.sources import load_data
    from kdray.training.config import from_dict
    from kdray.training.prepare import make_loaders

    ray_start_s = 0.0
    if mode == "stream":
        t = time.perf_counter()
        import ray.data

        from kdray.distributed.local_ray import init_ray

        init_ray(None)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ray_start_s = time.perf_counter() - t
    else:
        import kdray.data.imagefolder as imagefolder

        if not callable(getattr(imagefolder, "_cache_dirs", None)):
            raise SystemExit("data_scale: kdray.data.imagefolder._cache_dirs is gone: cannot turn the decode cache "
                             "off, so the memory mode would not measure a cold decode; update this benchmark")
        imagefolder._cache_dirs = lambda root: []  # no decode cache read or written: every run decodes
    cfg = from_dict({"dataset": "imagefolder", "data_dir": str(root), "image_size": args.image_size,
                     "data_path": mode, "views": "resized_crop", "batch_size": args.batch_size, "seed": 0})
    ready = time.perf_counter()
    data = load_data(cfg)
    if data.streamed != (mode == "stream"):
        print(f"data_scale: mode {mode} got a bundle with streamed={data.streamed}: it would not measure what "
              f"it names", file=sys.stderr, flush=True)
        sys.exit(2)
    load_s = time.perf_counter() - ready
    loaders = make_loaders(cfg, data, Precision(torch.device("cpu"), False, False), 0, 1)
    train = loaders.train
    kind = type(train).__name__
    if (mode == "stream") != (kind == "StreamLoader"):
        print(f"data_scale: mode {mode} got a {kind} train loader", file=sys.stderr, flush=True)
        sys.exit(2)

    def batches():
        epoch = 0
        while True:
            train.set_epoch(epoch)
            got = 0
            for x, _y, _keys in train.with_views():
                got += 1
                yield x, epoch
            if not got:
                raise SystemExit(f"data_scale: {mode}: an epoch gave no batches")
            epoch += 1

    extra = {"ray_start_s": round(ray_start_s, 3), "load_s": round(load_s, 3), "train_images": len(data.train),
             "loader": kind}
    return _time_batches(batches(), ready, args, extra, t_start)


def _dataloader(root: Path, args, t_start: float) -> dict:
    import torch
    import torchvision
    from torchvision import transforms as T

    class Folder(torchvision.datasets.ImageFolder):
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            return classes, {c: i for i, c in enumerate(classes)}

    torch.manual_seed(0)
    side = base_side(args.image_size)
    transform = T.Compose([
        T.Resize(side), T.CenterCrop(side),
        T.RandomResizedCrop(args.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD),
    ])
    workers = args.workers if args.workers is not None else usable_cpus()
    ready = time.perf_counter()
    ds = Folder(str(root), transform=transform)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                     persistent_workers=False)

    def batches():
        epoch = 0
        while True:
            for x, _y in dl:
                yield x, epoch
            epoch += 1

    extra = {"ray_start_s": 0.0, "load_s": round(time.perf_counter() - ready, 3), "train_images": len(ds),
             "loader": f"DataLoader(num_workers={workers})"}
    return _time_batches(batches(), ready, args, extra, t_start)


def _time_batches(it, ready: float, args, extra: dict, t_start: float) -> dict:
    x, _ = next(it)
    first = time.perf_counter()
    want = (args.batch_size, 3, args.image_size, args.image_size)
    if not x.dtype.is_floating_point or tuple(x.shape[1:]) != want[1:] or x.shape[0] < 1:
        print(f"data_scale: first batch is {x.dtype} {tuple(x.shape)}, not float {want}", file=sys.stderr, flush=True)
        sys.exit(2)
    images = batches = 0
    epoch = 0
    while images < args.images:
        x, epoch = next(it)
        images += x.shape[0]
        batches += 1
    secs = time.perf_counter() - first
    return {**extra, "first_batch_s": round(first - ready, 3), "startup_s": round(ready - t_start, 3),
            "images": images, "batches": batches, "epochs_crossed": epoch, "seconds": round(secs, 3),
            "img_s": round(images / secs, 2)}


def child_main(args) -> int:
    t_start = time.perf_counter()
    mode, n = args.child[0], int(args.child[1])
    root = tree_dir(Path(args.cache).expanduser(), n, args.image_size)
    if mode == "dataloader":
        result = _dataloader(root, args, t_start)
    else:
        result = _stream_or_memory(mode, root, args, t_start)
    print(RESULT_TAG + json.dumps({"mode": mode, "n": n, **result}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# the parent: RSS sampling


RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's per-node agents, titled like workers


def _kind(cmd: str, driver_cmd: str) -> str:
    """A process's kind by its command line: "ray_worker", "forked" (the driver's own command line: a
    fork of the driver, such as a DataLoader worker), "ray_system", or "other" (told by its parent)."""
    if cmd.startswith(RAY_AGENTS):
        return "ray_system"
    if cmd.startswith("ray::") or "default_worker.py" in cmd or "setup_worker.py" in cmd:
        return "ray_worker"  # Ray Data's tasks and its helper actors run in these
    if cmd == driver_cmd:
        return "forked"
    if "raylet" in cmd or "gcs_server" in cmd or "/ray/" in cmd or "ray-dashboard" in cmd:
        return "ray_system"
    return "other"


class RssSampler(threading.Thread):
    """Peak RSS of a process tree, sampled at ``hz``: the root (the driver), per process and summed
    per kind; the kind that counts as the driver's workers is ``workers`` ("ray_worker", "forked" or
    None), any other process of the tree counts as Ray's own (``ray_system``) or ``other``."""

    def __init__(self, pid: int, hz: float, workers):
        import psutil

        super().__init__(daemon=True)
        self.psutil = psutil
        self.root = psutil.Process(pid)
        self.driver_cmd = " ".join(self.root.cmdline())
        self.workers = workers
        self.period = 1.0 / hz
        self.halt = threading.Event()
        self.samples = 0
        self.peak: dict[str, int] = {}  # "driver", "workers", "driver+workers", "ray_system", "other", "total"
        self.proc_peak: dict[tuple, list] = {}  # (pid, create_time) -> [kind, peak rss]

    def _classify(self, cmd: str) -> str:
        kind = _kind(cmd, self.driver_cmd)
        if kind == "forked":  # a fork of the driver: its workers in the dataloader mode, else a fork before exec
            return "workers" if self.workers == "forked" else "other"
        if kind == "ray_worker":
            return "workers" if self.workers == "ray_worker" else "ray_system"
        return kind

    def sample(self) -> None:
        psutil = self.psutil
        try:
            procs = self.root.children(recursive=True)
            driver = self.root.memory_info()
        except psutil.Error:
            return
        seen = []  # (key, ppid, kind, rss, anon)
        kinds = {self.root.pid: "driver"}
        for p in procs:
            try:
                mem = p.memory_info()
                kind = self._classify(" ".join(p.cmdline()))
                key, ppid = (p.pid, p.create_time()), p.ppid()
            except psutil.Error:
                continue
            kinds[p.pid] = kind
            seen.append((key, ppid, kind, mem.rss, mem.rss - getattr(mem, "shared", 0)))
        values = {k: 0 for k in ("workers", "ray_system", "other")}
        anon = dict(values)
        for key, ppid, kind, rss, private in seen:
            if kind == "other" and kinds.get(ppid) == "ray_system":  # e.g. the dashboard's spawned modules
                kind = kinds[key[0]] = "ray_system"
            values[kind] += rss
            anon[kind] += private
            entry = self.proc_peak.setdefault(key, [kind, 0])
            entry[0] = kind if kind != "other" else entry[0]
            entry[1] = max(entry[1], rss)
        self.samples += 1
        d_anon = driver.rss - getattr(driver, "shared", 0)
        values.update({"driver": driver.rss, "driver+workers": driver.rss + values["workers"],
                       "total": driver.rss + sum(values[k] for k in ("workers", "ray_system", "other")),
                       "driver_anon": d_anon, "driver+workers_anon": d_anon + anon["workers"]})
        for k, v in values.items():
            self.peak[k] = max(self.peak.get(k, 0), v)

    def run(self) -> None:
        while not self.halt.is_set():
            t = time.perf_counter()
            self.sample()
            self.halt.wait(max(0.0, self.period - (time.perf_counter() - t)))

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        return self.report()

    def report(self) -> dict:
        mb = lambda b: round(b / 2**20, 1)  # noqa: E731
        out = {"rss_samples": self.samples, **{f"{k}_peak_mb": mb(v) for k, v in self.peak.items()}}
        for kind in ("workers", "ray_system"):
            peaks = [pk for k, pk in self.proc_peak.values() if k == kind]
            out[f"{kind}_processes"] = len(peaks)
            out[f"{kind}_max_peak_mb"] = mb(max(peaks)) if peaks else 0.0
        return out


WORKER_KIND = {"stream": "ray_worker", "dataloader": "forked", "memory": None}


def run_child(mode: str, n: int, args, logdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(n), "--cache", args.cache,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--images", str(args.images)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    out_path, err_path = logdir / f"{mode}-{n}.out", logdir / f"{mode}-{n}.err"
    t0 = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own, below it
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=str(REPO), env=env)
        try:
            sampler = RssSampler(proc.pid, args.sample_hz, WORKER_KIND[mode])
            sampler.start()
        except Exception:  # the child ended before its first sample
            sampler = None
        try:
            rc = proc.wait(timeout=args.child_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        mem = sampler.stop() if sampler is not None else {}
    wall = time.perf_counter() - t0
    lines = [ln for ln in out_path.read_text().splitlines() if ln.startswith(RESULT_TAG)]
    if rc != 0 or not lines:
        tail = "\n".join(err_path.read_text().splitlines()[-40:])
        print(f"data_scale: child {mode} N={n} failed (exit {rc}, {wall:.0f} s); its stderr ends:\n{tail}",
              file=sys.stderr, flush=True)
        raise SystemExit(2 if rc == 2 else 1)
    result = json.loads(lines[-1][len(RESULT_TAG):])
    if not mem.get("rss_samples"):
        raise SystemExit(f"data_scale: child {mode} N={n}: no RSS sample taken")
    worker = WORKER_KIND[mode]
    result.update(mem)
    result["wall_s"] = round(wall, 2)
    result["workers_kind"] = {"ray_worker": "Ray workers", "forked": "DataLoader workers"}.get(worker)
    result["worker_max_peak_mb"] = mem["workers_max_peak_mb"] if worker else None
    result["workers_sum_peak_mb"] = mem["workers_peak_mb"] if worker else None
    if mode == "stream" and not mem.get("workers_processes"):
        raise SystemExit(f"data_scale: stream N={n}: no Ray worker process seen below the child; the worker "
                         "RSS would be missing (did Ray start its workers elsewhere?)")
    return result


# ---------------------------------------------------------------------------------------------
# the table


def _fmt(v, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[dict], sizes: list[int]) -> None:
    head = ("| N | mode | driver peak MB | worker max peak MB | workers sum peak MB | driver+workers peak MB "
            "| driver+workers private peak MB | Ray system peak MB | ray start s | first batch s | steady img/s |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for n in sizes:
        for r in (r for r in results if r["n"] == n):
            if r.get("skipped"):
                print(f"| {n} | {r['mode']} | {r['skipped']} |" + " |" * 9)
                continue
            ray_sys = r.get("ray_system_peak_mb") if r["mode"] == "stream" else None
            print(f"| {n} | {r['mode']} | {_fmt(r['driver_peak_mb'])} | {_fmt(r['worker_max_peak_mb'])} "
                  f"| {_fmt(r['workers_sum_peak_mb'])} | {_fmt(r['driver+workers_peak_mb'])} "
                  f"| {_fmt(r['driver+workers_anon_peak_mb'])} | {_fmt(ray_sys)} "
                  f"| {_fmt(r['ray_start_s'] if r['mode'] == 'stream' else None, '.1f')} "
                  f"| {r['first_batch_s']:.2f} | {r['img_s']:.1f} |")


def targets(results: list[dict], sizes: list[int]) -> tuple[list[str], list[str], dict]:
    """(lines, failures, ratios) of the two targets."""
    by = {(r["mode"], r["n"]): r for r in results if not r.get("skipped")}
    lines, fails, ratios = [], [], {}
    lo, hi = min(sizes), max(sizes)
    a, b = by[("stream", lo)]["driver+workers_peak_mb"], by[("stream", hi)]["driver+workers_peak_mb"]
    growth = b / a - 1
    ok = round(growth, 9) <= MEMORY_GROWTH_TARGET
    ratios["stream_memory_growth"] = {"from": lo, "to": hi, "from_mb": a, "to_mb": b, "growth": round(growth, 4)}
    line = (f"memory growth, stream driver+workers peak RSS, N {lo} -> {hi}: {a:.0f} MB -> {b:.0f} MB = "
            f"{growth * 100:+.1f}% (target <= {MEMORY_GROWTH_TARGET * 100:.0f}%): {'PASS' if ok else 'FAIL'}")
    lines.append(line)
    if not ok:
        fails.append(line)
    if lo == hi:
        lines.append("  (one size only: the growth compares a size with itself)")
    a, b = by[("stream", lo)]["driver+workers_anon_peak_mb"], by[("stream", hi)]["driver+workers_anon_peak_mb"]
    ratios["stream_private_memory_growth"] = {"from_mb": a, "to_mb": b, "growth": round(b / a - 1, 4)}
    lines.append(f"  for information: the same as private memory (RSS less shared pages: the object store, "
                 f"libraries): {a:.0f} MB -> {b:.0f} MB = {(b / a - 1) * 100:+.1f}%")
    ratios["stream_over_dataloader"] = {}
    for n in sizes:
        s, d = by[("stream", n)]["img_s"], by[("dataloader", n)]["img_s"]
        ratio = s / d
        ok = ratio >= SPEED_TARGET
        ratios["stream_over_dataloader"][str(n)] = round(ratio, 3)
        line = (f"speed, stream / dataloader img/s at N {n}: {s:.1f} / {d:.1f} = {ratio:.2f}x "
                f"(target >= {SPEED_TARGET}x): {'PASS' if ok else 'FAIL'}")
        lines.append(line)
        if not ok:
            fails.append(line)
    return lines, fails, ratios


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=None, help="tree sizes N, comma-separated (default 4000,8000,16000)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--images", type=int, default=None,
                   help="images timed after the first batch (default 2560: inside one epoch of the 4 k tree's "
                        "train split; --quick: 160)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader num_workers (default: usable CPUs)")
    p.add_argument("--memory-limit-gb", type=float, default=8.0,
                   help="skip the memory mode where N x 3 x S x S bytes (S = stored side, 256) exceed this")
    p.add_argument("--cache", default="~/.cache/kdray/bench-trees", help="where the image trees are kept")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the generated trees")
    p.add_argument("--sample-hz", type=float, default=10.0, help="RSS samples per second")
    p.add_argument("--child-timeout", type=float, default=1800.0, help="seconds one measurement may take")
    p.add_argument("--quick", action="store_true", help="tiny settings for tests: sizes 64,128, batch 32, 160 images")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON to OUT")
    p.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in (args.sizes or ("64,128" if args.quick else "4000,8000,16000")).split(",") if s]
    args.batch_size = args.batch_size or (32 if args.quick else 128)
    args.images = args.images or (160 if args.quick else 2560)
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes {','.join(bad) or '(none)'}: allowed are {', '.join(MODES)}")
    if not args.sizes or min(args.sizes) < 20:
        p.error("--sizes: each at least 20 images (2 per class)")
    if max(args.sizes) > 1_000_000:
        p.error("--sizes: at most 1000000")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args)
    cache = Path(args.cache).expanduser()
    make_trees(args.sizes, args.image_size, cache, args.quality)
    side = base_side(args.image_size)
    cpus = usable_cpus()
    print(f"machine: {cpus} usable CPUs, load average {os.getloadavg()[0]:.2f}, python {sys.version.split()[0]}")
    print(f"config: trees {args.sizes} at {args.image_size}px (stored at {side}px by kdray), batch {args.batch_size}, "
          f"{args.images} images timed after the first batch, DataLoader workers "
          f"{args.workers if args.workers is not None else cpus}, RSS sampled at {args.sample_hz:g} Hz")
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="data_scale.") as logdir:
        for n in args.sizes:
            root = tree_dir(cache, n, args.image_size)
            warm_page_cache(root)
            for mode in args.modes:
                decoded = n * 3 * side * side
                if mode == "memory" and decoded > args.memory_limit_gb * 1024**3:
                    why = f"does not fit ({decoded / 1024**3:.3g} GB > {args.memory_limit_gb:g} GB)"
                    log(f"N={n} memory: {why}")
                    results.append({"mode": mode, "n": n, "skipped": why})
                    continue
                log(f"N={n} {mode} ...")
                r = run_child(mode, n, args, Path(logdir))
                log(f"N={n} {mode}: {r['img_s']:.1f} img/s, first batch {r['first_batch_s']:.2f} s, driver peak "
                    f"{r['driver_peak_mb']:.0f} MB, driver+workers peak {r['driver+workers_peak_mb']:.0f} MB "
                    f"({r['wall_s']:.0f} s)")
                results.append(r)
    print_table(results, args.sizes)
    lines, fails, ratios = ([], [], {})
    if {"stream", "dataloader"} <= set(args.modes):
        lines, fails, ratios = targets(results, args.sizes)
    else:
        lines = ["targets: not measured (they need the stream and dataloader modes)"]
    for line in lines:
        print(line)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        doc = {"cpus": cpus, "load_avg_1m": round(os.getloadavg()[0], 2),
               "config": {"sizes": args.sizes, "modes": args.modes, "image_size": args.image_size,
                          "stored_side": side, "batch_size": args.batch_size, "images": args.images,
                          "workers": args.workers if args.workers is not None else cpus, "sample_hz": args.sample_hz,
                          "memory_limit_gb": args.memory_limit_gb, "cache": str(cache)},
               "results": results, "ratios": ratios, "failures": fails}
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if fails and args.strict:
        for line in fails:
            print(f"FAIL: {line}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
