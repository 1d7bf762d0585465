#!/usr/bin/env python
"""Which precision and memory layout is fastest on this CPU, and does bf16 cost accuracy -- in one run.

Four settings are timed, each against fp32 NCHW (the reference) measured in the same run:

* fp32 NCHW          -- no autocast, contiguous tensors and weights
* fp32 channels_last -- no autocast, model and input in ``torch.channels_last``
* bf16 NCHW          -- ``torch.autocast("cpu", dtype=torch.bfloat16)``, contiguous
* bf16 channels_last -- both

The autocast context is kdray's own (:class:`kdray.core.device.Precision`), so the settings are the ones
``amp`` and ``channels_last`` select in a run. Three workloads, all on random data (speed does not
depend on trained weights, and random inputs keep data loading out of the timing):

* student step -- one training step of ``--student`` (batch ``--batch-size``): forward under
  autocast, cross-entropy, backward, the engine's default optimizer (SGD, nesterov momentum) step.
* teacher inference -- ``--teacher`` in a :class:`TeacherEnsemble` (eval mode, ``inference_mode``)
  under autocast, batch ``--batch-size``: what a live-teacher run pays per step.
* store build -- the same with the ``--store-teachers`` ensemble and batch ``--store-batch-size``,
  as the teacher store computes its rows (the uint8 view crop/flip of a real build is left out).

Every setting first runs ``--warmup`` untimed iterations (oneDNN builds its kernels on first use);
then ``--repeats`` rounds of ``--iters`` iterations are timed, the settings alternating within each
round so that load from other jobs on the machine spreads over all of them; the median round is
reported. The script also prints what ``Precision.for_config`` picks here (``amp: auto``,
``channels_last`` unset) and whether the CPU computes bf16 natively (``cpu_has_native_bf16``).

``--parity`` adds an accuracy check: the same student and config (``digits``, ``--parity-method``,
``--parity-epochs``) trained through ``kdray.training.fit`` for each of ``--seeds``, once with
``amp: off, channels_last: false`` and once with ``amp: bf16, channels_last: true``; test accuracy
per seed, mean +- sample std per setting and the difference of the means. A method that needs
teachers gets ``--parity-teachers``, or teachers trained here once in fp32 and shared by both sides.

Examples::

    # a smoke check (about 40 s on 2 cores; the figures are only indicative)
    python benchmarks/cpu_precision.py --repeats 1 --warmup 1 --iters 2
    # the measurement (several minutes on 2 cores: the store build dominates)
    python benchmarks/cpu_precision.py
    # plus accuracy parity (digits, 15 epochs x 3 seeds x 2 settings), as one JSON object
    python benchmarks/cpu_precision.py --parity --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

import torch
from torch import nn

from kdray.core.device import Precision, cpu_has_native_bf16
from kdray.core.errors import KdrayError
from kdray.data.sources import load_data
from kdray.distill import METHODS, get_method
from kdray.models import build_model
from kdray.teachers.ensemble import TeacherEnsemble
from kdray.training.config import from_dict
from kdray.training.fit import fit
from kdray.training.generation import make_optimizer
from kdray.training.teacher_set import train_teachers

CPU = torch.device("cpu")

#: the timed settings, the reference first: key -> (label, kdray's Precision for it)
SETTINGS = {
    "fp32_nchw": ("fp32 NCHW", Precision(CPU, use_amp=False, channels_last=False)),
    "fp32_cl": ("fp32 channels_last", Precision(CPU, use_amp=False, channels_last=True)),
    "bf16_nchw": ("bf16 NCHW", Precision(CPU, use_amp=True, channels_last=False)),
    "bf16_cl": ("bf16 channels_last", Precision(CPU, use_amp=True, channels_last=True)),
}
REFERENCE = "fp32_nchw"

#: the two sides of the accuracy check: key -> config keys
PARITY_SIDES = {
    "fp32_nchw": {"amp": "off", "channels_last": False},
    "bf16_cl": {"amp": "bf16", "channels_last": True},
}


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def setting_key(precision: Precision) -> str:
    """The key of SETTINGS that ``precision`` runs as."""
    return f"{'bf16' if precision.use_amp else 'fp32'}_{'cl' if precision.channels_last else 'nchw'}"


# ---------------------------------------------------------------------------------------------
# workloads: each builds its models for one setting and returns a zero-argument step


def in_layout(t, precision: Precision):
    """A model or batch in the setting's memory format (the engine converts both the same way)."""
    if precision.channels_last:
        return t.to(memory_format=torch.channels_last)
    return t


