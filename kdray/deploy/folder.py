"""The folder an export goes to: checked before any work (new, empty, or with --overwrite only an
earlier kdray export that does not hold the student being exported), filled beside it and
swapped in at the end, the earlier export removed by name only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from kdray.core.errors import KdrayError
from kdray.core.io import fill_beside

# The names ``export_student`` writes into its folder: the test for "an earlier kdray export" that
# ``overwrite`` may replace. Anything else in the folder belongs to someone else.
INFO_FILE = "export.json"
EXPORT_FORMAT = "kdray-export/1"  # export.json's "format"


_PAYLOAD_FILES = frozenset({"state_dict.pt", "model.pt2", "model.ts"})


_ALLOWED_HINT = (f"--overwrite replaces only an earlier kdray export "
                 f"({INFO_FILE} plus {', '.join(sorted(_PAYLOAD_FILES))})")


def _foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that an earlier ``export_student`` did not write; [] for an earlier export.

    An export is recognised by its ``export.json`` (this format) and only the payload files that
    it lists: a folder that merely holds a ``state_dict.pt`` of its own is not an export.
    """
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT:
        return [p.name for p in sorted(folder.iterdir())]
    recorded = info.get("files") if isinstance(info.get("files"), dict) else {}
    allowed = {INFO_FILE} | (_PAYLOAD_FILES & set(recorded))
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


def check_out(out: Path, dest: Path, overwrite: bool, source: Optional[Path]) -> None:
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
    for name in sorted(_PAYLOAD_FILES | {INFO_FILE}):
        (old / name).unlink(missing_ok=True)
    try:
        old.rmdir()  # fails, keeping them, if files someone else wrote turned up meanwhile
    except OSError:
        return False
    return True


def write_beside_and_swap(out: Path, dest: Path, overwrite: bool, source: Optional[Path],
                          fill: Callable[[Path], dict], log: Callable[[str], None]) -> dict:
    """Run ``fill`` on a temporary folder beside ``dest``, then swap it in; on failure remove it.

    The folder is checked again just before the swap: exporting and re-checking take a while,
    and a file someone put into ``dest`` meanwhile must make the swap refuse, not be deleted. An
    existing ``dest`` is set aside and removed only after the new one is in place, file by file
    (see :func:`kdray.core.io.swap_in`).
    """
    info, leftover = fill_beside(dest, fill, tag="tmp", check=lambda: check_out(out, dest, overwrite, source),
                                 remove_old=_remove_old_export)
    if leftover is not None:
        log(f"export: warning: kept {leftover}: files other than an earlier export appeared in it during the export")
    return info
