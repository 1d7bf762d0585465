"""How a student is measured: its parameter count, and its accuracy and loss on a split (of the
ensemble and of every branch), exact across DDP ranks."""

from __future__ import annotations

import torch
from torch import nn

from kdray.core.device import all_reduce
from kdray.data.loader import BatchLoader


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def evaluate(student: nn.Module, loader: BatchLoader, autocast) -> dict:
    """Accuracy of the evaluated logits and of every branch, exact across ranks."""
    student.eval()
    nb = int(getattr(student, "num_branches", 1))
    dev = loader.device
    correct = torch.zeros(nb + 1, device=dev, dtype=torch.float64)
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    n = torch.zeros((), device=dev, dtype=torch.float64)
    for x, y in loader:
        with autocast():
            out = student(x)
        logits = out["logits"].float()
        correct[0] += (logits.argmax(1) == y).sum()
        if nb > 1:
            correct[1:] += (out["branch_logits"].float().argmax(2) == y.unsqueeze(0)).sum(1)
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum")
        n += y.numel()
    stats = all_reduce(torch.cat([correct, loss_sum.view(1), n.view(1)])).tolist()
    return _accuracy_metrics(stats, nb)


def _accuracy_metrics(stats: list, nb: int) -> dict:
    total = max(stats[-1], 1.0)
    res = {"acc": stats[0] / total, "loss": stats[-2] / total}
    if nb > 1:
        branch = [c / total for c in stats[1 : nb + 1]]
        res.update({f"acc_b{b}": a for b, a in enumerate(branch)})
        res["acc_best_branch"] = max(branch)
        res["best_branch"] = int(max(range(nb), key=lambda b: branch[b]))
    return res
