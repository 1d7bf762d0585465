"""Deployable students: the whole EKD ensemble or one branch (FEED translators are never part of a
student), as a plain state dict plus a ``torch.export`` program, with the test accuracy re-checked.

Input contract of every deployed module: float images in [0, 1], shape [N, 3, H, W] (H = W =
``image_size`` from ``export.json``), RGB, resized the way the training data was; the output is
logits [N, num_classes] in the order of ``classes``. The data set's normalisation is inside the
module (buffers ``scale`` and ``shift``), computed exactly as :class:`kdray.data.BatchLoader`
does it for ``evaluate``: for an image stored as uint8 ``u``, feeding ``u / 255`` gives the
bit-identical network input ``u * scale - shift`` that training-time evaluation saw.

Files written into the output folder:

- ``model.pt2``: ``torch.export`` program (batch size dynamic); ``load_exported(out)`` or
  ``torch.export.load(path).module()``. If ``torch.export`` fails, ``model.ts`` (TorchScript,
  ``torch.jit.trace``) is written instead and ``export.json`` says so (``format``).
- ``state_dict.pt``: the plain state dict of the deploy module (loads with ``weights_only=True``);
  ``load_state_dict_module(out)`` rebuilds the module from it and ``export.json``.
- ``export.json``: what was exported, classes, normalisation, parameter count, logged and
  re-checked accuracy, sha256 of the other files.

The folder is filled beside ``out`` and swapped in whole. ``overwrite`` replaces only an earlier
kdray export (``export.json`` and the files it lists, nothing else); a folder holding anything else,
or the student being exported, is refused and left as it was.

This module needs bare torch only (no ray, mlflow or optuna).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.train.checkpoint import STUDENT_FORMAT, safe_load, sha256_file

EXPORT_FORMAT = "kdray-export/1"
_RECORD_KEYS = ("arch", "num_classes", "multi_branch", "branches", "split_stage", "classes", "mean", "std",
                "image_size", "config", "metrics", "state_dict")

Branch = Union[str, int]


class Deployed(nn.Module):
    """[0, 1] images -> the student's logits, normalising inside exactly like ``BatchLoader``."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        # the same float32 expressions as BatchLoader: (x*255) * scale - shift is then bit-identical
        # to the loader's uint8 * scale - shift, since (u/255)*255 == u exactly for every uint8 u
        self.register_buffer("scale", 1.0 / (255.0 * std_t))
        self.register_buffer("shift", mean_t / std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.mul(255.0).mul(self.scale).sub(self.shift))


# ---------------------------------------------------------------------------------------------
# records and branch choice


def check_record(record, where: str = "student record") -> dict:
    """``record`` if it is a kdray ``student.pt`` dict, else a KdrayError naming what is missing."""
    if not isinstance(record, dict):
        raise KdrayError(f"{where}: not a kdray student (expected a dict, got {type(record).__name__})")
    if record.get("format") not in (None, STUDENT_FORMAT):
        raise KdrayError(f"{where}: format {record.get('format')!r} is not {STUDENT_FORMAT!r}")
    missing = [k for k in _RECORD_KEYS if k not in record]
    if missing:
        raise KdrayError(f"{where}: not a kdray student (missing {', '.join(missing)})")
    return record


def load_record(path: Union[str, Path]) -> dict:
    """A ``student.pt`` loaded with ``weights_only=True`` and checked."""
    return check_record(safe_load(path, "student"), str(path))


def num_branches(record: dict) -> int:
    """Branches a deployer can choose from: B for a multi-branch student, 1 otherwise."""
    return max(1, int(record.get("branches", 1))) if record.get("multi_branch") else 1


def branch_accuracies(record: dict) -> tuple[list[Optional[float]], str]:
    """Per-branch logged accuracy and the split it came from: ``val`` (so that picking the best
    branch does not peek at the test split), else ``test``."""
    m = record.get("metrics", {})
    n = num_branches(record)
    for split in ("val", "test"):
        keys = [f"{split}_acc_b{i}" for i in range(n)]
        if all(k in m for k in keys):
            return [float(m[k]) for k in keys], split
        if n == 1 and f"{split}_acc" in m:  # one branch: evaluate logs no per-branch keys
            return [float(m[f"{split}_acc"])], split
    return [None] * n, "none"


