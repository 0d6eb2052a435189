"""The first phase of a graceful stop: new calls are answered UNAVAILABLE
(GATEWAY_SHUTTING_DOWN, with a retry delay) until they stop coming, and only then does the grpc
server stop.

Why not ``server.stop(grace)`` at once: grpc cancels every call that reaches the server once
its stop has begun, and a client takes CANCELLED for its own doing and does not retry it. A
client that sends its next call the moment the last one ended (a backup clearing what it just
copied) would see CANCELLED. Answered by the gateway instead, the call ends UNAVAILABLE, which
clients retry (on another instance, or after the restart).

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
from gateway.security.access import OPEN_PREFIXES

# New calls must have stopped arriving for this long before the server stops. A client that
# honours the refusal's retry delay (1 s) sends nothing more; one that sends a sequence of
# calls sends the next within milliseconds.
QUIET = 0.1

if TYPE_CHECKING:  # grpc-stubs makes it generic; grpc itself does not
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class Drain(_Interceptor):
    """Refuses new calls once ``stopping`` is set; :meth:`settle` waits until they stop."""

    def __init__(self, stopping: asyncio.Event, open_prefixes: tuple[str, ...] = ()) -> None:
        self.stopping = stopping
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
        """Wait until no call has arrived for QUIET seconds, ``limit`` seconds at most (calls
        that keep coming must not hold the stop up). Returns the seconds waited."""
        start = time.monotonic()
        while True:
            now = time.monotonic()
            wait = min(self.last_call + QUIET, start + limit) - now
            if wait <= 0:
                return now - start
            await asyncio.sleep(wait)
