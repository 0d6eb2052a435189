"""Print how many inputs each fuzz target was fed (and save them for scripts/fuzz)."""

from __future__ import annotations

from typing import Any

from tests.fuzz.support import TRIED, write_counts


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not TRIED:
        return
    write_counts()
    terminalreporter.section("fuzz inputs tried")
    for target, n in sorted(TRIED.items()):
        terminalreporter.write_line(f"{target:40} {n:>10}")
    terminalreporter.write_line(f"{'total':40} {sum(TRIED.values()):>10}")
