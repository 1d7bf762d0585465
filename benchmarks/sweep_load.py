#!/usr/bin/env python
"""A sweep of hundreds of short trials: does anything grow with the trial count, is anything lost?

One space (kd on digits at 16 px, one resnet8 teacher trained once, resnet8 students, 1 epoch: a
few seconds a trial), with the teacher store and MLflow on (sqlite stores: Optuna's and MLflow's,
in the sweep's working folder), run twice through the real CLI at --concurrency 2:

1. straight through: N trials;
2. the driver killed (SIGKILL) when trial K starts, then ``kdray tune --resume``.

For each it prints the per-trial fixed overhead (a trial's time in its slot outside its epoch:
start-up, loading, the end) of the first and last 50 trials, the driver's RSS (the `kdray tune`
process) when trials 1, N/2 and N start, the lines of every log that mention a locked database or
a retry, and whether Optuna, MLflow and Tune's result grid agree: the same N trials complete in each
(by Tune's trial id), no trial counted twice, no MLflow run left RUNNING.

Targets (issue 24): overhead and driver memory flat in N (last 50 within 20 % of the first 50);
zero lost or doubled trials. Exit 1 when a target is missed, 2 when the run did not measure what it
names (the store was not used, a trial had no timing).

    python benchmarks/sweep_load.py                              # N = 200, killed at 120; ~25 min on 2 cores
    python benchmarks/sweep_load.py --trials 20 --kill-at 12     # a quick look (~3 min)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KDRAY = [sys.executable, "-m", "kdray.cli"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
TRIAL_START = re.compile(r"\] trial (\d+)/(\d+) \(\S+\) started")
LOCK = re.compile(r"database is locked|OperationalError|retry", re.IGNORECASE)


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def fail(msg: str, code: int = 2) -> None:
    print(f"sweep_load: {msg}", file=sys.stderr)
    sys.exit(code)


def write_space(path: Path, args, teachers: Path) -> Path:
    path.write_text(f"""name: load
samples: {args.trials}
seed: 0
base: {{dataset: digits, image_size: 16, method: kd, student: resnet8, epochs: 1, batch_size: 64, device: cpu,
        teachers: {teachers}}}
params:
  lr: {{type: float, low: 0.02, high: 0.2, log: true}}
  temperature: {{type: float, low: 1, high: 8, log: true}}
""")
    return path


def train_teacher(work: Path) -> Path:
    out = work / "teachers"
    subprocess.run([*KDRAY, "--workdir", str(work / "t"), "teachers", "train", "--arch", "resnet8", "--count", "1",
                    "--epochs", "1", "--dataset", "digits", "--image-size", "16", "--device", "cpu", "--out",
                    str(out), "--no-track"], env=ENV, check=True, capture_output=True, cwd=work)
    return out


class Driver:
    """``kdray tune`` in its own process: its stderr read line by line (trial starts), its RSS read
    when trials start; killed with SIGKILL when trial ``kill_at`` starts."""

    def __init__(self, argv: list, cwd: Path, marks: set, kill_at: int = 0):
        import psutil

        self.proc = subprocess.Popen(argv, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, start_new_session=True)
        self.ps = psutil.Process(self.proc.pid)
        self.marks, self.kill_at = marks, kill_at
        self.rss_mb: dict = {}
        self.lines: list = []
        self.started = 0
        self.killed = False
        self.out = ""
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self.out = self.proc.stdout.read()
        self.proc.wait()
        reader.join(timeout=30)

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            m = TRIAL_START.search(line)
            if not m:
                continue
            n = int(m.group(1))
            self.started = max(self.started, n)
            if n in self.marks:
                try:
                    self.rss_mb[n] = round(self.ps.memory_info().rss / 1024**2, 1)
                except Exception:
                    pass
            if self.kill_at and n >= self.kill_at and not self.killed:
                self.killed = True
                os.kill(self.proc.pid, signal.SIGKILL)  # the driver only: what a crash or an OOM kill does

    def result(self) -> dict:
        if self.proc.returncode != 0:
            fail(f"kdray tune exited {self.proc.returncode}:\n{''.join(self.lines[-40:])}", 1)
        return json.loads(self.out.strip().splitlines()[-1])


def tune(work: Path, space: Path, args, *, resume: bool = False, kill_at: int = 0) -> Driver:
    argv = [*KDRAY, "--workdir", str(work), "tune", "--space", str(space), "--concurrency", str(args.concurrency),
            "--json"] + (["--resume"] if resume else [])
    marks = {1, max(1, args.trials // 2), args.trials}
    work.mkdir(parents=True, exist_ok=True)
    return Driver(argv, work, marks, kill_at)


def overheads(rows: list) -> list:
    """Each trial's fixed seconds (time in its slot outside its epoch), in start order."""
    timed = [r["timing"] for r in rows if {"started_at_s", "ended_at_s", "train_s"} <= set(r.get("timing", {}))]
    if len(timed) != len(rows):
        fail(f"{len(rows) - len(timed)} of {len(rows)} trials have no timing: the overhead cannot be measured")
    timed.sort(key=lambda t: t["started_at_s"])
    return [t["ended_at_s"] - t["started_at_s"] - t["train_s"] for t in timed]


