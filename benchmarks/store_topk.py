#!/usr/bin/env python
"""What top-k teacher-store logits cost against exact ones: kd students on CIFAR-10 (JPEG copy) at
10 %, the teachers' logits stored as fp32 (exact) or top-k (k = 1, 2, 5), 3 seeds; the store's
bytes per (sample, view) and its build rate.

Everything goes through the real ``kdray`` CLI in subprocesses, and everything is resumable: run
the same command again and it reads back what finished (teachers from the cache folder, every
student run from its ``result.json``).

1. The CIFAR-10 JPEG tarball (``shared/datasets``) is extracted once to ``~/.cache/kdray`` and read
   by kdray's ``imagefolder`` loader (as ``cifar_table.py`` does).
2. One teacher set (``kdray teachers train``, default 2 x resnet20, 15 epochs, on the students' 10 %
   split, 10 % of the data held out for validation) into ``--cache`` (default
   ``~/.cache/kdray/bench-topk``; the folder name says the settings), reused by every encoding and
   by later invocations.
3. For every encoding and seed, ``kdray train --method kd --teacher-store WORKDIR/stores/ENC
   --teacher-store-logits fp32|topk [--teacher-store-topk k] --no-track``: each encoding has its
   own store (the encoding is part of a store's key; here it also has its own folder), built by its
   seed-0 run and extended by the others. A run whose teachers ran live (its ``teacher_images``
   metric is not 0) or whose store keeps another encoding than the one asked for (the key in the
   store's ``meta.json``) stops the benchmark with exit status 2.
4. Tables: test accuracy per encoding (mean +- sample std over seeds, per-seed values) with the gap
   to exact and its standard error ``sqrt(s1^2/n + s2^2/n)``, and whether |gap| exceeds the larger
   of the two seed spreads; each store's bytes (``meta.json``'s count of its tensors, and
   ``store.pt`` on disk) per (sample, view) against ``bytes_per_row``; ``bytes_per_row`` at C = 10,
   100 and 1,000 classes; the build rate (views/s and teacher images/s, from each store's
   ``build_s``); the command that reproduces the figures. ``--json OUT`` writes them as JSON.

The figures (about 50 min on 2 idle CPU cores, more on a busy machine: ~10 min of teachers, then
per encoding and seed about 1-2 min to extend its store and 2 min of student)::

    python benchmarks/store_topk.py --workdir /tmp/kdray-store-topk

``--quick`` (the test's): digits, 1 resnet8 teacher trained 1 epoch, 1 student epoch, seed 0,
k = 1 and 2 (about a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shlex
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_table import ENV, kdray_exe, mean_std, pct, run_json
from step_throughput import cifar10_jpeg_dir

from kdray.teachers.store_codec import bytes_per_row
from kdray.teachers.store_files import META_FILE, list_stores

FULL = {"dataset": "cifar10-jpeg", "teacher_arch": "resnet20", "teachers": 2, "teacher_epochs": 15,
        "student": "resnet8", "epochs": 15, "fraction": 0.1, "seeds": "0,1,2", "topk": "1,2,5"}
QUICK = {"dataset": "digits", "teacher_arch": "resnet8", "teachers": 1, "teacher_epochs": 1,
         "student": "resnet8", "epochs": 1, "fraction": 0.1, "seeds": "0", "topk": "1,2"}
TABLE_CLASSES = (10, 100, 1000)
TABLE_ENCODINGS = (("fp32", 0), ("fp16", 0), ("bf16", 0), ("topk", 1), ("topk", 2), ("topk", 5), ("topk", 10))
RUN_STORE_LINE = re.compile(r"teacher outputs: store ([0-9a-f]{16})")


def log(msg: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def fail(msg: str) -> None:
    """A measurement that does not measure what it says: exit status 2."""
    print(f"store_topk: FAILED: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def label(enc: tuple[str, int]) -> str:
    name, k = enc
    return f"topk-k{k}" if name == "topk" else name


def words(enc: tuple[str, int]) -> str:
    name, k = enc
    return f"top-{k}" if name == "topk" else f"{name} (exact)"


# ---------------------------------------------------------------------------------------------
# teachers


def data_args(args) -> list[str]:
    if args.dataset == "digits":
        return ["--dataset", "digits"]
    return ["--dataset", "imagefolder", "--data-dir", str(args.data_dir)]


def teacher_dir(args) -> tuple[Path, list[str]]:
    """The teacher set's folder in the cache (its name: the settings and a hash of the command) and
    the ``kdray teachers train`` arguments that make it."""
    archs = args.teacher_arch.split(",")
    cmd = ["teachers", "train"] + data_args(args) + [
        "--train-fraction", str(args.teacher_fraction), "--count", str(args.teachers),
        "--epochs", str(args.teacher_epochs), "--batch-size", str(args.teacher_batch_size),
        "--lr", str(args.teacher_lr), "--device", args.device, "--no-track", "--json"]
    for arch in archs:
        cmd += ["--arch", arch]
    digest = hashlib.sha256(" ".join(cmd).encode()).hexdigest()[:8]
    name = f"{args.dataset}-{args.teachers}x{'+'.join(archs)}-e{args.teacher_epochs}-f{args.teacher_fraction}-{digest}"
    return Path(args.cache).expanduser() / "teachers" / name, cmd


def train_teachers(args) -> tuple[Path, dict]:
    """The teacher set: read from the cache, or trained (continued after an interruption) there."""
    tdir, cmd = teacher_dir(args)
    if (tdir / "manifest.json").is_file():
        log(f"teachers: reusing {tdir}")
        return tdir, json.loads((tdir / "manifest.json").read_text())
    cmd = kdray_exe() + cmd + ["--out", str(tdir)]
    log("teachers: " + " ".join(cmd) + f" (log: {args.workdir}/logs/teachers.log)")
    t0 = time.time()
    manifest = run_json(cmd, Path(args.workdir) / "logs" / "teachers.log")
    log(f"teachers trained in {time.time() - t0:.0f}s: "
        + ", ".join(f"{t['arch']} test acc {pct(t['test_acc'])} %" for t in manifest["teachers"]))
    return tdir, json.loads((tdir / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# students


def store_root(args, enc) -> Path:
    return Path(args.workdir) / "stores" / label(enc)


def train_student(args, tdir: Path, shas: list, enc: tuple[str, int], seed: int) -> dict:
    """One ``kdray train`` run reading its teachers from the encoding's store, read back from
    ``result.json`` when it finished before with the same arguments and teachers."""
    name = f"{label(enc)}-s{seed}"
    out = Path(args.workdir) / "runs" / name
    cached = out / "result.json"
    cmd = kdray_exe() + ["train", "--method", "kd", "--student", args.student, "--teachers", str(tdir)] \
        + data_args(args) + [
            "--train-fraction", str(args.fraction), "--epochs", str(args.epochs), "--seed", str(seed),
            "--device", args.device, "--teacher-store", str(store_root(args, enc)),
            "--teacher-store-logits", enc[0]] + (["--teacher-store-topk", str(enc[1])] if enc[0] == "topk" else []) \
        + ["--json", "--no-track", "--out", str(out)]
    args_now = cmd[cmd.index("train"):]
    if cached.is_file():
        res = json.loads(cached.read_text())
        was = res["command"][res["command"].index("train"):]
        if was != args_now or res.get("teachers_sha256") != shas:
            fail(f"{cached} was made with other settings or teachers; rerun with those, or use another --workdir")
        return res
    if out.exists():
        shutil.rmtree(out)  # an interrupted run: start it again
    log(f"{name}: kdray train --method kd --teacher-store-logits {enc[0]}"
        + (f" --teacher-store-topk {enc[1]}" if enc[0] == "topk" else "") + f" --seed {seed}")
    t0 = time.time()
    res = run_json(cmd, Path(args.workdir) / "logs" / f"{name}.log")
    res.update(wall_s=round(time.time() - t0, 1), command=cmd, teachers_sha256=shas)
    cached.write_text(json.dumps(res, indent=1, sort_keys=True))
    log(f"{name}: test_acc {res['test_acc']:.4f} val_acc {res['val_acc']:.4f} ({res['wall_s']:.0f}s)")
    return res


def used_store(args, enc: tuple[str, int], shas: list, run: dict, seed: int) -> dict:
    """The meta of the store the run read, checked: no teacher ran live, and the store (every store
    in the encoding's folder) keeps the encoding asked for."""
    name = f"{label(enc)}-s{seed}"
    if "teacher_images" not in run:
        fail(f"run {name} reports no teacher_images metric: whether its teachers ran live cannot be told")
    if run["teacher_images"] != 0:
        fail(f"run {name} ran its teachers live on {run.get('teacher_images')} images instead of reading them "
             f"from its store (metric teacher_images; log: {Path(args.workdir) / 'logs' / (name + '.log')})")
    root = store_root(args, enc)
    metas = list_stores(root)
    for m in metas:
        got = m["key"].get("logits", {})
        ok = got.get("encoding") == enc[0] and (enc[0] != "topk" or int(got.get("k", 0)) == enc[1])
        if not ok:
            flags = f"--teacher-store-logits {enc[0]}" + (f" --teacher-store-topk {enc[1]}" if enc[0] == "topk" else "")
            fail(f"store {m['path']} keeps logits {got}, not {words(enc)} as run {name} asked ({flags})")
    mine = [m for m in metas if m["key"].get("teachers") == shas]
    logged = Path(args.workdir) / "logs" / f"{name}.log"
    said = RUN_STORE_LINE.findall(logged.read_text()) if logged.is_file() else []
    if said:  # the run names the store it read
        mine = [m for m in mine if m["digest"] == said[-1]]
    if not mine:
        fail(f"run {name}: no store of these teachers in {root}" + (f" named {said[-1]}" if said else ""))
    return max(mine, key=lambda m: m.get("updated", ""))


def store_figures(args, enc: tuple[str, int], meta: dict, classes: int) -> dict:
    folder = Path(meta["path"])
    rows, build_s, teachers = int(meta["rows"]), float(meta.get("build_s", 0.0)), int(meta["info"][0])
    file_bytes = sum((folder / s["file"]).stat().st_size for s in meta["shards"])
    return {
        "digest": meta["digest"], "path": str(folder), "meta": str(folder / META_FILE),
        "encoding": meta["key"]["logits"], "precision": meta["key"]["precision"], "teachers": teachers,
        "rows": rows, "views": meta["views"], "feats": meta["feats"], "bytes": int(meta["bytes"]),
        "bytes_per_view": meta["bytes"] / max(rows, 1), "file_bytes": file_bytes,
        "file_bytes_per_view": file_bytes / max(rows, 1),
        "bytes_per_row": bytes_per_row(enc[0], teachers, classes, enc[1]),
        "build_s": build_s, "views_per_s": rows / build_s if build_s > 0 else None,
        "teacher_images_per_s": rows * teachers / build_s if build_s > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# figures


def kd_settings(run: dict) -> str:
    """The kd temperature and weight the run trained with (from its student file's config)."""
    from kdray.core.io import safe_load
    from kdray.distill import get_method

    try:
        cfg = safe_load(Path(run["student_path"]), "student")["config"]
    except Exception:  # a student file moved away: the table says less, it still stands
        return "kdray defaults otherwise"
    alpha = cfg.get("alpha")
    alpha = get_method("kd").default_alpha if alpha is None else alpha
    return f"T = {cfg.get('temperature'):g}, alpha = {alpha:g}, lr {cfg.get('lr'):g}, batch {cfg.get('batch_size')}"


def summarise(per_seed: dict[int, dict]) -> dict:
    seeds = sorted(per_seed)
    test = [per_seed[s]["test_acc"] for s in seeds]
    m, s = mean_std(test)
    return {"mean": m, "std": s, "n": len(test), "per_seed": {str(k): v for k, v in zip(seeds, test)},
            "val_mean": mean_std([per_seed[k]["val_acc"] for k in seeds])[0],
            "wall_s": round(sum(r.get("wall_s", 0.0) for r in per_seed.values()), 1)}


def gap(a: dict, exact: dict) -> dict:
    """Encoding a against exact: the gap of the means, its standard error, the larger seed spread."""
    n = a["n"]
    g, spread = a["mean"] - exact["mean"], max(a["std"], exact["std"])
    se = math.sqrt(a["std"] ** 2 / n + exact["std"] ** 2 / n)
    return {"gap": g, "gap_se": se, "seed_spread": spread, "exceeds_spread": abs(g) > spread if n > 1 else None}


def bytes_table(teachers: int) -> dict:
    """``bytes_per_row`` for ``teachers`` teachers: encoding -> classes -> bytes (None: k >= C)."""
    return {label(e): {str(c): (bytes_per_row(e[0], teachers, c, e[1]) if e[1] < c else None) for c in TABLE_CLASSES}
            for e in TABLE_ENCODINGS}


def reproduce_command(args) -> str:
    cmd = ["python", "benchmarks/store_topk.py", "--dataset", args.dataset]
    if args.dataset != "digits" and args.data_dir_given:
        cmd += ["--data-dir", str(args.data_dir)]
    cmd += ["--teacher-arch", args.teacher_arch, "--teachers", str(args.teachers),
            "--teacher-epochs", str(args.teacher_epochs), "--teacher-fraction", str(args.teacher_fraction),
            "--teacher-batch-size", str(args.teacher_batch_size), "--teacher-lr", str(args.teacher_lr),
            "--student", args.student, "--epochs", str(args.epochs), "--fraction", str(args.fraction),
            "--seeds", ",".join(map(str, args.seeds)), "--topk", ",".join(map(str, args.topk)),
            "--device", args.device, "--workdir", str(args.workdir), "--cache", str(args.cache)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    return " ".join(shlex.quote(c) for c in cmd)


def print_report(args, s: dict) -> None:
    t = s["teachers"]
    n = len(args.seeds)
    print(f"Teacher store logits: exact against top-k. {s['dataset_words']}; teachers "
          + ", ".join(f"{x['arch']} {pct(x['test_acc'])} %" for x in t["set"])
          + f" test acc ({t['epochs']} epoch(s) on {int(100 * args.teacher_fraction)} % of the training split); "
          f"students kd {args.student}, {args.epochs} epoch(s) on {int(100 * args.fraction)} % "
          f"({s['train_images']} images), {s['kd_settings']}; seeds {args.seeds}.\n")
    print(f"**Test accuracy %**, mean ± sample std over {n} seed(s); gap to {words(s['exact'])} in points\n")
    print("| logits | test acc % | per seed | val acc % | gap pts | s.e. of gap pts | |gap| > larger std |")
    print("|---|---|---|---|---|---|---|")
    for lab, e in s["encodings"].items():
        r, g = e["summary"], e.get("gap")
        spread = pct(r["mean"]) + (f" ± {pct(r['std'])}" if n > 1 else "")
        gap_cells = (["–", "–", "–"] if g is None else
                     [f"{100 * g['gap']:+.2f}", pct(g["gap_se"]) if n > 1 else "–",
                      {True: "yes", False: "no", None: "n/a (1 seed)"}[g["exceeds_spread"]]])
        print(f"| {e['words']} | {spread} | {', '.join(pct(v) for v in r['per_seed'].values())} | "
              f"{pct(r['val_mean'])} | " + " | ".join(gap_cells) + " |")
    K, C = t["count"], s["classes"]
    print(f"\n**Each encoding's store** ({K} teacher(s), C = {C}; bytes per (sample, view): the store's tensors "
          "from its meta.json, store.pt on disk, and `bytes_per_row`)\n")
    print("| logits | store | rows (views) | bytes | bytes / view | store.pt bytes | store.pt / view "
          "| bytes_per_row | build s | views/s | teacher images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for e in s["encodings"].values():
        st = e["store"]
        rate = lambda v: f"{v:,.0f}" if v else "–"  # noqa: E731
        print(f"| {e['words']} | {st['digest']} | {st['rows']:,} | {st['bytes']:,} | {st['bytes_per_view']:.1f} | "
              f"{st['file_bytes']:,} | {st['file_bytes_per_view']:.1f} | {st['bytes_per_row']} | {st['build_s']:.1f} | "
              f"{rate(st['views_per_s'])} | {rate(st['teacher_images_per_s'])} |")
    b = s["build_rate"]
    prec = "bf16" if s["store_precision"].get("bf16") else "fp32"
    print(f"\n**Build rate**, all stores together: {b['rows']:,} views x {K} teacher(s) in {b['build_s']:.1f} s = "
          + (f"{b['views_per_s']:,.0f} views/s, {b['teacher_images_per_s']:,.0f} teacher images/s"
             if b["views_per_s"] else "too short to time")
          + f" ({s['store_precision'].get('device')}, teachers in {prec}; decoding the views included)")
    print(f"\n**Bytes per (sample, view)**, `bytes_per_row` (kdray.teachers.store_codec) for K = {K} teacher(s), "
          "the 8-byte code in the index included, feature maps not\n")
    print("| logits | " + " | ".join(f"C = {c:,}" for c in TABLE_CLASSES) + " |")
    print("|---|" + "---|" * len(TABLE_CLASSES))
    for lab, per in s["bytes_per_row"].items():
        print(f"| {lab} | " + " | ".join("n/a (k ≥ C)" if v is None else f"{v:,}" for v in per.values()) + " |")
    runs_s = sum(e["summary"]["wall_s"] for e in s["encodings"].values())
    print(f"\nwall time of this invocation {s['wall_s']:.0f}s (the student runs, stores built included, took "
          f"{runs_s:.0f}s when they ran); results in {Path(args.workdir) / 'store_topk.json'}")
    print(f"reproduce: {s['reproduce']}")


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny settings for the test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--dataset", choices=("cifar10-jpeg", "digits"), help=f"default {FULL['dataset']}")
    p.add_argument("--data-dir", type=Path, help="the CIFAR-10 JPEG tree (default: extract the shared tarball)")
    p.add_argument("--workdir", default="/tmp/kdray-store-topk", help="stores, runs, logs, results")
    p.add_argument("--cache", default="~/.cache/kdray/bench-topk", help="where the teacher set is kept and reused")
    p.add_argument("--teacher-arch", help=f"comma list, cycled over --teachers (default {FULL['teacher_arch']})")
    p.add_argument("--teachers", type=int, help=f"teacher count K (default {FULL['teachers']})")
    p.add_argument("--teacher-epochs", type=int, help=f"default {FULL['teacher_epochs']}")
    p.add_argument("--teacher-fraction", type=float, help="the teachers' train fraction (default --fraction)")
    p.add_argument("--teacher-batch-size", type=int, default=128)
    p.add_argument("--teacher-lr", type=float, default=0.1)
    p.add_argument("--student", help=f"default {FULL['student']}")
    p.add_argument("--epochs", type=int, help=f"student epochs (default {FULL['epochs']})")
    p.add_argument("--fraction", type=float, help=f"the students' train fraction (default {FULL['fraction']})")
    p.add_argument("--seeds", help=f"default {FULL['seeds']}")
    p.add_argument("--topk", help=f"k values of the top-k encoding, comma list (default {FULL['topk']})")
    p.add_argument("--exact", default="fp32", choices=("fp32", "fp16", "bf16"), help="the exact encoding compared")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0,
                   help="OMP/torch threads per run (0, the default, leaves the environment alone)")
    p.add_argument("--json", metavar="OUT", help="also write the figures as JSON to OUT")
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.topk = [int(k) for k in str(args.topk).split(",") if k.strip()]
    if args.teacher_fraction is None:
        args.teacher_fraction = args.fraction
    if not args.seeds:
        p.error("--seeds: give at least one seed")
    if any(k < 1 for k in args.topk):
        p.error("--topk: every k must be >= 1")
    args.data_dir_given = args.data_dir is not None
    args.workdir = Path(args.workdir).expanduser().resolve()
    args.cache = Path(args.cache).expanduser().resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    ENV.setdefault("KDRAY_WORKDIR", str(args.workdir / "kdray-work"))
    if args.threads > 0:  # the environment every kdray subprocess is started with
        ENV.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.dataset == "cifar10-jpeg" and args.data_dir is None:
        args.data_dir = cifar10_jpeg_dir(Path("~/.cache/kdray").expanduser())
    t_start = time.time()

    tdir, manifest = train_teachers(args)
    shas = [t.get("sha256") for t in manifest["teachers"]]
    classes = len(manifest["classes"])
    encodings = [(args.exact, 0)] + [("topk", k) for k in args.topk]
    too_big = [k for k in args.topk if k >= classes]
    if too_big:
        fail(f"--topk {too_big}: k must be below the {classes} classes")
    results: dict[str, dict] = {}
    for seed in args.seeds:  # seed by seed: a partial invocation has every encoding of its first seeds
        for enc in encodings:
            run = train_student(args, tdir, shas, enc, seed)
            used_store(args, enc, shas, run, seed)
            results.setdefault(label(enc), {})[seed] = run
    summary_enc = {}
    for enc in encodings:
        meta = used_store(args, enc, shas, results[label(enc)][args.seeds[-1]], args.seeds[-1])
        summary_enc[label(enc)] = {"encoding": enc[0], "k": enc[1] or None, "words": words(enc),
                                   "summary": summarise(results[label(enc)]),
                                   "store": store_figures(args, enc, meta, classes),
                                   "runs": {str(s): r for s, r in results[label(enc)].items()}}
    exact = summary_enc[label(encodings[0])]["summary"]
    for lab, e in summary_enc.items():
        if lab != label(encodings[0]):
            e["gap"] = gap(e["summary"], exact)
    stores = [e["store"] for e in summary_enc.values()]
    rows, build_s = sum(st["rows"] for st in stores), sum(st["build_s"] for st in stores)
    K = len(manifest["teachers"])
    first_run = results[label(encodings[0])][args.seeds[0]]
    train_images = None
    log_file = args.workdir / "logs" / f"{label(encodings[0])}-s{args.seeds[0]}.log"
    found = re.findall(r"ready in [\d.]+s: (\d+) train", log_file.read_text()) if log_file.is_file() else []
    if found:
        train_images = int(found[-1])
    summary = {
        "dataset": args.dataset,
        "dataset_words": ("digits" if args.dataset == "digits" else f"the image folder {args.data_dir}"
                          if args.data_dir_given else "CIFAR-10 (JPEG copy)"),
        "classes": classes, "train_images": train_images, "exact": encodings[0],
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "teachers": {"dir": str(tdir), "count": K, "epochs": args.teacher_epochs,
                     "set": [{k: t.get(k) for k in ("arch", "seed", "epochs", "val_acc", "test_acc", "sha256")}
                             for t in manifest["teachers"]]},
        "encodings": summary_enc,
        "store_precision": stores[0]["precision"],
        "build_rate": {"rows": rows, "build_s": round(build_s, 2), "teachers": K,
                       "views_per_s": rows / build_s if build_s > 0 else None,
                       "teacher_images_per_s": rows * K / build_s if build_s > 0 else None},
        "bytes_per_row": bytes_table(K),
        "reproduce": reproduce_command(args),
        "kd_settings": kd_settings(first_run),
        "student_epoch_s": first_run.get("epoch_time_s"),
        "wall_s": round(time.time() - t_start, 1),
    }
    text = json.dumps(summary, indent=1, default=str)
    (args.workdir / "store_topk.json").write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    print_report(args, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
