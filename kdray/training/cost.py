"""What an epoch cost, measured by the training process itself, with no thread of its own: read
once at the epoch's start and once at its end, two clock reads per batch (and, on a GPU, a
utilisation sample every half second between steps), so nothing is left running when a
scheduler stops the trial between epochs.

The metrics (over the epoch's training, the interval of ``epoch_time_s``):

- ``cpu_cores``: the process's CPU seconds (user + system, every thread) over the wall seconds:
  cores kept busy on average (2.0 = two cores); ``cpu_util``: that over the cores the process may
  run on (its CPU affinity), 0-1;
- ``peak_rss_mb``: the process's peak resident memory in MiB. On Linux the peak is reset at the
  epoch's start (``/proc/self/clear_refs``), so it is the epoch's own (a process that runs
  several trials does not carry an earlier one's peak; ``ru_maxrss`` and ``VmHWM`` of the
  process then hold the peak since the latest epoch's start too); where that cannot be done, the
  process's peak so far (``ru_maxrss``);
- ``data_wait_share``: the share of the epoch's step time spent waiting for the next batch
  (``data_wait_s``: the host's time inside the loader's ``next``, :meth:`EpochCost.batches`);
- on CUDA, ``gpu_peak_mb`` (``torch.cuda.max_memory_allocated``, reset at the epoch's start) and,
  where NVML answers (``pynvml``), ``gpu_util`` (0-100, the mean of the samples).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Iterable, Iterator, Optional

import torch

#: seconds between two GPU utilisation samples taken from the step loop
GPU_SAMPLE_S = 0.5


def cpu_seconds() -> float:
    """CPU time of this process so far (user + system, all its threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def usable_cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return max(os.cpu_count() or 1, 1)


def reset_peak_rss() -> bool:
    """Make the process's peak resident memory its current one (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(since_reset: bool) -> float:
    """The process's peak resident memory in MiB: since :func:`reset_peak_rss` (``VmHWM``) when
    ``since_reset``, else its lifetime peak."""
    if since_reset:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def gpu_utilisation(device: torch.device) -> Optional[float]:
    """NVML's utilisation of ``device`` (0-100) now, or None without a GPU or ``pynvml``."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.utilization(device))
    except Exception:  # noqa: BLE001 - no pynvml / amdsmi, or NVML refuses: no utilisation
        return None


class EpochCost:
    """:meth:`start` before an epoch's steps, its batches through :meth:`batches`, :meth:`stop`
    after them: the epoch's cost metrics (see the module)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.sample_gpu = self.cuda and gpu_utilisation(device) is not None
        self.t0 = self.cpu0 = self.next_sample = self.data_wait_s = 0.0
        self.rss_reset = False
        self.util: list = []

    def start(self) -> None:
        self.rss_reset = reset_peak_rss()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.util, self.data_wait_s = [], 0.0
        self.cpu0, self.t0 = cpu_seconds(), time.perf_counter()
        self.next_sample = self.t0 + GPU_SAMPLE_S

    def batches(self, batches: Iterable) -> Iterator:
        """``batches`` as they are, the time spent getting each next one summed in ``data_wait_s``
        (two clock reads a step, host time: no device sync), and on a GPU a utilisation sample
        taken after a step when :data:`GPU_SAMPLE_S` has passed since the last."""
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.data_wait_s += time.perf_counter() - t0
                return
            self.data_wait_s += time.perf_counter() - t0
            yield batch  # the step runs here
            if self.sample_gpu and time.perf_counter() >= self.next_sample:
                self._sample_gpu()

    def _sample_gpu(self) -> None:
        self.next_sample = time.perf_counter() + GPU_SAMPLE_S
        value = gpu_utilisation(self.device)
        if value is not None:
            self.util.append(value)

    def stop(self, wall_s: Optional[float] = None) -> dict:
        """The epoch's costs; ``wall_s``: its step time (default: since :meth:`start`)."""
        wall = max(wall_s if wall_s is not None else time.perf_counter() - self.t0, 1e-9)
        cores = (cpu_seconds() - self.cpu0) / wall
        out = {"cpu_cores": cores, "cpu_util": cores / usable_cores(), "peak_rss_mb": peak_rss_mb(self.rss_reset),
               "data_wait_s": self.data_wait_s, "data_wait_share": min(max(self.data_wait_s / wall, 0.0), 1.0)}
        if self.cuda:
            out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            if self.sample_gpu and not self.util:  # an epoch shorter than one sample period
                self._sample_gpu()
            if self.util:
                out["gpu_util"] = sum(self.util) / len(self.util)
        return out
