"""The CSI ``csi.v1.Identity`` and ``csi.v1.SnapshotMetadata`` services (Kubernetes changed
block tracking, docs/kubernetes-cbt.md), served on a unix socket to the external-snapshot-metadata
sidecar.

Snapshot ids are handles ``EXPORT/CHECKPOINT``: a checkpoint of a gateway export names a point in
its change history (gateway.hosts.checkpoints). GetMetadataDelta(base, target) is what was written
between the two checkpoints (``Snapshots.checkpoint_delta``); GetMetadataAllocated(C) is the
``base:allocation`` of the snapshot that started checkpoint C, while that snapshot is open (the
point in time exists only as long as something holds it).

The stream rules of the CSI spec are kept by :func:`plan`, a pure function: ranges strictly
increasing and disjoint across the whole stream, none ending at or before ``starting_offset``,
at most ``max_results`` per message, the same type and capacity in every message. The gateway
sets no stream deadline of its own.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_right
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
from google.protobuf import wrappers_pb2

from gateway import __version__, errors
from gateway.config import ConfigError, check_csi_block_size
from gateway.errors import GatewayError
from gateway.hosts.checkpoints import merged
from gateway.hosts.snapshots import snapshot_export_id
from nbdcore.aio.client import NBDClient
from nbdcore.constants import CONTEXT_BASE_ALLOCATION, NBD_STATE_HOLE
from nbdcore.exceptions import NBDError
from nbdcore.extents import iter_extents
from nbdgw.csi.v1 import csi_pb2 as cpb
from nbdgw.csi.v1 import csi_pb2_grpc as cpb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger("nbdgw.csi")

HANDLE_SEPARATOR = "/"  # EXPORT/CHECKPOINT: export ids never hold a "/" (gateway.api.names)
DEFAULT_MAX_RESULTS = 4096  # ranges per message when the caller leaves it to us (~90 KiB)
FIXED_LENGTH = cpb.BlockMetadataType.FIXED_LENGTH
VARIABLE_LENGTH = cpb.BlockMetadataType.VARIABLE_LENGTH
# FIXED_LENGTH answers come with a block size: the gateway's (csi_block_size, 0: extents), or
# the one a call's secrets name. The secrets are the requests' only free-form field; the sidecar
# fills them from the VolumeSnapshotClass's snapshotter secret, so a class can ask for blocks.
BLOCK_SIZE_KEY = "nbdgw.dev/block-size"

Range = tuple[int, int]  # (offset, length) in bytes


# --- handles -------------------------------------------------------------------------------------


def handle(export: str, checkpoint: str) -> str:
    """The snapshot id a CSI driver hands to Kubernetes for checkpoint ``checkpoint``."""
    return f"{export}{HANDLE_SEPARATOR}{checkpoint}"


def parse_handle(value: str, field_name: str) -> tuple[str, str]:
    """``EXPORT/CHECKPOINT`` -> (export, checkpoint). Empty: INVALID_ARGUMENT; an id of another
    shape resolves to nothing: NOT_FOUND."""
    if not value:
        raise errors.invalid_field(field_name, "required: a snapshot id (EXPORT/CHECKPOINT)")
    export, sep, checkpoint = value.partition(HANDLE_SEPARATOR)
    if not sep or not export or not checkpoint:
        raise GatewayError(
            grpc.StatusCode.NOT_FOUND,
            "SNAPSHOT_NOT_FOUND",
            f"{field_name} {value!r} names no snapshot: nbdgw snapshot ids are"
            " EXPORT/CHECKPOINT (docs/kubernetes-cbt.md)",
            {"snapshot_id": value},
        )
    return export, checkpoint


# --- the stream rules (pure) ---------------------------------------------------------------------


def blocks(ranges: Iterable[Range], block_size: int) -> Iterator[Range]:
    """The FIXED_LENGTH form: every aligned block of ``block_size`` that a range touches, once."""
    done = 0  # end of the last block given: blocks are never repeated
    for off, length in ranges:
        start = max(off - off % block_size, done)
        end = -(-(off + length) // block_size) * block_size
        for b in range(start, end, block_size):
            yield (b, block_size)
        done = max(done, end)


def plan(
    ranges: Sequence[Range], starting_offset: int, max_results: int, block_size: int | None
) -> Iterator[list[Range]]:
    """The messages of one stream: the merged ``ranges`` (sorted, disjoint) that end after
    ``starting_offset`` (the first may start before it), as blocks when ``block_size`` is set,
    at most ``max_results`` (0: our choice) per message."""
    per_message = max_results or DEFAULT_MAX_RESULTS
    # The first range that ends after starting_offset (ends are increasing).
    ends = _Ends(ranges)
    first = bisect_right(ends, starting_offset)
    shaped: Iterable[Range] = (ranges[i] for i in range(first, len(ranges)))
    if block_size is not None:
        shaped = (
            b for b in blocks(shaped, block_size) if b[0] + b[1] > starting_offset
        )  # a block may start before a range that ends after starting_offset
    batch: list[Range] = []
    for r in shaped:
        batch.append(r)
        if len(batch) == per_message:
            yield batch
            batch = []
    if batch:
        yield batch


class _Ends(Sequence[int]):
    """The end offsets of ``ranges``, computed on demand, for bisect."""

    def __init__(self, ranges: Sequence[Range]) -> None:
        self.ranges = ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: Any) -> Any:
        off, length = self.ranges[i]
        return off + length


def check_request(starting_offset: int, max_results: int, capacity: int) -> None:
    if max_results < 0:
        raise errors.invalid_field("max_results", f"must not be negative (got {max_results})")
    if starting_offset < 0 or starting_offset > capacity:
        raise GatewayError(
            grpc.StatusCode.OUT_OF_RANGE,
            errors.Reason.RANGE_PAST_END,
            f"starting_offset {starting_offset} is outside the volume (0 to {capacity} bytes)",
            {"field": "starting_offset", "value": str(starting_offset), "size": str(capacity)},
        )


# --- answers -------------------------------------------------------------------------------------


@dataclass
class Answer:
    capacity: int
    ranges: list[Range]  # sorted, merged


def _failed_precondition(message: str, **metadata: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.FAILED_PRECONDITION, "CHANGE_TRACKING_UNAVAILABLE", message, metadata
    )


def _checkpoint_not_found(export: str, checkpoint: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.NOT_FOUND,
        "CHECKPOINT_NOT_FOUND",
        f"export {export!r} has no checkpoint {checkpoint!r} (snapshot id {export}/{checkpoint})",
        {"export": export, "checkpoint": checkpoint},
    )


class Resolver:
    """Snapshot ids to answers, through the gateway's snapshot and checkpoint managers."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def _check_export(self, export: str) -> None:
        if export not in self.gateway.pools:
            raise errors.export_not_found(export)

    async def delta(self, base_id: str, target_id: str) -> Answer:
        violations = []
        for field_name, value in (("base_snapshot_id", base_id), ("target_snapshot_id", target_id)):
            if not value:
                violations.append((field_name, "required: a snapshot id (EXPORT/CHECKPOINT)"))
        if violations:
            raise errors.invalid_fields(violations)
        export, base = parse_handle(base_id, "base_snapshot_id")
        target_export, target = parse_handle(target_id, "target_snapshot_id")
        self._check_export(export)
        self._check_export(target_export)
        if export != target_export:
            raise errors.invalid_field(
                "target_snapshot_id",
                f"base {base_id!r} and target {target_id!r} are snapshots of two different"
                f" volumes ({export!r}, {target_export!r})",
            )
        try:
            found = await self.gateway.snapshots.checkpoint_delta(export, base, target)
        except GatewayError as err:
            if err.reason == "SNAPSHOTS_NOT_SUPPORTED":
                raise _failed_precondition(
                    f"change tracking is not available for {export!r}: {err.message}",
                    export=export,
                ) from None
            if any(name == "base" for name, _ in errors.field_violations(err)):
                raise errors.invalid_field(
                    "base_snapshot_id", f"base {base_id!r} was taken after target {target_id!r}"
                ) from None
            raise
        return Answer(found.size, list(merged(found.ranges)))

    async def allocated(self, snapshot_id: str) -> Answer:
        export, checkpoint = parse_handle(snapshot_id, "snapshot_id")
        self._check_export(export)
        snap = await self._snapshot_of(export, checkpoint)
        if snap is None:
            raise await self._missing_point(export, checkpoint)
        pool = snapshot_export_id(export, snap.name.rsplit("/", 1)[-1])
        capacity, ranges = await self._read(pool, CONTEXT_BASE_ALLOCATION, dirty=False)
        return Answer(capacity, ranges)

    async def _snapshot_of(self, export: str, checkpoint: str) -> spb.Snapshot | None:
        """The open snapshot of ``export`` that started ``checkpoint``, if any."""
        token = ""
        while True:
            page = await self.gateway.snapshots.list(
                spb.ListSnapshotsRequest(parent=export, page_token=token)
            )
            for snap in page.snapshots:
                if snap.checkpoint_id == checkpoint:
                    return snap
            token = page.next_page_token
            if not token:
                return None

    async def _missing_point(self, export: str, checkpoint: str) -> GatewayError:
        """NOT_FOUND for a checkpoint the chain does not have; FAILED_PRECONDITION for one whose
        point in time is no longer held (its snapshot was released)."""
        if checkpoint not in await self._chain(export):
            return _checkpoint_not_found(export, checkpoint)
        return _failed_precondition(
            f"checkpoint {checkpoint!r} of {export!r} exists, but its point in time is no longer"
            " held: keep the snapshot that started it open while the VolumeSnapshot exists",
            export=export,
            checkpoint=checkpoint,
        )

    async def _chain(self, export: str) -> list[str]:
        """The checkpoint ids of ``export``, oldest first (none on a host without them)."""
        try:
            chain = await self.gateway.snapshots.list_checkpoints(
                spb.ListCheckpointsRequest(parent=export)
            )
        except GatewayError as err:
            if err.code == grpc.StatusCode.FAILED_PRECONDITION:
                return []  # a host without checkpoints: every id resolves to nothing
            raise
        return [c.name.rsplit("/", 1)[-1] for c in chain.checkpoints]

    async def _size(self, pool_name: str) -> int:
        pool = self.gateway.pools[pool_name]

        async def size(client: NBDClient) -> int:
            return int(client.size or 0)

        return await pool.run([], size)

    async def _read(self, pool_name: str, context: str, *, dirty: bool) -> tuple[int, list[Range]]:
        """The merged ranges of ``context`` on a gateway export: dirty ones of a bitmap, or the
        allocated (not hole) ones of base:allocation; and the export's size."""
        pool = self.gateway.pools.get(pool_name)
        if pool is None:
            raise errors.export_not_found(pool_name)
        ranges: list[Range] = []

        async def read(client: NBDClient) -> int:
            async for batch in iter_extents(client, [context]):
                for off, length, (flags,) in batch.rows():
                    if bool(flags & 1) if dirty else not flags & NBD_STATE_HOLE:
                        if ranges and ranges[-1][0] + ranges[-1][1] == off:
                            ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                        else:
                            ranges.append((off, length))
            return int(client.size or 0)

        try:
            size = await pool.run([context], read)
        except (OSError, NBDError, EOFError) as exc:
            raise errors.from_exception(exc, export=pool_name, host=pool.host.name) from None
        return size, ranges


