#!/usr/bin/env python
"""CIFAR-10 (JPEG copy) limited-data table: ce, kd (each teacher), avg_kd, ekd (B = K and B
searched), feed; one student architecture, 3 seeds, 10 % and 25 % of the training split.

Everything goes through the real ``kdray`` CLI in subprocesses, and everything is resumable: run
the same command again and it continues where it stopped (teachers epoch by epoch, every student
run that finished is read back from its ``result.json``).

1. The CIFAR-10 JPEG tarball (``shared/datasets``) is extracted once to ``~/.cache/kdray`` and read
   by kdray's ``imagefolder`` loader (decoded once into a uint8 cache).
2. ``kdray teachers train`` on the whole training split (train fraction 1.0, 10 % held out for
   validation): a heterogeneous set, ``--teacher-arch`` cycled over ``--teachers``, into
   WORKDIR/teachers. Each teacher also gets a one-teacher set (WORKDIR/teacher-<k>, the weights
   hard-linked, the manifest's entry copied) so ``kd`` can be run from every teacher.
3. ``kdray train --teacher-store auto`` for every fraction, seed and method: the teachers' outputs
   are computed once per view into the teacher set's store and shared by every method and seed.
   EKD's branch count is searched on seed 0 by validation accuracy (``--ekd-branches``), and the
   best B is run with every seed; the test set is never used to choose.
4. A tuned sweep (``--tune-samples``, on ``--tune-fraction``): ``kdray tune`` searches EKD's
   temperature, KD weight, branch count, ensemble KD weight and learning rate (Optuna TPE, ASHA)
   by validation accuracy at the same epochs as the table; the best configuration is re-trained
   with every seed and set beside EKD with the paper's defaults (B = K). The feature weight is not
   searched here: the teachers' feature maps of every view do not fit the store's budget on this
   machine, so those trials would run the teachers live, about 3x slower.
5. Teacher diagnostics on the test split (each teacher's accuracy, their averaged probabilities,
   how often two disagree, how often at least one is right): what the students can learn from.
6. A markdown table of mean +- sample std (ddof 1) test accuracy with the per-seed values,
   ``table.json`` beside it.

The README's table::

    python benchmarks/cifar_table.py --workdir /tmp/kdray-cifar-table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_table import ENV, kdray_exe, pct, run_json
from step_throughput import cifar10_jpeg_dir

# the statistics and the Markdown of `kdray compare`: mean and sample std, the gap to a baseline
# with its standard error, pipe tables
from kdray.tracking.comparison import gap_between, markdown_table, mean_std

BASELINES = ("ce", "kd", "avg_kd")


def log(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# teachers


def data_args(args) -> list[str]:
    return ["--dataset", "imagefolder", "--data-dir", str(args.data_dir)]


def train_teachers(args, tdir: Path) -> dict:
    """The teacher set (trained, or continued after an interruption, by ``kdray teachers train``)."""
    if (tdir / "manifest.json").is_file():
        log(f"teachers: reusing {tdir}")
        manifest = json.loads((tdir / "manifest.json").read_text())
        archs = args.teacher_arch.split(",")
        wanted = [(archs[k % len(archs)], args.teacher_epochs) for k in range(args.teachers)]
        found = [(t["arch"], t["epochs"]) for t in manifest["teachers"]]
        if found != wanted:
            raise SystemExit(f"{tdir} holds teachers (arch, epochs) {found}, not {wanted}; use another --workdir")
        return manifest
    cmd = kdray_exe() + ["teachers", "train"] + data_args(args) + [
        "--train-fraction", "1.0", "--count", str(args.teachers), "--epochs", str(args.teacher_epochs),
        "--batch-size", str(args.teacher_batch_size), "--lr", str(args.teacher_lr),
        "--out", str(tdir), "--json", "--device", args.device,
    ]
    for arch in args.teacher_arch.split(","):
        cmd += ["--arch", arch]
    log("teachers: " + " ".join(cmd) + f" (log: {args.workdir}/logs/teachers.log)")
    t0 = time.time()
    manifest = run_json(cmd, Path(args.workdir) / "logs" / "teachers.log")
    log(f"teachers trained in {time.time() - t0:.0f}s")
    return manifest


def single_teacher_set(tdir: Path, manifest: dict, k: int) -> Path:
    """A one-teacher set holding teacher k of ``tdir`` (weights hard-linked, entry copied)."""
    out = tdir.parent / f"teacher-{k}"
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    entry = manifest["teachers"][k]
    dst = out / entry["file"]
    if not dst.exists():
        try:
            os.link(tdir / entry["file"], dst)
        except OSError:
            shutil.copy2(tdir / entry["file"], dst)
    sub = dict(manifest, teachers=[entry])
    (out / "manifest.json.tmp").write_text(json.dumps(sub, indent=2))
    os.replace(out / "manifest.json.tmp", out / "manifest.json")
    return out


def teacher_diagnostics(args, tdir: Path) -> dict:
    """What the teachers offer a student, on the test split: each one's accuracy, the accuracy of
    their averaged probabilities (what avg_kd and EKD's B = 1 distil), how often two of them
    disagree (the ensemble's diversity) and how often at least one is right. Cached beside them."""
    cached = tdir / "diagnostics.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    from kdray.training.config import RunConfig
    from kdray.training.prepare import prepare

    cfg = RunConfig().replace(dataset="imagefolder", data_dir=str(args.data_dir), train_fraction=1.0,
                              method="avg_kd", teachers=str(tdir), device="cpu")
    prep = prepare(cfg)
    logits, labels = [], []
    for x, y in prep.loaders.test:
        logits.append(prep.ensemble()(x)["logits"].float())
        labels.append(y)
    logits, y = torch.cat(logits, 1), torch.cat(labels)  # [K, N, C], [N]
    pred = logits.argmax(2)
    K = pred.shape[0]
    pairs = [(a, b) for a in range(K) for b in range(a + 1, K)]
    diag = {
        "test_acc": [float((p == y).double().mean()) for p in pred],
        "ensemble_test_acc": float((logits.softmax(2).mean(0).argmax(1) == y).double().mean()),
        "oracle_test_acc": float((pred == y).any(0).double().mean()),
        "pairwise_disagreement": {f"{a}-{b}": float((pred[a] != pred[b]).double().mean()) for a, b in pairs},
    }
    cached.write_text(json.dumps(diag, indent=1))
    log("teachers on the test split: " + ", ".join(pct(a) for a in diag["test_acc"])
        + f"; their averaged probabilities {pct(diag['ensemble_test_acc'])}; pairwise disagreement "
        + ", ".join(f"{k} {pct(v)}" for k, v in diag["pairwise_disagreement"].items()))
    return diag


# ---------------------------------------------------------------------------------------------
# students


def kdray_args(cmd: list[str]) -> list[str]:
    """A ``kdray train`` command without its executable (whose path differs between checkouts)."""
    return cmd[cmd.index("train"):]


def check_same_run(cached: Path, was: list[str], now: list[str]) -> None:
    """A finished run is read back only if it ran with the arguments asked for now."""
    if was != now:
        diff = [f"{a} -> {b}" for a, b in zip(was, now) if a != b] or [f"{len(was)} -> {len(now)} arguments"]
        raise SystemExit(f"{cached} was made with other settings ({'; '.join(diff[:3])}); "
                         "rerun with the settings it was made with, or use another --workdir")


def fraction_epochs(args, fraction: float) -> int:
    """Student epochs at ``fraction``. With ``--steps-of F`` (the default, 0.1), the epochs that give
    the optimizer steps of ``--epochs`` at F: every fraction gets the same training compute, so a
    larger fraction differs only in how many distinct images it sees. With ``--steps-of 0``,
    ``--epochs`` at every fraction."""
    if not args.steps_of:
        return args.epochs
    return max(1, round(args.epochs * args.steps_of / fraction))


def train_student(args, teachers: Path, row: str, method: str, fraction: float, seed: int,
                  extra: list[str]) -> dict:
    """One ``kdray train`` run, read back from ``result.json`` when it finished before."""
    name = f"f{fraction}-{row}-s{seed}"
    out = Path(args.workdir) / "runs" / name
    cached = out / "result.json"
    cmd = kdray_exe() + ["train", "--method", method, "--student", args.student, "--teachers", str(teachers)] \
        + data_args(args) + [
            "--train-fraction", str(fraction), "--epochs", str(fraction_epochs(args, fraction)), "--seed", str(seed),
            "--device", args.device, "--teacher-store", "auto", "--json", "--no-track", "--out", str(out),
        ] + extra + args.extra
    if cached.is_file():
        res = json.loads(cached.read_text())
        check_same_run(cached, kdray_args(res["command"]), kdray_args(cmd))
        return res
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: start it again
    log(f"{name}: kdray train --method {method} {' '.join(extra)}")
    t0 = time.time()
    res = run_json(cmd, Path(args.workdir) / "logs" / f"{name}.log")
    res["wall_s"] = round(time.time() - t0, 1)
    res["command"] = cmd
    cached.write_text(json.dumps(res, indent=1, sort_keys=True))
    extra_acc = f" best branch {res['test_acc_best_branch']:.4f}" if "test_acc_best_branch" in res else ""
    log(f"{name}: test_acc {res['test_acc']:.4f}{extra_acc} val_acc {res['val_acc']:.4f} ({res['wall_s']:.0f}s)")
    return res


def ekd_flags(branches: int) -> list[str]:
    """EKD's flags with the branch-loss form spelled out: runs of the spec's averaged form
    (before 2026-11-30) lack it, so the resume guard refuses to read them back as today's EKD."""
    return ["--branches", str(branches), "--set=mean_branch_losses=false"]


def rows_for(args, tdir: Path, manifest: dict) -> list[tuple[str, str, Path, list[str]]]:
    """(row name, method, teacher set, extra flags) of every fixed row of the table."""
    K = len(manifest["teachers"])
    rows = [("ce", "ce", tdir, [])]
    for k, t in enumerate(manifest["teachers"]):
        rows.append((f"kd-t{k}-{t['arch']}", "kd", single_teacher_set(tdir, manifest, k), []))
    rows += [("avg_kd", "avg_kd", tdir, []), (f"ekd-B{K}", "ekd", tdir, ekd_flags(K)),
             ("feed", "feed", tdir, [])]
    return rows


def search_branches(args, tdir: Path, fraction: float, K: int, results: dict) -> int:
    """EKD's B chosen on seed 0 by validation accuracy among --ekd-branches (and B = K)."""
    seed0 = args.seeds[0]
    val = {K: results[f"ekd-B{K}"][seed0]["val_acc"]}
    for B in args.ekd_branches:
        if B != K:
            r = train_student(args, tdir, f"ekd-B{B}", "ekd", fraction, seed0, ekd_flags(B))
            results.setdefault(f"ekd-B{B}", {})[seed0] = r
            val[B] = r["val_acc"]
    best = max(sorted(val), key=lambda b: val[b])
    log(f"f{fraction}: ekd branch search on seed {seed0}, val acc " +
        ", ".join(f"B={b}: {v:.4f}" for b, v in sorted(val.items())) + f" -> B={best}")
    return best


def run_fraction(args, tdir: Path, manifest: dict, fraction: float) -> dict:
    K = len(manifest["teachers"])
    results: dict[str, dict[int, dict]] = {}
    rows = rows_for(args, tdir, manifest)
    for i, seed in enumerate(args.seeds):
        for row, method, teachers, extra in rows:
            results.setdefault(row, {})[seed] = train_student(args, teachers, row, method, fraction, seed, extra)
        if i == 0:
            best_b = search_branches(args, tdir, fraction, K, results)
        if best_b != K:
            r = train_student(args, tdir, f"ekd-B{best_b}", "ekd", fraction, seed, ekd_flags(best_b))
            results.setdefault(f"ekd-B{best_b}", {})[seed] = r
    return {"results": results, "ekd_best_branches": best_b}


# ---------------------------------------------------------------------------------------------
# tuned sweep
# ---------------------------------------------------------------------------------------------
TUNED_PARAMS = {
    "temperature": {"type": "float", "low": 1, "high": 10, "log": True},
    "alpha": {"type": "float", "low": 0.3, "high": 1.0},
    "ens_kd_weight": {"type": "float", "low": 0.0, "high": 1.0},
    "lr": {"type": "float", "low": 0.02, "high": 0.2, "log": True},
}


def tune_space(args, tdir: Path, fraction: float, K: int) -> Path:
    """The sweep's space file (YAML, rewritten on every invocation with the same content, so a
    resumed sweep finds the space it started with)."""
    import yaml

    space = {
        "name": f"cifar-ekd-f{fraction}",
        "metric": "val_acc",
        "mode": "max",
        "samples": args.tune_samples,
        "base": {
            "dataset": "imagefolder",
            "data_dir": str(args.data_dir),
            "train_fraction": fraction,
            "method": "ekd",
            "student": args.student,
            "epochs": fraction_epochs(args, fraction),
            "teachers": str(tdir),
            "seed": args.seeds[0],
            "device": args.device,
            "mean_branch_losses": False,
        },
        "params": {**TUNED_PARAMS, "branches": {"type": "int", "low": 1, "high": max(K, 4)}},
        "scheduler": {"grace_period": max(1, fraction_epochs(args, fraction) // 4), "reduction_factor": 2},
        "seed": 0,
    }
    path = Path(args.workdir) / "tune" / f"cifar-ekd-f{fraction}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def tuned_sweep(args, tdir: Path, manifest: dict, fraction: float) -> dict:
    """Search EKD on val acc, then re-train the best configuration with every seed."""
    K = len(manifest["teachers"])
    space = tune_space(args, tdir, fraction, K)
    cmd = kdray_exe() + ["--workdir", str(Path(args.workdir) / "tune"), "tune", "--space", str(space),
                         "--experiment", space.stem, "--resume", "--concurrency", str(args.tune_concurrency),
                         "--json"]
    log(f"tuned sweep f{fraction}: {' '.join(cmd)}")
    t0 = time.time()
    summary = run_json(cmd, Path(args.workdir) / "logs" / f"tune-f{fraction}.log")
    best = {k: v for k, v in summary["best"]["config"].items() if k in TUNED_PARAMS or k == "branches"}
    log(f"tuned sweep f{fraction}: best {best} val_acc {summary['best']['metrics']['val_acc']:.4f} "
        f"({time.time() - t0:.0f}s)")
    extra = [f"--set={k}={v}" for k, v in sorted(best.items())]
    # the row is named after its configuration: a longer sweep that finds another one re-trains it
    row = "ekd-tuned-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8]
    runs = {seed: train_student(args, tdir, row, "ekd", fraction, seed, extra) for seed in args.seeds}
    return {"row": row, "best_config": best, "sweep_best_val_acc": summary["best"]["metrics"]["val_acc"],
            "study_counts": summary.get("study_counts"), "runs": runs}


# ---------------------------------------------------------------------------------------------
# the table


def branch_chosen_by_val(r: dict) -> tuple[int, float] | None:
    """EKD's single branch with the best validation accuracy, and its test accuracy."""
    val = {int(k[len("val_acc_b"):]): v for k, v in r.items() if k.startswith("val_acc_b") and k[9:].isdigit()}
    if not val:
        return None
    b = max(sorted(val), key=lambda k: val[k])
    return b, r[f"test_acc_b{b}"]


def summarise(name: str, per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    m, s = mean_std([per_seed[k]["test_acc"] for k in seeds])
    row = {"row": name, "mean": m, "std": s, "per_seed": {str(k): per_seed[k]["test_acc"] for k in seeds},
           "val_mean": mean_std([per_seed[k]["val_acc"] for k in seeds])[0],
           "wall_s": sum(r.get("wall_s", 0) for r in per_seed.values())}
    branches = [branch_chosen_by_val(per_seed[k]) for k in seeds]
    if all(branches):
        bm, bs = mean_std([acc for _, acc in branches])
        row.update(best_branch_mean=bm, best_branch_std=bs, best_branch=[b for b, _ in branches])
    return row


def table_rows(fr: dict, seeds: list[int]) -> list[dict]:
    """Every row finished with every seed, and the kd teacher whose students did best on val."""
    full = {name: per for name, per in fr["results"].items() if all(s in per for s in seeds)}
    rows = [summarise(name, per) for name, per in full.items()]
    kd_rows = [r for r in rows if r["row"].startswith("kd-")]
    if kd_rows:
        best = max(kd_rows, key=lambda r: r["val_mean"])
        rows.append(dict(best, row=f"kd, best teacher by val ({best['row'][3:]})", duplicate=True))
    return rows


def compare(a: dict, b: dict) -> dict:
    """Row a against row b: the gap of the means, the larger seed spread, the standard error of the
    gap (``kdray compare``'s; None, as the spread, with one seed)."""
    g = gap_between(list(a["per_seed"].values()), list(b["per_seed"].values()), against=b["row"])
    return {"row": a["row"], "against": b["row"], "gap": g.gap, "seed_spread": g.spread, "gap_se": g.se,
            "beats_by_more_than_spread": g.beyond_spread}


def verdict(rows: list[dict], K: int) -> dict:
    """Each ensemble method (EKD in every setting, FEED) against the strongest baseline. The
    baseline is the one with the best test mean: the conservative choice for a claim that a method
    beats it. EKD tuned is also set against EKD with the paper's defaults (B = K)."""
    base = [r for r in rows if r["row"] == "ce" or r["row"].startswith(("kd-", "avg_kd"))]
    ours = [r for r in rows if r["row"].startswith(("ekd", "feed"))]
    if not base or not ours:
        return {}
    strongest = max(base, key=lambda r: r["mean"])
    out = {"strongest_baseline": strongest["row"], "methods": [compare(o, strongest) for o in ours]}
    default = next((r for r in rows if r["row"] == f"ekd-B{K}"), None)
    tuned = next((r for r in rows if r["row"].startswith("ekd-tuned")), None)
    if tuned and default:
        out["tuned_vs_default"] = compare(tuned, default)
    return out


#: the columns of row_cells
ROW_COLUMNS = ("test acc %", "per seed", "val acc %", "EKD single branch chosen by val, test acc %")


def row_cells(r: dict) -> list[str]:
    """A summarised row's test acc (± its spread from 2 seeds on), per-seed values, val acc and
    EKD's single branch chosen by val."""
    spread = lambda m, s: pct(m) + (f" ± {pct(s)}" if len(r["per_seed"]) > 1 else "")  # noqa: E731
    branch = (f"{spread(r['best_branch_mean'], r['best_branch_std'])} (branches {r['best_branch']})"
              if "best_branch_mean" in r else "")
    return [spread(r["mean"], r["std"]), ", ".join(pct(v) for v in r["per_seed"].values()), pct(r["val_mean"]), branch]


def pct_or_dash(x) -> str:
    return "-" if x is None else pct(x)


def comparison_cells(c: dict) -> list[str]:
    beats = c["beats_by_more_than_spread"]
    return [c["row"], c["against"], pct(c["gap"]), pct_or_dash(c["seed_spread"]), pct_or_dash(c["gap_se"]),
            "-" if beats is None else ("yes" if beats else "no")]


def print_table(args, manifest: dict, summary: dict) -> None:
    print("CIFAR-10 (JPEG copy). Teachers on the whole training split (its validation part held out): "
          + ", ".join(f"{t['arch']} {pct(t['test_acc'])} %" for t in manifest["teachers"])
          + f" test accuracy after {args.teacher_epochs} epochs.")
    d = summary["teacher_diagnostics"]
    pairs = d["pairwise_disagreement"]
    print(f"Their averaged probabilities: {pct(d['ensemble_test_acc'])} %; at least one right: "
          f"{pct(d['oracle_test_acc'])} %"
          + ("; pairwise disagreement " + ", ".join(f"{k} {pct(v)} %" for k, v in pairs.items()) if pairs else "")
          + ".")
    print(f"Students: {args.student}, kdray defaults otherwise"
          + (f" plus {' '.join(args.extra)}" if args.extra else "")
          + f"; seeds {args.seeds}; test accuracy %, mean ± sample std.\n")
    for fr in summary["fractions"]:
        print(f"**{int(fr['fraction'] * 100)} % of the training split**, {fr['epochs']} epochs "
              f"(EKD's B searched on seed {args.seeds[0]} by val acc: B = {fr.get('ekd_best_branches')})\n")
        print(markdown_table(["row", *ROW_COLUMNS], [[r["row"], *row_cells(r)] for r in fr["rows"]]))
        if fr.get("tuned"):
            t = fr["tuned"]
            print(
                f"\n{t['row']}: the best of a {args.tune_samples}-trial sweep (val acc {t['sweep_best_val_acc']:.4f}): "
                + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["best_config"].items())
                + "; re-trained with every seed."
            )
        v = fr.get("verdict") or {}
        if v:
            pairs = v["methods"] + ([v["tuned_vs_default"]] if "tuned_vs_default" in v else [])
            print("\n" + markdown_table(["method", "against", "gap pts", "seed spread pts", "s.e. of gap pts",
                                         "beats it by more than the spread"], map(comparison_cells, pairs)) + "\n")
    print(f"wall time of this invocation {summary['wall_s']:.0f}s; results in {Path(args.workdir) / 'table.json'}")


def finished_runs(workdir: Path, fraction: float) -> dict[str, dict[int, dict]]:
    """Every student run of ``fraction`` that finished so far: row -> seed -> result."""
    found: dict[str, dict[int, dict]] = {}
    prefix = f"f{fraction}-"
    for res in sorted((workdir / "runs").glob(f"{prefix}*-s*/result.json")):
        row, _, seed = res.parent.name[len(prefix):].rpartition("-s")
        found.setdefault(row, {})[int(seed)] = json.loads(res.read_text())
    return found


def print_progress(args, fractions: list[float]) -> None:
    """``--report``: the table so far, rows with fewer seeds included (their count shown)."""
    work = Path(args.workdir)
    print(f"Progress of {work} (students {args.student}); test acc %, mean ± sample std:\n")
    for fraction in fractions:
        runs = finished_runs(work, fraction)
        print(f"**{int(fraction * 100)} % of the training split**, {fraction_epochs(args, fraction)} epochs: "
              f"{sum(map(len, runs.values()))} runs finished\n")
        rows = [summarise(name, per) for name, per in runs.items()]
        print(markdown_table(["row", "seeds", *ROW_COLUMNS],
                             [[r["row"], ",".join(r["per_seed"]), *row_cells(r)] for r in rows]) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/kdray-cifar-table", help="teachers, stores, runs, logs, results")
    p.add_argument("--data-dir", type=Path, help="the CIFAR-10 JPEG tree (default: extract the shared tarball)")
    p.add_argument("--teacher-arch", default="resnet14,resnet20,resnet32", help="comma list, cycled over --teachers")
    p.add_argument("--teachers", type=int, default=3, help="teacher count K")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--teacher-batch-size", type=int, default=128)
    p.add_argument("--teacher-lr", type=float, default=0.1)
    p.add_argument("--student", default="resnet8")
    p.add_argument("--epochs", type=int, default=20,
                   help="student epochs at the --steps-of fraction, the same for every method "
                        "(20: the 10 %% table fits a session on 2 cores)")
    p.add_argument("--steps-of", type=float, default=0.1, metavar="F",
                   help="every fraction trains for the optimizer steps of --epochs at fraction F "
                        "(25 %% gets 8 epochs when F is 0.1 and --epochs 20); 0: --epochs at every fraction")
    p.add_argument("--fractions", default="0.1,0.25", help="train fractions of the students")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ekd-branches", default="1,2,4", help="B values searched for EKD besides B = K")
    p.add_argument("--tune-samples", type=int, default=12, help="trials of the tuned EKD sweep (0: no sweep)")
    p.add_argument("--tune-fractions", default="0.1", help="fractions that get a tuned sweep")
    p.add_argument("--tune-concurrency", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP/torch threads per run (0, the default, leaves the environment alone)")
    p.add_argument("--extra", action="append", default=[],
                   help="extra argument for every `kdray train` call (repeatable: --extra=--lr --extra=0.1)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of markdown")
    p.add_argument("--report", action="store_true",
                   help="print the runs finished so far (any number of seeds) and train nothing")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.ekd_branches = [int(b) for b in args.ekd_branches.split(",") if b.strip()]
    args.tune_fractions = [float(f) for f in args.tune_fractions.split(",") if f.strip()]
    fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if not 0 <= args.steps_of <= 1:
        p.error(
            f"--steps-of {args.steps_of:g}: allowed is a train fraction in (0, 1], or 0 for the same epochs everywhere"
        )
    if args.tune_samples and args.extra:
        p.error("--extra applies to the table's runs only, not to the tuned sweep's trials: "
                "use it with --tune-samples 0")
    # kdray's own working files (the runs' library logs) stay in this workdir, not in the cwd
    ENV.setdefault("KDRAY_WORKDIR", str(Path(args.workdir).resolve() / "kdray-work"))
    if args.threads > 0:  # the environment every kdray subprocess is started with
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    work = Path(args.workdir)
    if args.report:
        print_progress(args, fractions)
        return 0
    work.mkdir(parents=True, exist_ok=True)
    if args.data_dir is None:
        args.data_dir = cifar10_jpeg_dir(Path("~/.cache/kdray").expanduser())
    t_start = time.time()

    manifest = train_teachers(args, work / "teachers")
    diagnostics = teacher_diagnostics(args, work / "teachers")
    summary = {
        "teacher_diagnostics": diagnostics,
        "dataset": "cifar10-jpeg",
        "student": args.student,
        "epochs": args.epochs,
        "steps_of": args.steps_of,
        "seeds": args.seeds,
        "extra": args.extra,
        "teacher_epochs": args.teacher_epochs,
        "teachers": [
            {k: t[k] for k in ("arch", "seed", "epochs", "val_acc", "test_acc")} for t in manifest["teachers"]
        ],
        "fractions": [],
    }
    for fraction in fractions:
        fr = run_fraction(args, work / "teachers", manifest, fraction)
        if args.tune_samples and fraction in args.tune_fractions:
            tuned = tuned_sweep(args, work / "teachers", manifest, fraction)
            fr["results"][tuned["row"]] = tuned["runs"]
            fr["tuned"] = {k: v for k, v in tuned.items() if k != "runs"}
        rows = table_rows(fr, args.seeds)
        summary["fractions"].append(
            {
                "fraction": fraction,
                "epochs": fraction_epochs(args, fraction),
                "ekd_best_branches": fr["ekd_best_branches"],
                "rows": rows,
                "verdict": verdict(rows, len(manifest["teachers"])),
                "tuned": fr.get("tuned"),
            }
        )
    summary["wall_s"] = round(time.time() - t_start, 1)
    (work / "table.json").write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print_table(args, manifest, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
