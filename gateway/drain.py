"""The first phase of a graceful stop: new calls are answered UNAVAILABLE
(GATEWAY_SHUTTING_DOWN, with a retry delay) until they stop coming and the running ones have
ended, and only then does the grpc server stop.

Why not ``server.stop(grace)`` at once: grpc cancels every call that reaches the server once
its stop has begun, and a client takes CANCELLED for its own doing and does not retry it. A
client that sends its next call the moment the last one ended (a backup clearing what it just
copied) would see CANCELLED. Answered by the gateway instead, the call ends UNAVAILABLE, which
clients retry (on another instance, or after the restart). A client whose call is still
running sends its next call the moment it ends: so the wait is for the running calls
(gateway.observability.InFlight) too, then for a quiet moment.

Health calls (and the CSI Identity service's) are never refused: probes must keep seeing
NOT_SERVING (not ready) while the gateway drains.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from gateway import errors
from gateway.observability import InFlight
from gateway.security.access import OPEN_PREFIXES

# No call may have arrived or ended for this long before the server stops. A client that
# honours the refusal's retry delay (1 s) sends nothing more; one that sends a sequence of
# calls sends the next within milliseconds of the last one's end.
QUIET = 0.1

if TYPE_CHECKING:  # grpc-stubs makes it generic; grpc itself does not
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class Drain(_Interceptor):
    """Refuses new calls once ``stopping`` is set; :meth:`settle` waits until they stop and
    ``in_flight`` (the calls the server runs) is empty."""

    def __init__(
        self,
        stopping: asyncio.Event,
        in_flight: InFlight,
        open_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.stopping = stopping
        self.in_flight = in_flight
        self.open_prefixes = OPEN_PREFIXES + open_prefixes
        self.refused = 0
        # The last call that arrived (health aside), stopping or not: a gateway stopped right
        # after a call waits for a possible next one; an idle one stops at once.
        self.last_call = float("-inf")

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.open_prefixes):
            return handler
        self.last_call = time.monotonic()
        if not self.stopping.is_set():
            return handler
        self.refused += 1

        async def refuse(_requests: Any, context: Any) -> None:
            await context.abort_with_status(errors.shutting_down().grpc_status())

        # Request-streaming, so that grpc runs it before any message arrives (as
        # gateway.security.access refuses calls on their headers).
        refusal: grpc.RpcMethodHandler[Any, Any] = grpc.stream_stream_rpc_method_handler(refuse)
        return refusal

    async def settle(self, limit: float) -> float:
        """Wait until no call runs and none has arrived or ended for QUIET seconds; ``limit``
        seconds at most (calls that keep coming, or a long one, must not hold the stop up: the
        server's grace period is theirs then). Returns the seconds waited."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            if now - start >= limit:
                return now - start
            if self.in_flight.count > 0:
                await asyncio.sleep(min(QUIET / 4, start + limit - now))
                continue
            quiet_from = max(self.last_call, self.in_flight.last_end)
            wait = min(quiet_from + QUIET, start + limit) - now
            if wait <= 0:
                return now - start
            await asyncio.sleep(wait)
