"""The measuring core: sides measured in turn, statistics, rows with targets, reports.

A benchmark names its *sides* (ours, and one or more references such as ``nbdcopy``), each a
callable returning one figure (GiB/s, extents/s, MiB...). The harness runs every side once per
round, round after round, so ours and the reference see the same machine noise; then each *row*
compares the median of one side with the median of another (or with an absolute target) and says
whether the target holds. Nothing here knows about NBD: benchmarks live in ``bench.suites``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal


class NotAvailable(Exception):
    """A benchmark cannot run yet (a component has not landed, a peer is missing): the harness
    prints the reason and goes on with the next benchmark."""


Side = Callable[[], float] | NotAvailable


@dataclass(frozen=True)
class Metric:
    unit: str  # "GiB/s", "Mext/s", "MiB"
    higher_is_better: bool = True


GIB_S = Metric("GiB/s")
MEXT_S = Metric("Mext/s")
MIB = Metric("MiB", higher_is_better=False)


@dataclass(frozen=True)
class Target:
    """``ratio >= 1.2`` (on="ratio") or ``value < 150`` (on="value")."""

    op: Literal[">=", "<", "<=", ">"]
    value: float
    on: Literal["ratio", "value"] = "ratio"

    def holds(self, x: float) -> bool:
        return {
            ">=": x >= self.value,
            ">": x > self.value,
            "<=": x <= self.value,
            "<": x < self.value,
        }[self.op]

    def __str__(self) -> str:
        what = "ratio" if self.on == "ratio" else "value"
        return f"{what} {self.op} {self.value:g}"


@dataclass(frozen=True)
class Row:
    """One line of the report: side ``ours`` against side ``reference`` (or alone)."""

    label: str
    ours: str
    reference: str | None = None
    target: Target | None = None  # None: the ratio is reported, with no target


@dataclass
class Benchmark:
    """``setup`` is a context manager factory entered once around all rounds (it starts peers,
    checks fixtures, raises NotAvailable); it yields the sides: name -> callable returning one
    figure per call, or a NotAvailable instance for a side that cannot run yet."""

    name: str
    title: str
    metric: Metric
    setup: Callable[[], AbstractContextManager[dict[str, Side]]]
    rows: Sequence[Row]
    warmup: bool = True  # one untimed call of each side first (page cache, imports)


@dataclass
class Stats:
    median: float
    min: float
    max: float
    spread_pct: float  # (max - min) / median
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        if not samples:
            raise ValueError("no samples")
        med = statistics.median(samples)
        lo, hi = min(samples), max(samples)
        # A zero median (nothing measured) gets no spread rather than an infinity JSON refuses.
        spread = (hi - lo) / med * 100 if med else 0.0
        return cls(med, lo, hi, spread, list(samples))


@dataclass
class RowResult:
    benchmark: str
    label: str
    unit: str
    status: Literal["ok", "not available", "error"]
    ours_side: str
    reference_side: str | None = None
    ours: Stats | None = None
    reference: Stats | None = None
    ratio: float | None = None
    target: str | None = None
    met: bool | None = None
    reason: str | None = None
    # 1-minute load average when the benchmark started and ended: how busy the shared machine was.
    load: tuple[float, float] | None = None


@dataclass
class Run:
    started: str
    finished: str | None
    mode: str  # "full" or "quick"
    repeat: int
    machine: dict[str, Any]
    command: str
    rows: list[RowResult] = field(default_factory=list)


def run_rounds(sides: dict[str, Side], repeat: int, *, warmup: bool = True) -> dict[str, Stats]:
    """Call every side once per round, ``repeat`` rounds, interleaved, in alternating order
    (forwards, then backwards: no side always runs first, on a cold cache or right after a
    side that heated the machine). A side given as a NotAvailable (its component has not
    landed) is skipped: the others are still measured."""
    live = {name: fn for name, fn in sides.items() if not isinstance(fn, NotAvailable)}
    if warmup:
        for fn in live.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in live}
    for index in range(repeat):
        for name in round_order(list(live), index):
            samples[name].append(live[name]())
    return {name: Stats.of(values) for name, values in samples.items()}


def round_order(names: list[str], index: int) -> list[str]:
    """The order of the sides in round ``index``: as given, reversed every other round."""
    return names if index % 2 == 0 else names[::-1]


def evaluate(
    bench: Benchmark, stats: dict[str, Stats], missing: dict[str, str] | None = None
) -> list[RowResult]:
    missing = missing or {}
    results = []
    for row in bench.rows:
        ref = stats.get(row.reference) if row.reference else None
        gone = [missing[s] for s in (row.ours, row.reference) if s in missing]
        if gone:
            results.append(
                RowResult(
                    benchmark=bench.name,
                    label=row.label,
                    unit=bench.metric.unit,
                    status="not available",
                    ours_side=row.ours,
                    reference_side=row.reference,
                    ours=stats.get(row.ours),
                    reference=ref,
                    target=str(row.target) if row.target else None,
                    reason="; ".join(gone),
                )
            )
            continue
        ours = stats[row.ours]
        ratio = None
        if ref is not None and ref.median:
            # A ratio above 1 always means "ours is better", whichever way the unit goes.
            ratio = (
                ours.median / ref.median
                if bench.metric.higher_is_better
                else ref.median / ours.median
            )
        met = None
        if row.target is not None:
            x = ratio if row.target.on == "ratio" else ours.median
            met = row.target.holds(x) if x is not None else None
        results.append(
            RowResult(
                benchmark=bench.name,
                label=row.label,
                unit=bench.metric.unit,
                status="ok",
                ours_side=row.ours,
                reference_side=row.reference,
                ours=ours,
                reference=ref,
                ratio=ratio,
                target=str(row.target) if row.target else None,
                met=met,
            )
        )
    return results


def failed_rows(
    bench: Benchmark, status: Literal["not available", "error"], reason: str
) -> list[RowResult]:
    return [
        RowResult(
            benchmark=bench.name,
            label=row.label,
            unit=bench.metric.unit,
            status=status,
            ours_side=row.ours,
            reference_side=row.reference,
            target=str(row.target) if row.target else None,
            reason=reason,
        )
        for row in bench.rows
    ]


def run_benchmark(bench: Benchmark, repeat: int) -> list[RowResult]:
    """Run one benchmark; never raises for a benchmark's own failure (the next one still runs)."""
    load_start = os.getloadavg()[0]
    rows = _run_benchmark(bench, repeat)
    load = (round(load_start, 2), round(os.getloadavg()[0], 2))
    for row in rows:
        row.load = load
    return rows


