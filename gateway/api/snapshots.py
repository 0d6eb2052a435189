"""The ``nbdgw.v1.SnapshotService`` servicer: each call handed to the snapshot manager
(:mod:`gateway.hosts.snapshots`), its failures turned into statuses by :mod:`gateway.errors`."""

from __future__ import annotations

import logging
from typing import Any, cast

import grpc

from gateway import errors
from gateway.config import EMBEDDED_HOST
from gateway.errors import GatewayError
from gateway.hosts.snapshots import Snapshots
from nbdcore.exceptions import NBDError
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc

log = logging.getLogger("nbdgw.snapshots")


class SnapshotServicer(spb_grpc.SnapshotServiceServicer):
    def __init__(self, snapshots: Snapshots) -> None:
        self.snapshots = snapshots

    async def _call(
        self, context: grpc.aio.ServicerContext[Any, Any], export: str, body: Any
    ) -> Any:
        try:
            return await body()
        except GatewayError as err:
            await cast(Any, context).abort_with_status(err.grpc_status())
        except Exception as exc:
            if not isinstance(exc, (OSError, NBDError)):
                log.exception("unexpected failure")
            mapped = errors.from_exception(exc, export=export, host=EMBEDDED_HOST)
            await cast(Any, context).abort_with_status(mapped.grpc_status())
        raise AssertionError("abort returned")  # pragma: no cover

    async def CreateSnapshot(
        self, request: spb.CreateSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.Snapshot:
        result: spb.Snapshot = await self._call(
            context, request.parent, lambda: self.snapshots.create(request)
        )
        return result

    async def ListSnapshots(
        self, request: spb.ListSnapshotsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.ListSnapshotsResponse:
        async def body() -> spb.ListSnapshotsResponse:
            return await self.snapshots.list(request)

        result: spb.ListSnapshotsResponse = await self._call(context, request.parent, body)
        return result

    async def ReleaseSnapshot(
        self, request: spb.ReleaseSnapshotRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.ReleaseSnapshotResponse:
        result: spb.ReleaseSnapshotResponse = await self._call(
            context, request.name, lambda: self.snapshots.release(request)
        )
        return result

    async def ListCheckpoints(
        self, request: spb.ListCheckpointsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.ListCheckpointsResponse:
        result: spb.ListCheckpointsResponse = await self._call(
            context, request.parent, lambda: self.snapshots.list_checkpoints(request)
        )
        return result

    async def DeleteCheckpoint(
        self, request: spb.DeleteCheckpointRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> spb.DeleteCheckpointResponse:
        result: spb.DeleteCheckpointResponse = await self._call(
            context, request.name, lambda: self.snapshots.delete_checkpoint(request)
        )
        return result