def parse_branch(branch: Branch) -> Branch:
    """``"best"``, ``"all"`` or a branch number (CLI strings such as ``"2"`` become ints)."""
    if isinstance(branch, bool):
        raise KdrayError(f"branch {branch!r} is not allowed; allowed: best, all or a branch number")
    if isinstance(branch, int):
        return branch
    s = str(branch).strip().lower()
    if s in ("best", "all"):
        return s
    try:
        return int(s)
    except ValueError:
        raise KdrayError(f"branch {branch!r} is not allowed; allowed: best, all or a branch number") from None


def resolve_branch(record: dict, branch: Branch) -> Optional[int]:
    """``None`` for the whole student (EKD: the ensemble of all branches), else a branch index.

    ``best`` picks the multi-branch student's branch with the highest logged ``val_acc_b{i}``
    (the test split never chooses; ``test_acc_b{i}`` only when the val ones are missing; ties: the
    lowest index); for a single
    student it means the student itself. A single student allows best, all and 0 only.
    """
    branch = parse_branch(branch)
    multi = bool(record.get("multi_branch"))
    n = num_branches(record)
    if branch == "all":
        return None
    if branch == "best":
        if not multi:
            return None
        accs, split = branch_accuracies(record)
        if split == "none":
            raise KdrayError("--branch best: the student has no logged per-branch accuracy "
                             f"(test_acc_b*/val_acc_b*); choose --branch all or 0..{n - 1}")
        return max(range(n), key=lambda i: (accs[i], -i))
    if not 0 <= branch < n:
        allowed = f"0..{n - 1}" if n > 1 else "0"
        kind = f"a {n}-branch student" if multi else "a single-branch student"
        raise KdrayError(f"branch {branch} does not exist in {kind}; allowed: best, all or {allowed}")
    return branch if multi else None


def logged_accuracy(record: dict, branch: Optional[int]) -> Optional[float]:
    """The accuracy the run logged for what gets exported (ensemble/single: test_acc)."""
    m = record.get("metrics", {})
    key = "test_acc" if branch is None or num_branches(record) == 1 else f"test_acc_b{branch}"
    return float(m[key]) if key in m else None


def deploy_module(record: dict, branch: Branch = "all") -> nn.Module:
    """The deploy module for ``record`` ([0, 1] images -> logits), on CPU in eval mode.

    Built from the student weights only: ``rebuild_student`` loads ``record["state_dict"]``
    strictly, so a record carrying anything else (say FEED translators) is refused.
    """
    from kdray.models import export_module
    from kdray.train.student_file import rebuild_student

    check_record(record)
    b = resolve_branch(record, branch)
    try:
        student = rebuild_student(record)
    except RuntimeError as exc:  # load_state_dict(strict=True): missing or unexpected keys
        first = str(exc).strip().splitlines()[0]
        raise KdrayError(f"student weights do not fit {record['arch']!r}: {first[:200]}") from None
    net = export_module(student, b)
    return Deployed(net, record["mean"], record["std"]).eval()


def _describe(record: dict, b: Optional[int]) -> str:
    if b is not None:
        return f"branch {b}"
    return "ensemble" if record.get("multi_branch") and num_branches(record) > 1 else "student"


# ---------------------------------------------------------------------------------------------
# re-check


def _recheck_tolerance(cfg, n: int, device="cpu") -> tuple[float, str]:
    """How far the re-checked accuracy may be from the logged one and still ``match``."""
    if cfg.device == "cpu" and cfg.amp != "bf16" and torch.device(device).type == "cpu":
        # logged by evaluate() in float32 on CPU: same weights, bit-identical inputs, same batches,
        # so the predictions are the same; the tolerance only absorbs float rounding of the ratio
        return 1e-6, "logged in float32 on CPU: identical predictions expected"
    # logged possibly on a GPU (other kernels) or under bf16 autocast (about 3 significant digits
    # per logit): an image whose top two logits are that close may flip. Allow one image or 0.2% of
    # the split, whichever is more (a 1-epoch resnet8 flipped 1 of 800 images between float32 and
    # bf16); a wrong branch, wrong weights or wrong normalisation moves accuracy by far more.
    tol = max(1.0 / max(n, 1), 0.002) + 1e-6
    return tol, (f"logged with amp={cfg.amp!r} on device={cfg.device!r}, re-checked on {device} (GPU or bf16 possible): "
                 f"up to {tol * n:.0f} image(s) may flip")


