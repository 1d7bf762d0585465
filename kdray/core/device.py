"""Where a run computes: the device picked from the config, its precision (bf16 autocast and
memory format), and the rank, world size and sum across DDP processes (one process: itself)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from kdray.core.errors import KdrayError


def pick_device(cfg) -> torch.device:
    if cfg.device == "auto":
        if torch.cuda.is_available():
            idx = torch.cuda.current_device() if dist.is_initialized() else 0
            return torch.device("cuda", idx)
        return torch.device("cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise KdrayError(f"device {cfg.device!r} asked for, but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(cfg.device)


def rank_and_world() -> tuple[int, int]:
    """This process's DDP rank and the world size; (0, 1) outside DDP."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the DDP processes, in place (``t`` itself outside DDP)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512_BF16 or AMX): there bf16 autocast is
    about 2x faster than fp32; without it oneDNN emulates bf16 and it is 1.3-2x slower (measured by
    ``benchmarks/cpu_precision.py``). torch.cpu's feature probes are private; a torch without them
    counts as no."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(getattr(torch.cpu, p)() for p in probes if hasattr(torch.cpu, p))
    except RuntimeError:
        return False


@dataclass(frozen=True)
class Precision:
    """Where and how the step runs. ``amp: auto``: bf16 autocast on GPU and on CPUs with native
    bf16; ``channels_last`` unset: on (faster on GPU and, for these convnets, on AVX-512 CPUs:
    1.2-1.3x in fp32 here)."""

    device: torch.device
    use_amp: bool
    channels_last: bool

    @classmethod
    def for_config(cls, cfg, device: torch.device) -> "Precision":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return cls(device, cfg.amp == "bf16" or (cfg.amp == "auto" and fast_bf16),
                   device.type in ("cuda", "cpu") if cfg.channels_last is None else bool(cfg.channels_last))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)