def random_batch(batch: int, size: int, num_classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(num_classes, (batch,), generator=g)


def student_step(args, precision: Precision) -> Callable[[], None]:
    """One training step of a freshly initialised student (same weights for every setting)."""
    torch.manual_seed(args.seed)
    model = in_layout(build_model(args.student, args.num_classes), precision).train()
    x, y = random_batch(args.batch_size, args.image_size, args.num_classes, args.seed)
    x = in_layout(x, precision)
    optimizer = make_optimizer(from_dict({}, where="cpu_precision"), model.parameters())

    def step() -> None:
        with precision.autocast():  # the loss inside autocast too, as the engine's train_step does
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def ensemble_step(archs: list[str], batch: int, args, precision: Precision) -> Callable[[], None]:
    """One forward pass of a frozen ensemble, as ``LiveTeacherOutputs`` runs it (autocast around
    the ensemble's own ``inference_mode``)."""
    torch.manual_seed(args.seed)
    ensemble = in_layout(TeacherEnsemble([build_model(a, args.num_classes) for a in archs]), precision)
    x, _ = random_batch(batch, args.image_size, args.num_classes, args.seed)
    x = in_layout(x, precision)

    def step() -> None:
        with precision.autocast():
            ensemble(x)

    return step


def workloads(args) -> dict:
    """name -> (description, images per step, factory(precision) -> step)."""
    store = args.store_teachers
    return {
        "student_step": (f"student train step: {args.student}, batch {args.batch_size}",
                         args.batch_size, lambda p: student_step(args, p)),
        "teacher_inference": (f"teacher inference: {args.teacher}, batch {args.batch_size}",
                              args.batch_size, lambda p: ensemble_step([args.teacher], args.batch_size, args, p)),
        "store_build": (f"store build: {'+'.join(store)}, batch {args.store_batch_size}",
                        args.store_batch_size, lambda p: ensemble_step(store, args.store_batch_size, args, p)),
    }


# ---------------------------------------------------------------------------------------------
# timing


def run_steps(step: Callable[[], None], n: int) -> float:
    """Seconds for ``n`` calls of ``step`` (CPU work is synchronous: no device sync needed)."""
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def time_workload(factory, images: int, args) -> dict:
    """Per setting: median ms/step over the rounds, img/s and the speed-up against the reference."""
    steps = {key: factory(precision) for key, (_, precision) in SETTINGS.items()}
    for step in steps.values():
        run_steps(step, args.warmup)
    rounds: dict[str, list[float]] = {key: [] for key in SETTINGS}
    for _ in range(args.repeats):
        for key, step in steps.items():  # alternating, so a burst of outside load hits all settings
            rounds[key].append(run_steps(step, args.iters) / args.iters * 1000)
    ref_ms = statistics.median(rounds[REFERENCE])
    out = {}
    for key, ms_rounds in rounds.items():
        ms = statistics.median(ms_rounds)
        out[key] = {"ms_per_step": round(ms, 3), "img_s": round(images / ms * 1000, 1),
                    "speedup": round(ref_ms / ms, 3), "ms_rounds": [round(v, 3) for v in ms_rounds]}
    return out


def fastest(results: dict) -> str:
    return min(results, key=lambda k: results[k]["ms_per_step"])


def kdray_pick() -> Precision:
    """What a kdray CPU run uses with ``amp: auto`` and ``channels_last`` unset."""
    return Precision.for_config(from_dict({"device": "cpu", "amp": "auto"}, where="cpu_precision"), CPU)


def run_timing(args) -> dict:
    out = {}
    for name, (desc, images, factory) in workloads(args).items():
        t = time.perf_counter()
        results = time_workload(factory, images, args)
        log(f"{desc}: timed in {time.perf_counter() - t:.1f}s")
        out[name] = {"description": desc, "images_per_step": images, "settings": results,
                     "fastest": fastest(results)}
    return out


# ---------------------------------------------------------------------------------------------
# accuracy parity


def parity_base(args) -> dict:
    """The config keys both sides of the check share."""
    return {"dataset": "digits", "student": args.student, "method": args.parity_method,
            "epochs": args.parity_epochs, "batch_size": args.parity_batch_size, "device": "cpu"}


def parity_teachers(args, base: dict, tmp: Path) -> str | None:
    """A teacher directory for a method that needs one: ``--parity-teachers``, else teachers
    trained now with plain CE in fp32, so that both sides distil from the very same teachers."""
    if get_method(args.parity_method).min_teachers == 0:
        return None
    if args.parity_teachers:
        return args.parity_teachers
    out = tmp / "teachers"
    cfg = from_dict({**base, "amp": "off", "channels_last": False}, where="cpu_precision")
    log(f"parity: training {args.parity_teacher_count} teacher(s) {','.join(args.parity_teacher_archs)} "
        f"for {args.parity_epochs} epochs (fp32)")
    train_teachers(cfg, args.parity_teacher_archs, args.parity_teacher_count, out, log=lambda s: None)
    return str(out)


def train_once(cfg, data, root: Path) -> dict:
    m = fit(cfg, data=data, checkpoint_root=str(root), keep_checkpoints=1, log=lambda s: None)["metrics"]
    return {"test_acc": m["test_acc"], "val_acc": m["val_acc"], "epoch_time_s": round(m["epoch_time_s"], 3),
            "images_per_s": round(m["images_per_s"], 1)}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None with a single value: JSON has no NaN)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def run_parity(args) -> dict:
    base = parity_base(args)
    with tempfile.TemporaryDirectory(prefix="kdray-cpu-precision.") as tmp:
        tmp = Path(tmp)
        teachers = parity_teachers(args, base, tmp)
        if teachers:
            base["teachers"] = teachers
        data = load_data(from_dict(base, where="cpu_precision"))  # the same split for every run
        runs: dict[str, dict] = {key: {} for key in PARITY_SIDES}
        for seed in args.seeds:
            for key, keys in PARITY_SIDES.items():
                cfg = from_dict({**base, **keys, "seed": seed}, where="cpu_precision")
                t = time.perf_counter()
                runs[key][seed] = train_once(cfg, data, tmp / "checkpoints" / f"{key}-seed{seed}")
                log(f"parity: {SETTINGS[key][0]} seed {seed}: test_acc {runs[key][seed]['test_acc']:.4f} "
                    f"({time.perf_counter() - t:.1f}s)")
    sides = {}
    for key, per_seed in runs.items():
        mean, std = mean_std([r["test_acc"] for r in per_seed.values()])
        sides[key] = {"config": PARITY_SIDES[key], "per_seed": per_seed, "test_acc_mean": mean,
                      "test_acc_std": std}
    return {"config": {**base, "teachers": bool(base.get("teachers")), "seeds": args.seeds}, "sides": sides,
            "test_acc_diff": sides["bf16_cl"]["test_acc_mean"] - sides["fp32_nchw"]["test_acc_mean"]}


