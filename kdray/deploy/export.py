"""Deployable students: the whole EKD ensemble or one branch (FEED translators are never part of a
student), as a plain state dict plus a ``torch.export`` program, with the test accuracy re-checked.

Input contract of every deployed module: float images in [0, 1], shape [N, 3, H, W] (H = W =
``image_size`` from ``export.json``), RGB, resized the way the training data was; the output is
logits [N, num_classes] in the order of ``classes``. The data set's normalisation is inside the
module (buffers ``scale`` and ``shift``), computed exactly as :class:`kdray.data.loader.BatchLoader`
does it for ``evaluate``: for an image stored as uint8 ``u``, feeding ``u / 255`` gives the
bit-identical network input ``u * scale - shift`` that training-time evaluation saw. That
evaluation runs in fp32 whatever the run's ``amp`` (``kdray.core.device.Precision.evaluation``),
as the exported program does, so on CPU the re-check reproduces the logged test accuracy exactly.

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
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.core.io import first_line, safe_load, sha256_file
from kdray.deploy.deployed import (
    Branch,
    Deployed,
    branch_accuracies,
    branch_label,
    deploy_module,
    logged_accuracy,
    num_branches,
    parse_branch,
    resolve_branch,
)
from kdray.deploy.folder import EXPORT_FORMAT, INFO_FILE, check_out, write_beside_and_swap
from kdray.deploy.latency import LATENCY, cpu_latency_ms
from kdray.deploy.recheck import load_test_split, recheck_fields
from kdray.training.student_file import check_record


# ---------------------------------------------------------------------------------------------
# writing an export
# ---------------------------------------------------------------------------------------------
def _export_program(module: nn.Module, size: int, folder: Path) -> tuple[str, str, Optional[str]]:
    """Write ``model.pt2`` (torch.export, dynamic batch), or on failure ``model.ts`` (jit.trace):
    ``(file name, program format, why torch.export failed or None)``."""
    example = torch.rand(2, 3, size, size)
    try:
        batch = torch.export.Dim("batch")
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, folder / "model.pt2")
        return "model.pt2", "torch.export", None
    except Exception as exc:  # an op torch.export cannot capture: fall back to TorchScript
        reason = first_line(exc)
        (folder / "model.pt2").unlink(missing_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(module, example)
    torch.jit.save(traced, str(folder / "model.ts"))
    return "model.ts", "torchscript", reason[:300]


def _load_program(path: Path) -> nn.Module:
    """An exported program read back from disk, callable like the module it came from."""
    if path.suffix == ".pt2":
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path), map_location="cpu").eval()


def _export_info(record: dict, module: nn.Module, branch: Branch, branch_index: Optional[int], *, program: str,
                 program_format: str, fallback_reason: Optional[str], export_s: float) -> dict:
    """``export.json``'s description of what is exported (before re-check, latency and hashes)."""
    m = record.get("metrics", {})
    accs, selected_by = branch_accuracies(record)
    requested = parse_branch(branch)
    return {
        "format": EXPORT_FORMAT,
        "program_format": program_format,
        "program": program,
        "export_fallback_reason": fallback_reason,
        "arch": record["arch"],
        "method": record.get("method"),
        "dataset": record.get("dataset"),
        "multi_branch": bool(record.get("multi_branch")),
        "branches": num_branches(record),
        "split_stage": int(record["split_stage"]),
        "branch_requested": str(requested),
        "branch": branch_label(record, branch_index),
        "branch_index": branch_index,
        "branch_selected_by": f"{selected_by}_acc_b*" if requested == "best" and branch_index is not None else None,
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
        "params_logged": m.get("branch_params" if branch_index is not None else "params"),
        "test_acc_logged": logged_accuracy(record, branch_index),
        "export_s": round(export_s, 3),
    }


def _fill_export_folder(folder: Path, record: dict, module: nn.Module, branch: Branch, branch_index: Optional[int],
                        *, device, split, latency: bool, log: Callable[[str], None]) -> dict:
    """Write state dict, program and ``export.json`` into ``folder``; return the info dict."""
    size = int(record["image_size"])
    torch.save(module.state_dict(), folder / "state_dict.pt")
    t0 = time.perf_counter()
    program, program_format, fallback_reason = _export_program(module, size, folder)
    export_s = time.perf_counter() - t0
    if fallback_reason:
        log(f"export: torch.export failed ({fallback_reason}); wrote TorchScript {program} instead")
    info = _export_info(record, module, branch, branch_index, program=program, program_format=program_format,
                        fallback_reason=fallback_reason, export_s=export_s)
    # re-check and time the program read back from disk: that is what a deployer gets
    loaded = _load_program(folder / program).to(torch.device(device))
    if split is not None:
        info.update(recheck_fields(loaded, record, info["test_acc_logged"], device, split))
    if latency:  # the one figure kdray logs and prints (LATENCY), of the program as exported
        on_cpu = loaded if torch.device(device).type == "cpu" else _load_program(folder / program)
        info["latency_ms"] = cpu_latency_ms(on_cpu, size)
        info["latency"] = f"{LATENCY}, of the exported {info['branch']}"
    info["files"] = {f.name: sha256_file(f) for f in sorted(folder.iterdir())}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _log_summary(info: dict, record: dict, out: Path, recheck: bool, log: Callable[[str], None]) -> None:
    """One line of what was exported where; a second when the re-check does not match."""
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
    check_out(out, dest, overwrite, source)
    branch_index = resolve_branch(record, branch)
    t_start = time.perf_counter()
    split = load_test_split(record) if recheck else None  # fail before exporting if the data is gone
    module = deploy_module(record, branch_index if branch_index is not None else "all")

    def fill(folder: Path) -> dict:
        return _fill_export_folder(folder, record, module, branch, branch_index, device=device, split=split,
                                   latency=latency, log=log)

    info = write_beside_and_swap(out, dest, overwrite, source, fill, log)
    info["total_s"] = round(time.perf_counter() - t_start, 3)
    _log_summary(info, record, out, recheck, log)
    return info


# ---------------------------------------------------------------------------------------------
# reading an export
# ---------------------------------------------------------------------------------------------
def read_export_info(out: Union[str, Path]) -> dict:
    """``export.json`` of the export in ``out``."""
    path = Path(out) / INFO_FILE
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

