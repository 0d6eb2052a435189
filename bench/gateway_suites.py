"""Gateway benchmarks (filled in when the gateway lands)."""

from __future__ import annotations

from bench.fixtures import Fixtures
from bench.harness import Benchmark


def benchmarks(fx: Fixtures, opts: dict[str, int]) -> list[Benchmark]:
    return []
