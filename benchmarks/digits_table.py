#!/usr/bin/env python
"""Digits limited-data table: ce, kd, avg_kd, ekd (B branches) and feed, mean +- std over seeds.

Everything goes through the real ``kdray`` CLI in subprocesses:

1. ``kdray teachers train --dataset digits --train-fraction TF --arch TEACHER --count 3`` into
   WORKDIR/teachers (skipped when WORKDIR/teachers/manifest.json exists). TF is
   ``--teacher-train-fraction`` (default: the students' ``--train-fraction``); the README's table
   uses teachers trained on all the data (TF 1.0) and students on 25% (F 0.25).
2. ``kdray train --method M --student S --teachers DIR --train-fraction F --seed s --json`` for
   every method and seed; the JSON summary's ``test_acc`` (and ``test_acc_best_branch`` for ekd)
   is read back. A run whose ``result.json`` already exists is reused.
3. A markdown table of mean +- std (sample std, ddof=1) test accuracy with the per-seed values.

The README's table (about 80 minutes on 2 shared CPU cores, teachers 19 of them)::

    python benchmarks/digits_table.py --workdir /tmp/kdray-digits-table --teacher-train-fraction 1.0 \
        --teacher-epochs 40 --epochs 60 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("ce", "kd", "avg_kd", "ekd", "feed")
ENV = dict(os.environ)


def kdray_exe() -> list[str]:
    exe = shutil.which("kdray") or str(Path(sys.executable).with_name("kdray"))
    if Path(exe).exists():
        return [exe]
    return [sys.executable, "-m", "kdray.cli"]


def run_json(cmd: list[str], log_path: Path) -> dict:
    """Run a kdray command, keep its stderr in ``log_path``, return the JSON on stdout's last line."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
    if proc.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"command failed (rc {proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise SystemExit(f"no JSON on stdout from: {' '.join(cmd)}\nstdout: {proc.stdout[-500:]}")
    return json.loads(lines[-1])


def train_teachers(args, tdir: Path) -> dict:
    manifest = tdir / "manifest.json"
    if manifest.is_file():
        print(f"# teachers: reusing {tdir}", file=sys.stderr)
        found = json.loads(manifest.read_text())
        if found.get("train_fraction") != args.teacher_train_fraction:
            raise SystemExit(f"{manifest}: teachers were trained with train_fraction {found.get('train_fraction')}, "
                             f"not {args.teacher_train_fraction}; use another --workdir")
        return found
    cmd = kdray_exe() + [
        "teachers", "train", "--dataset", "digits", "--train-fraction", str(args.teacher_train_fraction),
        "--arch", args.teacher_arch, "--count", str(args.teachers), "--epochs", str(args.teacher_epochs),
        "--out", str(tdir), "--json", "--device", args.device,
    ] + args.teacher_extra
    print("# " + " ".join(cmd), file=sys.stderr)
    t0 = time.time()
    out = run_json(cmd, Path(args.workdir) / "logs" / "teachers.log")
    print(f"# teachers trained in {time.time() - t0:.0f}s", file=sys.stderr)
    return out