def load_test_split(record: dict):
    """``(config, test Split)`` of the record's data: ``load_data(from_dict(record["config"]))``.

    The test split is fixed by the data code (its own split seed), so it is the split the run
    was tested on. A KdrayError with the reason when the data cannot be loaded or no longer fits.
    """
    from kdray.data.sources import load_data
    from kdray.train.config import from_dict

    try:
        cfg = from_dict(dict(record["config"]), "the student's config")
        data = load_data(cfg)
    except Exception as exc:  # KdrayError, OSError (missing folder), download errors, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KdrayError(f"cannot re-check the accuracy: dataset {record['config'].get('dataset')!r} "
                         f"could not be loaded ({reason[:200]}); pass recheck=False / --no-recheck to skip") from None
    if data.classes != list(record["classes"]):
        raise KdrayError(f"cannot re-check the accuracy: the dataset's classes now differ from the student's "
                         f"({len(data.classes)} vs {len(record['classes'])})")
    if data.image_size != int(record["image_size"]):
        raise KdrayError(f"cannot re-check the accuracy: images load at {data.image_size}px, "
                         f"the student wants {record['image_size']}px")
    return cfg, data.test


@torch.no_grad()
def predict(module: nn.Module, x_uint8: torch.Tensor, *, device="cpu", batch: int = 512) -> torch.Tensor:
    """Predicted classes (CPU int64) of a [0, 1]-input module for uint8 images [N, 3, H, W]."""
    dev = torch.device(device)
    preds = [module(x_uint8[i:i + batch].to(dev).float().div(255.0)).argmax(1).cpu()
             for i in range(0, len(x_uint8), batch)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def recheck_accuracy(module: nn.Module, record: dict, *, device="cpu", batch: Optional[int] = None,
                  split=None) -> dict:
    """Accuracy of ``module`` ([0, 1] images -> logits) on the test split of the record's data,
    in batches of ``eval_batch_size`` in order, as ``evaluate`` ran it."""
    cfg, test = split if split is not None else load_test_split(record)
    correct = int((predict(module, test.x, device=device, batch=int(batch or cfg.eval_batch_size)) == test.y).sum())
    n = len(test.y)
    tol, why = _recheck_tolerance(cfg, n, device)
    return {"acc": correct / max(n, 1), "correct": correct, "n": n, "tolerance": tol, "tolerance_reason": why}


# ---------------------------------------------------------------------------------------------
# export


def _export_program(module: nn.Module, size: int, path_dir: Path) -> tuple[str, str, Optional[str]]:
    """Write ``model.pt2`` (torch.export, dynamic batch); on failure ``model.ts`` (jit.trace)."""
    example = torch.rand(2, 3, size, size)
    try:
        batch = torch.export.Dim("batch")
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, path_dir / "model.pt2")
        return "model.pt2", "torch.export", None
    except Exception as exc:  # an op torch.export cannot capture: fall back to TorchScript
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        (path_dir / "model.pt2").unlink(missing_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    torch.jit.save(traced, str(path_dir / "model.ts"))
    return "model.ts", "torchscript", reason[:300]


def _load_program(path: Path) -> nn.Module:
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path), map_location="cpu").eval()


# The names ``export_student`` writes into its folder: the test for "an earlier kdray export" that
# ``overwrite`` may replace. Anything else in the folder belongs to someone else.
_INFO_FILE = "export.json"
_PAYLOAD_FILES = frozenset({"state_dict.pt", "model.pt2", "model.ts"})
_ALLOWED_HINT = (f"--overwrite replaces only an earlier kdray export "
                 f"({_INFO_FILE} plus {', '.join(sorted(_PAYLOAD_FILES))})")


