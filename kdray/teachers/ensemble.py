"""Teachers: loaded from a verified teacher directory, frozen, and the engine's source of teacher
outputs computed live. (Training them, `kdray teachers train`, is a stage above the engine.)

A teacher directory holds ``manifest.json`` and one ``teacher_<i>.pt`` state dict per teacher.
The ensemble is a frozen module list: eval mode, no grad, never wrapped in DDP, never in the
optimizer, and run under ``torch.inference_mode``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from kdray.core.errors import KdrayError
from kdray.core.io import first_line, safe_load, sha256_file
from kdray.distill.base import TeacherInfo
from kdray.models import StagedModel, build_model
from kdray.teachers.manifest import read_manifest


class TeacherEnsemble(nn.Module):
    """Frozen teachers. ``forward(x, feats)`` returns ``{"logits": [K,N,C], "feats": [K maps]}``."""

    def __init__(self, models: list[StagedModel]):
        super().__init__()
        self.members = nn.ModuleList(models)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # teachers never leave eval mode
        return super().train(False)

    @property
    def info(self) -> TeacherInfo:
        return TeacherInfo(len(self.members), tuple(int(m.stage_channels[-1]) for m in self.members))

    def forward(self, x: torch.Tensor, feats: bool = False) -> dict:
        with torch.inference_mode():
            if feats:
                outs = [m.forward_features(x) for m in self.members]
                logits = torch.stack([o[0] for o in outs])
                maps = [o[1][-1] for o in outs]
            else:
                logits = torch.stack([m(x) for m in self.members])
                maps = []
        # clone outside inference mode so the tensors may enter the student's autograd graph
        return {"logits": logits.clone(), "feats": [f.clone() for f in maps]}


class LiveTeacherOutputs:
    """The engine's source of teacher outputs, computed live: the frozen ensemble run on each
    batch under the step's autocast. ``outputs(x, keys)`` -> ``{"logits": [K,N,C], "feats": [...]}``
    (``keys``, the batch's views, are not needed: the batch is the views); feature maps only when
    the method asks for them (they cost memory). ``images`` counts the images the teachers ran on."""

    def __init__(self, ensemble: TeacherEnsemble, autocast: Callable, feats: bool):
        self.ensemble, self.autocast, self.feats = ensemble, autocast, feats
        self.images = 0

    @property
    def info(self):
        return self.ensemble.info

    @property
    def device(self) -> torch.device:
        return next(self.ensemble.parameters()).device

    def __call__(self, x: torch.Tensor, keys=None) -> dict:
        self.images += int(x.shape[0])
        with self.autocast():
            return self.ensemble(x, feats=self.feats)


def load_teachers(path: str | Path, classes: Optional[list] = None, device="cpu") -> TeacherEnsemble:
    """Load and verify a teacher directory; ``classes`` must match the dataset's when given."""
    path = Path(path)
    manifest = read_manifest(path)
    if classes is not None and list(manifest["classes"]) != list(classes):
        raise KdrayError(
            f"teachers in {path} were trained on {manifest.get('dataset')!r} with classes "
            f"{_short(manifest['classes'])}, but the dataset has classes {_short(classes)}"
        )
    models = []
    for entry in manifest["teachers"]:
        file = path / entry["file"]
        if not file.is_file():
            raise KdrayError(f"teachers: {file} listed in the manifest is missing")
        digest = sha256_file(file)
        if digest != entry.get("sha256"):
            raise KdrayError(f"teachers: {file} is corrupt (sha256 {digest[:12]}... does not match the manifest)")
        state = safe_load(file, "teacher file")
        model = build_model(entry["arch"], len(manifest["classes"]))
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as exc:
            raise KdrayError(f"teachers: {file} does not fit arch {entry['arch']!r} ({first_line(exc)})") from None
        models.append(model)
    return TeacherEnsemble(models).to(device)


def _short(items, n=4) -> str:
    items = list(items)
    return "[" + ", ".join(map(str, items[:n])) + (", ..." if len(items) > n else "") + "]"