def train_student(args, tdir: Path, method: str, seed: int) -> dict:
    tag = f"{args.student}-e{args.epochs}-f{args.train_fraction}" + (f"-b{args.branches}" if method == "ekd" else "")
    if args.extra:
        tag += "-" + hashlib.sha1(" ".join(args.extra).encode()).hexdigest()[:8]
    out = Path(args.workdir) / "runs" / f"{method}-{tag}-s{seed}"
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: start it again
    cmd = kdray_exe() + [
        "train", "--method", method, "--student", args.student, "--teachers", str(tdir),
        "--dataset", "digits", "--train-fraction", str(args.train_fraction),
        "--epochs", str(args.epochs), "--seed", str(seed), "--device", args.device,
        "--json", "--no-track", "--out", str(out),
    ]
    if method == "ekd":
        cmd += ["--branches", str(args.branches)]
    cmd += args.extra
    t0 = time.time()
    res = run_json(cmd, Path(args.workdir) / "logs" / f"{method}-{tag}-s{seed}.log")
    res["wall_s"] = round(time.time() - t0, 1)
    res["command"] = cmd
    cached.write_text(json.dumps(res, indent=1, sort_keys=True))
    return res


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/kdray-digits-table", help="teachers, runs, logs, results")
    p.add_argument("--epochs", type=int, default=30, help="student epochs (same for every method)")
    p.add_argument("--teacher-epochs", type=int, default=40, help="teacher epochs")
    p.add_argument("--teacher-arch", default="resnet20")
    p.add_argument("--teachers", type=int, default=3, help="teacher count K")
    p.add_argument("--student", default="resnet8", help="one student architecture for every method")
    p.add_argument("--branches", type=int, default=3, help="EKD branches B")
    p.add_argument("--train-fraction", type=float, default=0.25, help="for teachers and students alike")
    p.add_argument("--teacher-train-fraction", type=float,
                   help="train fraction of the teachers (default: --train-fraction, the EKD paper's limited-data "
                   "setting; 1.0 gives teachers trained on the whole training split)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="auto")
    p.add_argument("--extra", action="append", default=[],
                   help="extra argument for every `kdray train` call (repeatable, --extra=--lr --extra=0.1); "
                        "it applies to ALL methods alike")
    p.add_argument("--teacher-extra", action="append", default=[],
                   help="extra argument for `kdray teachers train` (repeatable, --teacher-extra=--lr ...)")
    p.add_argument("--threads", type=int, default=1,
                   help="OMP/torch threads per run (default 1: robust on shared cores, where oversubscribed "
                        "OpenMP threads slow every epoch down many times; 0 leaves the environment alone)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of markdown")
    args = p.parse_args(argv)
    if args.teacher_train_fraction is None:
        args.teacher_train_fraction = args.train_fraction

    if args.threads > 0:
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tdir = work / "teachers"
    t_start = time.time()
    manifest = train_teachers(args, tdir)

    results: dict[str, list[dict]] = {}
    for method in methods:
        for seed in seeds:
            r = train_student(args, tdir, method, seed)
            results.setdefault(method, []).append(r)
            extra = f" best_branch={r['test_acc_best_branch']:.4f}" if "test_acc_best_branch" in r else ""
            print(f"# {method} seed {seed}: test_acc={r['test_acc']:.4f}{extra} ({r.get('wall_s', '?')}s)",
                  file=sys.stderr)
    wall = time.time() - t_start

    rows = []
    for method in methods:
        accs = [r["test_acc"] for r in results[method]]
        m, s = mean_std(accs)
        row = {"method": method, "mean": m, "std": s, "per_seed": dict(zip(seeds, accs))}
        if method == "ekd":
            best = [r["test_acc_best_branch"] for r in results[method]]
            bm, bs = mean_std(best)
            row.update({"best_branch_mean": bm, "best_branch_std": bs, "best_branch_per_seed": dict(zip(seeds, best))})
        rows.append(row)

    teachers = [{"arch": t["arch"], "seed": t["seed"], "test_acc": t["test_acc"], "val_acc": t["val_acc"]}
                for t in manifest["teachers"]]
    verdict = None
    by = {r["method"]: r for r in rows}
    if "ce" in by and "ekd" in by:
        gap = by["ekd"]["mean"] - by["ce"]["mean"]
        spread = max(by["ekd"]["std"], by["ce"]["std"])
        verdict = {"ekd_minus_ce": gap, "seed_spread": spread, "ekd_beats_ce": gap > spread}

    summary = {
        "dataset": "digits", "train_fraction": args.train_fraction,
        "teacher_train_fraction": manifest.get("train_fraction"), "teacher_arch": args.teacher_arch,
        "teacher_epochs": args.teacher_epochs, "student": args.student, "epochs": args.epochs,
        "branches": args.branches, "seeds": seeds, "extra": args.extra, "teachers": teachers,
        "rows": rows, "ekd_vs_ce": verdict, "wall_s": round(wall, 1),
    }
    (work / "table.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0

    tf = manifest.get("train_fraction")
    if tf == args.train_fraction:
        print(f"Digits, train_fraction {args.train_fraction} for teachers AND students "
              f"(teachers trained on the same limited data).")
    else:
        print(f"Digits: students on train_fraction {args.train_fraction}, teachers on train_fraction {tf} "
              f"(teachers trained on all the data, the student on a limited subset).")
    print(f"Teachers: {len(teachers)} x {args.teacher_arch}, {args.teacher_epochs} epochs; test acc "
          + ", ".join(pct(t["test_acc"]) for t in teachers) + " %")
    print(f"Students: {args.student}, {args.epochs} epochs, seeds {seeds}, other settings kdray defaults"
          + (f" plus {' '.join(args.extra)}" if args.extra else "") + "; std is the sample std over seeds.\n")
    print("| method | test acc % (mean ± std) | per seed | ekd best single branch % |")
    print("|---|---|---|---|")
    for r in rows:
        name = f"ekd (B={args.branches}, ensemble)" if r["method"] == "ekd" else r["method"]
        per = ", ".join(pct(v) for v in r["per_seed"].values())
        branch = ""
        if "best_branch_mean" in r:
            branch = (f"{pct(r['best_branch_mean'])} ± {pct(r['best_branch_std'])} "
                      f"({', '.join(pct(v) for v in r['best_branch_per_seed'].values())})")
        print(f"| {name} | {pct(r['mean'])} ± {pct(r['std'])} | {per} | {branch} |")
    if verdict:
        print(
            f"\nekd - ce = {pct(verdict['ekd_minus_ce'])} pts; "
            f"seed spread (max std) = {pct(verdict['seed_spread'])} pts; "
            f"ekd beats ce by more than the spread: {'yes' if verdict['ekd_beats_ce'] else 'NO'}"
        )
    print(f"wall time {wall:.0f}s (including cached runs' reuse); results in {work / 'table.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
