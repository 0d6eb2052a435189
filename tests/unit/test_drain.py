"""The first phase of a graceful stop (gateway.drain): what it waits for. The end-to-end
behaviour under SIGTERM is tests/gateway/test_security_faults.py's."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.drain import QUIET, Drain
from gateway.observability import InFlight


async def test_an_idle_gateway_stops_at_once() -> None:
    drain = Drain(asyncio.Event(), InFlight())
    assert await drain.settle(5.0) == pytest.approx(0.0, abs=0.05)


async def test_a_running_call_is_waited_for_then_a_quiet_moment() -> None:
    """A client whose call runs sends its next call the moment it ends: that one must find the
    gateway refusing (UNAVAILABLE), not its server stopped (grpc would cancel it)."""
    calls = InFlight()
    drain = Drain(asyncio.Event(), calls)
    calls.start()

    async def end_later() -> float:
        await asyncio.sleep(0.3)
        calls.end()
        return time.monotonic()

    ending = asyncio.create_task(end_later())
    settled = await drain.settle(5.0)
    ended = await ending
    assert calls.count == 0
    assert settled >= 0.3 + QUIET * 0.9
    assert time.monotonic() - ended >= QUIET * 0.9


async def test_calls_that_keep_coming_hold_the_stop_up_to_the_limit_only() -> None:
    calls = InFlight()
    drain = Drain(asyncio.Event(), calls)
    calls.start()  # never ends
    assert 0.5 <= await drain.settle(0.5) < 5.0
