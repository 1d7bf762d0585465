"""Deployable students: the whole EKD ensemble or one branch (FEED translators are never part of
a student), as a plain state dict plus a ``torch.export`` program, accuracy re-checked.

The deployed module takes float images in [0, 1], shape [N, 3, H, W], and returns logits: the
data set's normalisation is inside it, so nothing else is needed to use it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .errors import KdrayError
from .models import export_module


class Deployed(nn.Module):
    """Normalise [0, 1] images with the training statistics, then the student's logits."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def branch_accuracies(record: dict) -> list[float]:
    m = record.get("metrics", {})
    return [float(m[f"test_acc_b{i}"]) if f"test_acc_b{i}" in m else float(m.get(f"val_acc_b{i}", 0.0))
            for i in range(int(record.get("branches", 1)))]


def resolve_branch(record: dict, branch: Union[str, int]) -> Optional[int]:
    """None for the whole student (EKD: the ensemble), else the branch index to export."""
    multi = bool(record.get("multi_branch")) and int(record.get("branches", 1)) >= 1
    n = int(record.get("branches", 1)) if multi else 1
    if branch == "all":
        return None
    if branch == "best":
        if not multi:
            return None
        accs = branch_accuracies(record)
        return max(range(n), key=lambda i: accs[i])
    if isinstance(branch, int) and not isinstance(branch, bool):
        if not 0 <= branch < n:
            raise KdrayError(f"branch {branch} does not exist; allowed: best, all or 0..{n - 1} "
                             f"(this student has {n} branch{'es' if n > 1 else ''})")
        return branch if multi else None
    raise KdrayError(f"branch {branch!r} is not allowed; allowed: best, all or a branch number")


def deploy_module(record: dict, branch: Union[str, int] = "all") -> nn.Module:
    """The deployable module for ``record`` (a ``student.pt`` dict), in eval mode."""
    from .engine import rebuild_student

    b = resolve_branch(record, branch)
    net = export_module(rebuild_student(record), b)
    return Deployed(net, record["mean"], record["std"]).eval()


def logged_accuracy(record: dict, branch: Optional[int]) -> Optional[float]:
    m = record.get("metrics", {})
    key = "test_acc" if branch is None else f"test_acc_b{branch}"
    return float(m[key]) if key in m else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def test_accuracy(module: nn.Module, record: dict, batch: int = 512) -> tuple[float, int]:
    """Accuracy of ``module`` ([0, 1] images -> logits) on the test split of the record's data."""
    from .config import from_dict
    from .data import load_data

    try:
        data = load_data(from_dict(record["config"]))
    except KdrayError as exc:
        raise KdrayError(f"cannot re-check the accuracy: {exc}") from None
    x, y = data.test.x, data.test.y
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            logits = module(x[i:i + batch].float() / 255.0)
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
    return correct / max(len(y), 1), len(y)


def export_student(record: dict, *, branch: Union[str, int] = "best", out: Path, recheck: bool = True,
                   overwrite: bool = False, log: Callable[[str], None] = print) -> dict:
    """Write ``state_dict.pt``, ``model.pt2`` (torch.export) and ``export.json`` into ``out``.

    The files are written into a temporary folder beside ``out`` and moved into place at the end,
    so a failure leaves nothing half-written. The exported program is loaded back and its test
    accuracy compared with the one the run logged."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise KdrayError(f"--out {out} exists and is not empty; pass --overwrite or choose another folder")
    b = resolve_branch(record, branch)
    module = deploy_module(record, b if b is not None else "all")
    size = int(record["image_size"])
    example = torch.rand(2, 3, size, size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        t0 = time.perf_counter()
        torch.save(module.state_dict(), tmp / "state_dict.pt")
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}})
        torch.export.save(program, tmp / "model.pt2")
        export_s = time.perf_counter() - t0
        what = "ensemble" if b is None and record.get("multi_branch") else ("student" if b is None else f"branch {b}")
        info = {
            "arch": record["arch"], "method": record["method"], "dataset": record["dataset"], "branch": what,
            "branch_index": b, "classes": record["classes"], "image_size": size,
            "input": "float images in [0, 1], shape [N, 3, H, W]; normalisation is inside the model",
            "mean": record["mean"], "std": record["std"],
            "params": sum(p.numel() for p in module.parameters()),
            "test_acc_logged": logged_accuracy(record, b), "export_s": round(export_s, 3),
        }
        if recheck:
            loaded = torch.export.load(tmp / "model.pt2").module()
            info["test_acc_rechecked"], n = test_accuracy(loaded, record)
            info["test_images"] = n
            logged = info["test_acc_logged"]
            # same weights, same images; normalisation is folded differently (x/255 vs uint8 * scale),
            # so a prediction on a float tie could flip: allow at most one image
            info["matches"] = logged is None or abs(info["test_acc_rechecked"] - logged) <= 1.0 / max(n, 1) + 1e-12
        info["files"] = {f.name: _sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / "export.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    acc = info.get("test_acc_rechecked")
    log(f"export: {what} of {record['arch']} -> {out} ({info['params']} params"
        + (f", test acc re-checked {acc:.4f}, logged {info['test_acc_logged']}" if acc is not None else "") + ")")
    if recheck and not info["matches"]:
        log(f"export: warning: the re-checked accuracy {acc:.4f} differs from the logged {info['test_acc_logged']:.4f}")
    return info


def load_exported(out: Path) -> nn.Module:
    """The exported program in ``out`` as a callable module ([0, 1] images -> logits)."""
    return torch.export.load(Path(out) / "model.pt2").module()


def measure_latency_ms(module: nn.Module, image_size: int, *, batch: int = 1, device="cpu", warmup: int = 5,
                       iters: int = 30) -> float:
    """Median milliseconds per forward pass of a [batch, 3, S, S] input."""
    dev = torch.device(device)
    module = module.to(dev).eval()
    x = torch.rand(batch, 3, image_size, image_size, device=dev)
    times = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            module(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))