def _run_benchmark(bench: Benchmark, repeat: int) -> list[RowResult]:
    try:
        with bench.setup() as sides:
            stats = run_rounds(sides, repeat, warmup=bench.warmup)
            missing = {n: str(s) for n, s in sides.items() if isinstance(s, NotAvailable)}
    except NotAvailable as exc:
        return failed_rows(bench, "not available", str(exc))
    except Exception as exc:  # a broken component must not stop the other benchmarks
        return failed_rows(bench, "error", f"{type(exc).__name__}: {exc}")
    return evaluate(bench, stats, missing)


def select(benchmarks: Sequence[Benchmark], only: Sequence[str]) -> list[Benchmark]:
    """``only`` names benchmarks exactly, or by prefix (``client`` selects every client-*)
    when no benchmark has that exact name."""
    if not only:
        return list(benchmarks)
    names = [b.name for b in benchmarks]
    wanted: set[str] = set()
    for o in only:
        if o in names:
            wanted.add(o)
            continue
        matches = {n for n in names if n.startswith(o.rstrip("-") + "-")}
        if not matches:
            raise ValueError(f"unknown benchmark {o} (known: {', '.join(names)})")
        wanted |= matches
    return [b for b in benchmarks if b.name in wanted]


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) // 1024 // 1024} GiB"
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "commit": commit,
        "host": platform.node(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
    }


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


# --- reports ---------------------------------------------------------------------------------


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0 or abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _fig(s: Stats | None) -> str:
    return "-" if s is None else f"{_fmt(s.median)} ±{s.spread_pct:.0f}%"


def _verdict(r: RowResult) -> str:
    if r.status != "ok":
        return r.status
    if r.met is None:
        return "report"
    return "MET" if r.met else "missed"


def table_lines(rows: Sequence[RowResult]) -> Iterator[list[str]]:
    yield [
        "benchmark",
        "comparison",
        "unit",
        "ours",
        "reference",
        "ratio",
        "target",
        "verdict",
        "load",
    ]
    for r in rows:
        comparison = r.label
        yield [
            r.benchmark,
            comparison,
            r.unit,
            _fig(r.ours),
            _fig(r.reference),
            "-" if r.ratio is None else f"{r.ratio:.2f}x",
            r.target or "-",
            _verdict(r),
            "-" if r.load is None else f"{r.load[0]:.1f}-{r.load[1]:.1f}",
        ]


def format_text(rows: Sequence[RowResult]) -> str:
    lines = list(table_lines(rows))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    said = set()
    for r in rows:
        if r.reason and (r.benchmark, r.reason) not in said:
            said.add((r.benchmark, r.reason))
            out.append(f"{r.benchmark}: {r.status}: {r.reason}")
    return "\n".join(out)


def format_markdown(rows: Sequence[RowResult]) -> str:
    lines = list(table_lines(rows))
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


def to_json(run: Run) -> str:
    return json.dumps(asdict(run), indent=2, allow_nan=False, default=str)


def from_json(text: str) -> Run:
    data = json.loads(text)
    rows = []
    for r in data.pop("rows"):
        for key in ("ours", "reference"):
            if r.get(key) is not None:
                r[key] = Stats(**r[key])
        if r.get("load") is not None:
            r["load"] = tuple(r["load"])
        rows.append(RowResult(**r))
    return Run(rows=rows, **data)
