"""How a teacher store keeps the teachers' logits: its one lossy choice, part of the store's key
(stores of different encodings never mix), rebuilt into full ``[rows, K, C]`` logits for the methods.

Encodings (``--teacher-store-logits``), per (sample, view) row and teacher, C classes:

``fp32`` / ``fp16`` / ``bf16`` (exact)
    The logits the teachers produced, cast. A cast moves each logit z by at most ``|z| u``
    (u = 2^-24, 2^-11, 2^-8: half a unit in the last place), so softmax(z/T) moves by a relative
    error of at most ``exp(2 max|z| u / T) - 1`` ~ ``2 max|z| u / T``. Measured on trained-
    classifier-like logits (max |z| = 15, C = 100; tests/test_store_scale.py): fp16 5.7e-3 at T=1,
    9.2e-4 at T=4; bf16 4.7e-2 at T=1, 7.5e-3 at T=4 (the largest relative error over all classes,
    which the smallest probabilities reach). Logits the teachers computed in bf16 (amp) are cast
    to fp32 or fp16 without error; fp32 of fp32 teachers is the values themselves.
``topk``
    Per teacher: the k largest log-probabilities ``z - lse`` (fp16; log-probabilities rather than
    logits: the large probabilities, near log p = 0, keep the finest steps), their class indices
    (int16 up to 32767 classes, else int32) and the log-sum-exp of all C logits (fp32). Rebuilt as
    FKD / ReLabel do: the top k exact to fp16 (each top-k probability at T=1 within a relative
    ``|log p| 2^-11``, plus ~1e-6 of fp32 arithmetic), the remaining probability mass
    ``1 - sum(top-k p)`` spread evenly over the other C - k classes (logit ``lse + log(remaining /
    (C - k))``, the mass floored at 1e-12). What is lost is the tail's shape: KL(p || p_rebuilt) at
    T=1. Measured for a confident teacher (gaussian logits, sd 1, one class +12): C=100, k=10 (top-1
    p 0.998): mean 2.8e-4, max 8.5e-3 nats; C=1000, k=10 (top-1 p 0.984): mean 6.0e-3, max 0.11.
    A softened target weighs the tail more: at T=4 the means are 1.6e-2 and 2.8e-2. Broader teachers
    lose more (C=1000, top-1 p 0.8: mean 0.13 nats at T=1).
``auto`` (default)
    exact in the teachers' own dtype up to :data:`AUTO_EXACT_CLASSES` classes, else ``topk`` with
    k = :data:`DEFAULT_TOPK`.

Bytes per stored (sample, view): ``8 + K x`` the bytes per teacher below (8: the row's code in the
index; feature maps not counted), :func:`bytes_per_row`:

=============  =====  ======  ======
per teacher    C=10   C=100   C=1000
=============  =====  ======  ======
fp32           40     400     4000
fp16, bf16     20     200     2000
topk k=10      (k<C)  44      44
topk k=5       24     24      24
=============  =====  ======  ======
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from kdray.core.errors import KdrayError

ENCODINGS = ("auto", "fp32", "fp16", "bf16", "topk")
EXACT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_TOPK = 10  # provisional: to be set by measurement (accuracy of students vs k)
AUTO_EXACT_CLASSES = 100  # up to here exact logits cost at most ~400 bytes per teacher and row
CODE_BYTES = 8  # the int64 code of each stored row in the sparse index
TAIL_FLOOR = 1e-12  # remaining probability mass below this (fp16 rounding of a near-1 top-k) is clamped
INT16_CLASSES = 32767


@dataclass(frozen=True)
class LogitEncoding:
    """The encoding asked for (``--teacher-store-logits``, ``--teacher-store-topk``), resolved
    against the teachers' class count and dtype by :meth:`resolve`."""

    name: str = "auto"
    topk: Optional[int] = None

    def check(self) -> None:
        if self.name not in ENCODINGS:
            raise KdrayError(f"--teacher-store-logits {self.name!r} is not an encoding; "
                             f"allowed: {', '.join(ENCODINGS)}")
        if self.topk is not None and self.topk < 1:
            raise KdrayError(f"--teacher-store-topk {self.topk} is out of range; allowed: 1 .. classes - 1")

    def resolve(self, classes: int, teacher_dtype: torch.dtype) -> "LogitCodec":
        self.check()
        name = self.name
        if name == "auto":
            name = _dtype_name(teacher_dtype) if classes <= AUTO_EXACT_CLASSES else "topk"
        k = (self.topk or DEFAULT_TOPK) if name == "topk" else 0
        if name == "topk" and not 1 <= k < classes:
            raise KdrayError(f"--teacher-store-topk {k} is out of range for {classes} classes; "
                             f"allowed: 1 .. {classes - 1}")
        return LogitCodec(name, int(classes), int(k))


