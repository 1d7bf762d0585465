"""Bring your own teachers: classifiers trained elsewhere become a verified kdray teacher set
(``kdray teachers import``), usable by ``kdray train --teachers`` like one kdray trained.

A source is a state-dict file (loaded tensors-only) in kdray's key layout (``stem.*``,
``stages.*``, ``head.*``) or torchvision's (``conv1.*``, ``layer1.*``, ``fc.*``), or a torchvision
weights name. Each is loaded strictly into its architecture built for the dataset's classes, its
val and test accuracy are measured on the dataset the way kdray evaluates, and the set is written
the way ``kdray teachers train`` writes one: ``teacher_<i>.pt`` (kdray-layout state dicts) and
``manifest.json``. Nothing is written unless every source fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from kdray.core.device import Precision, pick_device
from kdray.core.errors import KdrayError, choice_error
from kdray.core.io import FolderTaken, atomic_save, fill_beside, safe_load, sha256_file
from kdray.data.access import loader_for
from kdray.data.bundle import DataBundle
from kdray.data.sources import load_data
from kdray.models import StagedModel, Student, build_model
from kdray.models.measure import count_params, evaluate
from kdray.models.tv import (
    from_torchvision_state,
    load_strict,
    load_torchvision_weights,
    resolve_weights,
    torchvision_names,
    wrap_torchvision,
)
from kdray.teachers.manifest import write_manifest

LAYOUTS = ("auto", "kdray", "torchvision")
#: the top-level modules of every StagedModel: a state dict whose keys all start so is kdray's
KDRAY_PREFIXES = ("stem.", "stages.", "head.")
#: where training scripts commonly nest the state dict in a checkpoint
WRAPPER_KEYS = ("state_dict", "model")
#: key prefixes added by wrappers: DDP, torch.compile, and a kdray single-branch Student (student.pt)
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


@dataclass
class Imported:
    """One teacher, loaded and measured, not yet written."""

    model: StagedModel
    source: str  # the file's path or the resolved torchvision weights name
    layout: str  # the key layout it was read in: kdray or torchvision
    seed: Optional[int] = None  # the seed of a re-initialised classifier, if any
    reinitialised: Optional[str] = None  # the classifier layer replaced to fit the dataset's classes
    accuracy: Optional[dict] = None  # {"val_acc", "test_acc"}


# --- reading a state-dict file -------------------------------------------------------------------
def read_state_dict(path: str | Path) -> dict:
    """The state dict in ``path``: a plain one, or one under "state_dict" / "model" of a checkpoint,
    with wrapper prefixes ("module." of DDP, ...) removed. Loaded with ``weights_only=True``."""
    obj = safe_load(path, "teacher file")
    state = _unwrap(obj)
    if state is None:
        raise KdrayError(f"teacher file {path} holds no state dict (a dict of tensors by parameter name, or one "
                         f"under {' or '.join(repr(k) for k in WRAPPER_KEYS)})")
    return strip_wrapper_prefixes(state)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _unwrap(obj) -> Optional[dict]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in WRAPPER_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    return None


def strip_wrapper_prefixes(state: dict) -> dict:
    """Remove a prefix every key shares ("module.", "_orig_mod.", "model."), repeatedly (a
    compiled model inside DDP has both)."""
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            return state
        state = {k[len(prefix):]: v for k, v in state.items()}


def detect_layout(state: dict) -> str:
    """"kdray" when every key belongs to a StagedModel's stem, stages or head, else "torchvision"."""
    return "kdray" if all(k.startswith(KDRAY_PREFIXES) for k in state) else "torchvision"


# --- one source -> one StagedModel ------------------------------------------------------------
def load_file_teacher(path: str, arch: str, layout: str, num_classes: int) -> Imported:
    """The model of ``arch`` (``num_classes`` outputs) holding the weights in ``path``."""
    state = read_state_dict(path)
    layout = detect_layout(state) if layout == "auto" else layout
    try:
        model = _model_from_state(state, arch, layout, num_classes)
    except KdrayError as exc:  # name the file and how it was read, in the same line
        raise KdrayError(f"teacher file {path} ({layout} layout): {exc}") from None
    return Imported(model, str(Path(path).resolve()), layout)


def _model_from_state(state: dict, arch: str, layout: str, num_classes: int) -> StagedModel:
    if layout == "torchvision":
        if arch not in torchvision_names():
            first = ", ".join(list(state)[:3])
            raise KdrayError(f"keys ({first}, ...) are not kdray's ({', '.join(p + '*' for p in KDRAY_PREFIXES)}) "
                             f"and arch {arch!r} is not a torchvision model, so they cannot be torchvision's")
        return from_torchvision_state(arch, state, num_classes)
    model = build_model(arch, num_classes)
    load_strict(model, state, f"weights for {arch!r} ({num_classes} classes)")
    return model


def load_weights_teacher(weights: str, arch: str, num_classes: int, seed: int) -> Imported:
    """Torchvision ``arch`` with pretrained ``weights``; a classifier re-initialised (seeded, so an
    import is reproducible) when the dataset's classes differ from the weights'."""
    member = resolve_weights(arch, weights)
    with torch.random.fork_rng():  # leaves the caller's RNG streams untouched
        torch.manual_seed(seed)
        model, reset = load_torchvision_weights(arch, weights, num_classes)
    return Imported(wrap_torchvision(model, arch, num_classes), str(member), "torchvision",
                    seed=seed if reset else None, reinitialised=reset)


