"""A comparison of groups of runs on one metric: each group's n, mean, sample std and per-seed
values, its gap to a baseline group with the gap's standard error and whether the gap is larger
than the seeds' spread, and the table as console text, Markdown, CSV and JSON.

Plain values only, no MLflow: `kdray compare` fills it from tracked runs
(:mod:`kdray.tracking.compare`), ``benchmarks/cifar_table.py`` from its result files."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from kdray.core.errors import KdrayError

MODES = ("max", "min")


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> tuple[float, Optional[float]]:
    """The mean and the sample standard deviation (ddof 1); no std for one value: a spread needs two."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


@dataclass(frozen=True)
class Gap:
    """Group a's mean minus baseline b's, the standard error of that difference (Welch:
    sqrt(s_a²/n_a + s_b²/n_b), which is sqrt((s_a² + s_b²)/n) for equal n), the larger of the two
    stds, and whether the gap goes beyond it in the direction that is better (``mode``). The error
    and the verdict need a std on both sides: None when either group has one value."""

    against: str
    gap: float
    se: Optional[float]
    spread: Optional[float]
    beyond_spread: Optional[bool]


def gap_between(a: Sequence[float], b: Sequence[float], *, mode: str = "max", against: str = "") -> Gap:
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    gap = mean_a - mean_b
    if std_a is None or std_b is None:
        return Gap(against, gap, None, None, None)
    se = math.sqrt(std_a ** 2 / len(a) + std_b ** 2 / len(b))
    spread = max(std_a, std_b)
    better = gap if mode == "max" else -gap
    return Gap(against, gap, se, spread, better > spread)


# ---------------------------------------------------------------------------------------------
# groups
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Value:
    """One run's value of the metric; ``seed`` as the run logged it (MLflow params are text)."""

    value: float
    seed: Optional[str] = None
    run_id: Optional[str] = None


def seed_order(seed: Optional[str]) -> tuple:
    """Seeds in numeric order (2 before 10), anything else after them."""
    text = "" if seed is None else str(seed)
    return (0, int(text), "") if text.lstrip("-").isdigit() else (1, 0, text)


@dataclass
class Group:
    """Runs that share a configuration (or the values of the --by keys): ``key`` says which."""

    label: str
    values: list[Value]
    key: dict = field(default_factory=dict)
    gap: Optional[Gap] = None
    is_baseline: bool = False

    def __post_init__(self):
        self.values = sorted(self.values, key=lambda v: seed_order(v.seed))
        self.mean, self.std = mean_std([v.value for v in self.values])

    @property
    def n(self) -> int:
        return len(self.values)

    def numbers(self) -> list[float]:
        return [v.value for v in self.values]


def find_baseline(groups: Sequence[Group], name: str) -> Group:
    """The group ``name`` names: its label, or KEY=VALUE matching exactly one group's key."""
    by_label = [g for g in groups if g.label == name]
    key, sep, value = name.partition("=")
    by_key = [g for g in groups if sep and str(g.key.get(key.strip())) == value.strip()]
    found = by_label or by_key
    if len(found) == 1:
        return found[0]
    labels = ", ".join(repr(g.label) for g in groups)
    if found:
        raise KdrayError(f"--baseline {name!r} matches {len(found)} groups; name one of: {labels}")
    raise KdrayError(f"--baseline {name!r} names no group; allowed: {labels}")


def set_baseline(groups: Sequence[Group], name: str, mode: str) -> Group:
    """Mark the baseline and give every other group its gap to it."""
    base = find_baseline(groups, name)
    for g in groups:
        g.is_baseline = g is base
        g.gap = None if g is base else gap_between(g.numbers(), base.numbers(), mode=mode, against=base.label)
    return base


