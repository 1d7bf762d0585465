"""The re-check of an export: the test split of the student's data loaded again, the exported
program run over it as ``evaluate`` ran the student, and its accuracy compared with the logged one
within a stated tolerance."""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.core.io import first_line
from kdray.data.access import eval_images


def _logged_in_fp32_on_cpu(record: dict, cfg) -> bool:
    """Whether the record's accuracies were measured in fp32 on a CPU. A record says where and in
    which precision (``evaluation``: fp32 always, see ``kdray.core.device.Precision``); one written
    before it does not, and was evaluated under bf16 autocast unless ``amp`` was off (``auto`` too
    picks bf16 on a CPU with native bf16), on the configured device."""
    evaluation = record.get("evaluation")
    if isinstance(evaluation, dict):
        return evaluation.get("precision") == "fp32" and evaluation.get("device") == "cpu"
    return cfg.amp == "off" and cfg.device == "cpu"


def _recheck_tolerance(record: dict, cfg, n: int, device="cpu") -> tuple[float, str]:
    """How far the re-checked accuracy may be from the logged one and still ``match``."""
    if _logged_in_fp32_on_cpu(record, cfg) and torch.device(device).type == "cpu":
        # logged by evaluate() in float32 on CPU: same weights, bit-identical inputs, same batches,
        # so the predictions are the same; the tolerance only absorbs float rounding of the ratio
        return 1e-6, "logged in float32 on CPU: identical predictions expected"
    # logged on a GPU (other kernels, TF32 convolutions) or, by a record from before evaluation was
    # fp32, under bf16 autocast (about 3 significant digits per logit): an image whose top two
    # logits are that close may flip. Allow one image or 0.2% of the split, whichever is more (a
    # 1-epoch resnet8 flipped 1 of 800 images between float32 and bf16); a wrong branch, wrong
    # weights or wrong normalisation moves accuracy by far more.
    tol = max(1.0 / max(n, 1), 0.002) + 1e-6
    where = record.get("evaluation") or {"device": cfg.device, "precision": f"amp={cfg.amp!r}"}
    return tol, (f"logged in {where.get('precision')} on {where.get('device')}, re-checked in float32 on {device}: "
                 f"up to {tol * n:.0f} image(s) may flip")


def load_test_split(record: dict):
    """``(config, DataBundle)`` of the record's data: ``load_data(from_dict(record["config"]))``.

    The test split is fixed by the data code (its own split seed), so it is the split the run
    was tested on. A KdrayError with the reason when the data cannot be loaded or no longer fits.
    """
    from kdray.data.sources import load_data
    from kdray.training.config import from_dict

    try:
        cfg = from_dict(dict(record["config"]), "the student's config")
        data = load_data(cfg)
    except Exception as exc:  # KdrayError, OSError (missing folder), download errors, ...
        reason = first_line(exc)
        raise KdrayError(f"cannot re-check the accuracy: dataset {record['config'].get('dataset')!r} "
                         f"could not be loaded ({reason[:200]}); pass recheck=False / --no-recheck to skip") from None
    if data.classes != list(record["classes"]):
        raise KdrayError(f"cannot re-check the accuracy: the dataset's classes now differ from the student's "
                         f"({len(data.classes)} vs {len(record['classes'])})")
    if data.image_size != int(record["image_size"]):
        raise KdrayError(f"cannot re-check the accuracy: images load at {data.image_size}px, "
                         f"the student wants {record['image_size']}px")
    return cfg, data


@torch.no_grad()
def predict(module: nn.Module, x_uint8: torch.Tensor, *, device="cpu", batch: int = 512) -> torch.Tensor:
    """Predicted classes (CPU int64) of a [0, 1]-input module for uint8 images [N, 3, H, W]."""
    dev = torch.device(device)
    preds = [module(x_uint8[i:i + batch].to(dev).float().div(255.0)).argmax(1).cpu()
             for i in range(0, len(x_uint8), batch)]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _count_correct(module: nn.Module, batches, device) -> tuple:
    """(correct, n) of ``module`` over ``(uint8 images, labels)`` batches."""
    correct = n = 0
    for x, y in batches:
        correct += int((predict(module, x, device=device, batch=len(x) or 1) == y).sum())
        n += len(y)
    return correct, n


def recheck_accuracy(module: nn.Module, record: dict, *, device="cpu", batch: Optional[int] = None,
                     split=None) -> dict:
    """Accuracy of ``module`` ([0, 1] images -> logits) on the test split of the record's data,
    in batches of ``eval_batch_size`` in order, as ``evaluate`` ran it."""
    cfg, data = split if split is not None else load_test_split(record)
    correct, n = _count_correct(module, eval_images(data, "test", int(batch or cfg.eval_batch_size)), device)
    tol, why = _recheck_tolerance(record, cfg, n, device)
    return {"acc": correct / max(n, 1), "correct": correct, "n": n, "tolerance": tol, "tolerance_reason": why}


def recheck_fields(loaded: nn.Module, record: dict, logged: Optional[float], device, split) -> dict:
    """``export.json``'s re-check fields: the test accuracy of the program as loaded from disk, and
    whether it matches the ``logged`` one."""
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