def _foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that an earlier ``export_student`` did not write; [] for an earlier export.

    An export is recognised by its ``export.json`` (this format) and only the payload files that
    it lists: a folder that merely holds a ``state_dict.pt`` of its own is not an export.
    """
    try:
        info = json.loads((folder / _INFO_FILE).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        return [p.name for p in sorted(folder.iterdir())]
    recorded = info.get("files") if isinstance(info.get("files"), dict) else {}
    allowed = {_INFO_FILE} | (_PAYLOAD_FILES & set(recorded))
    # symlinks and folders are never written by export, even under an allowed name
    return [p.name for p in sorted(folder.iterdir())
            if p.name not in allowed or p.is_symlink() or not p.is_file()]


def _contains(folder: Path, path: Path) -> bool:
    """Whether ``path`` lies inside ``folder`` (at any depth), symlinks resolved."""
    try:
        Path(path).resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def _check_out(out: Path, dest: Path, overwrite: bool, source: Optional[Path]) -> None:
    """Refuse an ``out`` that export may not fill or replace, before any work is done.

    ``out`` is the folder as the caller named it (for messages), ``dest`` its absolute path.
    """
    if dest.exists() and not dest.is_dir():
        raise KdrayError(f"--out {out} exists and is not a folder")
    if not dest.is_dir() or not any(dest.iterdir()):
        return  # a new or empty folder: nothing of anyone's can be lost
    if not overwrite:
        raise KdrayError(f"--out {out} exists and is not empty; pass --overwrite or choose another folder")
    if source is not None and _contains(dest, source):
        # replacing this folder would delete the very student being exported (and, in a run
        # folder, its checkpoints): never, whatever the folder looks like
        raise KdrayError(f"--out {out} contains the student being exported ({source}); "
                         f"{_ALLOWED_HINT}, never the student's own folder; choose another --out")
    foreign = _foreign_entries(dest)
    if foreign:
        shown = ", ".join(repr(n) for n in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise KdrayError(f"--out {out} holds files kdray export did not write ({shown}); "
                         f"{_ALLOWED_HINT}; choose another --out or empty the folder yourself")


def _remove_old_export(old: Path) -> bool:
    """Delete a set-aside earlier export by name (never ``rmtree``); False if anything else remains."""
    if old.is_symlink():  # ``out`` was a link: drop the link, leave the folder it pointed to alone
        old.unlink()
        return True
    for name in sorted(_PAYLOAD_FILES | {_INFO_FILE}):
        (old / name).unlink(missing_ok=True)
    try:
        old.rmdir()  # fails, keeping them, if files someone else wrote turned up meanwhile
    except OSError:
        return False
    return True


def _move_into_place(tmp: Path, out: Path) -> Optional[Path]:
    """Rename ``tmp`` to ``out``; an existing ``out`` is set aside first and removed only after.

    The swap is two renames in one folder, so ``out`` is at every moment either the complete old
    export or the complete new one (or briefly absent), never a mixture. Returns the set-aside
    folder if it could not be removed completely (it then held more than an earlier export).
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.monotonic_ns()}")
        out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is None or _remove_old_export(old):
        return None
    return old


def _export_info(record: dict, module: nn.Module, branch: Branch, b: Optional[int], *, prog_name: str, fmt: str,
                 fallback_reason: Optional[str], export_s: float) -> dict:
    """``export.json``'s description of what is exported (before re-check, latency and hashes)."""
    m = record.get("metrics", {})
    accs, selected_by = branch_accuracies(record)
    requested = parse_branch(branch)
    return {
        "format": EXPORT_FORMAT,
        "program_format": fmt,
        "program": prog_name,
        "export_fallback_reason": fallback_reason,
        "arch": record["arch"],
        "method": record.get("method"),
        "dataset": record.get("dataset"),
        "multi_branch": bool(record.get("multi_branch")),
        "branches": num_branches(record),
        "split_stage": int(record["split_stage"]),
        "branch_requested": str(requested),
        "branch": _describe(record, b),
        "branch_index": b,
        "branch_selected_by": f"{selected_by}_acc_b*" if requested == "best" and b is not None else None,
        "branch_accuracies_logged": accs if num_branches(record) > 1 else None,
        "num_classes": int(record["num_classes"]),
        "classes": list(record["classes"]),
        "image_size": int(record["image_size"]),
        "input": "float32 images in [0, 1], shape [N, 3, image_size, image_size], RGB; "
                 "normalisation (mean/std) is inside the model",
        "output": "logits [N, num_classes]",
        "mean": list(record["mean"]),
        "std": list(record["std"]),
        "params": sum(p.numel() for p in module.parameters()),
        # the parameter count the run logged for the same thing (a branch or the whole student)
        "params_logged": m.get("branch_params" if b is not None else "params"),
        "test_acc_logged": logged_accuracy(record, b),
        "export_s": round(export_s, 3),
    }


