"""Hyperparameters a method declares beside its ``@register``: name, type, default, range, help.

The run config, ``--set``, the CLI flags and search-space validation read them from the table
kept here, so a method with a new hyperparameter is one file and nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kdray.core.errors import KdrayError
from kdray.core.values import coerce_value


@dataclass(frozen=True)
class HParam:
    """One declared hyperparameter. ``low``/``high`` bound it (``low_open``: strictly above
    ``low``); a ``per_branch`` one is a list with one value per student branch."""

    name: str
    type: type
    default: Any
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    optional: bool = False
    per_branch: bool = False

    def allowed(self) -> str:
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"<= {self.high:g}"
        if lo and hi and not self.low_open:
            return f"{self.low:g}..{self.high:g}"
        return " and ".join(x for x in (lo, hi) if x) or "any"

    def in_range(self, number: float) -> bool:
        if self.low is not None and (number <= self.low if self.low_open else number < self.low):
            return False
        return self.high is None or number <= self.high

    def check(self, value: Any, where: str = "config") -> Any:
        """The coerced value, or a one-line KdrayError naming the key and the allowed range."""
        value = coerce_value(self.name, self.type, self.optional, value, where)
        numbers = value if self.type is list and value is not None else [value]
        for number in numbers:
            if isinstance(number, (int, float)) and not isinstance(number, bool) and not self.in_range(number):
                what = "each value" if self.type is list else "allowed"
                raise KdrayError(f"{where}: {self.name}={value!r} is out of range; {what}: {self.allowed()}")
        return value


# --- shared declarations: several methods list the same object -----------------------------------
TEMPERATURE = HParam("temperature", float, 4.0, "distillation temperature T", low=0, low_open=True)
ALPHA = HParam("alpha", float, None, "KD weight a, 0-1 (default: the method's own, 0.9 kd/avg_kd/ekd, 0 feed)",
               low=0, high=1, optional=True)
BRANCHES = HParam("branches", int, 3, "student branch count B, 1-8", low=1, high=8)
SPLIT_STAGE = HParam("split_stage", int, 1, "stages in the student's shared trunk", low=0)

#: every hyperparameter of every registered method, by name
HPARAMS: dict[str, HParam] = {}


def declare(owner: str, params, reserved=()) -> None:
    """Add ``owner``'s hyperparameters to the table. A name two methods share must be declared
    identically (the config has one value for it); a name of the run config's own is refused."""
    for p in params:
        if p.name in reserved:
            raise ValueError(f"method {owner!r}: hyperparameter {p.name!r} is a run-config key already")
        known = HPARAMS.get(p.name)
        if known is not None and known != p:
            raise ValueError(f"method {owner!r}: hyperparameter {p.name!r} differs from its earlier declaration")
        HPARAMS[p.name] = p
