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
- Every call, authenticated or not, and on a gateway without authentication: at most
  ``max_calls`` open at once and ``max_calls_per_connection`` on one client connection
  (RESOURCE_EXHAUSTED beyond), and its request message must arrive within ``request_timeout``
  seconds of its headers (DEADLINE_EXCEEDED): a call sent as headers with no body was held
  open for as long as the client liked, and without authentication 10,000 Health.Watch
  streams were held with no limit at all.
- Data in flight (:class:`DataBudget`): a StreamExtents data message takes its size from a
  gateway-wide budget (``buffered_data_mib``) before it is read from the host, and gives it
  back once grpc has taken it. A stream that cannot get budget waits (holding no buffer), in
  turn; one identity holds at most ``buffered_data_per_identity_mib`` of it. Each never-reading
  stream pinned ~4.6 MiB until its stall timeout (two 1 MiB messages, their copies, grpc's):
  without a budget, 256 of them pinned over 1 GiB; with it, what they pin is about 2.3 times
  the budget, whatever their number.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc
from google.rpc import error_details_pb2

from gateway.errors import GatewayError

T = TypeVar("T")

RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
MiB = 1024 * 1024


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
    max_calls: int = 1024  # calls of any kind open at once
    max_calls_per_connection: int = 256  # ... on one client connection
    request_timeout: float = 10.0  # seconds from a call's headers to its request message
    buffered_data_mib: float = 64.0  # StreamExtents data read and not yet taken by grpc
    buffered_data_per_identity_mib: float = 16.0  # ... of it held by one identity's streams

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
            self.max_calls,
            self.max_calls_per_connection,
        )
        if not all(isinstance(n, int) for n in counts) or not isinstance(self.clear_burst, int):
            raise ValueError("stream and call limits and the clear burst must be integers")
        if min(counts) < 1:
            raise ValueError("stream and call limits must be at least 1")
        if self.clear_rate < 0 or self.clear_burst < 1:
            raise ValueError("clear rate must be >= 0 and its burst >= 1")
        if self.stall_timeout < 0 or self.unary_timeout < 0 or self.unauthenticated_timeout <= 0:
            raise ValueError("timeouts must be >= 0")
        if self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if self.buffered_data_mib < 1 or self.buffered_data_per_identity_mib < 1:
            raise ValueError("the buffered data budgets must be at least 1 MiB")


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


