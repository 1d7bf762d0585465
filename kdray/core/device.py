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


#: the precision every accuracy kdray logs (val and test, ensemble and per branch) is measured in,
#: whatever ``amp`` says: that of the student kdray exports and registers
EVAL_PRECISION = "fp32"


@dataclass(frozen=True)
class Precision:
    """Where and how the step runs. ``amp: auto``: bf16 autocast on GPU and on CPUs with native
    bf16; ``channels_last`` unset: on (faster on GPU and, for these convnets, on AVX-512 CPUs:
    1.2-1.3x in fp32 here).

    ``amp`` is the precision of the training step, the live teachers and the precise-BN pass
    (:meth:`autocast`; the BatchNorm buffers that pass leaves are saved as they are). Evaluation
    runs in fp32 (:meth:`evaluation`), so the accuracy a run logs is the accuracy of the fp32
    student it saves, exports and registers: the same weights on the same images in the same
    precision, which ``kdray export`` re-checks exactly on CPU. Under bf16 autocast (about 3
    significant digits per logit) an image whose top two logits are close may flip, and the logged
    accuracy would be one no deployed model reproduces (a 1-epoch resnet8 on ``fake``, seed 3, on a
    CPU with native bf16: test accuracy 0.325 under bf16, 0.315 in fp32). The price: the val split
    (a tenth of train's size) each epoch and test once go through an fp32 forward pass, about a
    third of a training step's work per image, so a few per cent of an epoch even where fp32 runs
    at half bf16's speed; not worth logging a second, bf16 accuracy that no model reproduces. On
    GPU "fp32" is PyTorch's default (cuDNN convolutions may use TF32), and a GPU-logged accuracy is
    re-checked on CPU within a stated tolerance."""

    device: torch.device
    use_amp: bool
    channels_last: bool

    @classmethod
    def for_config(cls, cfg, device: torch.device) -> "Precision":
        fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
        return cls(device, cfg.amp == "bf16" or (cfg.amp == "auto" and fast_bf16),
                   device.type in ("cuda", "cpu") if cfg.channels_last is None else bool(cfg.channels_last))

    def autocast(self):
        """The training step's (and live teachers') precision: bf16 autocast when ``use_amp``."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp)

    def evaluation(self):
        """The precision of every logged accuracy: fp32 (:data:`EVAL_PRECISION`), autocast off even
        inside an enclosing autocast region."""
        return torch.autocast(self.device.type, enabled=False)
