"""A real `kdray tune` in a subprocess, its stderr read line by line while it runs (the fault tests
kill it, its tracking server or its Ray, and wait for what it says)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import psutil

KDRAY = [sys.executable, "-m", "kdray.cli"]


class Driver:
    """A `kdray tune` subprocess whose stderr is read line by line while it runs."""

    def __init__(self, args, cwd):
        self.proc = subprocess.Popen(KDRAY + args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float) -> float:
        """When a line holding ``text`` was seen (monotonic clock); AssertionError after ``timeout``
        seconds or when the driver ended without it."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if any(text in ln for ln in self.lines):
                return time.monotonic()
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {text!r} within {timeout}s; stderr:\n" + "\n".join(self.lines[-40:]))

    def descendants(self) -> list:
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def finish(self, timeout: float) -> int:
        """The driver's exit code; killed, and AssertionError, when it runs past ``timeout`` seconds."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
            raise AssertionError(f"the sweep did not end within {timeout}s; stderr:\n" + "\n".join(self.lines[-40:]))
        self._reader.join(10)
        return rc
