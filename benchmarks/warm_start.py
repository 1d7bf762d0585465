"""Warm start on digits: a T-trial sweep warm-started from a T-trial sweep against one cold sweep of
2T trials over the same space; the best val accuracy at each trial count, over repeats with
different sampler seeds.

    .venv/bin/python benchmarks/warm_start.py --workdir /tmp/kd/warm            # 3 repeats, T = 6

Per repeat r (sampler seed SEED + r), in one working directory (one teacher, trained once; one
Optuna storage and MLflow store):
- ``cold-r``: one sweep of 2T trials;
- ``first-r``: T trials with the same seed: its proposals, and so its scores, are cold-r's first T
  (checked: the benchmark exits 2 when they differ, since the comparison would then not be the
  one it names);
- ``second-r``: T trials, ``--warm-start first-r``: a new study given first-r's trials as history
  (checked: exit 2 unless its study holds every finished trial of first-r as history).
- ``solo-r``: T trials with second-r's seed and no warm start.
So the two arms differ only in trials T+1..2T: the same study going on, or a new one starting
from the first's trials. A second table sets second-r's own trials beside solo-r's: what the
history gave the second sweep. Trial counts are cumulative (first-r's T, then second-r's). "Best" is the
best val_acc of the trials that trained all their epochs (kdray's winner rule), as a sweep reports
it at that count; ASHA's pruned trials count as trials but not as a best.

Prints a Markdown table (mean ± sample std over repeats and the per-repeat values at each count)
and, with --json, the raw per-trial values. Sweeps already finished in --workdir are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from digits_table import kdray_exe, run_json  # noqa: E402

SPACE = """\
# kd from one resnet20 teacher into resnet8 on 25% of digits at 16 px (benchmarks/warm_start.py)
name: warm-bench
metric: val_acc
mode: max
base: {dataset: digits, image_size: 16, train_fraction: 0.25, method: kd, student: resnet8, epochs: 6,
       batch_size: 32, device: cpu, precise_bn: true}
teachers: {arch: [resnet20], count: 1, epochs: 10, train_fraction: 1.0}
params:
  temperature: {type: float, low: 1, high: 10, log: true}
  alpha: {type: float, low: 0.1, high: 0.9}
  lr: {type: float, low: 0.005, high: 0.5, log: true}
  weight_decay: {type: float, low: 0.00001, high: 0.003, log: true}
scheduler: {grace_period: 2, reduction_factor: 2}
"""


def log(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def sweep(args, name: str, samples: int, seed: int, *flags: str) -> list:
    """Run (or reuse) sweep ``name``; its own trials' (number, state, val_acc) in proposal order."""
    space = args.workdir / "space.yaml"
    space.write_text(SPACE)
    done = args.workdir / "results" / f"{name}.json"
    if not done.is_file():
        log(f"sweep {name}: {samples} trials, seed {seed} {' '.join(flags)}")
        run_json(kdray_exe() + ["--workdir", str(args.workdir), "tune", "--space", str(space), "--experiment", name,
                                "--samples", str(samples), "--seed", str(seed), "--json", *flags],
                 args.workdir / "logs" / f"bench-{name}.log")
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(study_trials(args.workdir, name)))
    return json.loads(done.read_text())


def study_trials(workdir: Path, name: str) -> list:
    import optuna

    from kdray.tune.warm_start import own_trials

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    return [(t.number, t.state.name, t.value) for t in sorted(own_trials(study), key=lambda t: t.number)]


def check_history(workdir: Path, name: str, first: list) -> None:
    """Exit 2 unless sweep ``name``'s study started from every finished trial of ``first``: a warm
    start that silently gave nothing would make this a cold-against-cold comparison."""
    import optuna

    from kdray.tune.warm_start import STUDY_ATTR, is_history

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}")
    given = sum(is_history(t) for t in study.get_trials(deepcopy=False))
    finished = sum(state in ("COMPLETE", "PRUNED") for _, state, _ in first)
    if given != finished or (study.user_attrs.get(STUDY_ATTR) or {}).get("history") != finished:
        print(f"{name}: its study holds {given} warm-start trial(s), not the {finished} its source finished",
              file=sys.stderr)
        raise SystemExit(2)


def best_by_count(trials: list) -> list:
    """The best completed val_acc after each trial (None until one completed)."""
    best, out = None, []
    for _, state, value in trials:
        if state == "COMPLETE" and (best is None or value > best):
            best = value
        out.append(best)
    return out


def repeat(args, r: int) -> dict:
    seed = args.seed + r
    cold = sweep(args, f"cold-{r}", 2 * args.trials, seed)
    first = sweep(args, f"first-{r}", args.trials, seed)
    if [t[1:] for t in first] != [t[1:] for t in cold[:args.trials]]:
        print(f"first-{r} did not repeat cold-{r}'s first {args.trials} trials: {first} vs {cold}", file=sys.stderr)
        raise SystemExit(2)
    second = sweep(args, f"second-{r}", args.trials, seed + 1000, "--warm-start", f"first-{r}")
    check_history(args.workdir, f"second-{r}", first)
    solo = sweep(args, f"solo-{r}", args.trials, seed + 1000)
    return {"seed": seed, "cold": best_by_count(cold), "warm": best_by_count(first + second),
            "second": best_by_count(second), "solo": best_by_count(solo),
            "trials": {"cold": cold, "first": first, "second": second, "solo": solo}}


def cell(values: list) -> str:
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return "-"
    sd = f" ± {100 * statistics.stdev(known):.1f}" if len(known) > 1 else ""
    return f"{100 * statistics.mean(known):.1f}{sd} ({', '.join(f'{100 * v:.1f}' for v in known)})"


def print_table(args, runs: list) -> None:
    print(f"Best val accuracy % by trial count, {len(runs)} repeats (sampler seeds "
          f"{', '.join(str(r['seed']) for r in runs)}); warm: trials 1-{args.trials} are first-r's, "
          f"{args.trials + 1}-{2 * args.trials} second-r's (warm-started from first-r):\n")
    print("| trials | cold sweep | first + warm-started second |")
    print("|---:|---|---|")
    for k in range(2 * args.trials):
        print(f"| {k + 1} | {cell([r['cold'][k] for r in runs])} | {cell([r['warm'][k] for r in runs])} |")
    print("\nThe second sweep's own trials: warm-started from first-r, or the same seed without a warm start "
          "(solo-r):\n")
    print("| its trials | warm-started second | solo |")
    print("|---:|---|---|")
    for k in range(args.trials):
        print(f"| {k + 1} | {cell([r['second'][k] for r in runs])} | {cell([r['solo'][k] for r in runs])} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, required=True, help="working directory (kept; finished sweeps reused)")
    p.add_argument("--repeats", type=int, default=3, help="repeats, each with its own sampler seed (default 3)")
    p.add_argument("--trials", type=int, default=6, help="T: trials of each half (default 6)")
    p.add_argument("--seed", type=int, default=11, help="the first repeat's sampler seed (default 11)")
    p.add_argument("--json", action="store_true", help="print the per-trial values as JSON too")
    args = p.parse_args(argv)
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    runs = [repeat(args, r) for r in range(args.repeats)]
    print_table(args, runs)
    if args.json:
        print(json.dumps(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
