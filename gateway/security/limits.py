"""Limits that keep one caller from starving the others.

- Concurrent StreamExtents calls, in total and per identity: one more is RESOURCE_EXHAUSTED
  (with RetryInfo) at once, never queued (a queue would hold memory for callers that may be gone).
- ClearRange rate per identity: a token bucket (``clear_rate`` per second, bursts of
  ``clear_burst``); over it, RESOURCE_EXHAUSTED with the wait in RetryInfo.
- A stalled reader: a stream whose ``context.write`` has not completed for ``stall_timeout``
  seconds (the client stopped reading; HTTP/2 flow control holds the write) is cancelled and
  ends with DEADLINE_EXCEEDED, freeing its slot and its two buffered messages.
- Unary calls are cut at ``unary_timeout`` seconds (DEADLINE_EXCEEDED), whatever the client's
  own deadline (a client without one must not pin a call forever on a stuck host).
- Calls without an identity (the open health checks when the gateway authenticates callers):
  at most ``max_unauthenticated`` at once, ``max_unauthenticated_per_connection`` per client
  connection (RESOURCE_EXHAUSTED beyond), each cut after ``unauthenticated_timeout`` seconds
  (DEADLINE_EXCEEDED): 10,000 token-less Health.Watch streams held the memory of 10,000 calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.rpc import error_details_pb2

from gateway.errors import GatewayError

T = TypeVar("T")

RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


@dataclass
class Limits:
    max_streams: int = 256
    max_streams_per_identity: int = 64
    clear_rate: float = 100.0  # ClearRange calls per second and identity (0: unlimited)
    clear_burst: int = 200
    stall_timeout: float = 60.0  # seconds a stream's write may wait for the client (0: none)
    unary_timeout: float = 120.0  # seconds a unary call may take (0: unlimited)
    max_unauthenticated: int = 64  # calls without an identity open at once (health probes)
    max_unauthenticated_per_connection: int = 4
    unauthenticated_timeout: float = 10.0  # seconds such a call may last

    def check(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{f.name} must be a number, not {value!r}")
        counts = (
            self.max_streams,
            self.max_streams_per_identity,
            self.max_unauthenticated,
            self.max_unauthenticated_per_connection,
        )
        if not all(isinstance(n, int) for n in counts) or not isinstance(self.clear_burst, int):
            raise ValueError("stream and call limits and the clear burst must be integers")
        if min(counts) < 1:
            raise ValueError("stream and call limits must be at least 1")
        if self.clear_rate < 0 or self.clear_burst < 1:
            raise ValueError("clear rate must be >= 0 and its burst >= 1")
        if self.stall_timeout < 0 or self.unary_timeout < 0 or self.unauthenticated_timeout <= 0:
            raise ValueError("timeouts must be >= 0")


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromMilliseconds(max(1, int(seconds * 1000)))
    return info


def resource_exhausted(message: str, retry_after: float, what: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        RESOURCE_EXHAUSTED,
        message,
        {"limit": what},
        [_retry_info(retry_after)],
    )


def deadline_exceeded(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_EXCEEDED, message)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.tokens = float(burst)
        self.stamp = clock()

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens: 0.0 if granted, else the seconds until they would be."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


@dataclass
class Limiter:
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    streams: int = 0
    per_identity: dict[str, int] = field(default_factory=dict)
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    # Counters for metrics and tests.
    refused_streams: int = 0
    refused_clears: int = 0
    stalled: int = 0
    timed_out: int = 0
    ended_streams: int = 0  # streams that held a slot and ended (gateway.server trims after)
    unauthenticated: int = 0
    unauthenticated_per_peer: dict[str, int] = field(default_factory=dict)
    refused_unauthenticated: int = 0

    # --- streams ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _slot(self, identity: str) -> Iterator[None]:
        self.streams += 1
        self.per_identity[identity] = self.per_identity.get(identity, 0) + 1
        try:
            yield
        finally:
            self.streams -= 1
            self.ended_streams += 1
            left = self.per_identity[identity] - 1
            if left:
                self.per_identity[identity] = left
            else:
                del self.per_identity[identity]

    def open_stream(self, identity: str) -> contextlib.AbstractContextManager[None]:
        """A slot for one stream (a context manager), or RESOURCE_EXHAUSTED."""
        lim = self.limits
        if self.streams >= lim.max_streams:
            self.refused_streams += 1
            raise resource_exhausted(
                f"the gateway serves {lim.max_streams} streams at most; retry later",
                1.0,
                "streams",
            )
        if self.per_identity.get(identity, 0) >= lim.max_streams_per_identity:
            self.refused_streams += 1
            raise resource_exhausted(
                f"identity {identity!r} has {lim.max_streams_per_identity} streams open, its"
                " limit; retry once one ends",
                1.0,
                "streams_per_identity",
            )
        return self._slot(identity)

    async def run_stream(
        self, behaviour: Callable[[Any, Any], Awaitable[Any]], request: Any, context: Any
    ) -> None:
        """Run a write()-ing stream behaviour; cancel it if a write stalls too long."""
        stall = self.limits.stall_timeout
        if not stall:
            await behaviour(request, context)
            return
        watched = _WatchedContext(context, self.clock)
        task = asyncio.ensure_future(behaviour(request, watched))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=max(stall / 4, 0.01))
                if done:
                    break
                since = watched.writing_since
                if since is not None and self.clock() - since > stall:
                    self.stalled += 1
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    await _abort(
                        context,
                        deadline_exceeded(
                            f"the client read nothing for {stall:g} s; stream cancelled"
                        ),
                    )
                    return
        except asyncio.CancelledError:  # the call itself was cancelled (client went away)
            task.cancel()
            raise
        task.result()

    # --- calls without an identity --------------------------------------------------------

    @contextlib.contextmanager
    def _unauthenticated_slot(self, peer: str) -> Iterator[None]:
        self.unauthenticated += 1
        self.unauthenticated_per_peer[peer] = self.unauthenticated_per_peer.get(peer, 0) + 1
        try:
            yield
        finally:
            self.unauthenticated -= 1
            left = self.unauthenticated_per_peer[peer] - 1
            if left:
                self.unauthenticated_per_peer[peer] = left
            else:
                del self.unauthenticated_per_peer[peer]

    def open_unauthenticated(self, peer: str) -> contextlib.AbstractContextManager[None]:
        """A slot for a call without an identity from connection ``peer`` (grpc's
        ``context.peer()``: address and port, one per TCP connection), or RESOURCE_EXHAUSTED."""
        lim = self.limits
        if self.unauthenticated >= lim.max_unauthenticated:
            self.refused_unauthenticated += 1
            raise resource_exhausted(
                f"the gateway serves {lim.max_unauthenticated} calls without credentials at"
                " most; retry later, or authenticate",
                1.0,
                "unauthenticated",
            )
        if self.unauthenticated_per_peer.get(peer, 0) >= lim.max_unauthenticated_per_connection:
            self.refused_unauthenticated += 1
            raise resource_exhausted(
                f"{lim.max_unauthenticated_per_connection} calls without credentials are open"
                " on this connection, its limit",
                1.0,
                "unauthenticated_per_connection",
            )
        return self._unauthenticated_slot(peer)

    async def run_unauthenticated(self, call: Awaitable[T], context: Any) -> T | None:
        """Run a call without an identity for at most ``unauthenticated_timeout`` seconds."""
        timeout = self.limits.unauthenticated_timeout
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            self.timed_out += 1
            await _abort(
                context,
                deadline_exceeded(
                    f"calls without credentials last {timeout:g} s at most; authenticate for"
                    " longer ones"
                ),
            )
            return None

    # --- unary calls -----------------------------------------------------------------------

    async def run_unary(self, call: Awaitable[T], context: Any) -> T:
        timeout = self.limits.unary_timeout
        if not timeout:
            return await call
        try:
            return await asyncio.wait_for(call, timeout)
        except TimeoutError:
            self.timed_out += 1
            await _abort(context, deadline_exceeded(f"the call took more than {timeout:g} s"))
            raise AssertionError("abort returned") from None  # pragma: no cover

    # --- ClearRange rate -------------------------------------------------------------------

    def take_clear(self, identity: str) -> float:
        """0.0 if a ClearRange may run now, else the seconds to wait."""
        lim = self.limits
        if not lim.clear_rate:
            return 0.0
        bucket = self.buckets.get(identity)
        if bucket is None:
            bucket = self.buckets[identity] = TokenBucket(
                lim.clear_rate, lim.clear_burst, self.clock
            )
        wait = bucket.take()
        if wait:
            self.refused_clears += 1
        return wait

    def clear_rate_exceeded(self, wait: float) -> GatewayError:
        return resource_exhausted(
            f"ClearRange is limited to {self.limits.clear_rate:g} calls per second"
            f" (bursts of {self.limits.clear_burst}); retry in {wait:.3f} s",
            wait,
            "clear_rate",
        )


class _WatchedContext:
    """A servicer context whose ``write`` records since when it has been waiting."""

    def __init__(self, context: Any, clock: Callable[[], float]) -> None:
        self._context = context
        self._clock = clock
        self.writing_since: float | None = None

    async def write(self, message: Any) -> None:
        self.writing_since = self._clock()
        try:
            await self._context.write(message)
        finally:
            self.writing_since = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _abort(context: Any, err: GatewayError) -> None:
    await cast(Any, context).abort_with_status(err.grpc_status())