# ---------------------------------------------------------------------------------------------
# report


def print_timing(timing: dict, pick: str) -> None:
    for res in timing.values():
        print(f"\n{res['description']}")
        for key, r in res["settings"].items():
            mark = " (reference)" if key == REFERENCE else ""
            print(f"  {SETTINGS[key][0]:<20} {r['ms_per_step']:9.1f} ms/step {r['img_s']:9.1f} img/s "
                  f"{r['speedup']:6.2f}x{mark}")
    print("\nfastest:")
    for name, res in timing.items():
        best = res["fastest"]
        print(f"  {name:<18} {SETTINGS[best][0]:<20} {res['settings'][best]['speedup']:.2f}x; "
              f"kdray's pick {SETTINGS[pick][0]}: {res['settings'][pick]['speedup']:.2f}x")


def print_parity(parity: dict) -> None:
    c = parity["config"]
    print(f"\naccuracy parity: {c['dataset']}, {c['student']}, method {c['method']}, {c['epochs']} epochs, "
          f"batch {c['batch_size']}, seeds {','.join(map(str, c['seeds']))}")
    sides = parity["sides"]
    for seed in c["seeds"]:
        row = "  ".join(f"{SETTINGS[k][0]} {s['per_seed'][seed]['test_acc']:.4f}" for k, s in sides.items())
        print(f"  seed {seed}: {row}")
    for key, s in sides.items():
        ips = statistics.fmean(r["images_per_s"] for r in s["per_seed"].values())
        std = "n/a" if s["test_acc_std"] is None else f"{s['test_acc_std']:.4f}"
        print(f"  {SETTINGS[key][0]:<20} test_acc {s['test_acc_mean']:.4f} +- {std} "
              f"(last epoch {ips:.0f} img/s)")
    print(f"  difference (bf16 channels_last - fp32 NCHW): {parity['test_acc_diff']:+.4f}")


