"""How fast a deployable student answers: median milliseconds per forward pass, and kdray's one
latency figure (:data:`LATENCY`: batch 1, one CPU thread) that runs and exports both log."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Union

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.core.io import safe_load


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
    from kdray.deploy.deployed import deploy_module

    record = safe_load(student_pt, "student")
    return cpu_latency_ms(deploy_module(record, "all"), int(record["image_size"]))
