"""Optional bearer-token authentication of gRPC calls (a grpc.aio server interceptor).

With a token configured, every BitmapService call must carry the metadata
``authorization: Bearer TOKEN``; others fail with UNAUTHENTICATED (ErrorInfo reason
UNAUTHENTICATED). Health checks and reflection stay open: probes (the kubelet) send no token.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from gateway import errors

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


if TYPE_CHECKING:  # grpc-stubs makes it generic; grpc itself does not
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor


class BearerTokenInterceptor(_Interceptor):
    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("empty token")
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        got = metadata.get("authorization")
        handler = await continuation(details)
        if isinstance(got, str) and hmac.compare_digest(got.encode(), self._expected):
            return handler
        why = "missing bearer token" if got is None else "wrong bearer token"
        denied: grpc.RpcMethodHandler[Any, Any] = _deny(handler, errors.unauthenticated(why))
        return denied


def _deny(handler: grpc.RpcMethodHandler[Any, Any] | None, err: errors.GatewayError) -> Any:
    async def abort(request: Any, context: Any) -> None:
        await context.abort_with_status(err.grpc_status())

    if handler is not None and handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            abort,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return grpc.unary_unary_rpc_method_handler(
        abort,
        request_deserializer=handler.request_deserializer if handler else None,
        response_serializer=handler.response_serializer if handler else None,
    )
