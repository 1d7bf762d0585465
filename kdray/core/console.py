"""What reaches the user's terminal during a sweep or a training run: kdray's own lines. Ray's, Tune's and Optuna's
output (their loggers, and what Tune prints: its configuration box, result-folder and TensorBoard
hints) goes to a log file beside the sweep's other state instead."""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path
from typing import Iterator

#: library loggers whose records go to the sweep's log file (their children propagate to them)
LIBRARY_LOGGERS = ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "optuna", "mlflow", "alembic")


class _Quiet:
    """A record the log file cannot take (its disk is full, its folder gone) is dropped: not
    Python's "--- Logging error ---" report with its tracebacks on stderr. What failed is said
    once, by the command's own error line, when it matters to the command."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass


class _QuietStream(_Quiet, logging.StreamHandler):
    pass


class _LogFile(_Quiet, logging.FileHandler):
    """Appends to ``path``, opened (and its folder made) on its first record: a command that logs
    nothing (refused at the door) leaves no file."""

    def __init__(self, path: Path):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)  # opening the file happens here, outside StreamHandler's own guard
        except Exception:  # noqa: BLE001
            self.handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError:  # the last flush on a full disk: dropped like the record it held
            pass


def _to_file(loggers: tuple, handler: logging.Handler) -> list:
    """Point ``loggers`` at ``handler`` only; return what to restore."""
    saved = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    return saved


@contextlib.contextmanager
def _handler_for(path: Path, stdout: bool) -> Iterator[tuple]:
    """(handler, stream for stdout or None): with ``stdout`` the file is opened now, else on the
    handler's first record."""
    if not stdout:
        handler = _LogFile(path)
        try:
            yield handler, None
        finally:
            handler.close()
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", buffering=1) as fh:
        yield _QuietStream(fh), fh


@contextlib.contextmanager
def library_output_to(path: Path, stdout: bool = True) -> Iterator[Path]:
    """Inside: the libraries' log records and (``stdout``) everything printed to stdout go to
    ``path`` (appended; without ``stdout``, the file is made on the first record only). kdray's
    own lines go to stderr and are untouched."""
    path = Path(path)
    with _handler_for(path, stdout) as (handler, fh):
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        import mlflow  # noqa: F401  (its import configures the "mlflow" logger: do it before we take it over)
        import optuna

        # Optuna adds its stderr handler lazily, on its first record; configure and remove it now
        optuna.logging.disable_default_handler()
        saved = _to_file(LIBRARY_LOGGERS, handler)
        try:
            with contextlib.redirect_stdout(fh) if fh is not None else contextlib.nullcontext():
                yield path
        finally:
            for logger, handlers, propagate in saved:
                logger.handlers, logger.propagate = handlers, propagate
            optuna.logging.enable_default_handler()


def to_stderr(msg: str) -> None:
    """kdray's own progress line, flushed at once: the default log of a run, a sweep and the CLI."""
    print(msg, file=sys.stderr, flush=True)
