"""grpc.health.v1 for the gateway: grpc's own servicer, except that a Check of a name it does
not serve fails with a rich status (an ErrorInfo, as every error of the gateway) instead of a
bare NOT_FOUND.

Service names (gateway.server sets their statuses):

- ``""``: liveness; ``nbdgw.v1.BitmapService``: readiness;
- ``exports/{export}``: that export's host is reachable. An export made since the last status
  change (a snapshot's, ``exports/{export}@{snapshot}``) is answered from its host's state.

A name outside these fails with NOT_FOUND, as the health protocol says: reason
EXPORT_NOT_FOUND for ``exports/{export}`` of an export the gateway does not serve,
HEALTH_SERVICE_NOT_FOUND for any other name. Watch keeps grpc's behaviour (SERVICE_UNKNOWN in
the stream, which the protocol prescribes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import grpc
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health.aio re-exports
from grpc_health.v1 import health_pb2

from gateway import errors

EXPORT_PREFIX = "exports/"

# The status of export ``{export}`` now, or None when the gateway serves no such export.
ExportStatus = Callable[[str], "health_pb2.HealthCheckResponse.ServingStatus | None"]


class HealthServicer(health_aio.HealthServicer):  # type: ignore[misc]  # untyped in grpc
    def __init__(self, export_status: ExportStatus) -> None:
        super().__init__()
        self._export_status = export_status
        self._names = {""}  # the names given a status (grpc's servicer starts with "")

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        self._names.add(service)
        await super().set(service, status)

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        service = request.service
        if service.startswith(EXPORT_PREFIX):
            # The exports of now: a released snapshot's export keeps a stale status here.
            export = service.removeprefix(EXPORT_PREFIX)
            status = self._export_status(export)
            if status is None:
                err = errors.export_not_found(export)
            elif service not in self._names:
                return health_pb2.HealthCheckResponse(status=status)
            else:
                return cast(health_pb2.HealthCheckResponse, await super().Check(request, context))
        elif service in self._names:
            return cast(health_pb2.HealthCheckResponse, await super().Check(request, context))
        else:
            err = errors.health_service_not_found(service)
        await cast(Any, context).abort_with_status(err.grpc_status())
        raise AssertionError("abort returned")  # pragma: no cover