def _dtype_name(dtype: torch.dtype) -> str:
    return next((n for n, d in EXACT.items() if d == dtype), "fp32")


@dataclass(frozen=True)
class LogitCodec:
    """A resolved encoding: ``encode`` turns ``[R, K, C]`` logits into the store's per-row tensors
    (its *parts*), ``decode`` rebuilds ``[B, K, C]`` logits from chosen rows of them."""

    name: str  # fp32 | fp16 | bf16 | topk
    classes: int
    k: int = 0

    @property
    def exact(self) -> bool:
        return self.name in EXACT

    def key(self) -> dict:
        return {"encoding": self.name, "classes": self.classes, **({"k": self.k} if not self.exact else {})}

    @classmethod
    def from_key(cls, key: dict) -> "LogitCodec":
        return cls(key["encoding"], int(key["classes"]), int(key.get("k", 0)))

    def describe(self) -> str:
        return f"logits {self.name}" if self.exact else f"top-{self.k} logits"

    @property
    def index_dtype(self) -> torch.dtype:
        return torch.int16 if self.classes <= INT16_CLASSES else torch.int32

    def layout(self, teachers: int) -> dict:
        """Each part's per-row shape and dtype."""
        if self.exact:
            return {"logits": ((teachers, self.classes), EXACT[self.name])}
        return {"top_logp": ((teachers, self.k), torch.float16), "top_index": ((teachers, self.k), self.index_dtype),
                "lse": ((teachers,), torch.float32)}

    def row_bytes(self, teachers: int) -> int:
        """Bytes of one row's logits (the index's code not counted)."""
        return sum(math.prod(shape) * dt.itemsize for shape, dt in self.layout(teachers).values())

    def empty(self, teachers: int) -> dict:
        return {n: torch.empty((0, *shape), dtype=dt) for n, (shape, dt) in self.layout(teachers).items()}

    def encode(self, logits: torch.Tensor) -> dict:
        """``[R, K, C]`` logits (any float dtype) as this encoding's parts."""
        if self.exact:
            return {"logits": logits.to(EXACT[self.name])}
        z = logits.float()
        lse = torch.logsumexp(z, dim=-1)
        top, idx = torch.topk(z, self.k, dim=-1)
        return {"top_logp": (top - lse.unsqueeze(-1)).half(), "top_index": idx.to(self.index_dtype), "lse": lse}

    def decode(self, parts: dict, rows: torch.Tensor, device=None) -> torch.Tensor:
        """``[len(rows), K, C]`` logits of ``rows`` on ``device``: exact encodings in their dtype,
        top-k rebuilt in fp32 (there: only the compact rows travel)."""
        got = {n: t.index_select(0, rows).to(device) for n, t in parts.items()}
        if self.exact:
            return got["logits"]
        logp, idx, lse = got["top_logp"].float(), got["top_index"].long(), got["lse"].unsqueeze(-1)
        remaining = (1.0 - logp.exp().sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)
        tail = lse + torch.log(remaining / (self.classes - self.k))
        out = tail.expand(*logp.shape[:-1], self.classes).contiguous()
        return out.scatter_(-1, idx, lse + logp)


def bytes_per_row(encoding: str, teachers: int, classes: int, k: int = DEFAULT_TOPK) -> int:
    """Bytes one stored (sample, view) takes: its logits in ``encoding`` (fp32, fp16, bf16, topk)
    for ``teachers`` teachers of ``classes`` classes, plus its 8-byte code in the index (feature
    maps not counted)."""
    codec = LogitCodec(encoding, classes, k if encoding == "topk" else 0)
    return CODE_BYTES + codec.row_bytes(teachers)
