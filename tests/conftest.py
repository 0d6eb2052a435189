"""Under CI=true every skip and xfail fails unless allow-listed (tests/ci_guard.py)."""

from __future__ import annotations

import pytest

from tests.ci_guard import CIGuard
from tests.peers import IN_CI

pytest_plugins = ["pytester"]


def pytest_configure(config: pytest.Config) -> None:
    if IN_CI:
        config.pluginmanager.register(CIGuard(), "nbdgw-ci-guard")