# --- measuring --------------------------------------------------------------------------------
def measure_accuracy(model: StagedModel, data: DataBundle, cfg, precision: Precision) -> dict:
    """Val and test accuracy, evaluated as kdray evaluates a run (same loader, normalisation,
    precision and memory format)."""
    model = model.to(precision.device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    student = Student(model)
    accuracy = {}
    for split in ("val", "test"):
        loader = loader_for(data, split, cfg.eval_batch_size, device=precision.device,
                            channels_last=precision.channels_last)
        accuracy[f"{split}_acc"] = evaluate(student, loader, precision.evaluation)["acc"]
    model.to("cpu", memory_format=torch.contiguous_format)
    return accuracy


# --- writing the teacher set --------------------------------------------------------------------
def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise KdrayError(f"--out {out} exists and is not an empty folder; kdray never overwrites it: "
                         "choose a new or empty folder")


def _entry(teacher: Imported, file: Path) -> dict:
    entry = {"file": file.name, "arch": teacher.model.arch, "source": teacher.source, "layout": teacher.layout,
             # no training seed: kdray did not train this one (`teachers show` names its source)
             "seed": teacher.seed, "imported": True, **teacher.accuracy,
             "params": count_params(teacher.model), "sha256": sha256_file(file)}
    if teacher.reinitialised:
        entry["reinitialised"] = teacher.reinitialised
    return entry


def write_teacher_set(out: Path, teachers: list[Imported], cfg, data: DataBundle) -> dict:
    """Write the set into a hidden folder next to ``out``, the manifest last, then rename it to
    ``out`` in one step: ``out`` never holds half a set, and an ``out`` someone filled meanwhile
    is left as it is."""
    data_keys = ("dataset", "train_fraction", "val_fraction", "data_seed", "image_size")

    def fill(staging: Path) -> dict:
        entries = [_entry(t, atomic_save(_cpu_state(t.model), staging / f"teacher_{i}.pt"))
                   for i, t in enumerate(teachers)]
        # the recipe: what the accuracies were measured on (kdray's own sets record their training recipe)
        return write_manifest(staging, cfg, image_size=data.image_size, classes=data.classes, teachers=entries,
                              recipe={"imported": True, **{k: getattr(cfg, k) for k in data_keys}}, imported=True)

    try:
        manifest, _ = fill_beside(out, fill, tag="importing")
    except FolderTaken:
        raise KdrayError(f"--out {out} was filled while the teachers were imported; nothing written") from None
    return manifest


def _cpu_state(model: StagedModel) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# --- the whole import ---------------------------------------------------------------------------
def _archs_per_source(archs: Sequence[str], count: int) -> list[str]:
    archs = list(archs or [])
    if len(archs) == 1:
        return archs * count
    if len(archs) != count:
        raise KdrayError(f"{len(archs)} --arch given for {count} teacher source(s); give one --arch for all, "
                         "or one per source (files first, then --weights, in order)")
    return archs


def _check_request(sources: list[str], weights: list[str], layout: str, out: Path) -> None:
    if not sources and not weights:
        raise KdrayError("nothing to import: give state-dict FILEs and/or --weights NAME")
    if layout not in LAYOUTS:
        raise choice_error("layout", layout, LAYOUTS)
    missing = [s for s in sources if not Path(s).is_file()]
    if missing:
        raise KdrayError(f"teacher file {missing[0]} not found")
    _check_out(out)


def import_teachers(sources: Sequence[str | Path] = (), *, out: str | Path, cfg, archs: Sequence[str],
                    layout: str = "auto", weights: Sequence[str] = (),
                    log: Callable[[str], None] = print) -> dict:
    """Import teachers into the new or empty folder ``out``; returns its manifest.

    ``sources``: state-dict files; ``weights``: torchvision weights names, each one more teacher
    (after the files). ``archs``: one architecture for all, or one per source in that order.
    ``layout``: the files' key layout, "auto" (detected per file), "kdray" or "torchvision".
    ``cfg``: a RunConfig for the data keys (dataset, image size, splits), ``device`` and
    ``eval_batch_size``; the architectures are built for the dataset's classes.
    """
    out = Path(out)
    files, weights = [str(s) for s in sources], [str(w) for w in (weights or ())]
    _check_request(files, weights, layout, out)
    archs = _archs_per_source(archs, len(files) + len(weights))
    for arch in dict.fromkeys(archs):
        build_model(arch, 2)  # an unknown arch fails here, before the data set loads
    for arch, name in zip(archs[len(files):], weights):
        resolve_weights(arch, name)  # and so do weights of another model
    data = load_data(cfg)
    precision = Precision.for_config(cfg, pick_device(cfg))
    n, teachers = len(archs), []
    for i, arch in enumerate(archs):
        if i < len(files):
            teacher = load_file_teacher(files[i], arch, layout, data.num_classes)
        else:
            teacher = load_weights_teacher(weights[i - len(files)], arch, data.num_classes, seed=cfg.seed + i)
        teacher.accuracy = measure_accuracy(teacher.model, data, cfg, precision)
        log(_describe(i, n, teacher, data))
        teachers.append(teacher)
    return write_teacher_set(out, teachers, cfg, data)


def _describe(i: int, n: int, teacher: Imported, data: DataBundle) -> str:
    acc = teacher.accuracy
    line = (f"teacher {i + 1}/{n}: {teacher.model.arch} from {teacher.source} ({teacher.layout} layout): "
            f"val acc {acc['val_acc']:.4f}, test acc {acc['test_acc']:.4f} on {data.name}")
    if teacher.reinitialised:
        line += (f"; its classifier {teacher.reinitialised!r} was re-initialised for the {data.num_classes} "
                 "classes: fine-tune it before it can teach")
    return line
