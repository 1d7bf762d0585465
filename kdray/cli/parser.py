"""The `kdray` argument parser: every command, its flags and their help."""

from __future__ import annotations

import argparse

from kdray.cli.best import cmd_best
from kdray.cli.common import (
    TRACKING_HELP,
    WORKDIR_HELP,
    add_data_args,
    add_hparam_args,
    add_optim_args,
    add_tracking_args,
)
from kdray.cli.compare import add_compare_parser
from kdray.cli.export import cmd_export
from kdray.cli.shipped import cmd_clusters, cmd_spaces
from kdray.cli.teachers import (
    cmd_teachers_import,
    cmd_teachers_show,
    cmd_teachers_store,
    cmd_teachers_train,
)
from kdray.cli.train import cmd_train
from kdray.cli.tune import cmd_tune


def build_parser() -> argparse.ArgumentParser:
    from kdray._version import __version__

    p = argparse.ArgumentParser(
        prog="kdray",
        description="Distil teacher ensembles into small image classifiers (EKD, FEED and baselines), "
        "search the distillation's hyperparameters with Ray Tune + Optuna, and track everything in MLflow.",
    )
    p.add_argument("--version", action="version", version=f"kdray {__version__}")
    p.add_argument("--workdir", default=argparse.SUPPRESS, help=WORKDIR_HELP)
    p.add_argument("--tracking-uri", default=argparse.SUPPRESS, help=TRACKING_HELP)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    # train ----------------------------------------------------------------------------------
    t = sub.add_parser("train", help="distil one student (one run)",
                       description="Train one student with a distillation method; one progress line per epoch, a "
                       "summary at the end.")
    m = t.add_argument_group("method")
    from kdray.distill import METHODS

    m.add_argument("--method", help=f"{', '.join(sorted(METHODS))} (default ekd)")
    m.add_argument("--student",
                   help="student architecture, e.g. resnet8 (default), resnet8x4, wrn_16_2, mobilenet_v3_small")
    m.add_argument("--teachers", help="teacher directory written by `kdray teachers train`")
    add_hparam_args(m)
    m.add_argument("--workers", type=int, help="Ray Train DDP workers (default 1: in this process)")
    m.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="GPUs per Ray Train worker when --workers > 1 (default 0)")
    m.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default 1)")
    m.add_argument("--address", help="Ray cluster address for --workers > 1 (default: a local Ray)")
    m.add_argument("--max-failures", type=int, default=0,
                   help="with --workers > 1: worker failures the run survives, resuming from its last checkpoint "
                   "(default 0)")
    m.add_argument("--teacher-store", metavar="DIR|URI|auto",
                   help="take the teachers' outputs from a teacher store in DIR or at a URI (s3://, gs://, hdfs://, "
                   "file://; read through a local mirror) (auto: the teacher set's stores/), computing the views it "
                   "lacks once (default: teachers run live on every batch)")
    m.add_argument("--teacher-store-budget", type=float, default=4.0, metavar="GB",
                   help="memory / disk a teacher store may take (default 4); feature maps beyond it are computed "
                   "online")
    add_store_encoding_args(m, "--teacher-store-logits", "--teacher-store-topk")
    add_data_args(t)
    add_optim_args(t)
    o = t.add_argument_group("output")
    o.add_argument("--out", help="run folder for checkpoints and the student (default WORKDIR/runs/NAME; with "
                   "--seeds: the group's folder)")
    o.add_argument("--name", help="run name (default METHOD-STUDENT-sSEED-TIME; with --seeds the group's, default "
                   "METHOD-STUDENT-seeds-TIME, its runs NAME-sSEED)")
    o.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --out (with --seeds: the seed group in --out / "
                   "WORKDIR/runs/NAME; finished seeds are skipped)")
    o.add_argument("--json", action="store_true", help="print one JSON object of final metrics on stdout "
                   "(with --seeds: the group's run id, each seed's results and the mean / std)")
    o.add_argument("--seeds", metavar="S,S,...",
                   help="train this configuration once per seed (e.g. 0,1,2; distinct, >= 0), one after another, "
                   "as one seed group: an MLflow parent run (kdray.kind seeds) with one child run per seed and the "
                   "mean / std of their val and test accuracy; run folders --out/sSEED. Not with --seed")
    add_tracking_args(t)
    t.set_defaults(func=cmd_train)

    # tune -----------------------------------------------------------------------------------
    tu = sub.add_parser("tune", help="search distillation hyperparameters (Ray Tune + Optuna TPE + ASHA)",
                        description="Run a sweep from a YAML search space: the teachers' outputs are computed once "
                        "into a teacher store shared by every trial; a 1-worker trial trains in Tune's trial process, "
                        "a trial of W > 1 workers is a Ray Train run with W DDP workers; Optuna's TPE proposes, ASHA "
                        "stops weak trials early (recorded as PRUNED).")
    tu.add_argument("--space", required=True, help="search space YAML, e.g. search_spaces/quick.yaml")
    add_sweep_options(tu)
    tu.add_argument("--json", action="store_true", help="print the sweep's result (trials, best, Pareto front) as JSON")
    tu.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or "
                    "sqlite:///WORKDIR/mlflow.db); an `mlflow server` when trials run on several hosts")
    tu.add_argument("--no-track", action="store_true", help="do not log the sweep to MLflow")
    tu.set_defaults(func=cmd_tune)

    # best -----------------------------------------------------------------------------------
    b = sub.add_parser("best", help="list the best students of an experiment; register the winner",
                       description="Rank the completed runs of an MLflow experiment (a sweep's trials or train runs) "
                       "by a metric, with optional size / latency limits; --register logs the winner as an MLflow "
                       "PyTorch model and registers it with the alias `champion`.")
    b.add_argument("--experiment", required=True, help="MLflow experiment (the sweep's --experiment / space name)")
    b.add_argument("--metric", help="metric to rank by (default: the sweep's metric, else val_acc)")
    b.add_argument("--mode", choices=["max", "min"], help="max or min (default: the sweep's mode, else max)")
    b.add_argument("--max-params", type=int, help="only students with at most this many parameters")
    b.add_argument("--max-latency-ms", type=float, help="only students at most this slow (CPU, batch 1, ms)")
    b.add_argument("--top", type=int, help="rows to show (default 5); with --retrain the runs re-trained (default 1)")
    b.add_argument("--register", metavar="MODEL_NAME", help="register the winner under MODEL_NAME, alias champion")
    b.add_argument("--retrain", action="store_true",
                   help="train the best run's configuration (the --top best runs', default 1), rebuilt exactly from "
                   "its student record, again with each of --seeds, as a seed group in this experiment (named "
                   "retrain-RUN, tagged kdray.retrain_of=RUN) and show its mean ± std beside the run's one score")
    b.add_argument("--seeds", metavar="S,S,...", help="with --retrain: the seeds, e.g. 0,1,2 (distinct, >= 0)")
    b.add_argument("--json", action="store_true",
                   help="print the table (and registration) as JSON; with --retrain the groups")
    b.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite in the workdir)")
    b.set_defaults(func=cmd_best)

    # compare --------------------------------------------------------------------------------
    add_compare_parser(sub)

    # export ---------------------------------------------------------------------------------
    x = sub.add_parser("export", help="write a deployable student (state dict + exported program)",
                       description="Export a trained student for deployment: the whole EKD ensemble or one branch "
                       "(FEED translators are never part of it), as a plain state dict plus a torch.export program, "
                       "with its accuracy re-checked on the test split.")
    x.add_argument("--run", help="MLflow run id whose student/student.pt to export")
    x.add_argument("--student", help="or a local student.pt (from `kdray train`)")
    x.add_argument("--branch", default="best",
                   help="best (default: the best single branch), all (the whole ensemble) or N")
    x.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an earlier kdray export in --out (refused for a folder holding anything else)")
    x.add_argument("--no-recheck", action="store_true", help="skip re-checking the accuracy on the test split")
    x.add_argument("--json", action="store_true", help="print what was exported as JSON")
    x.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite in the workdir)")
    x.set_defaults(func=cmd_export)

    # spaces / clusters: the files kdray ships --------------------------------------------------
    sp = sub.add_parser("spaces", help="list, show or copy the search spaces kdray ships",
                        description="The search spaces kdray ships; `kdray tune --space NAME` runs one by name "
                        "(a path to your own YAML works too).")
    spsub = sp.add_subparsers(dest="spaces_command", metavar="ACTION")
    spl = spsub.add_parser("list", help="names and one-line descriptions (the default)")
    for parser in (sp, spl):  # `kdray spaces --json` and `kdray spaces list --json`
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print name, path and description as JSON")
    sps = spsub.add_parser("show", help="print a shipped space's YAML")
    sps.add_argument("name", help="a shipped space, e.g. quick")
    spc = spsub.add_parser("copy", help="copy a shipped space to a file you can edit")
    spc.add_argument("name", help="a shipped space, e.g. ekd")
    spc.add_argument("dest", nargs="?", default=".", help="destination folder (default: the current one)")
    sp.set_defaults(func=cmd_spaces)
    cl = sub.add_parser("clusters", help="list or copy the Ray cluster files kdray ships (`ray up`)",
                        description="The Ray cluster files kdray ships (AWS, GCP, on-prem over SSH) and the MLflow "
                        "head script they mount; `kdray clusters copy` puts them in ./clusters, where they expect "
                        "to be (see their README).")
    clsub = cl.add_subparsers(dest="clusters_command", metavar="ACTION")
    cll = clsub.add_parser("list", help="file names and one-line descriptions (the default)")
    for parser in (cl, cll):
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                            help="print name, path and description as JSON")
    clc = clsub.add_parser("copy", help="copy every cluster file into DEST")
    clc.add_argument("dest", nargs="?", default="clusters", help="destination folder (default ./clusters)")
    cl.set_defaults(func=cmd_clusters)

    # teachers -------------------------------------------------------------------------------
    te = sub.add_parser("teachers", help="train, import or inspect teacher ensembles",
                        description="Train, import or inspect teacher ensembles.")
    tsub = te.add_subparsers(dest="teachers_command", metavar="ACTION")
    tt = tsub.add_parser("train", help="train K teachers and write weights + manifest",
                         description="Train K teachers (architectures cycled, seeds SEED..SEED+K-1) and write their "
                         "weights and a manifest with arch, dataset, classes, accuracy, seed and sha256.")
    tt.add_argument("--arch", action="append",
                    help="teacher architecture (repeatable; cycled over --count), default resnet20")
    tt.add_argument("--count", type=int, default=3, help="number of teachers K (default 3)")
    tt.add_argument("--out", help="output directory (default WORKDIR/teachers/DATASET)")
    tt.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    add_data_args(tt)
    add_optim_args(tt)
    add_tracking_args(tt, default_experiment="kdray-teachers")
    tt.set_defaults(func=cmd_teachers_train)
    st = tsub.add_parser("store",
                         help="build (or extend) a teacher store: the teachers' outputs for the views runs will see",
                         description="Compute the teachers' outputs for every training view a sweep of --space (or a "
                         "run of the given method, data and epochs) will see, once, into a verified store that sweeps "
                         "and `kdray train --teacher-store` read instead of running the teachers.")
    st.add_argument("dir", help="teacher directory")
    st.add_argument("--space", help="build what a sweep of this search space needs (its seeds, epochs, methods)")
    st.add_argument("--method", help="otherwise: the method a run will train (default ekd)")
    st.add_argument("--store", metavar="DIR|URI", help="where stores live: a folder or a URI (s3://, gs://, hdfs://, "
                    "file://) (default DIR/stores)")
    st.add_argument("--budget", type=float, default=4.0, metavar="GB",
                    help="memory / disk the store may take (default 4)")
    add_store_encoding_args(st, "--logits", "--topk", "--teacher-store-logits", "--teacher-store-topk")
    st.add_argument("--address", help="Ray cluster address the store is computed on (default: a local Ray)")
    st.add_argument("--json", action="store_true", help="print the store's record as JSON")
    add_hparam_args(st)
    add_data_args(st)
    add_optim_args(st)
    st.set_defaults(func=cmd_teachers_store)
    ts = tsub.add_parser("show", help="verify and list a teacher directory and its stores",
                         description="Verify checksums and weights of a teacher directory and list its teachers and "
                         "teacher stores (key, size, coverage).")
    ts.add_argument("dir", help="teacher directory")
    ts.add_argument("--json", action="store_true", help="print the manifest as JSON")
    ts.set_defaults(func=cmd_teachers_show)
    ti = tsub.add_parser("import", help="import classifiers trained elsewhere as a verified teacher set",
                         description="Load state-dict files (kdray or torchvision key layout; tensors only) and/or "
                         "torchvision pretrained weights into their architectures built for the dataset's classes, "
                         "measure their val and test accuracy on it, and write a teacher set like `kdray teachers "
                         "train` does (weights + manifest with arch, source, accuracy and sha256).")
    ti.add_argument("files", nargs="*", metavar="FILE",
                    help="state-dict file: a plain state dict or a checkpoint holding one under 'state_dict' or "
                    "'model' ('module.' prefixes are removed)")
    ti.add_argument("--arch", action="append", required=True,
                    help="architecture (repeatable): one for all sources, or one per source in order (files, then "
                    "--weights)")
    ti.add_argument("--weights", action="append", metavar="NAME",
                    help="torchvision weights as one more teacher (repeatable), e.g. ResNet18_Weights.IMAGENET1K_V1 or "
                    "DEFAULT; read from the torch hub cache, downloaded if missing; a classifier whose classes differ "
                    "from the dataset's is re-initialised (fine-tune such a teacher)")
    ti.add_argument("--layout", choices=("auto", "kdray", "torchvision"), default="auto",
                    help="the files' key layout (default auto: kdray when every key starts with stem./stages./head.)")
    ti.add_argument("--out", required=True, help="a new or empty folder for the teacher set (never overwritten)")
    ti.add_argument("--device", help="where accuracy is measured: auto (default: cuda if visible), cpu, cuda, cuda:N")
    ti.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    add_data_args(ti)
    ti.set_defaults(func=cmd_teachers_import)
    te.set_defaults(func=lambda a: (te.print_help(), 2)[1])
    accept_global_options_anywhere(p)
    return p