class DataBudget:
    """Bytes of StreamExtents data in flight, gateway-wide: read (or being read) from a host and
    not yet taken by grpc. ``total`` in all, ``share`` for one owner (an identity).

    Takes are granted first come, first served, with one exception: a take held back only by
    its owner's share does not hold up the takes of other owners behind it (one identity's
    stalled streams must not starve the others). A take larger than what is left is granted
    once its owner (or everyone, for the total) holds nothing: a small budget slows streams
    down, it never blocks one for good.
    """

    def __init__(self, total: int, share: int) -> None:
        self.total = total
        self.share = share
        self.used = 0
        self.used_by: dict[str, int] = {}
        self.peak = 0
        self.waits = 0  # takes that had to wait (a metric)
        self.given = 0  # bytes given back so far: it stops growing when every holder stalls
        self._queue: deque[tuple[str, int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def _share_ok(self, owner: str, n: int) -> bool:
        held = self.used_by.get(owner, 0)
        return held == 0 or held + n <= self.share

    def _total_ok(self, n: int) -> bool:
        return self.used == 0 or self.used + n <= self.total

    def _grant(self, owner: str, n: int) -> None:
        self.used += n
        self.used_by[owner] = self.used_by.get(owner, 0) + n
        self.peak = max(self.peak, self.used)

    def try_take(self, owner: str, n: int) -> bool:
        """Take ``n`` bytes now if that is fair: False if it must wait its turn."""
        if any(self._share_ok(o, m) for o, m, _ in self._queue):
            return False  # someone waits for the total: after them
        if not (self._total_ok(n) and self._share_ok(owner, n)):
            return False
        self._grant(owner, n)
        return True

    async def take(self, owner: str, n: int) -> None:
        """Take ``n`` bytes, waiting for them in turn."""
        if self.try_take(owner, n):
            return
        self.waits += 1
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (owner, n, waiter)
        self._queue.append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(owner, n)  # granted as it was cancelled: not ours after all
            elif entry in self._queue:  # (a wake-up may have dropped it already)
                self._queue.remove(entry)
                self._wake()
            raise

    def give(self, owner: str, n: int) -> None:
        self.used -= n
        self.given += n
        left = self.used_by[owner] - n
        if left:
            self.used_by[owner] = left
        else:
            del self.used_by[owner]
        self._wake()

    def _wake(self) -> None:
        for entry in list(self._queue):
            owner, n, waiter = entry
            if waiter.done():  # cancelled: its task has not run its cleanup yet
                self._queue.remove(entry)
                continue
            if not self._share_ok(owner, n):
                continue  # its owner holds its share: the others may go ahead
            if not self._total_ok(n):
                break  # first come, first served for the total
            self._queue.remove(entry)
            self._grant(owner, n)
            waiter.set_result(None)


class BudgetLease:
    """One stream's use of the :class:`DataBudget`: what it holds is given back when the stream
    ends (:meth:`close`), however it ends."""

    def __init__(self, budget: DataBudget | None, owner: str) -> None:
        self.budget = budget
        self.owner = owner
        self.held = 0

    def try_take(self, n: int) -> bool:
        if self.budget is None:
            return True
        if self.budget.try_take(self.owner, n):
            self.held += n
            return True
        return False

    async def take(self, n: int) -> None:
        if self.budget is not None:
            await self.budget.take(self.owner, n)
            self.held += n

    def give(self, n: int) -> None:
        if self.budget is not None and n:
            n = min(n, self.held)
            self.held -= n
            self.budget.give(self.owner, n)

    def close(self) -> None:
        self.give(self.held)


# The lease of the StreamExtents call being served (set by the access interceptor); streams
# run without one (a servicer tested on its own) take from no budget.
CURRENT_LEASE: contextvars.ContextVar[BudgetLease | None] = contextvars.ContextVar(
    "nbdgw_budget_lease", default=None
)


def stream_budget() -> BudgetLease:
    """The data budget of the current stream: take a data message's size before reading it from
    the host, give it back once ``context.write`` returned (gateway.api.bitmaps)."""
    lease = CURRENT_LEASE.get()
    return _UNLIMITED if lease is None else lease


_UNLIMITED = BudgetLease(None, "")


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
    calls: int = 0
    calls_per_peer: dict[str, int] = field(default_factory=dict)
    refused_calls: int = 0
    request_timeouts: int = 0  # calls whose request message did not come in time
    budget: DataBudget = field(init=False)

    def __post_init__(self) -> None:
        lim = self.limits
        self.budget = DataBudget(
            int(lim.buffered_data_mib * MiB), int(lim.buffered_data_per_identity_mib * MiB)
        )

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
                    cut = deadline_exceeded(
                        f"the client read nothing for {stall:g} s; stream cancelled"
                    )
                    # The stalled write raises ``cut`` in the behaviour, which ends the call
                    # with it as with any failure: StreamExtents adds where to resume.
                    watched.cut = cut
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        # Cancelled between writes (one had just ended): no position to give.
                        await _abort(context, cut)
                    except GatewayError as err:  # a behaviour that lets its errors through
                        await _abort(context, err)
                    return
        except asyncio.CancelledError:  # the call itself was cancelled (client went away)
            task.cancel()
            raise
        task.result()

    @contextlib.contextmanager
    def stream_lease(self, owner: str) -> Iterator[BudgetLease]:
        """The budget lease of one stream, current while it runs, given back when it ends."""
        lease = BudgetLease(self.budget, owner)
        reset = CURRENT_LEASE.set(lease)
        try:
            yield lease
        finally:
            lease.close()
            CURRENT_LEASE.reset(reset)

    # --- every call -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _call_slot(self, peer: str) -> Iterator[None]:
        self.calls += 1
        self.calls_per_peer[peer] = self.calls_per_peer.get(peer, 0) + 1
        try:
            yield
        finally:
            self.calls -= 1
            left = self.calls_per_peer[peer] - 1
            if left:
                self.calls_per_peer[peer] = left
            else:
                del self.calls_per_peer[peer]

    def open_call(self, peer: str) -> contextlib.AbstractContextManager[None]:
        """A slot for any call from connection ``peer``, or RESOURCE_EXHAUSTED."""
        lim = self.limits
        if self.calls >= lim.max_calls:
            self.refused_calls += 1
            raise resource_exhausted(
                f"the gateway serves {lim.max_calls} calls at most; retry later", 1.0, "calls"
            )
        if self.calls_per_peer.get(peer, 0) >= lim.max_calls_per_connection:
            self.refused_calls += 1
            raise resource_exhausted(
                f"{lim.max_calls_per_connection} calls are open on this connection, its limit;"
                " retry once one ends, or open another connection",
                1.0,
                "calls_per_connection",
            )
        return self._call_slot(peer)

    async def receive_request(self, requests: Any, context: Any) -> Any:
        """The one request message of a call, once it came: within ``request_timeout`` seconds
        of the call's headers, else the call ends with DEADLINE_EXCEEDED."""
        timeout = self.limits.request_timeout
        try:
            return await asyncio.wait_for(anext(aiter(requests)), timeout)
        except TimeoutError:
            self.request_timeouts += 1
            await _abort(
                context,
                deadline_exceeded(f"no request message came within {timeout:g} s of the headers"),
            )
        except StopAsyncIteration:
            # No message: the client went away (grpc's own unary path calls that a cancel).
            raise asyncio.CancelledError from None
        raise AssertionError("abort returned")  # pragma: no cover

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
        self.cut: GatewayError | None = None  # set when the limiter cancels a stalled write

    async def write(self, message: Any) -> None:
        self.writing_since = self._clock()
        try:
            await self._context.write(message)
        except asyncio.CancelledError:
            if self.cut is None:
                raise
            raise self.cut from None
        finally:
            self.writing_since = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _abort(context: Any, err: GatewayError) -> None:
    await cast(Any, context).abort_with_status(err.grpc_status())