def lock_lines(work: Path, drivers: list) -> list:
    lines = [ln.strip() for d in drivers for ln in d.lines if LOCK.search(ln)]
    for f in (work / "logs").glob("**/*.log") if (work / "logs").is_dir() else []:
        lines += [f"{f.name}: {ln.strip()}" for ln in f.read_text(errors="replace").splitlines() if LOCK.search(ln)]
    return lines


def agreement(work: Path, rows: list, n: int) -> dict:
    """Optuna's, MLflow's and Tune's trials, by Tune trial id."""
    import mlflow
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="load", storage=f"sqlite:///{work / 'optuna.db'}")
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    client = mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("load")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'", max_results=50000)
    done_runs = [r for r in runs if r.data.tags.get("kdray.state") == "completed"]
    tune_ids = [r["trial"] for r in rows if not r.get("error")]
    ids = {"optuna": [t.user_attrs.get("ray_trial_id") for t in complete],
           "mlflow": [r.data.tags.get("kdray.trial_id") for r in done_runs]}
    return {
        "optuna_complete": len(complete), "optuna_states": _count(t.state.name for t in trials),
        "mlflow_completed": len(done_runs), "mlflow_states": _count(r.info.status for r in runs),
        "tune_ok_this_session": len(tune_ids),
        "doubled": {k: len(v) - len(set(v)) for k, v in ids.items()},
        "optuna_equals_mlflow": sorted(ids["optuna"]) == sorted(ids["mlflow"]),
        "tune_in_both": set(tune_ids) <= set(ids["optuna"]) and set(tune_ids) <= set(ids["mlflow"]),
        "running_left": sum(1 for r in runs if r.info.status == "RUNNING"),
        "all_n": len(complete) == n and len(done_runs) == n,
    }


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def measure(rows: list, driver: Driver, window: int) -> dict:
    over = overheads(rows)
    w = min(window, len(over) // 2) or 1
    first, last = sum(over[:w]) / w, sum(over[-w:]) / w
    if any(r["metrics"].get("teacher_images", 0) for r in rows):
        fail("a trial ran its teachers live: the sweep's store did not serve it")
    return {"trials": len(rows), "window": w, "overhead_first_s": round(first, 2), "overhead_last_s": round(last, 2),
            "overhead_ratio": round(last / first, 2) if first else None, "driver_rss_mb": driver.rss_mb}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--kill-at", type=int, default=120, help="trial whose start kills the driver (0: no kill run)")
    p.add_argument("--concurrency", type=int, default=2)
    p.add_argument("--window", type=int, default=50, help="first / last trials compared (default 50)")
    p.add_argument("--work", help="working folder (default: a temporary one, removed after)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kdray-sweep-load-") as tmp:
        work = Path(args.work or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        log("training one resnet8 teacher (1 epoch)")
        space = write_space(work / "load.yaml", args, train_teacher(work))
        t0 = time.perf_counter()
        log(f"sweep 1: {args.trials} trials straight through")
        d1 = tune(work / "straight", space, args)
        rows = d1.result()["trials"]
        straight = {**measure(rows, d1, args.window), "wall_s": round(time.perf_counter() - t0, 1),
                    "agree": agreement(work / "straight", rows, args.trials),
                    "lock_lines": lock_lines(work / "straight", [d1])}
        log(f"sweep 1: {json.dumps(straight)}")
        killed = None
        if args.kill_at:
            log(f"sweep 2: killed at trial {args.kill_at}, then --resume")
            d2 = tune(work / "killed", space, args, kill_at=args.kill_at)
            if not d2.killed:
                fail(f"the driver was never killed (it started {d2.started} trials)")
            d3 = tune(work / "killed", space, args, resume=True)
            rows3 = d3.result()["trials"]
            killed = {"killed_at": d2.started, "resumed_trials": len(rows3),
                      "agree": agreement(work / "killed", rows3, args.trials),
                      "lock_lines": lock_lines(work / "killed", [d2, d3])}
            log(f"sweep 2: {json.dumps(killed)}")
    result = {"config": vars(args), "straight": straight, "killed": killed, "cpu_count": os.cpu_count()}
    ok = _verdict(result)
    if args.json:
        print(json.dumps(result))
    else:
        _print(result, ok)
    return 0 if all(ok.values()) else 1


def _verdict(r: dict) -> dict:
    s, k = r["straight"], r["killed"]
    rss = [v for _, v in sorted(s["driver_rss_mb"].items())]
    ok = {"overhead flat (last <= 1.2 x first)": s["overhead_ratio"] is not None and s["overhead_ratio"] <= 1.2,
          "driver RSS flat (last <= 1.2 x first)": len(rss) >= 2 and rss[-1] <= 1.2 * rss[0],
          "straight: all N in Optuna and MLflow, none doubled, none RUNNING":
              s["agree"]["all_n"] and not any(s["agree"]["doubled"].values()) and s["agree"]["optuna_equals_mlflow"]
              and s["agree"]["tune_in_both"] and s["agree"]["running_left"] == 0}
    if k is not None:
        a = k["agree"]
        ok["killed + resumed: all N, none doubled, none RUNNING"] = (
            a["all_n"] and not any(a["doubled"].values()) and a["optuna_equals_mlflow"] and a["tune_in_both"]
            and a["running_left"] == 0)
    return ok


def _print(r: dict, ok: dict) -> None:
    s, k = r["straight"], r["killed"]
    print(f"{s['trials']} trials at concurrency {r['config']['concurrency']} in {s['wall_s']:.0f} s "
          f"({r['cpu_count']} CPUs)")
    print(f"fixed overhead per trial: first {s['window']} {s['overhead_first_s']:.2f} s, last {s['window']} "
          f"{s['overhead_last_s']:.2f} s (x{s['overhead_ratio']})")
    rss = sorted(s["driver_rss_mb"].items())
    print("driver RSS at trial start: " + ", ".join(f"#{n} {mb:.0f} MB" for n, mb in rss))
    print(f"straight: Optuna {s['agree']['optuna_states']}, MLflow {s['agree']['mlflow_states']}, "
          f"doubled {s['agree']['doubled']}, lock/retry lines {len(s['lock_lines'])}")
    if k is not None:
        print(f"killed at trial {k['killed_at']}, resumed ({k['resumed_trials']} trials in the resumed session): "
              f"Optuna {k['agree']['optuna_states']}, MLflow {k['agree']['mlflow_states']}, doubled "
              f"{k['agree']['doubled']}, RUNNING left {k['agree']['running_left']}, lock/retry lines "
              f"{len(k['lock_lines'])}")
    for name, good in ok.items():
        print(f"{'PASS' if good else 'FAIL'}: {name}")


if __name__ == "__main__":
    sys.exit(main())
