"""Under CI=true no test skips or xfails unless it is on :data:`ALLOWED`: a skipped interop test
proves nothing, and the way it was skipped (a marker, ``pytest.skip``, ``raise
pytest.skip.Exception``, ``importorskip``, a module-level skip, an xfail) does not matter.

Registered by tests/conftest.py; tests/unit/test_peers.py drives it with pytester.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any

import pytest

# Test node ids (without parameters) allowed to skip in CI, each with why. Only opt-in tests
# that CI runs another way belong here.
ALLOWED: Mapping[str, str] = {
    "tests/deploy/test_container_check.py::test_container_check_with_the_pod": (
        "opt-in (NBDGW_CONTAINER_CHECK=1): CI runs scripts/container-check from scripts/test"
    ),
}


def _base(nodeid: str) -> str:
    return nodeid.split("[", 1)[0]


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    if getattr(report, "wasxfail", None) is not None:
        return f"xfail: {report.wasxfail}"  # type: ignore[attr-defined]
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


class CIGuard:
    """A pytest plugin: turns every skip and xfail (and xpass) outside :data:`ALLOWED` into a
    failure that says what was skipped and why."""

    def __init__(self, allowed: Mapping[str, str] = ALLOWED) -> None:
        self.allowed = allowed

    def _fail(self, report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
        reason = _reason(report)
        report.outcome = "failed"
        if hasattr(report, "wasxfail"):
            del report.wasxfail  # type: ignore[attr-defined]
        report.longrepr = (
            f"CI=true: {what} ({reason}); a test may not skip or xfail in CI unless it is in "
            "tests/ci_guard.py ALLOWED"
        )

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        if _base(report.nodeid) in self.allowed:
            return
        if report.skipped:
            kind = "xfailed" if hasattr(report, "wasxfail") else "skipped"
            self._fail(report, f"{kind} in {report.when}")
        elif report.passed and hasattr(report, "wasxfail"):
            self._fail(report, "xpassed (marked xfail)")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> Generator[None, Any, None]:
        outcome = yield
        report: pytest.CollectReport = outcome.get_result()
        if report.skipped and _base(report.nodeid) not in self.allowed:
            self._fail(report, "module skipped at collection")
