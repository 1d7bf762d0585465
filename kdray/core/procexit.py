"""Leaving a process that has run Ray: every atexit handler, then no interpreter finalisation.

Ray 2.58 leaves native threads of its GCS and gRPC clients (``gcs_client_io_service``, gRPC timer and
event-engine threads, ``worker.io``) running in a driver after ``ray.shutdown()``. When the
interpreter then tears its modules down, those threads can touch freed state: a CI run printed
"207 passed" and then the pytest process itself died of SIGSEGV (exit 139), every result already in.

``exit_after_atexit()`` registers a handler that runs after every atexit handler registered later
(Ray's ``shutdown``, MLflow's end-of-run, logging's flush, temporary-directory finalizers: atexit runs
them last-in first-out), flushes stdout and stderr, and ends the process with ``os._exit(code)``.
Non-daemon threads have been joined before atexit runs, so nothing but the teardown of module
globals and C++ static destructors is skipped. It acts only once a code has been set, so a process
that dies of an unexpected exception still gets Python's own traceback and exit status.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Callable


class _ExitAfterAtexit:
    def __init__(self) -> None:
        self.code: int | None = None

    def set(self, code: int) -> None:
        self.code = int(code)

    def __call__(self) -> None:
        if self.code is None:
            return
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                if stream is not None:
                    stream.flush()
            except (OSError, ValueError):  # closed or broken pipe: nothing left to save
                pass
        os._exit(self.code)


def exit_after_atexit() -> Callable[[int], None]:
    """Register the handler now (before Ray or MLflow register theirs, so it runs after them) and
    return the function that sets the exit code it leaves with."""
    handler = _ExitAfterAtexit()
    atexit.register(handler)
    return handler.set
