"""Files and folders as kdray writes and reads them: a file written whole or not at all, torch files
loaded tensors-only, their sha256, a folder filled beside its target and swapped in without
deleting what the user did not ask to replace, what a refused command created taken away again,
and the one line an exception is summed up in."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pickle
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, TypeVar, Union

import torch

from kdray.core.errors import KdrayError

T = TypeVar("T")
Content = Union[bytes, bytearray, memoryview, str, Callable[[BinaryIO], None]]


def first_line(exc: BaseException | str, limit: Optional[int] = None) -> str:
    """The first non-empty line of ``str(exc)`` (stripped), or the exception's type name when its
    message is empty; at most ``limit`` characters. ``exc`` may also be a message (a non-empty str)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if limit is None else line[:limit]


# --- one file ---------------------------------------------------------------------------------------
def _unique_beside(path: Path, tag: str) -> Path:
    """A hidden name beside ``path`` that nothing else uses: ``.<name>.<tag>-<pid>-<random>``."""
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass  # a leftover temp file must not turn the error being raised into another one


def atomic_write(path: str | Path, content: Content, *, mode: Optional[int] = None) -> Path:
    """Write ``content`` (bytes, str as UTF-8, or a function writing to the open binary file) to a
    temporary file beside ``path``, fsync it and rename it over ``path``: a reader sees the old
    file or the new one, never half of one. On any failure the temporary file is removed; an
    OSError without a file name (a full disk) is given ``path``'s. The file gets the umask's
    permissions, or ``mode``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode() if isinstance(content, str) else content)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(path)
        raise
    return path


def atomic_save(obj, path: str | Path) -> Path:
    """``torch.save`` of ``obj`` to ``path`` through :func:`atomic_write`. Serialised in memory first:
    a full disk then fails as an OSError naming the file (torch's own writer would raise a
    RuntimeError that says neither)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(path, buffer.getbuffer())


def safe_load(path: str | Path, what: str = "checkpoint"):
    """``torch.load`` with ``weights_only=True`` onto the CPU; a missing, refused or unreadable file
    is a one-line KdrayError naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise KdrayError(f"{what} {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's own message suggests weights_only=False, i.e. running the file's code: never that
        raise KdrayError(f"{what} {path} was refused: it holds Python objects other than tensors and plain "
                         "values, and loading those could run code; kdray loads tensors only") from None
    except Exception as exc:  # corrupt, truncated or not a torch file
        raise KdrayError(f"{what} {path} is corrupt or unreadable ({first_line(exc, 160)})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- one folder -------------------------------------------------------------------------------------
class FolderTaken(Exception):
    """The target of :func:`swap_in` was filled by someone else meanwhile; nothing was replaced."""


def swap_in(staging: Path, dest: Path, remove_old: Optional[Callable[[Path], bool]] = None) -> Optional[Path]:
    """Rename the complete folder ``staging`` to ``dest``.

    Without ``remove_old``, ``dest`` must be absent or an empty folder: anything else stays as it
    is and :class:`FolderTaken` is raised. With it, an existing ``dest`` is first renamed aside
    (``.<name>.old-...``), ``staging`` renamed in (the old one put back if that fails), and then
    ``remove_old(old)`` deletes what the caller may delete: two renames in one folder, so ``dest``
    is at every moment the whole old folder or the whole new one (or briefly absent). Returns the
    set-aside folder when ``remove_old`` could not remove it completely (it is then kept)."""
    if remove_old is None:
        try:
            os.replace(staging, dest)  # POSIX: replaces an empty folder, refuses a non-empty one
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise FolderTaken(str(dest)) from None
            raise
        return None
    old = None
    if dest.exists():
        old = _unique_beside(dest, "old")
        dest.rename(old)
    try:
        staging.rename(dest)
    except BaseException:
        if old is not None:
            old.rename(dest)
        raise
    if old is None or remove_old(old):
        return None
    return old


def fill_beside(dest: Path, fill: Callable[[Path], T], *, tag: str, check: Callable[[], None] = lambda: None,
                remove_old: Optional[Callable[[Path], bool]] = None) -> tuple[T, Optional[Path]]:
    """Run ``fill`` on a new hidden folder beside ``dest`` (``.<name>.<tag>-...``, the umask's
    permissions, as ``dest`` would get), call ``check`` (a last look at ``dest``: filling takes a
    while), then :func:`swap_in`. Returns ``fill``'s result and what ``swap_in`` returns. On any
    failure the folder is removed and ``dest`` is as it was."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = _unique_beside(dest, tag)
    staging.mkdir()
    try:
        result = fill(staging)
        check()
        leftover = swap_in(staging, dest, remove_old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename happened
        raise
    return result, leftover


# --- what a refused command created -----------------------------------------------------------------
class Undo:
    """What a command creates before its work begins (a log file, a run folder, an MLflow run),
    taken away again when the command is refused before :meth:`began` is called: a refused command
    leaves nothing behind. Refused: a :class:`KdrayError` of exit code 2 (the user's input; a full
    disk or a lost server is exit code 1, and what it left stays for ``--resume``). Only what did not
    exist when it was noted is removed: never anything the user or an earlier run had."""

    def __init__(self) -> None:
        self._steps: list[Callable[[], None]] = []
        self.begun = False

    def path(self, path: str | Path) -> Path:
        """Note ``path`` (a file or a folder) before the command may create it, with its missing
        parent folders. On undo: absent now, it is removed (a folder with what is in it; a missing
        parent only when empty: other runs share it); a file present now is cut back to its size."""
        path = Path(path)
        for parent in reversed([p for p in path.parents if not p.exists()]):
            self._steps.append(lambda p=parent: _remove_if_empty(p))
        existed, size = path.exists(), (path.stat().st_size if path.is_file() else None)
        self._steps.append(lambda: _put_back(path, existed, size))
        return path

    def call(self, step: Callable[[], None]) -> None:
        """Also run ``step`` on undo (after what was noted later, before what was noted earlier)."""
        self._steps.append(step)

    def began(self) -> None:
        """The work has begun: from now on what it created stays, whatever happens."""
        self.begun = True
        self._steps.clear()

    def refused(self, exc: BaseException) -> bool:
        """Whether ``exc`` refuses the command before its work began."""
        return not self.begun and isinstance(exc, KdrayError) and getattr(exc, "exit_code", 2) == 2

    def undo(self) -> None:
        steps, self._steps = self._steps, []
        for step in reversed(steps):
            try:
                step()
            except Exception:  # noqa: BLE001 - what cannot be removed stays; the refusal's line matters more
                pass


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty (someone else's now) or gone already


def _put_back(path: Path, existed: bool, size: Optional[int]) -> None:
    if existed:
        if size is not None and path.is_file() and path.stat().st_size > size:
            os.truncate(path, size)
    elif path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def undone_on_refusal(undo: Optional[Undo] = None) -> Iterator[Undo]:
    """Inside, note what the command may create on the :class:`Undo` it yields (``undo``, or a new
    one); a refusal raised inside takes it away again and goes on."""
    undo = undo or Undo()
    try:
        yield undo
    except BaseException as exc:
        if undo.refused(exc):
            undo.undo()
        raise
