"""A teacher set's ``manifest.json``: what is in the set (the teacher files, their sha256 and
accuracies), for which classes and from which recipe. The one reader and the one writer, used
by ``kdray teachers train`` and ``kdray teachers import`` alike."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from kdray._version import __version__
from kdray.core.errors import KdrayError
from kdray.core.io import atomic_write

MANIFEST = "manifest.json"
FORMAT = "kdray-teachers/1"


def read_manifest(path: str | Path) -> dict:
    """The manifest of the teacher set in folder ``path``, checked to list teachers and classes."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise KdrayError(f"teachers: {mf} not found; create teachers with `kdray teachers train --out {path}`")
    try:
        manifest = json.loads(mf.read_text())
        assert isinstance(manifest.get("teachers"), list) and manifest["teachers"]
        assert isinstance(manifest.get("classes"), list)
    except (ValueError, AssertionError):
        raise KdrayError(f"teachers: {mf} is not a valid kdray teacher manifest") from None
    return manifest


def write_manifest(folder: Path, cfg, *, image_size: int, classes: list, teachers: list[dict], recipe: dict,
                   imported: bool = False) -> dict:
    """Write (atomically) and return the manifest of the set in ``folder``: ``teachers`` its entries
    (``file``, ``arch``, ``sha256``, accuracies, ...), ``recipe`` how they were made (for an imported
    set: what their accuracies were measured on). Written last: a folder without one is never used."""
    manifest = {
        "format": FORMAT, "kdray_version": __version__, "dataset": cfg.dataset,
        "train_fraction": cfg.train_fraction, "image_size": image_size, "classes": list(classes),
        "teachers": teachers, **({"imported": True} if imported else {}), "recipe": recipe,
    }
    atomic_write(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return manifest


def teacher_archs(teachers: Optional[str]) -> Optional[list]:
    """The teachers' architectures for the run's tags (None when there are none or no manifest)."""
    if not teachers:
        return None
    try:
        return [t["arch"] for t in read_manifest(teachers)["teachers"]]
    except KdrayError:  # the manifest is verified again, with its own message, when teachers load
        return None
