"""The asyncio client, over grpc.aio."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from nbdgw import _core, _wire
from nbdgw._models import (
    Bitmap,
    ByteRange,
    Checkpoint,
    ClearResult,
    DataChunk,
    Export,
    Extent,
    ExtentBatch,
    ExtentFilter,
    GenerationChange,
    Release,
    RetryEvent,
    Snapshot,
    SnapshotOnFull,
)
from nbdgw._options import (
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT,
    TLS,
    Retry,
    channel_spec,
    check_timeout,
)
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc

# Retries are logged here (WARNING), and passed to on_retry.
_log = logging.getLogger("nbdgw")


class AsyncClient:
    """An asyncio client of an nbdgw gateway: :class:`nbdgw.Client`'s surface, with
    coroutines for calls and async iterators for streams.

    Create it inside the running event loop (``async with AsyncClient(...) as client:``).
    An async iterator left early releases its stream when it is closed: wrap it in
    ``contextlib.aclosing`` to do that at once rather than at garbage collection.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: TLS | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry: Retry | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        spec = channel_spec(target, token=token, tls=tls, options=tuple(channel_options))
        self.target = target
        self.timeout = check_timeout(timeout)
        self.retry = retry or Retry()
        self._on_retry = on_retry
        self._metadata = spec.metadata
        if spec.credentials is None:
            self._channel = grpc.aio.insecure_channel(spec.target, options=spec.options)
        else:
            self._channel = grpc.aio.secure_channel(spec.target, spec.credentials, spec.options)
        self._bitmaps: Any = pb_grpc.BitmapServiceStub(self._channel)
        self._snapshots: Any = spb_grpc.SnapshotServiceStub(self._channel)
        # StreamExtents' data stays in the bytes gRPC received (nbdgw._wire): one copy less.
        self._stream_extents: Any = self._channel.unary_stream(
            _core.STREAM_EXTENTS,
            request_serializer=pb.StreamExtentsRequest.SerializeToString,
            response_deserializer=_wire.parse_response,
            _registered_method=True,  # type: ignore[call-arg]  # as generated stubs do
        )

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- calls ---------------------------------------------------------------------------------

    async def _unary(self, stub: Any, method: str, request: Any, *, retry: bool = True) -> Any:
        policy = self.retry if retry else Retry(attempts=0)
        state = _core.RetryState(policy, _core.RETRYABLE_UNARY, method)
        while True:
            try:
                return await getattr(stub, method)(
                    request, metadata=self._metadata, timeout=self.timeout
                )
            except grpc.RpcError as exc:
                event = state.next_delay(_core.error_from_rpc(exc))
            self._retrying(event)
            await asyncio.sleep(event.delay)

    async def _stream(
        self, method: str, request: Any, retry: Retry | None = None
    ) -> AsyncIterator[Any]:
        resume = _core.StreamResume(method, request, retry or self.retry)
        stub = self._stream_extents if method == "StreamExtents" else getattr(self._bitmaps, method)
        while True:
            call = stub(resume.request, metadata=self._metadata)
            try:
                async for msg in call:
                    resume.accept(msg)
                    yield msg
                resume.ended()
                return
            except grpc.RpcError as exc:
                event = resume.failed(exc)
            finally:
                call.cancel()  # a consumer that stops early frees the stream now
            self._retrying(event)
            await asyncio.sleep(event.delay)

    def _retrying(self, event: RetryEvent) -> None:
        _log.warning("%s", event)
        if self._on_retry is not None:
            self._on_retry(event)

    async def list_exports(self) -> list[Export]:
        """Every export of the gateway, in configuration order (all pages)."""
        out: list[Export] = []
        token = ""
        while True:
            req = pb.ListExportsRequest(page_token=token)
            resp = await self._unary(self._bitmaps, "ListExports", req)
            out += map(_core.export_from, resp.exports)
            token = resp.next_page_token
            if not token:
                return out

    async def get_export(self, export: str) -> Export:
        """One export, as its host describes it now (``disk`` or ``exports/disk``)."""
        return _core.export_from(
            await self._unary(self._bitmaps, "GetExport", pb.GetExportRequest(name=export))
        )

    async def list_bitmaps(self, export: str) -> list[Bitmap]:
        """Every metadata context the export's host offers (all pages)."""
        out: list[Bitmap] = []
        token = ""
        while True:
            req = pb.ListBitmapsRequest(parent=export, page_token=token)
            resp = await self._unary(self._bitmaps, "ListBitmaps", req)
            out += map(_core.bitmap_from, resp.bitmaps)
            token = resp.next_page_token
            if not token:
                return out

    async def stream_extents(
        self,
        request: pb.StreamExtentsRequest,
        *,
        retry: Retry | None = None,
        check_digest: bool = False,
    ) -> AsyncIterator[ExtentBatch]:
        """StreamExtents for a request built by hand (fields this client does not know pass
        through untouched: a digest, compression...), resumed like :meth:`iter_batches`, within
        ``retry`` (default: the client's). With ``include_data``, each batch's ``data`` is
        checked (and decompressed) before it is yielded. With ``check_digest`` (a request with
        ``digest`` and ``include_data``, read from the start of its range), the client hashes
        what it receives and compares with the gateway's digest before the last batch."""
        check = _core.DigestCheck(request) if check_digest else None
        async for msg in self._stream("StreamExtents", request, retry):
            data = _core.message_data(msg) if request.include_data else None
            if check is not None and data is not None:
                check.add(msg, data)
            yield _core.batch_from(msg, data)
        if check is not None:
            check.ended()

    def iter_batches(
        self,
        export: str,
        context: str,
        *,
        offset: int = 0,
        length: int | None = None,
        filter: ExtentFilter = ExtentFilter.ALL,
        merge_allocation: bool = False,
        include_data: bool = False,
        max_extents_per_message: int = 0,
        resume_token: str = "",
        digest: str = "",
        compression: str = "",
        compression_level: int = 0,
    ) -> AsyncIterator[ExtentBatch]:
        """The stream's messages as they come: packed extents, their data, and where to
        resume. The other iterators are built on this one.

        ``digest`` (``"blake3"`` or ``"sha256"``): the last batch's ``digest`` is the gateway's
        digest of the range (nbdgw.integrity); with ``include_data`` the client computes its
        own from what it received and raises ``errors.DataCorrupted`` before the last batch
        when they differ. ``compression="zstd"`` (``compression_level`` 1-19) has the data
        sent compressed; each batch's ``data`` is decompressed and checked as ever."""
        req = _core.stream_request(
            export,
            context,
            offset=offset,
            length=length,
            filter=filter,
            merge_allocation=merge_allocation,
            include_data=include_data,
            max_extents_per_message=max_extents_per_message,
            resume_token=resume_token,
            digest=digest,
            compression=compression,
            compression_level=compression_level,
        )
        return self.stream_extents(req, check_digest=bool(digest) and include_data)

    async def iter_extents(
        self,
        export: str,
        context: str,
        *,
        offset: int = 0,
        length: int | None = None,
        filter: ExtentFilter = ExtentFilter.ALL,
        merge_allocation: bool = False,
        max_extents_per_message: int = 0,
        resume_token: str = "",
    ) -> AsyncIterator[Extent]:
        """The extents of ``context`` (a name without ``:`` is ``qemu:dirty-bitmap:NAME``)
        over ``[offset, offset + length)`` in order, each exactly once, whatever restarts."""
        async for batch in self.iter_batches(
            export,
            context,
            offset=offset,
            length=length,
            filter=filter,
            merge_allocation=merge_allocation,
            max_extents_per_message=max_extents_per_message,
            resume_token=resume_token,
        ):
            for extent in batch.extents():
                yield extent

    async def iter_data(
        self,
        export: str,
        context: str,
        *,
        offset: int = 0,
        length: int | None = None,
        filter: ExtentFilter = ExtentFilter.ALL,
        max_extents_per_message: int = 0,
        resume_token: str = "",
        digest: str = "",
        compression: str = "",
        compression_level: int = 0,
    ) -> AsyncIterator[DataChunk]:
        """The extents with their bytes (``filter=ExtentFilter.SET``: only the dirty ones);
        extents that read as zeroes come with ``data=None``. ``digest`` and ``compression``:
        as in :meth:`iter_batches` (a digest that does not match raises before the last
        chunks)."""
        async for batch in self.iter_batches(
            export,
            context,
            offset=offset,
            length=length,
            filter=filter,
            include_data=True,
            max_extents_per_message=max_extents_per_message,
            resume_token=resume_token,
            digest=digest,
            compression=compression,
            compression_level=compression_level,
        ):
            for chunk in batch.chunks():
                yield chunk

    async def iter_remaining_dirty(
        self,
        export: str,
        bitmap: str,
        *,
        offset: int = 0,
        length: int | None = None,
        resume_token: str = "",
    ) -> AsyncIterator[ByteRange]:
        """The ranges of a dirty bitmap still dirty: the host's minus what was cleared."""
        req = _core.remaining_request(
            export, bitmap, offset=offset, length=length, resume_token=resume_token
        )
        async for msg in self._stream("StreamRemainingDirty", req):
            for r in _core.remaining_ranges(msg):
                yield r

    async def clear_range(
        self,
        export: str,
        bitmap: str,
        offset: int,
        length: int,
        *,
        generation: str = "",
        clear_token: str = "",
        unconditional: bool = False,
    ) -> ClearResult:
        """Acknowledge ``[offset, offset + length)`` of a dirty bitmap (see ClearRange). On a
        writable export pass the ``clear_token`` of the batch that carried the range (the
        result's ``kept`` then says what was written since), or ``unconditional=True`` when
        nothing writes the export."""
        req = pb.ClearRangeRequest(
            export=export,
            bitmap=bitmap,
            offset=offset,
            length=length,
            generation=generation,
            clear_token=clear_token,
            unconditional=unconditional,
        )
        return _core.clear_result_from(await self._unary(self._bitmaps, "ClearRange", req))

    async def set_generation(self, export: str, generation: str) -> GenerationChange:
        """Set the export's generation (the point in time its ledger clears belong to)."""
        req = pb.SetExportGenerationRequest(export=export, generation=generation)
        return _core.generation_from(await self._unary(self._bitmaps, "SetExportGeneration", req))

    # --- snapshots -----------------------------------------------------------------------------

    async def create_snapshot(
        self,
        export: str,
        *,
        snapshot_id: str = "",
        bitmaps: Sequence[str] = (),
        cluster_size: int = 0,
        max_preserved_bytes: int = 0,
        on_full: SnapshotOnFull = SnapshotOnFull.UNSPECIFIED,
        group: Sequence[str] = (),
        checkpoint: str = "",
        since: str = "",
    ) -> Snapshot:
        """A point-in-time snapshot of ``export``, forking ``bitmaps``; with the exports of
        ``group`` at the same instant (a consistency group); starting checkpoint
        ``checkpoint``; forking what changed since checkpoint ``since`` as
        ``qemu:dirty-bitmap:since:SINCE``. Not retried: a retry after a lost answer could make
        a second snapshot."""
        req = spb.CreateSnapshotRequest(
            parent=export,
            snapshot_id=snapshot_id,
            bitmaps=list(bitmaps),
            cluster_size_bytes=cluster_size,
            max_preserved_bytes=max_preserved_bytes,
            on_full=int(on_full),  # type: ignore[arg-type]
            group=list(group),
            checkpoint_id=checkpoint,
            since_checkpoint=since,
        )
        return _core.snapshot_from(
            await self._unary(self._snapshots, "CreateSnapshot", req, retry=False)
        )

    async def list_snapshots(self, export: str) -> list[Snapshot]:
        out: list[Snapshot] = []
        token = ""
        while True:
            req = spb.ListSnapshotsRequest(parent=export, page_token=token)
            resp = await self._unary(self._snapshots, "ListSnapshots", req)
            out += map(_core.snapshot_from, resp.snapshots)
            token = resp.next_page_token
            if not token:
                return out

    async def release_snapshot(self, export: str, snapshot: str) -> Release:
        """Release a snapshot (and the rest of its consistency group): what its forks still
        held merges back into the export's bitmaps (``merged``), and ``released`` names every
        snapshot released. Not retried (a second release would find nothing)."""
        req = spb.ReleaseSnapshotRequest(name=_core.snapshot_name(export, snapshot))
        resp = await self._unary(self._snapshots, "ReleaseSnapshot", req, retry=False)
        return _core.release_from(resp)

    # --- bitmaps and checkpoints -----------------------------------------------------------------

    async def add_bitmap(
        self, export: str, bitmap: str, *, granularity: int = 0, persistent: bool = True
    ) -> Bitmap:
        """Add dirty bitmap ``bitmap`` to ``export`` (hosts that can: running QEMU VMs); it
        records every write from now on. ``granularity`` 0: the host's default. Not retried (a
        retry after a lost answer would find it there)."""
        req = pb.AddBitmapRequest(
            parent=export, bitmap=bitmap, granularity_bytes=granularity, persistent=persistent
        )
        return _core.bitmap_from(await self._unary(self._bitmaps, "AddBitmap", req, retry=False))

    async def remove_bitmap(self, export: str, bitmap: str) -> str:
        """Remove dirty bitmap ``bitmap`` (``NAME`` or ``qemu:dirty-bitmap:NAME``) of
        ``export``; returns its context. Not retried."""
        req = pb.RemoveBitmapRequest(name=_core.bitmap_name(export, bitmap))
        resp = await self._unary(self._bitmaps, "RemoveBitmap", req, retry=False)
        return str(resp.context)

    async def list_checkpoints(self, export: str) -> list[Checkpoint]:
        """The checkpoints of ``export``, oldest first."""
        req = spb.ListCheckpointsRequest(parent=export)
        resp = await self._unary(self._snapshots, "ListCheckpoints", req)
        return [_core.checkpoint_from(c) for c in resp.checkpoints]

    async def delete_checkpoint(self, export: str, checkpoint: str) -> str:
        """Delete a checkpoint: its interval merges into the older neighbour, whose id is
        returned ("" when it was the oldest). Not retried."""
        req = spb.DeleteCheckpointRequest(name=_core.checkpoint_name(export, checkpoint))
        resp = await self._unary(self._snapshots, "DeleteCheckpoint", req, retry=False)
        return str(resp.merged_into).rsplit("/", 1)[-1]
