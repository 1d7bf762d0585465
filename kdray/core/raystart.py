"""How a process that needs Ray before any runs starts it: the data stage's streaming path calls
:func:`start_ray`, the entry points (CLI, ``kdray.train``) name kdray's own start (local on loopback,
or joining an address) with :func:`set_ray_starter`; a registry here, so that neither imports the
other's stage and the CLI names it without importing torch."""

from __future__ import annotations

from typing import Callable, Optional

from kdray.core.errors import KdrayError

_starter: Optional[Callable[[], None]] = None


def set_ray_starter(start: Callable[[], None]) -> None:
    global _starter
    _starter = start


def start_ray() -> None:
    """Start Ray the way this process's entry point named, unless it runs already."""
    import ray

    if ray.is_initialized():
        return
    if _starter is None:
        raise KdrayError("the streaming data path needs Ray: use kdray's CLI or kdray.train (they start a local "
                         "Ray), or call ray.init() first")
    _starter()
