#!/usr/bin/env python
"""What a sweep costs with and without the teacher store, for N = 2, 4, 8 trials, in one run.

The same sweep (one space, one teacher set trained once up front, the same TPE seed) runs with
the store (the default: the teachers' outputs for every view the trials will see computed once,
by Ray tasks, before the first trial) and with ``--no-teacher-store`` (the teachers run on every
batch of every trial). For each it prints wall time, the teacher forward passes (images x
teachers: the trials' own plus the store build's), the store build time, the trials' time in
epochs and the fixed cost per trial (a trial's time in its slot outside its epochs: start-up,
loading, the end). Ratios are against the same sweep without the store, measured in this run.

Targets (issue 12): the teacher work of a sweep does not grow with N; per-trial fixed overhead
<= 5 s for 1-worker trials; >= 85 % of the trials' slot time in epochs.

    python benchmarks/sweep_cost.py                 # digits, kd, 2 x resnet20 -> resnet8, about 6 min on 2 cores
    python benchmarks/sweep_cost.py --trials 2 --epochs 2 --json   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KDRAY = [sys.executable, "-m", "kdray.cli"]


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def kdray(*args: str, cwd: Path) -> dict:
    """One kdray command with --json; its JSON result (stderr shown on failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*KDRAY, *args, "--json"], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kdray {' '.join(args[:3])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_space(path: Path, args, teachers: Path, trials: int) -> Path:
    path.write_text(f"""name: cost
samples: {trials}
seed: 0
base: {{dataset: {args.dataset}, train_fraction: {args.train_fraction}, method: {args.method}, student: {args.student},
        epochs: {args.epochs}, batch_size: {args.batch_size}, device: cpu, teachers: {teachers}}}
params:
  temperature: {{type: float, low: 1, high: 10, log: true}}
  lr: {{type: float, low: 0.02, high: 0.2, log: true}}
scheduler: {{grace_period: {args.epochs}}}
""")
    return path


def store_build(store_dir: Path) -> dict:
    """Rows and build seconds of the stores under ``store_dir`` (one per sweep here)."""
    metas = [json.loads(p.read_text()) for p in store_dir.glob("*/meta.json")]
    return {"rows": sum(m["rows"] for m in metas), "build_s": sum(m["build_s"] for m in metas)}


def one_sweep(args, work: Path, teachers: Path, count: int, trials: int, store: bool) -> dict:
    tag = f"n{trials}-{'store' if store else 'live'}"
    space = write_space(work / f"{tag}.yaml", args, teachers, trials)
    store_dir = work / f"stores-{tag}"
    flags = ["--teacher-store", str(store_dir)] if store else ["--no-teacher-store"]
    t0 = time.perf_counter()
    res = kdray("--workdir", str(work / tag), "tune", "--space", str(space), "--no-track",
                "--concurrency", str(args.concurrency), *flags, cwd=work)
    wall = time.perf_counter() - t0
    trial_images = sum(r["metrics"].get("teacher_images", 0) for r in res["trials"])
    built = store_build(store_dir) if store else {"rows": 0, "build_s": 0.0}
    t = res["timing"]
    out = {"trials": trials, "store": store, "wall_s": round(wall, 1), "sweep_s": t["wall_s"],
           "teacher_passes": (trial_images + built["rows"]) * count, "store_build_s": built["build_s"],
           "epochs_s": t["train_s"], "train_share": t["train_share"], "overhead_s_per_trial": t["overhead_s_per_trial"],
           "startup_s_mean": t["startup_s_mean"]}
    log(f"{tag}: {json.dumps(out)}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", default="2,4,8", help="sweep sizes N, comma-separated (default 2,4,8)")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train-fraction", type=float, default=0.25)
    p.add_argument("--method", default="kd", help="a method with teachers (default kd)")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--teacher-arch", default="resnet20")
    p.add_argument("--teacher-count", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (default 6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(n) for n in args.trials.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="kdray-sweep-cost-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        teachers = work / "teachers"
        log(f"training {args.teacher_count} x {args.teacher_arch} once ({args.teacher_epochs} epochs)")
        kdray("teachers", "train", "--arch", args.teacher_arch, "--count", str(args.teacher_count),
              "--epochs", str(args.teacher_epochs), "--dataset", args.dataset, "--device", "cpu",
              "--out", str(teachers), cwd=work)
        rows = [one_sweep(args, work, teachers, args.teacher_count, n, store)
                for n in sizes for store in (False, True)]
    by = {(r["trials"], r["store"]): r for r in rows}
    for n in sizes:
        live, st = by[(n, False)], by[(n, True)]
        st["wall_ratio"] = round(live["sweep_s"] / st["sweep_s"], 2)
        st["teacher_work_ratio"] = round(live["teacher_passes"] / max(st["teacher_passes"], 1), 1)
    result = {"config": vars(args), "rows": rows, "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{'N':>3} {'store':>5} {'sweep s':>8} {'teacher passes':>15} {'build s':>8} {'in epochs':>9} "
          f"{'fixed s/trial':>13} {'speed-up':>8}")
    for r in rows:
        print(f"{r['trials']:>3} {'yes' if r['store'] else 'no':>5} {r['sweep_s']:>8.1f} {r['teacher_passes']:>15,} "
              f"{r['store_build_s']:>8.1f} {100 * (r['train_share'] or 0):>8.0f}% {r['overhead_s_per_trial']:>13.1f} "
              f"{(str(r['wall_ratio']) + 'x') if r['store'] else '':>8}")
    first, last = by[(sizes[0], True)], by[(sizes[-1], True)]
    print(f"teacher passes with the store, N={sizes[-1]} vs N={sizes[0]}: "
          f"{last['teacher_passes'] / max(first['teacher_passes'], 1):.2f}x (live: "
          f"{by[(sizes[-1], False)]['teacher_passes'] / max(by[(sizes[0], False)]['teacher_passes'], 1):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
