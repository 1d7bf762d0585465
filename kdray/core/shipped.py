"""The files kdray ships besides code: its search spaces and its Ray cluster files.

In a git checkout they are the top-level ``search_spaces/`` and ``clusters/`` folders; a wheel
installs the same folders as package data inside ``kdray/`` (pyproject.toml maps them there).
``shipped_dir`` finds them either way, so ``--space quick`` works from a checkout and from
``pip install kdray-*.whl`` alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kdray.core.errors import KdrayError

SPACES, CLUSTERS = "search_spaces", "clusters"
CLUSTER_SUFFIXES = (".yaml", ".sh", ".md")


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped ``kind`` (SPACES or CLUSTERS): package data, else the checkout's."""
    here = Path(__file__).resolve().parents[1]  # the kdray package
    for folder in (here / kind, here.parent / kind):
        if folder.is_dir():
            return folder
    raise KdrayError(f"kdray's {kind} folder is missing from this installation (looked in {here} and {here.parent}); "
                     "reinstall kdray")


def description(path: Path) -> str:
    """A shipped file's one-line description: its first comment line."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("#!"):
            return line.lstrip("#").strip()
    return ""


def shipped_spaces() -> dict[str, Path]:
    """Shipped search spaces by name (file stem), sorted."""
    return {p.stem: p for p in sorted(shipped_dir(SPACES).glob("*.yaml"))}


def shipped_cluster_files() -> list[Path]:
    return [p for p in sorted(shipped_dir(CLUSTERS).iterdir()) if p.suffix in CLUSTER_SUFFIXES]


def resolve_space(space: str | Path) -> Path:
    """A search space argument as a file: an existing path, else a shipped space named ``space``
    (``quick`` or ``quick.yaml``). Anything else is an error naming the shipped spaces."""
    path = Path(space).expanduser()
    if path.is_file():
        return path
    name = str(space)
    spaces = shipped_spaces()
    if "/" not in name and "\\" not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        if stem in spaces:
            return spaces[stem]
    raise KdrayError(f"search space {name!r}: no such file and no shipped space of that name; shipped: "
                     f"{', '.join(spaces)} (`kdray spaces` describes them)")


def copy_out(files: list[Path], dest: Path) -> list[Path]:
    """Copy ``files`` into ``dest`` (created if missing). Refuses, copying nothing, when any of them
    is already there: kdray never overwrites a user's file."""
    dest = Path(dest)
    clashes = [str(dest / f.name) for f in files if (dest / f.name).exists()]
    if clashes:
        raise KdrayError(f"{', '.join(clashes)} already exist(s); kdray does not overwrite files: "
                         "remove them or choose another destination")
    dest.mkdir(parents=True, exist_ok=True)
    copied = [Path(shutil.copy2(f, dest / f.name)) for f in files]
    for path in copied:
        if path.suffix == ".sh":  # a wheel does not keep file modes; the cluster files run this script
            path.chmod(path.stat().st_mode | 0o111)
    return copied