def add_store_encoding_args(group, logits: str, topk: str, *aliases: str) -> None:
    """The teacher store's logit encoding flags (``aliases``: the same two flags' other names)."""
    from kdray.teachers.store_codec import AUTO_EXACT_CLASSES, DEFAULT_TOPK, ENCODINGS

    group.add_argument(logits, *aliases[:1], dest="teacher_store_logits", choices=ENCODINGS, default="auto",
                       help="how the teacher store keeps logits: fp32, fp16, bf16 (exact, cast) or topk (top-k + "
                       f"log-sum-exp, rebuilt); auto (default): exact up to {AUTO_EXACT_CLASSES} classes, else topk")
    group.add_argument(topk, *aliases[1:], dest="teacher_store_topk", type=int, metavar="K",
                       help=f"k of the topk encoding (default {DEFAULT_TOPK})")


def add_sweep_options(parser: argparse.ArgumentParser) -> None:
    """One flag per field of :class:`~kdray.tune.options.SweepOptions`, in its order: the name,
    help and default from the field's declaration, the type from its annotation (a bool is a
    switch that flips its default; a repeatable option's values a list); the parsed value lands
    under the field's name."""
    import dataclasses
    import typing

    from kdray.tune.options import SweepOptions

    hints = typing.get_type_hints(SweepOptions)
    for f in dataclasses.fields(SweepOptions):
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        kind = next((t for t in typing.get_args(hints[f.name]) if t is not type(None)), hints[f.name])
        value = {**({"metavar": meta["metavar"]} if meta.get("metavar") else {}),
                 **({"choices": meta["choices"]} if meta.get("choices") else {})}
        extra = ({"action": "store_false" if f.default else "store_true"} if kind is bool else
                 {"action": "append", **value} if meta.get("repeatable") else {"type": kind, **value})
        parser.add_argument(flag, dest=f.name, default=f.default, help=meta["help"], **extra)


def accept_global_options_anywhere(parser: argparse.ArgumentParser) -> None:
    """``--workdir`` and ``--tracking-uri`` before or after the (sub)command: every command's parser
    takes them too. Their defaults are SUPPRESS everywhere, so a value given before the command is
    not overwritten by the command parser's default (argparse copies a subparser's defaults into
    the namespace)."""
    for action in parser._actions:  # argparse has no public API to walk its subparsers
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in dict.fromkeys(action.choices.values()):
            options = {o: a for a in sub._actions for o in a.option_strings}
            if "--workdir" not in options:
                sub.add_argument("--workdir", default=argparse.SUPPRESS, help=WORKDIR_HELP)
            if "--tracking-uri" in options:
                options["--tracking-uri"].default = argparse.SUPPRESS
            accept_global_options_anywhere(sub)