# ---------------------------------------------------------------------------------------------
# cells: how a number reads in each format
# ---------------------------------------------------------------------------------------------
def fixed(x: Optional[float], digits: int = 4, sign: bool = False) -> str:
    """A number as the tables show it; "-" where there is none."""
    if x is None:
        return "-"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def yes_no(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("yes" if flag else "no")


def per_seed_text(values: Iterable[Value], digits: int = 4) -> str:
    """``0: 0.9521, 1: 0.9480`` (a value without a seed shows ``?``)."""
    return ", ".join(f"{'?' if v.seed is None else v.seed}: {v.value:.{digits}f}" for v in values)


def per_seed_csv(values: Iterable[Value]) -> str:
    """``0:0.952112676056338;1:0.948...``: full precision, one CSV cell."""
    return ";".join(f"{'' if v.seed is None else v.seed}:{v.value!r}" for v in values)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A pipe table (``|---|`` rule); a ``|`` inside a cell is escaped."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def console_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Iterable[int] = ()) -> str:
    """Columns padded to their widest cell, the ``right`` ones (numbers) right-aligned."""
    right = set(right)
    table = [list(map(str, header)), *(list(map(str, r)) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     .rstrip() for r in table)


# ---------------------------------------------------------------------------------------------
# the comparison and its four formats
# ---------------------------------------------------------------------------------------------
CSV_COLUMNS = ("group", "n", "mean", "std", "per_seed", "gap", "gap_se", "spread", "beyond_spread", "baseline")


@dataclass
class Comparison:
    """The groups of a comparison on ``metric`` (``by``: the grouping keys; empty: by
    configuration), the baseline's label when there is one, and where the runs came from."""

    metric: str
    groups: list[Group]
    mode: str = "max"
    by: tuple = ()
    baseline: Optional[str] = None
    left_out: dict = field(default_factory=dict)  # kdray.state -> runs of that state not counted
    source: dict = field(default_factory=dict)  # the filter: experiments, tags, run ids asked for
    run_id: Optional[str] = None  # the MLflow run holding this table, once logged

    @property
    def run_ids(self) -> list[str]:
        return [v.run_id for g in self.groups for v in g.values if v.run_id]

    def grouping(self) -> str:
        return ",".join(self.by) if self.by else "configuration"

    def title(self) -> str:
        base = f"; gap to {self.baseline!r}" if self.baseline else ""
        groups = f"{len(self.groups)} group" + ("s" if len(self.groups) != 1 else "")
        return (f"{self.metric} ({self.mode}) of {len(self.run_ids)} runs in {groups} "
                f"by {self.grouping()}{base}")

    def _cells(self, g: Group) -> list[str]:
        cells = [g.label, str(g.n), fixed(g.mean), fixed(g.std), per_seed_text(g.values)]
        if self.baseline:
            gap = g.gap or Gap("", 0.0, None, None, None)
            cells += (["baseline", "-", "-"] if g.is_baseline else
                      [fixed(gap.gap, sign=True), fixed(gap.se), yes_no(gap.beyond_spread)])
        return cells

    def _header(self) -> list[str]:
        header = ["group", "n", f"{self.metric} mean", "std", "per seed"]
        return header + (["gap", "s.e. of gap", "beyond spread"] if self.baseline else [])

    def to_console(self) -> str:
        rows = [self._cells(g) for g in self.groups]
        return self.title() + ":\n" + console_table(self._header(), rows, right=(1, 2, 3, 5, 6))

    def to_markdown(self) -> str:
        return markdown_table(self._header(), [self._cells(g) for g in self.groups])

    def rows(self) -> list[dict]:
        """One flat record per group, full precision (CSV, MLflow's table artifact)."""
        out = []
        for g in self.groups:
            gap = g.gap or Gap("", 0.0, None, None, None)
            out.append({"group": g.label, "n": g.n, "mean": g.mean, "std": g.std, "per_seed": per_seed_csv(g.values),
                        "gap": gap.gap if g.gap else None, "gap_se": gap.se, "spread": gap.spread,
                        "beyond_spread": gap.beyond_spread, "baseline": g.is_baseline})
        return out

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: "" if v is None else (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        return buf.getvalue()

    def to_dict(self) -> dict:
        groups = [{"label": g.label, "key": g.key, "n": g.n, "mean": g.mean, "std": g.std, "baseline": g.is_baseline,
                   "values": [{"seed": v.seed, "value": v.value, "run_id": v.run_id} for v in g.values],
                   "gap": g.gap.gap if g.gap else None, "gap_se": g.gap.se if g.gap else None,
                   "spread": g.gap.spread if g.gap else None,
                   "beyond_spread": g.gap.beyond_spread if g.gap else None} for g in self.groups]
        return {"metric": self.metric, "mode": self.mode, "by": list(self.by) or "configuration",
                "baseline": self.baseline, "groups": groups, "runs": len(self.run_ids), "left_out": self.left_out,
                "source": self.source, "run_id": self.run_id}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def render(self, fmt: str) -> str:
        """The table in ``fmt``: table (the console's), markdown, csv or json."""
        renderers = {"table": self.to_console, "markdown": self.to_markdown, "csv": self.to_csv, "json": self.to_json}
        if fmt not in renderers:
            raise KdrayError(f"--format {fmt!r} is not allowed; allowed: {', '.join(renderers)}")
        return renderers[fmt]().rstrip("\n")