def machine_info() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2),  # other jobs on the machine skew the figures
            "cpu_has_native_bf16": cpu_has_native_bf16()}


def print_header(info: dict, pick: Precision, args) -> None:
    print(f"cpu: {info['cpu']}, torch {info['torch']}, {info['threads']} threads, "
          f"load average {info['load_avg_1m']} on {info['cpu_count']} CPUs")
    print(f"cpu_has_native_bf16: {info['cpu_has_native_bf16']}")
    print(f"kdray picks (amp auto, channels_last unset): {SETTINGS[setting_key(pick)][0]} "
          f"(use_amp={pick.use_amp}, channels_last={pick.channels_last})")
    if not args.skip_timing:
        print(f"timing: {args.iters} iterations x {args.repeats} round(s) after {args.warmup} warm-up, "
              f"{args.image_size}px, {args.num_classes} classes; median round; speed-up vs fp32 NCHW (>1 is faster)")


# ---------------------------------------------------------------------------------------------
# main


def comma_list(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all CPUs)")
    p.add_argument("--student", default="resnet8", help="student arch (timing and parity)")
    p.add_argument("--teacher", default="resnet56", help="teacher arch of the inference timing")
    p.add_argument("--store-teachers", type=comma_list, default=comma_list("resnet20,resnet32,resnet56"),
                   help="comma-separated teacher archs of the store-build timing")
    p.add_argument("--batch-size", type=int, default=128, help="student step and teacher inference batch")
    p.add_argument("--store-batch-size", type=int, default=256, help="store-build batch (the store's own)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per setting before the rounds")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per setting; the median is reported")
    p.add_argument("--seed", type=int, default=0, help="weights and random batch of the timing")
    p.add_argument("--skip-timing", action="store_true", help="only the parity check (with --parity)")
    p.add_argument("--parity", action="store_true", help="also train on digits: fp32 NCHW vs bf16 channels_last")
    p.add_argument("--parity-epochs", type=int, default=15)
    p.add_argument("--parity-method", default="ce", choices=sorted(METHODS))
    p.add_argument("--parity-batch-size", type=int, default=64, help="the config's batch_size (kdray default 64)")
    p.add_argument("--seeds", type=lambda s: [int(v) for v in comma_list(s)], default=[0, 1, 2],
                   help="comma-separated training seeds of the parity check")
    p.add_argument("--parity-teachers", default=None,
                   help="teacher directory for a method that needs teachers (default: train them here)")
    p.add_argument("--parity-teacher-archs", type=comma_list, default=comma_list("resnet20"),
                   help="archs of the teachers trained here when --parity-teachers is not given")
    p.add_argument("--parity-teacher-count", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if min(args.threads, args.iters, args.repeats, args.batch_size, args.store_batch_size,
           args.parity_epochs, args.parity_batch_size, args.parity_teacher_count) < 1 or args.warmup < 0:
        p.error("need --threads, --iters, --repeats, --batch-size, --store-batch-size, --parity-epochs, "
                "--parity-batch-size, --parity-teacher-count >= 1 and --warmup >= 0")
    if not args.store_teachers or not args.seeds or not args.parity_teacher_archs:
        p.error("--store-teachers, --seeds and --parity-teacher-archs need at least one entry")
    if args.skip_timing and not args.parity:
        p.error("--skip-timing without --parity leaves nothing to do")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        pick = kdray_pick()
        info = machine_info()
        result = {**info, "kdray_pick": {"setting": setting_key(pick), "use_amp": pick.use_amp,
                                         "channels_last": pick.channels_last}}
        if not args.skip_timing:
            result["timing_config"] = {k: getattr(args, k) for k in (
                "student", "teacher", "store_teachers", "batch_size", "store_batch_size", "image_size",
                "num_classes", "iters", "warmup", "repeats", "seed")}
            result["timing"] = run_timing(args)
        if args.parity:
            result["parity"] = run_parity(args)
    except KdrayError as exc:
        raise SystemExit(f"cpu_precision: {exc}") from None
    if args.json:
        print(json.dumps(result))
        return 0
    print_header(info, pick, args)
    if "timing" in result:
        print_timing(result["timing"], setting_key(pick))
    if "parity" in result:
        print_parity(result["parity"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