# --- the servicers -------------------------------------------------------------------------------


class IdentityServicer(cpb_grpc.IdentityServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def GetPluginInfo(
        self, request: cpb.GetPluginInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cpb.GetPluginInfoResponse:
        return cpb.GetPluginInfoResponse(
            name=self.gateway.config.csi_driver_name, vendor_version=__version__
        )

    async def GetPluginCapabilities(
        self,
        request: cpb.GetPluginCapabilitiesRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> cpb.GetPluginCapabilitiesResponse:
        service = cpb.PluginCapability.Service(
            type=cpb.PluginCapability.Service.Type.SNAPSHOT_METADATA_SERVICE
        )
        return cpb.GetPluginCapabilitiesResponse(
            capabilities=[cpb.PluginCapability(service=service)]
        )

    async def Probe(
        self, request: cpb.ProbeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cpb.ProbeResponse:
        # The gateway's readiness: every NBD host up, and not shutting down.
        gw = self.gateway
        ready = not gw.shutdown.is_set() and all(h.up for h in gw.hosts.values())
        return cpb.ProbeResponse(ready=wrappers_pb2.BoolValue(value=ready))


class SnapshotMetadataServicer(cpb_grpc.SnapshotMetadataServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.resolver = Resolver(gateway)

    def _block_size(self, secrets: Any) -> int | None:
        """The FIXED_LENGTH block size of a call; None: VARIABLE_LENGTH extents."""
        value = secrets.get(BLOCK_SIZE_KEY)
        if value is None:
            size = self.gateway.config.csi_block_size
        else:
            try:
                size = check_csi_block_size(int(value), "block size")
            except (ValueError, ConfigError) as exc:
                raise errors.invalid_field(f"secrets[{BLOCK_SIZE_KEY}]", str(exc)) from None
        return size or None

    async def GetMetadataAllocated(
        self,
        request: cpb.GetMetadataAllocatedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[cpb.GetMetadataAllocatedResponse]:
        async def answer() -> Answer:
            return await self.resolver.allocated(request.snapshot_id)

        async for msg in self._stream(
            context,
            "GetMetadataAllocated",
            request.snapshot_id,
            answer,
            cpb.GetMetadataAllocatedResponse,
            request.starting_offset,
            request.max_results,
            request.secrets,
        ):
            yield msg

    async def GetMetadataDelta(
        self,
        request: cpb.GetMetadataDeltaRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[cpb.GetMetadataDeltaResponse]:
        async def answer() -> Answer:
            return await self.resolver.delta(request.base_snapshot_id, request.target_snapshot_id)

        async for msg in self._stream(
            context,
            "GetMetadataDelta",
            request.target_snapshot_id,
            answer,
            cpb.GetMetadataDeltaResponse,
            request.starting_offset,
            request.max_results,
            request.secrets,
        ):
            yield msg

    async def _stream(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        method: str,
        snapshot_id: str,
        answer: Any,
        response: Any,
        starting_offset: int,
        max_results: int,
        secrets: Any,
    ) -> AsyncIterator[Any]:
        try:
            if max_results < 0:  # before any work: the cheapest refusal first
                raise errors.invalid_field(
                    "max_results", f"must not be negative (got {max_results})"
                )
            block_size = self._block_size(secrets)
            if starting_offset < 0:
                check_request(starting_offset, max_results, 0)
            found: Answer = await answer()
            check_request(starting_offset, max_results, found.capacity)
        except GatewayError as err:
            await cast(Any, context).abort_with_status(err.grpc_status())
            raise AssertionError("abort returned") from None  # pragma: no cover
        kind = VARIABLE_LENGTH if block_size is None else FIXED_LENGTH
        # Resolved, so the id names an export: a bounded label set.
        counted = self.gateway.metrics.csi_ranges_streamed.labels(
            method, snapshot_id.partition(HANDLE_SEPARATOR)[0]
        )
        sent = 0
        for batch in plan(found.ranges, starting_offset, max_results, block_size):
            if self.gateway.shutdown.is_set():
                # Resume where this message would have started (its first range may begin
                # before starting_offset: resuming there repeats nothing the caller has).
                resume = max(batch[0][0], starting_offset)
                await cast(Any, context).abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"{errors.shutting_down().message}; resume with starting_offset={resume}",
                )
            msg = response(block_metadata_type=kind, volume_capacity_bytes=found.capacity)
            add = msg.block_metadata.add
            for off, length in batch:
                add(byte_offset=off, size_bytes=length)
            sent += 1
            counted.inc(len(batch))
            yield msg
            await asyncio.sleep(0)  # let other calls run between messages of a long stream
        log.debug("csi stream: %d messages, %d ranges in all", sent, len(found.ranges))