def _recheck_fields(loaded: nn.Module, record: dict, logged: Optional[float], device, split) -> dict:
    """The re-checked test accuracy of the program as loaded from disk, against the logged one."""
    t0 = time.perf_counter()
    res = recheck_accuracy(loaded, record, device=device, split=split)
    diff = None if logged is None else abs(res["acc"] - logged)
    return {
        "test_acc_rechecked": res["acc"], "test_images": res["n"], "test_correct_rechecked": res["correct"],
        "recheck_device": str(device), "recheck_s": round(time.perf_counter() - t0, 3),
        "recheck_tolerance": res["tolerance"], "recheck_tolerance_reason": res["tolerance_reason"],
        "recheck_diff": diff,
        "matches": None if diff is None else diff <= res["tolerance"],
    }


def _fill_export_folder(folder: Path, record: dict, module: nn.Module, branch: Branch, b: Optional[int], *,
                        device, split, latency: bool, log: Callable[[str], None]) -> dict:
    """Write state dict, program and ``export.json`` into ``folder``; return the info dict."""
    size = int(record["image_size"])
    torch.save(module.state_dict(), folder / "state_dict.pt")
    t0 = time.perf_counter()
    prog_name, fmt, fallback_reason = _export_program(module, size, folder)
    export_s = time.perf_counter() - t0
    if fallback_reason:
        log(f"export: torch.export failed ({fallback_reason}); wrote TorchScript {prog_name} instead")
    info = _export_info(record, module, branch, b, prog_name=prog_name, fmt=fmt, fallback_reason=fallback_reason,
                        export_s=export_s)
    # re-check and time the program read back from disk: that is what a deployer gets
    loaded = _load_program(folder / prog_name).to(torch.device(device))
    if split is not None:
        info.update(_recheck_fields(loaded, record, info["test_acc_logged"], device, split))
    if latency:  # the one figure kdray logs and prints (LATENCY), of the program as exported
        on_cpu = loaded if torch.device(device).type == "cpu" else _load_program(folder / prog_name)
        info["latency_ms"] = cpu_latency_ms(on_cpu, size)
        info["latency"] = f"{LATENCY}, of the exported {info['branch']}"
    info["files"] = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
    (folder / _INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _write_beside_and_swap(out: Path, dest: Path, overwrite: bool, source: Optional[Path],
                           fill: Callable[[Path], dict], log: Callable[[str], None]) -> dict:
    """Run ``fill`` on a temporary folder beside ``dest``, then swap it in; on failure remove it.

    The folder is checked again just before the swap: exporting and re-checking take a while,
    and a file someone put into ``dest`` meanwhile must make the swap refuse, not be deleted.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        info = fill(tmp)
        _check_out(out, dest, overwrite, source)
        leftover = _move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if leftover is not None:
        log(f"export: warning: kept {leftover}: files other than an earlier export appeared in it during the export")
    return info


def _log_summary(info: dict, record: dict, out: Path, recheck: bool, log: Callable[[str], None]) -> None:
    msg = f"export: {info['branch']} of {record['arch']} ({info['params']} params, {info['program_format']}) -> {out}"
    if recheck:
        logged = info["test_acc_logged"]
        msg += f"; test acc re-checked {info['test_acc_rechecked']:.4f}" + (
            f", logged {logged:.4f}" if logged is not None else ", none logged")
    if "latency_ms" in info:
        msg += f"; latency {info['latency_ms']:.3g} ms (batch 1, CPU, 1 thread)"
    log(msg)
    if recheck and info["matches"] is False:
        log(f"export: warning: re-checked test accuracy {info['test_acc_rechecked']:.4f} differs from the logged "
            f"{info['test_acc_logged']:.4f} by more than {info['recheck_tolerance']:.2g}")


def export_student(
    record: dict,
    *,
    branch: Branch = "best",
    out: Union[str, Path],
    device="cpu",
    recheck: bool = True,
    overwrite: bool = False,
    latency: bool = True,
    log: Optional[Callable[[str], None]] = print,
    source: Optional[Union[str, Path]] = None,
) -> dict:
    """Export ``record`` (a ``student.pt`` dict) into the folder ``out``; return ``export.json``'s dict.

    ``branch``: ``"all"`` (the whole student; EKD: mean of the branch logits), ``"best"``
    (EKD: the branch with the highest logged validation accuracy; otherwise the student), or a branch
    number (a single student: 0 only). The program is exported on CPU (portable); the re-check
    loads it back from disk and runs it on ``device`` over the test split. Files are written into
    a temporary folder beside ``out`` and renamed into place at the end, so a failure leaves no
    half-written ``out``.

    An existing non-empty ``out`` is refused unless ``overwrite=True``, and even then it may only
    be an earlier kdray export (``export.json`` and the files it lists, nothing else) and must not
    contain ``source``, the ``student.pt`` the record was loaded from. Refusals delete nothing.
    """
    log = log or (lambda s: None)
    check_record(record)
    out = Path(out)
    dest = Path(os.path.abspath(out))  # so that "." or "x/.." still have a real parent to swap in
    source = Path(source) if source is not None else None
    _check_out(out, dest, overwrite, source)
    b = resolve_branch(record, branch)
    t_start = time.perf_counter()
    split = load_test_split(record) if recheck else None  # fail before exporting if the data is gone
    module = deploy_module(record, b if b is not None else "all")

    def fill(folder: Path) -> dict:
        return _fill_export_folder(folder, record, module, branch, b, device=device, split=split,
                                   latency=latency, log=log)

    info = _write_beside_and_swap(out, dest, overwrite, source, fill, log)
    info["total_s"] = round(time.perf_counter() - t_start, 3)
    _log_summary(info, record, out, recheck, log)
    return info


# ---------------------------------------------------------------------------------------------
# loading and latency


def read_export_info(out: Union[str, Path]) -> dict:
    path = Path(out) / "export.json"
    if not path.is_file():
        raise KdrayError(f"{out}: not a kdray export (no export.json)")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise KdrayError(f"{path}: unreadable ({exc})") from None


def load_exported(out: Union[str, Path]) -> nn.Module:
    """The exported program in ``out`` as a callable module ([0, 1] images -> logits)."""
    info = read_export_info(out)
    path = Path(out) / info.get("program", "model.pt2")
    if not path.is_file():
        raise KdrayError(f"{out}: {path.name} is missing")
    return _load_program(path)


def load_state_dict_module(out: Union[str, Path]) -> nn.Module:
    """The deploy module rebuilt from ``export.json`` + ``state_dict.pt`` (weights_only), eval mode."""
    from kdray.models import build_student, export_module

    info = read_export_info(out)
    multi = info["multi_branch"]
    student = build_student(info["arch"], info["num_classes"], branches=info["branches"],
                            split_stage=info["split_stage"], multi_branch=multi)
    module = Deployed(export_module(student, info["branch_index"] if multi else None), info["mean"], info["std"])
    module.load_state_dict(safe_load(Path(out) / "state_dict.pt", "exported state dict"))
    return module.eval()


def measure_latency_ms(module: nn.Module, image_size: int, *, batch: int = 1, device="cpu", warmup: int = 5,
                       iters: int = 30) -> float:
    """Median milliseconds per forward pass of a random [batch, 3, S, S] input (inference mode)."""
    if iters < 1 or warmup < 0 or batch < 1:
        raise KdrayError(f"latency: need iters >= 1, warmup >= 0, batch >= 1 (got {iters}, {warmup}, {batch})")
    dev = torch.device(device)
    module = module.to(dev)
    if isinstance(module, nn.Module) and hasattr(module, "eval"):
        try:
            module.eval()
        except NotImplementedError:  # exported-program modules refuse train()/eval()
            pass
    x = torch.rand(batch, 3, image_size, image_size, device=dev)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            sync()
            t0 = time.perf_counter()
            module(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    ms = float(statistics.median(times))
    if not math.isfinite(ms):
        raise KdrayError("latency: timing came out non-finite")
    return ms


#: kdray's one latency figure: the MLflow metric ``latency_ms`` of a run (its whole student, the
#: module whose accuracy the run logged) and ``latency_ms`` of ``kdray export`` (the exported
#: module: the whole student, or one branch) are both measured this way
LATENCY = "median ms per forward pass, batch 1, CPU, 1 thread, inference mode (5 warm-up passes, 30 timed)"


def cpu_latency_ms(module: nn.Module, image_size: int) -> float:
    """:data:`LATENCY` of ``module``: one thread, so the figure does not depend on how many cores the
    machine has or how busy they are with other work."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        return float(measure_latency_ms(module, image_size, batch=1, device="cpu"))
    finally:
        torch.set_num_threads(threads)


def student_latency_ms(student_pt: Union[str, Path]) -> float:
    """:data:`LATENCY` of the deployable whole student in ``student.pt`` (what ``kdray export
    --branch all`` exports: normalisation, then every branch)."""
    record = safe_load(student_pt, "student")
    return cpu_latency_ms(deploy_module(record, "all"), int(record["image_size"]))
