"""The ``nbdgw.v1.BitmapService`` servicer (grpc.aio).

Each RPC validates its request completely before touching NBD, leases a connection from the
export's pool (:mod:`gateway.hosts.pool`), and turns every failure into a status through
:mod:`gateway.errors`. StreamExtents reads extents with ``nbdcore.extents.iter_extents`` and writes
each message with ``await context.write``, so it reads from NBD no faster than the client
consumes (HTTP/2 flow control) and holds at most one batch plus one message per stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import logging
import operator
import os
import struct
import time
from array import array
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate, compress
from typing import Any, TypeVar, cast

import grpc

from gateway import errors
from gateway.api.framing import DataMessageBuffer, PreparedMessage, extents_message, tail_fields
from gateway.api.names import (
    bitmap_resource,
    context_name,
    decode_clear_token,
    decode_page,
    encode_clear_token,
    encode_page,
    export_id,
    page_size,
)
from gateway.api.names import fingerprint as _fingerprint
from gateway.config import EMBEDDED_HOST
from gateway.errors import GatewayError
from gateway.hosts.checkpoints import merged
from gateway.hosts.libvirt import LibvirtHost, snapshot_required
from gateway.hosts.pool import ExportPool, KnownExport
from gateway.hosts.qmp import QmpHost, read_through_snapshot
from gateway.integrity import (
    COMPRESSION_ZSTD,
    DEFAULT_ZSTD_LEVEL,
    Compressor,
    DigestStates,
    RangeDigest,
    check_request,
    crc32c,
)
from gateway.ledger import GenerationChangedError, Ledger, LedgerError, Scope, mask_table
from gateway.security.limits import stream_budget
from nbdcore import clear_ext
from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import NBDServer
from nbdcore.client import BULK_READ
from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    Errno,
    TransmissionFlag,
)
from nbdcore.exceptions import NBDError, RequestError
from nbdcore.extents import ExtentBatch, iter_extents, merge_runs
from nbdcore.storage.checkpoint import checkpoint_id, reserved_bitmap
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

log = logging.getLogger("nbdgw.service")
T = TypeVar("T")

U64_MAX = (1 << 64) - 1
DEFAULT_EXTENTS_PER_MESSAGE = 4096
MAX_EXTENTS_PER_MESSAGE = 65536
MAX_DATA_PER_MESSAGE = 1 << 20
# A data message from an NBD host carries at most one READ of BULK_READ (960 KiB, below what makes
# qemu-nbd 7.2 mmap every READ buffer): one request per message costs the gateway and the host
# less than 1 MiB in two 512 KiB READs (per 2 GiB, alternating: gateway CPU -0.2 s, qemu-nbd
# -0.2 s, wall -9%; docs/benchmarks.md). Embedded exports are read without NBD: 1 MiB.
NBD_DATA_PER_MESSAGE = BULK_READ
# A filtered stream over a long run of unselected extents still reports progress this often,
# so that its resume position advances and the client sees it is alive.
PROGRESS_INTERVAL = 1.0

_FLAG_FIELDS = {
    TransmissionFlag.SEND_FLUSH: "can_flush",
    TransmissionFlag.SEND_FUA: "can_fua",
    TransmissionFlag.ROTATIONAL: "rotational",
    TransmissionFlag.SEND_TRIM: "can_trim",
    TransmissionFlag.SEND_WRITE_ZEROES: "can_write_zeroes",
    TransmissionFlag.SEND_DF: "can_df",
    TransmissionFlag.CAN_MULTI_CONN: "can_multi_conn",
    TransmissionFlag.SEND_CACHE: "can_cache",
    TransmissionFlag.SEND_FAST_ZERO: "can_fast_zero",
    TransmissionFlag.BLOCK_STATUS_PAYLOAD: "can_block_status_payload",
}


# --- request fields -----------------------------------------------------------------------


_QMP_LIVE_CLEAR = (
    "a running QEMU's live bitmap clears through a snapshot: ClearRange on the fork of"
    " EXPORT@SNAP (CreateSnapshot), which ReleaseSnapshot merges back"
)


def bitmap_kind(context: str) -> pb.BitmapKind.ValueType:
    if context == CONTEXT_BASE_ALLOCATION:
        return pb.BITMAP_KIND_ALLOCATION
    if context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
        return pb.BITMAP_KIND_DIRTY_BITMAP
    if context == CONTEXT_QEMU_ALLOCATION_DEPTH:
        return pb.BITMAP_KIND_ALLOCATION_DEPTH
    return pb.BITMAP_KIND_OTHER


# --- tokens -------------------------------------------------------------------------------
# Tokens are opaque to clients but not secret: they carry a position and a fingerprint of the
# request they belong to, so that a token replayed with different fields is refused instead of
# silently producing a map of something else. No server-side secret: a token stays valid across
# gateway restarts (a stream cut by SIGTERM resumes on the next instance).

_RESUME = struct.Struct(">BQ16s")
_RESUME_VERSION = 1
# A stream with a digest: version 2 also carries the digest's state (nbdgw.integrity): the
# chain value before the block that starts at the last field, whose delivered data up to the
# position is hashed again on resume.
_RESUME_DIGEST = struct.Struct(">BQ16s32sQ")
_RESUME_DIGEST_VERSION = 2
# Version 3 adds the id of the stream that issued it: the gateway keeps the exact digest state
# at each message end of recent streams (gateway.integrity.DigestStates), so a resume on the
# same gateway continues from what was delivered, without reading the block again.
_RESUME_DIGEST_ID = struct.Struct(">BQ16s32sQ8s")
_RESUME_DIGEST_ID_VERSION = 3
_RESUME_FORMATS = {
    _RESUME_VERSION: _RESUME,
    _RESUME_DIGEST_VERSION: _RESUME_DIGEST,
    _RESUME_DIGEST_ID_VERSION: _RESUME_DIGEST_ID,
}


def encode_resume(
    fingerprint: bytes,
    offset: int,
    digest: tuple[bytes, int] | None = None,
    stream_id: bytes = b"",
) -> str:
    if digest is None:
        raw = _RESUME.pack(_RESUME_VERSION, offset, fingerprint)
    elif stream_id:
        raw = _RESUME_DIGEST_ID.pack(
            _RESUME_DIGEST_ID_VERSION, offset, fingerprint, *digest, stream_id
        )
    else:
        raw = _RESUME_DIGEST.pack(_RESUME_DIGEST_VERSION, offset, fingerprint, *digest)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_resume(token: str, fingerprint: bytes) -> int:
    return decode_resume_state(token, fingerprint)[0]


def decode_resume_state(
    token: str, fingerprint: bytes
) -> tuple[int, tuple[bytes, int] | None, bytes | None]:
    """The position of a resume token, the digest state it carries (None: no digest), and the
    id of the stream that issued it (version 3; None before)."""
    digest, stream_id = None, None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        raise errors.invalid_token("resume", "resume_token", "malformed token") from None
    version = raw[0] if raw else 0
    layout = _RESUME_FORMATS.get(version)
    if layout is None:
        raise errors.invalid_token("resume", "resume_token", f"unknown token version {version}")
    try:
        fields = layout.unpack(raw)
    except struct.error:
        raise errors.invalid_token("resume", "resume_token", "malformed token") from None
    offset, fp = fields[1], fields[2]
    if version >= _RESUME_DIGEST_VERSION:
        digest = (fields[3], fields[4])
    if version == _RESUME_DIGEST_ID_VERSION:
        stream_id = fields[5]
    if fp != fingerprint:
        raise errors.invalid_token(
            "resume",
            "resume_token",
            "the token belongs to a different request (export, context, range, filter,"
            " merge_allocation, include_data and digest must be the same as when it was"
            " issued)",
        )
    return int(offset), digest, stream_id


# --- the servicer ---------------------------------------------------------------------------


@dataclass
class Backend:
    """What the servicer serves: export pools in configuration order, the embedded host's
    images (for ClearRange at the source), the shutdown signal, and the clear ledger (for
    exports of hosts that cannot clear; None when every export is embedded)."""

    pools: Mapping[str, ExportPool]
    images: Mapping[str, Image] = field(default_factory=dict)
    shutdown: asyncio.Event = field(default_factory=asyncio.Event)
    # StreamExtents calls in progress (for introspection: how far each has got).
    streams: set[_ExtentStream] = field(default_factory=set)
    # The exact digest states of recent digest streams, for their resumes (gateway.integrity).
    digest_states: DigestStates = field(default_factory=DigestStates)
    ledger: Ledger | None = None
    # Opens the ledger on first need (SetExportGeneration); None when no export can use it.
    open_ledger: Callable[[], Awaitable[Ledger]] | None = None
    # The embedded nbdcore host, once started: StreamExtents reads its exports' data straight
    # from their images (_LocalReads).
    embedded: Callable[[], NBDServer | None] = lambda: None

    def pool(self, name: str) -> ExportPool:
        pool = self.pools.get(name)
        if pool is None:
            raise errors.export_not_found(name)
        return pool


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: GatewayError) -> None:
    # grpc-stubs lacks abort_with_status (grpc.aio has it since 1.38).
    await cast(Any, context).abort_with_status(err.grpc_status())


MAX_GENERATION_BYTES = 256


@dataclass(frozen=True)
class ClearPlan:
    """How ClearRange works on one bitmap of one export, and why not when it does not."""

    mode: pb.ClearMode.ValueType
    why: str = ""
    generation: str = ""  # CLEAR_MODE_LEDGER_MASK: the scope of the clears
    # Refused because the image is open read-only: reason READ_ONLY, not CLEAR_NOT_SUPPORTED.
    read_only: bool = False


def _map(exc: BaseException, pool: ExportPool | None, name: str = "") -> GatewayError:
    if pool is None:
        return errors.from_exception(exc, export=name)
    return errors.from_exception(
        exc, export=pool.name, host=pool.host.name, retry_after=pool.host.retry_after()
    )


class BitmapServicer(pb_grpc.BitmapServiceServicer):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        # ClearRange on a remote host: at most as many leases at once as the pool keeps idle
        # connections, so that a burst of clears queues here instead of opening (and closing)
        # a connection per call. Ledger clears leave the lease before their commit.
        self._clear_slots: dict[str, asyncio.Semaphore] = {}

    # --- shared ----------------------------------------------------------------------------

    async def _unary(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        body: Callable[[], Awaitable[T]],
        pool: Callable[[], ExportPool | None] = lambda: None,
    ) -> T:
        """Run ``body``; abort with the status of whatever it raises (``pool()``: the export
        it was working on, for the message)."""
        try:
            return await body()
        except GatewayError as err:
            await _abort(context, err)
        except Exception as exc:
            if not isinstance(exc, (OSError, NBDError)):
                log.exception("unexpected failure")
            await _abort(context, _map(exc, pool()))
        raise AssertionError("abort returned")  # pragma: no cover

    def _export_message(self, pool: ExportPool, known: KnownExport | None) -> pb.Export:
        cfg = pool.config
        msg = pb.Export(
            name=f"exports/{cfg.name}",
            nbd_export_name=cfg.nbd_export,
            description=cfg.description,
            host=pool.host.name,
            host_kind=pool.host.config.kind,
            state=pb.EXPORT_STATE_AVAILABLE if known is not None else pb.EXPORT_STATE_UNAVAILABLE,
            read_only=cfg.read_only,
        )
        plan = self._clear_plan(pool, known, None)
        msg.clear_mode = plan.mode
        msg.generation = plan.generation
        if known is None:
            return msg
        if known.description and not cfg.description:
            msg.description = known.description
        msg.nbd_export_name = known.nbd_export_name or cfg.nbd_export
        msg.size_bytes = known.size
        msg.transmission_flags = int(known.flags)
        msg.read_only = cfg.read_only or known.read_only
        if known.block_size is not None:
            bs = known.block_size
            msg.block_sizes.CopyFrom(
                pb.BlockSizes(
                    minimum_bytes=bs.minimum, preferred_bytes=bs.preferred, maximum_bytes=bs.maximum
                )
            )
        for flag, attr in _FLAG_FIELDS.items():
            setattr(msg.flags, attr, bool(known.flags & flag))
        return msg

    def _local_reads(self, pool: ExportPool) -> _LocalReads | None:
        """Direct reads for an export of the embedded host (its snapshots included)."""
        if pool.host.name != EMBEDDED_HOST:
            return None
        server = self.backend.embedded()
        name = pool.config.nbd_export
        if server is None or server.lookup(name) is None:
            return None
        return _LocalReads(server, name)

    def _image(self, pool: ExportPool) -> Image | None:
        if pool.host.name != EMBEDDED_HOST:
            return None
        return self.backend.images.get(pool.name)

    def _clear_plan(
        self, pool: ExportPool, known: KnownExport | None, context: str | None
    ) -> ClearPlan:
        """How ClearRange works on ``context`` (None: the export's dirty bitmaps in general),
        decided per export from what its host said on the last connection (``known``).

        - the embedded host, or a host that acknowledged the NBD clear extension: at the source;
        - a read-only export of any other host, with a generation set: the ledger's mask;
        - a writable export of such a host: refused, since a mask would hide the blocks written
          after the clear, which the next backup needs.
        """
        unsupported = pb.CLEAR_MODE_UNSUPPORTED
        if context is not None and not context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
            return ClearPlan(unsupported, "only dirty bitmaps (qemu:dirty-bitmap:NAME) clear")
        if isinstance(pool.host, (QmpHost, LibvirtHost)) and pool.config.node:
            return ClearPlan(unsupported, _QMP_LIVE_CLEAR)
        image = self._image(pool)
        if image is not None:
            if not image.can_clear_bitmaps:
                return ClearPlan(unsupported, "the image is open read-only", read_only=True)
            return ClearPlan(pb.CLEAR_MODE_AT_SOURCE)
        if known is None:
            return ClearPlan(pb.CLEAR_MODE_UNSPECIFIED, "the host has not been reached yet")
        if known.clear_extension:
            return ClearPlan(pb.CLEAR_MODE_AT_SOURCE)
        host = pool.host.name
        if not known.read_only:
            return ClearPlan(
                unsupported,
                f"host {host} cannot clear bitmaps (it lacks the NBD clear extension) and the"
                " export is writable: a mask kept by the gateway would hide the blocks written"
                " after the clear, which the next backup needs",
            )
        ledger = self.backend.ledger
        generation = ledger.generation(pool.name) if ledger is not None else None
        recorded = ledger.export_size(pool.name, generation) if ledger and generation else None
        if recorded is not None and recorded != known.size:
            # A point in time has one size: another snapshot is exported under this name.
            return ClearPlan(
                unsupported,
                f"the export's size is {known.size} bytes, but {recorded} when generation"
                f" {generation!r} was first cleared: it shows another point in time; set a new"
                " generation (SetExportGeneration) for it",
            )
        if generation is None:
            return ClearPlan(
                unsupported,
                f"host {host} cannot clear bitmaps; for this read-only export the gateway keeps"
                " a ledger of clears once the export has a generation (the point in time it"
                " shows): set 'generation' in the configuration or call SetExportGeneration",
            )
        return ClearPlan(pb.CLEAR_MODE_LEDGER_MASK, generation=generation)

    async def _known(self, pool: ExportPool) -> KnownExport:
        if isinstance(pool.host, LibvirtHost) and pool.config.node:
            return await pool.host.known(pool)  # a libvirt VM's disk has no NBD export

        async def fetch(client: NBDClient) -> KnownExport:
            assert pool.known is not None  # set by every lease
            return pool.known

        return await pool.run((), fetch)

    # --- RPCs ------------------------------------------------------------------------------

    async def ListExports(
        self, request: pb.ListExportsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListExportsResponse:
        async def body() -> pb.ListExportsResponse:
            size = page_size(request.page_size)
            names = list(self.backend.pools)
            start = decode_page(request.page_token, "exports", len(names))
            page = names[start : start + size]

            async def describe(name: str) -> pb.Export:
                pool = self.backend.pools[name]
                known: KnownExport | None = None
                if pool.host.up:
                    try:
                        known = await asyncio.wait_for(self._known(pool), timeout=5)
                    except Exception as exc:
                        log.info("export %s: %s", name, exc)
                return self._export_message(pool, known)

            exports = await asyncio.gather(*(describe(n) for n in page))
            end = start + len(page)
            token = encode_page("exports", end) if end < len(names) else ""
            return pb.ListExportsResponse(exports=exports, next_page_token=token)

        return await self._unary(context, body)

    async def GetExport(
        self, request: pb.GetExportRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Export:
        pool: ExportPool | None = None

        async def body() -> pb.Export:
            nonlocal pool
            pool = self.backend.pool(export_id(request.name, "name"))
            return self._export_message(pool, await self._known(pool))

        return await self._unary(context, body, lambda: pool)

    async def ListBitmaps(
        self, request: pb.ListBitmapsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListBitmapsResponse:
        pool: ExportPool | None = None

        async def body() -> pb.ListBitmapsResponse:
            nonlocal pool
            name = export_id(request.parent, "parent")
            size = page_size(request.page_size)
            pool = self.backend.pool(name)
            scope = f"bitmaps/{name}"
            decode_page(request.page_token, scope, 1 << 62)  # malformed or foreign: fail early
            if not pool.host.up:
                raise pool.host.unavailable(name)
            known = await self._known(pool)
            qmp_bitmaps = {}
            if isinstance(pool.host, (QmpHost, LibvirtHost)) and (
                pool.config.node or isinstance(pool.host, QmpHost)
            ):
                # A running QEMU: its bitmaps from QMP (libvirt: its checkpoints), whatever
                # its NBD export offers.
                qmp_bitmaps = {
                    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + b.name: b
                    for b in await pool.host.bitmaps(pool)
                }
                contexts = [CONTEXT_BASE_ALLOCATION, *qmp_bitmaps]
            else:
                try:
                    contexts = await pool.host.list_contexts(pool.config.nbd_export)
                except Exception as exc:
                    pool.host.report_failure(exc)
                    raise
            start = decode_page(request.page_token, scope, len(contexts))
            page = contexts[start : start + size]
            image = self._image(pool)
            bitmaps = []
            for ctx in page:
                plan = self._clear_plan(pool, known, ctx)
                bm = pb.Bitmap(
                    name=f"exports/{name}/bitmaps/{ctx}",
                    context=ctx,
                    kind=bitmap_kind(ctx),
                    export_size_bytes=known.size,
                    clear_mode=plan.mode,
                    clear_unsupported_reason=plan.why,
                    generation=plan.generation,
                )
                short = ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
                if ctx in qmp_bitmaps:
                    qb = qmp_bitmaps[ctx]
                    bm.granularity_bytes = qb.granularity
                    bm.recording = qb.recording
                    bm.dirty_bytes = qb.count
                    bm.persistent = qb.persistent
                    bm.busy = qb.busy
                    bm.inconsistent = qb.inconsistent
                if image is not None and short != ctx and short in image.bitmaps:
                    bitmap = image.bitmaps[short]
                    bm.granularity_bytes = bitmap.granularity
                    bm.recording = bitmap.enabled
                    bm.dirty_bytes = bitmap.dirty_bytes()
                bitmaps.append(bm)
            end = start + len(page)
            token = encode_page(scope, end) if end < len(contexts) else ""
            return pb.ListBitmapsResponse(bitmaps=bitmaps, next_page_token=token)

        return await self._unary(context, body, lambda: pool)

    async def ClearRange(
        self, request: pb.ClearRangeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ClearRangeResponse:
        pool: ExportPool | None = None

        async def body() -> pb.ClearRangeResponse:
            nonlocal pool
            violations = []
            name = ctx = ""
            try:
                name = export_id(request.export, "export")
            except GatewayError as err:
                violations += errors.field_violations(err)
            try:
                ctx = context_name(request.bitmap, "bitmap")
            except GatewayError as err:
                violations += errors.field_violations(err)
            if request.length == 0:
                violations.append(("length", "must not be 0"))
            elif request.offset + request.length > U64_MAX:
                violations.append(("length", "offset + length overflows 64 bits"))
            if violations:
                raise errors.invalid_fields(violations)
            if len(request.generation.encode()) > MAX_GENERATION_BYTES:
                raise errors.invalid_fields(
                    [("generation", f"longer than {MAX_GENERATION_BYTES} bytes")]
                )
            checkpoint = checkpoint_id(ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX))
            if ctx.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX) and checkpoint:
                # A checkpoint's bitmap is the gateway's record of what changed in one interval
                # of the chain: a clear would drop those changes from every later "since".
                raise errors.bitmap_busy(
                    name,
                    ctx,
                    f"it is the bitmap of checkpoint {checkpoint!r}, kept by the gateway;"
                    " delete the checkpoint (DeleteCheckpoint) instead of clearing it",
                )
            pool = self.backend.pool(name)  # an unknown export is NOT_FOUND, whatever the token
            image = self._image(pool)
            if image is not None:
                return await self._clear_embedded(pool, image, ctx, request)
            return await self._clear_remote(pool, ctx, request)

        return await self._unary(context, body, lambda: pool)

    @staticmethod
    def _token_required(name: str, ctx: str, why: str = "") -> GatewayError:
        return errors.clear_token_required(
            name,
            ctx,
            why
            or "the export is writable, and a clear without a token could erase a write that"
            " landed after the range was read: pass the clear_token of the StreamExtents"
            " message that carried the range (or set unconditional if nothing writes the"
            " export)",
        )

    @staticmethod
    def _since(request: pb.ClearRangeRequest, name: str, ctx: str) -> tuple[int, int] | None:
        """The position the consumer's copy was read at (None: no token). Decoded once the
        bitmap is known to exist: a token names one bitmap, so for an unknown bitmap it would
        always be "read from another bitmap", where NOT_FOUND is the answer."""
        if not request.clear_token:
            return None
        return decode_clear_token(request.clear_token, name, ctx)

    async def _clear_embedded(
        self,
        pool: ExportPool,
        image: Image,
        ctx: str,
        request: pb.ClearRangeRequest,
    ) -> pb.ClearRangeResponse:
        name = pool.name
        plan = self._clear_plan(pool, None, ctx)
        if plan.mode != pb.CLEAR_MODE_AT_SOURCE:
            if plan.read_only:
                raise errors.read_only(name, ctx, plan.why)
            raise errors.clear_not_supported(name, ctx, plan.why)
        short = ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
        if short not in image.bitmaps:
            raise errors.bitmap_not_found(
                name, ctx, [CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + b for b in image.bitmaps]
            )
        since = self._since(request, name, ctx)
        _check_range(request.offset, request.length, image.size)
        granularity = image.bitmaps[short].granularity
        # The image is shared with the embedded NBD server's worker thread; Image locks
        # its bitmaps, and the clear may fsync, so it runs off the event loop. A snapshot
        # (read-only data) needs no token: nothing writes it.
        if not image.read_only and since is not None:
            cleared, kept = await asyncio.to_thread(
                image.clear_bitmap_range_since, short, request.offset, request.length, since
            )
            return _at_source(cleared, granularity, kept)
        if not image.read_only and not request.unconditional:
            raise self._token_required(name, ctx)
        cleared = await asyncio.to_thread(
            image.clear_bitmap_range, short, request.offset, request.length
        )
        return _at_source(cleared, granularity)

    async def _clear_remote(
        self,
        pool: ExportPool,
        ctx: str,
        request: pb.ClearRangeRequest,
    ) -> pb.ClearRangeResponse:
        """A clear on a remote host, decided and (at the source) done on one leased connection:
        at the source through the host's NBD clear extension (NBD_CMD_X_NBDGW_CLEAR), or in the
        ledger under the export's current generation (durable before the reply)."""
        name = pool.name

        async def on_host(client: NBDClient) -> tuple[ClearPlan, Any]:
            # The lease just described this connection's export in pool.known.
            plan = self._clear_plan(pool, pool.known, ctx)
            if plan.mode not in (pb.CLEAR_MODE_AT_SOURCE, pb.CLEAR_MODE_LEDGER_MASK):
                return plan, None
            if ctx not in client.meta_contexts:
                return plan, False
            at_source = plan.mode == pb.CLEAR_MODE_AT_SOURCE
            try:
                since = self._since(request, name, ctx)
                _check_range(request.offset, request.length, client.size)
                unconditional = client.read_only or (since is None and request.unconditional)
                if at_source and not unconditional and not client.conditional_clears:
                    raise self._token_required(
                        name,
                        ctx,
                        f"the export is writable and host {pool.host.name} cannot clear"
                        " conditionally (its NBD clear extension lacks positions): a clear"
                        " could erase a write that landed after the range was read; set"
                        " unconditional only if nothing writes the export",
                    )
                if at_source and not unconditional and since is None:
                    raise self._token_required(name, ctx)
                # A clear without a generation would be recorded under whatever generation is
                # current when it arrives, which may be a newer point in time than the one
                # copied.
                if not at_source and not request.generation and not pool.config.fixed_generation:
                    raise errors.generation_required(name, ctx, plan.generation)
                if not at_source and request.generation and request.generation != plan.generation:
                    raise errors.generation_mismatch(name, ctx, request.generation, plan.generation)
            except GatewayError as refused:
                # Refused before any request: returned, not raised, since the lease closes a
                # connection whose user raised (it may hold unanswered requests).
                return plan, refused
            if not at_source:
                return plan, True
            if unconditional:
                cleared = await client.clear(request.offset, request.length, ctx)
                return plan, _at_source(list(cleared.runs), cleared.granularity)
            assert since is not None
            try:
                cleared, kept = await client.clear_since(request.offset, request.length, ctx, since)
            except RequestError as exc:
                if exc.errno != Errno.EOVERFLOW:
                    raise
                # Too fragmented for one reply; the host cleared nothing.
                runs, g, kept_runs = await _clear_since_in_pieces(
                    client, request.offset, request.length, ctx, since
                )
                return plan, _at_source(runs, g, kept_runs)
            return plan, _at_source(list(cleared.runs), cleared.granularity, list(kept.runs))

        slots = self._clear_slots.get(name)
        if slots is None:
            slots = asyncio.Semaphore(max(1, pool.host.settings.max_idle_per_export))
            self._clear_slots[name] = slots
        async with slots:
            try:
                plan, done = await pool.run([ctx], on_host)
            except RequestError as exc:
                if exc.errno != Errno.EPERM:
                    raise
                # The host's storage is read-only (nbdgw nbd serve --read-only): not the
                # caller's permission, which PERMISSION_DENIED would say.
                raise errors.read_only(name, ctx, f"host {pool.host.name}: {exc}") from None
        if isinstance(done, GatewayError):
            raise done
        if done is False:
            raise errors.bitmap_not_found(name, ctx, await self._offered(pool))
        if plan.mode == pb.CLEAR_MODE_AT_SOURCE:
            assert isinstance(done, pb.ClearRangeResponse)
            return done
        if plan.mode != pb.CLEAR_MODE_LEDGER_MASK:
            raise errors.clear_not_supported(name, ctx, plan.why)
        # Outside the lease: many clears wait for one group commit without holding connections.
        ledger = self.backend.ledger
        assert ledger is not None  # the generation came from it
        try:
            cleared = await ledger.record_clear(
                Scope(name, ctx, plan.generation),
                request.offset,
                request.length,
                export_size=pool.known.size if pool.known is not None else None,
            )
        except GenerationChangedError as exc:
            # SetExportGeneration committed between the check above and this record.
            raise errors.generation_mismatch(name, ctx, plan.generation, exc.current) from exc
        except LedgerError as exc:
            raise errors.internal(f"nothing was cleared: {exc}") from exc
        return pb.ClearRangeResponse(
            cleared_ranges=[pb.ByteRange(offset=o, length=n) for o, n in cleared],
            cleared_bytes=sum(n for _, n in cleared),
            clear_mode=pb.CLEAR_MODE_LEDGER_MASK,
            generation=plan.generation,
        )

    def _mask_scope(self, pool: ExportPool, ctx: str) -> Scope | None:
        """The ledger scope whose mask applies to streams of ``ctx``, if any (decided from the
        connection just leased, which ``pool.known`` describes)."""
        plan = self._clear_plan(pool, pool.known, ctx)
        if plan.mode == pb.CLEAR_MODE_LEDGER_MASK:
            return Scope(pool.name, ctx, plan.generation)
        return None

    async def _offered(self, pool: ExportPool) -> list[str]:
        try:
            return await pool.host.list_contexts(pool.config.nbd_export)
        except Exception:
            return []

    async def SetExportGeneration(
        self, request: pb.SetExportGenerationRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.SetExportGenerationResponse:
        pool: ExportPool | None = None

        async def body() -> pb.SetExportGenerationResponse:
            nonlocal pool
            violations = []
            name = ""
            try:
                name = export_id(request.export, "export")
            except GatewayError as err:
                violations += errors.field_violations(err)
            gen = request.generation
            if not gen:
                violations.append(("generation", "required: the point in time the export shows"))
            elif len(gen.encode()) > MAX_GENERATION_BYTES:
                violations.append(("generation", f"longer than {MAX_GENERATION_BYTES} bytes"))
            if violations:
                raise errors.invalid_fields(violations)
            pool = self.backend.pool(name)
            ledger = self.backend.ledger
            if ledger is None and self.backend.open_ledger is not None:
                ledger = await self.backend.open_ledger()
            # Generations scope the ledger; an export that clears at the source has none.
            at_source = pool.known is not None and pool.known.clear_extension
            if ledger is None or self._image(pool) is not None or at_source:
                raise errors.generations_not_supported(name)
            try:
                previous = await ledger.set_generation(name, gen)
            except LedgerError as exc:
                raise errors.internal(f"the generation was not changed: {exc}") from exc
            if previous != gen:
                log.info("export %s: generation %r -> %r", name, previous, gen)
            return pb.SetExportGenerationResponse(
                export=f"exports/{name}", generation=gen, previous_generation=previous or ""
            )

        return await self._unary(context, body, lambda: pool)

    def _qmp_pool(self, name: str, ctx: str) -> tuple[ExportPool, QmpHost | LibvirtHost]:
        pool = self.backend.pool(name)
        if not isinstance(pool.host, (QmpHost, LibvirtHost)):
            raise errors.bitmap_management_not_supported(name, pool.host.config.kind)
        if not pool.host.up:
            raise pool.host.unavailable(name)
        return pool, pool.host

    async def AddBitmap(
        self, request: pb.AddBitmapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.Bitmap:
        pool: ExportPool | None = None

        async def body() -> pb.Bitmap:
            nonlocal pool
            violations = []
            name = bitmap = ""
            try:
                name = export_id(request.parent, "parent")
            except GatewayError as err:
                violations += errors.field_violations(err)
            try:
                ctx = context_name(request.bitmap, "bitmap")
                bitmap = ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
                if not ctx.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX) or not bitmap:
                    violations.append(("bitmap", "a dirty bitmap name (qemu:dirty-bitmap:NAME)"))
                elif why := reserved_bitmap(bitmap):
                    violations.append(("bitmap", why))
            except GatewayError as err:
                violations += errors.field_violations(err)
            g = request.granularity_bytes
            if g and (g & (g - 1) or not 512 <= g <= 1 << 31):
                violations.append(("granularity_bytes", "a power of two from 512 to 2 GiB"))
            if violations:
                raise errors.invalid_fields(violations)
            pool, host = self._qmp_pool(name, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + bitmap)
            persistent = request.persistent if request.HasField("persistent") else True
            info = await host.add_bitmap(pool, bitmap, g, persistent)
            log.info("export %s: bitmap %s added", name, bitmap)
            ctx = CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + bitmap
            known = pool.known
            return pb.Bitmap(
                name=f"exports/{name}/bitmaps/{ctx}",
                context=ctx,
                kind=pb.BITMAP_KIND_DIRTY_BITMAP,
                export_size_bytes=known.size if known is not None else 0,
                granularity_bytes=info.granularity,
                recording=info.recording,
                dirty_bytes=info.count,
                persistent=info.persistent,
                busy=info.busy,
                clear_mode=pb.CLEAR_MODE_UNSUPPORTED,
                clear_unsupported_reason=_QMP_LIVE_CLEAR,
            )

        return await self._unary(context, body, lambda: pool)

    async def RemoveBitmap(
        self, request: pb.RemoveBitmapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RemoveBitmapResponse:
        pool: ExportPool | None = None

        async def body() -> pb.RemoveBitmapResponse:
            nonlocal pool
            export, ctx = bitmap_resource(request.name)
            bitmap = ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
            if why := reserved_bitmap(bitmap):
                raise errors.invalid_field("name", why)
            pool, host = self._qmp_pool(export, ctx)
            await host.remove_bitmap(pool, bitmap)
            log.info("export %s: bitmap %s removed", export, bitmap)
            return pb.RemoveBitmapResponse(context=CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + bitmap)

        return await self._unary(context, body, lambda: pool)

    async def StreamRemainingDirty(  # type: ignore[override]
        self, request: pb.StreamRemainingDirtyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        as_extents = pb.StreamExtentsRequest(
            export=request.export,
            context=request.bitmap,
            offset=request.offset,
            filter=pb.EXTENT_FILTER_SET,
            resume_token=request.resume_token,
            max_extents_per_message=request.max_extents_per_message,
        )
        if request.HasField("length"):
            as_extents.length = request.length
        # The bitmap is checked here, under its own field name; the rest as StreamExtents does.
        try:
            name = context_name(request.bitmap, "bitmap")
            if not name.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
                raise errors.invalid_fields(
                    [("bitmap", f"{name!r} is not a dirty bitmap (qemu:dirty-bitmap:NAME)")]
                )
        except GatewayError as err:
            await _abort(context, err)
            return
        await self._stream_extents(as_extents, context, remaining=True)

    # Writes with context.write (so it can end with a status after messages), not by yielding.
    async def StreamExtents(  # type: ignore[override]
        self, request: pb.StreamExtentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        await self._stream_extents(request, context)

    async def _stream_extents(
        self,
        request: pb.StreamExtentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        remaining: bool = False,
    ) -> None:
        stream: _ExtentStream | None = None
        pool: ExportPool | None = None
        try:
            plan = _StreamPlan.from_request(request)
            pool = self.backend.pool(plan.export)
            plan = plan.at_instant(
                (pool.config.generation or "") if pool.config.fixed_generation else ""
            )
            if (
                isinstance(pool.host, QmpHost)
                and pool.config.node
                and plan.context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
            ):
                # QEMU exports a recording bitmap only writable (a moving answer anyway).
                raise read_through_snapshot(plan.export, plan.context)
            if isinstance(pool.host, LibvirtHost) and pool.config.node:
                raise snapshot_required(plan.export)
            stream = _ExtentStream(
                plan,
                pool,
                context,
                self.backend.shutdown,
                ledger=self.backend.ledger,
                mask_scope=self._mask_scope,
                remaining=remaining,
                local=self._local_reads(pool),
                states=self.backend.digest_states,
            )
            self.backend.streams.add(stream)
            try:
                await stream.run()
            finally:
                self.backend.streams.discard(stream)
        except GatewayError as err:
            await _abort(context, _resumable(err, stream))
        except Exception as exc:
            if _client_gone(context, exc):
                # The client cancelled (or hung up) while a message was being written: grpc
                # ends the write with an error of its own. Nothing failed here.
                log.debug("StreamExtents: the client went away (%s)", type(exc).__name__)
                raise asyncio.CancelledError from None
            if pool is not None and self.backend.pools.get(pool.name) is not pool:
                # The export went away under the stream (a snapshot released): no host to wait
                # for, and nothing to resume.
                gone = dataclasses.replace(
                    errors.export_not_found(pool.name),
                    message=f"export {pool.name!r} was removed during the stream (released)",
                )
                await _abort(context, gone)
                return
            if not isinstance(exc, (OSError, NBDError)):
                log.exception("unexpected failure in StreamExtents")
            await _abort(context, _resumable(_map(exc, pool), stream))


async def _clear_since_in_pieces(
    client: NBDClient, offset: int, length: int, ctx: str, since: tuple[int, int]
) -> tuple[list[tuple[int, int]], int, list[tuple[int, int]]]:
    """A conditional clear in pieces of at most MAX_CLEARED_RUNS granules, whose replies always
    fit (a host refuses one that would not with NBD_EOVERFLOW, having cleared nothing): the
    cleared runs, the granularity, the kept runs. The granularity comes from a clear of one
    byte, which no granule lies wholly inside: it clears nothing."""
    probe, _ = await client.clear_since(offset, 1, ctx, since)
    g = probe.granularity
    end = offset + length
    step = clear_ext.MAX_CLEARED_RUNS * g
    cleared: list[tuple[int, int]] = []
    kept: list[tuple[int, int]] = []
    at = offset
    while at < end:
        # Piece ends on granule boundaries: no granule is cut between two pieces.
        stop = min(end, -(-at // g) * g + step)
        c, k = await client.clear_since(at, stop - at, ctx, since)
        cleared += c.runs
        kept += k.runs
        at = stop
    return list(merged(cleared)), g, list(merged(kept))


def _at_source(
    cleared: list[tuple[int, int]],
    granularity: int,
    kept: list[tuple[int, int]] | None = None,
) -> pb.ClearRangeResponse:
    """The response of a clear at the source; ``kept`` for a conditional one."""
    resp = pb.ClearRangeResponse(
        cleared_ranges=[pb.ByteRange(offset=o, length=n) for o, n in cleared],
        cleared_bytes=sum(n for _, n in cleared),
        clear_mode=pb.CLEAR_MODE_AT_SOURCE,
        granularity_bytes=granularity,
    )
    if kept is not None:
        resp.conditional = True
        resp.kept_ranges.extend(pb.ByteRange(offset=o, length=n) for o, n in kept)
        resp.kept_bytes = sum(n for _, n in kept)
    return resp


def _client_gone(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> bool:
    """Whether ``exc`` only says that the call ended on the client's side: a write refused
    because the call is over (grpc.aio's InternalError, ExecuteBatchError among them, or
    UsageError), or any failure once the call is cancelled."""
    with contextlib.suppress(Exception):
        if context.cancelled():
            return True
    return isinstance(exc, (grpc.aio.InternalError, grpc.aio.UsageError))


def _resumable(err: GatewayError, stream: _ExtentStream | None) -> GatewayError:
    # Any failure after the stream started says where to resume (UNAVAILABLE is the one a
    # client retries, but a resume position costs nothing on the others).
    if stream is not None and stream.started and "resume_offset" not in err.metadata:
        return err.with_resume(stream.sent_offset, stream.sent_token())
    return err


def _check_range(offset: int, length: int | None, size: int) -> int:
    """Check ``[offset, offset + length)`` against the export; returns the end."""
    if offset >= size:
        raise errors.range_past_end("offset", offset, size, "offset")
    end = size if length is None else offset + length
    if end > size:
        raise errors.range_past_end("length", end, size, "end of range offset + length =")
    return end


# --- StreamExtents ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _StreamPlan:
    """A validated StreamExtents request."""

    export: str
    context: str
    offset: int
    length: int | None
    filter: int
    merge_allocation: bool
    include_data: bool
    resume_token: str
    resume_offset: int | None
    max_extents: int
    digest: str = ""  # nbdgw.integrity.DIGESTS
    compression: str = ""
    compression_level: int = DEFAULT_ZSTD_LEVEL
    instant: str = ""  # at_instant

    @classmethod
    def from_request(cls, r: pb.StreamExtentsRequest) -> _StreamPlan:
        violations: list[tuple[str, str]] = []
        export = ctx = ""
        try:
            export = export_id(r.export, "export")
        except GatewayError as err:
            violations += errors.field_violations(err)
        try:
            ctx = context_name(r.context, "context")
        except GatewayError as err:
            violations += errors.field_violations(err)
        length = r.length if r.HasField("length") else None
        if length == 0:
            violations.append(("length", "must not be 0 (leave it unset for the whole export)"))
        elif length is not None and r.offset + length > U64_MAX:
            violations.append(("length", "offset + length overflows 64 bits"))
        if r.filter not in pb.ExtentFilter.values():
            violations.append(("filter", f"unknown filter value {r.filter}"))
        violations += check_request(r.digest, r.compression, r.compression_level)
        if r.digest and r.HasField("resume_offset") and not r.resume_token:
            violations.append(
                (
                    "resume_offset",
                    "a stream with a digest resumes by resume_token, which carries the"
                    " digest's state",
                )
            )
        if violations:
            raise errors.invalid_fields(violations)
        flt = pb.EXTENT_FILTER_ALL if r.filter == pb.EXTENT_FILTER_UNSPECIFIED else r.filter
        max_extents = min(r.max_extents_per_message or DEFAULT_EXTENTS_PER_MESSAGE, 65536)
        plan = cls(
            export=export,
            context=ctx,
            offset=r.offset,
            length=length,
            filter=flt,
            # A digest hashes the data: it needs allocation to know what to read.
            merge_allocation=r.merge_allocation or r.include_data or bool(r.digest),
            include_data=r.include_data,
            resume_token=r.resume_token,
            resume_offset=r.resume_offset if r.HasField("resume_offset") else None,
            max_extents=max_extents,
            digest=r.digest,
            compression=r.compression if r.include_data else "",
            compression_level=r.compression_level or DEFAULT_ZSTD_LEVEL,
        )
        return plan

    def at_instant(self, instant: str) -> _StreamPlan:
        """The plan for an export whose point in time is ``instant`` (a VM snapshot's fixed
        generation; "" for the others), its resume token checked: a token of a snapshot
        released and taken again under the same name is another instant's, refused rather than
        resumed into a mix of the two."""
        plan = dataclasses.replace(self, instant=instant) if instant else self
        if plan.resume_token:
            pos = decode_resume(plan.resume_token, plan.fingerprint)
            if plan.resume_offset is not None and plan.resume_offset != pos:
                raise errors.invalid_fields(
                    [("resume_offset", f"disagrees with resume_token (which says {pos})")]
                )
        return plan

    @functools.cached_property
    def fingerprint(self) -> bytes:
        # Cached: every message of a stream carries a token (json + sha256 per message
        # measured 3-5% of the gateway's CPU on a data stream).
        return _fingerprint(
            self.export,
            self.context,
            self.offset,
            self.length,
            self.filter,
            self.merge_allocation,
            self.include_data,
            # Only when set: the tokens of streams without a digest stay as they were.
            *([self.digest] if self.digest else []),
            *([{"instant": self.instant}] if self.instant else []),
        )

    @property
    def read_data(self) -> bool:
        """Whether the stream reads the data: to send it, or to hash it for the digest."""
        return self.include_data or bool(self.digest)

    def start(self, end: int) -> tuple[int, RangeDigest | None, bytes | None]:
        """Where the stream starts (the range start, or the resume position), its digest
        (resumed from the token's state: the chain before the block that holds the position),
        and the id of the stream that issued the token (None: not known)."""
        state, stream_id = None, None
        if self.resume_token:
            pos, state, stream_id = decode_resume_state(self.resume_token, self.fingerprint)
            field_name = "resume_token"
        elif self.resume_offset is not None:
            pos, field_name = self.resume_offset, "resume_offset"
        else:
            pos, field_name = self.offset, ""
        if not self.offset <= pos <= end:
            raise errors.invalid_fields(
                [(field_name, f"resume position {pos} is outside the range [{self.offset}, {end}]")]
            )
        if not self.digest:
            return pos, None, None
        if state is None:
            return pos, RangeDigest(self.digest, self.offset), None
        chain, block = state
        if not self.offset <= block <= pos:
            raise errors.invalid_token("resume", "resume_token", "malformed digest state")
        return pos, RangeDigest(self.digest, block, chain=chain), stream_id


class _Message:
    """One StreamExtentsResponse under construction."""

    __slots__ = (
        "data_len",
        "deltas",
        "end",
        "flags",
        "kinds",
        "last",
        "lengths",
        "offset",
        "reads",
    )

    def __init__(self, offset: int) -> None:
        self.offset = offset  # coverage start
        self.end = offset  # coverage end so far
        self.last = offset  # end of the last extent added
        self.deltas = array("Q")
        self.lengths = array("Q")
        self.flags = array("Q")
        self.kinds = array("B")
        self.reads: list[tuple[int, int]] = []
        self.data_len = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, start: int, length: int, flags: int, kind: int) -> None:
        self.deltas.append(start - self.last)
        self.lengths.append(length)
        self.flags.append(flags)
        self.kinds.append(kind)
        self.last = self.end = start + length


class _LocalReads:
    """The data reads of a stream of an embedded export: straight from the image, in the
    embedded host's reader threads (NBDServer.pread_into). The alternative, a READ to the
    embedded host over its socket, runs both ends of NBD on the gateway's one event loop:
    the reply is built, sent and received again, two more copies and the Python of both
    sides per request. Extents still come over NBD (BLOCK_STATUS: one code path for every
    host); the data is the same image's, read at the same moment a READ would."""

    __slots__ = ("_name", "_server")

    def __init__(self, server: NBDServer, name: str) -> None:
        self._server = server
        self._name = name

    def pread_into(self, buf: memoryview, offset: int) -> Awaitable[None]:
        return self._server.pread_into(self._name, buf, offset)

    def pread_many_into(self, pieces: list[tuple[memoryview, int]]) -> asyncio.Future[Any]:
        return asyncio.gather(*(self.pread_into(buf, offset) for buf, offset in pieces))


class _ExtentStream:
    """One StreamExtents call: reads batches, shapes them into messages, writes them."""

    def __init__(
        self,
        plan: _StreamPlan,
        pool: ExportPool,
        context: grpc.aio.ServicerContext[Any, Any],
        shutdown: asyncio.Event,
        *,
        ledger: Ledger | None = None,
        mask_scope: Callable[[ExportPool, str], Scope | None] | None = None,
        remaining: bool = False,
        local: _LocalReads | None = None,
        states: DigestStates | None = None,
    ) -> None:
        self.plan = plan
        self.local = local
        # The exact digest state at each message end, for resumes (gateway.integrity).
        self.states = states if states is not None else DigestStates()
        self._stream_id = os.urandom(8)
        # Data bytes per message: each piece of it is one read (see NBD_DATA_PER_MESSAGE).
        self.per_message = MAX_DATA_PER_MESSAGE if local is not None else NBD_DATA_PER_MESSAGE
        self.ledger = ledger
        self.mask_scope = mask_scope
        self.remaining = remaining  # StreamRemainingDirty: its own message type
        self.pool = pool
        self.context = context
        self.shutdown = shutdown
        self.started = False
        self.sent_offset = plan.offset  # everything before it has been delivered
        self.range_end = 0
        self.messages = 0
        self._last_send = time.monotonic()
        self._made = 0  # messages made (written or queued)
        self._queued: tuple[_Message, _Reads | None] | None = None
        self._spare: bytearray | None = None  # the buffer of the last data message sent
        # The serialized fields above ``data``: the clear token, when the stream hands one out.
        self._tail = b""
        self.digest: RangeDigest | None = None  # of what was written, when asked for
        self._rehash_until = 0  # resumed inside a digest block: hash, do not send, up to here
        self._sent_state: tuple[bytes, int] | None = None  # the digest's, at sent_offset
        self._compressor = Compressor(plan.compression_level) if plan.compression else None

    def token(self, offset: int) -> str:
        """The resume token of ``offset``: with a digest, this stream's id (its exact state at
        each message end is kept in :attr:`states`) and its chain so far (a resume that finds
        no kept state hashes again what was delivered since the start of the block it names).
        """
        if self.digest is None:
            return encode_resume(self.plan.fingerprint, offset)
        return encode_resume(self.plan.fingerprint, offset, self.digest.state, self._stream_id)

    def sent_token(self) -> str:
        """The resume token of ``sent_offset``, for an error. The digest may already hold the
        data of a message that was then not sent (the gateway shut down before writing it):
        its state as of the last message written is the one that goes with the position."""
        stream_id = self._stream_id if self._sent_state is not None else b""
        return encode_resume(self.plan.fingerprint, self.sent_offset, self._sent_state, stream_id)

    async def run(self) -> None:
        plan = self.plan
        want_alloc = plan.merge_allocation and plan.context != CONTEXT_BASE_ALLOCATION
        contexts = [plan.context, CONTEXT_BASE_ALLOCATION] if want_alloc else [plan.context]
        if self.shutdown.is_set():
            raise errors.shutting_down()
        async with self.pool.connection(contexts) as client:
            if plan.context in client.meta_contexts:
                try:
                    await self._stream(client, contexts)
                    await self._flush()
                finally:
                    self._drop_queued()
                return
        # Listed after the lease is returned: listing takes a lease of its own.
        raise errors.bitmap_not_found(plan.export, plan.context, await self._offered())

    async def _stream(self, client: NBDClient, contexts: list[str]) -> None:
        plan = self.plan
        self.range_end = _check_range(plan.offset, plan.length, client.size)
        start, self.digest, issuer = plan.start(self.range_end)
        kept = None
        if self.digest is not None and issuer is not None:
            kept = self.states.get(issuer, start)
        if kept is not None:
            self.digest = kept  # exactly what was delivered up to ``start``: nothing to read
        self.sent_offset = start
        self._sent_state = None
        if self.digest is not None:
            self._sent_state = self.digest.state
            if kept is not None or self.digest.position >= start:
                # Exact at ``start`` (not so before a rehash: it is not kept then).
                self.states.put(self._stream_id, start, self.digest)
        walk = start
        if kept is None and self.digest is not None and self.digest.position < start:
            walk, self._rehash_until = self.digest.position, start
        self.started = True
        have_alloc = CONTEXT_BASE_ALLOCATION in client.meta_contexts
        columns = [c for c in contexts if c in client.meta_contexts]
        # Ledger mode: the clears recorded for this bitmap are masked out, byte-exactly.
        scope = None
        if self.ledger is not None and self.mask_scope is not None:
            scope = self.mask_scope(self.pool, plan.context)
        await self._take_position(client)
        msg = _Message(start)
        if walk < self.range_end:
            # cast: nbdcore.extents.BlockStatusClient declares extended_headers as a
            # settable attribute where NBDClient has a property (same value).
            batches: AsyncGenerator[Any, None] = iter_extents(  # type: ignore[assignment]
                cast(Any, client),
                columns,
                walk,
                self.range_end - walk,
                max_extents=plan.max_extents,
            )
            try:
                async for batch in _until(batches, self.shutdown):
                    if self.shutdown.is_set():
                        break
                    if scope is not None:
                        assert self.ledger is not None
                        mask = await self.ledger.mask(scope)
                        lengths, cols = mask_table(mask, batch.offset, batch.lengths, batch.flags)
                        batch = ExtentBatch(batch.offset, lengths, cols)
                    flags = batch.flags[0]
                    if plan.merge_allocation:
                        alloc = batch.flags[-1] if have_alloc else array("Q", bytes(8 * len(flags)))
                        kinds = array("B", bytes(map(_KIND.__getitem__, map(_MASK, alloc))))
                        lengths, (flags, kinds) = merge_runs(batch.lengths, (flags, kinds))
                    else:
                        lengths, kinds = batch.lengths, None
                    offset = batch.offset
                    if offset < self._rehash_until:
                        offset, lengths, flags, kinds = await self._rehash(
                            client, offset, lengths, flags, kinds
                        )
                        if not len(lengths):
                            continue
                    msg = await self._shape(client, msg, offset, lengths, flags, kinds)
            finally:
                await batches.aclose()
            if self.shutdown.is_set():
                raise errors.shutting_down()
        if len(msg) or msg.end > msg.offset or self._made == 0:
            msg.end = self.range_end
            await self._send(client, msg)

    async def _take_position(self, client: NBDClient) -> None:
        """The clear token of a live writable export's dirty bitmap: its host's write-history
        position, taken (and answered) before the first read of this stream, so that any
        write this stream may miss is after it and a clear with the token keeps it."""
        plan = self.plan
        if (
            self.remaining
            or client.read_only  # a snapshot: nothing writes it, nothing to condition on
            or not client.conditional_clears
            or not plan.context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
        ):
            return
        position = (await client.positions()).get(plan.context)
        if position is not None:
            token = encode_clear_token(plan.export, plan.context, position)
            self._tail = pb.StreamExtentsResponse(clear_token=token).SerializeToString()

    async def _offered(self) -> list[str]:
        try:
            return await self.pool.host.list_contexts(self.pool.config.nbd_export)
        except Exception:
            return []

    async def _rehash(
        self,
        client: NBDClient,
        offset: int,
        lengths: array[int],
        flags: array[int],
        kinds: array[int] | None,
    ) -> tuple[int, array[int], array[int], array[int] | None]:
        """Resumed inside a digest block: hash what the stream delivered between the block's
        start and the resume position again (read from the host, not sent). Returns the rows
        from the resume position on."""
        assert self.digest is not None
        scratch = memoryview(bytearray(NBD_DATA_PER_MESSAGE))
        for i in range(len(lengths)):
            length = lengths[i]
            take = min(length, self._rehash_until - offset)
            kind = kinds[i] if kinds is not None else pb.ALLOCATION_DATA
            if kind == pb.ALLOCATION_DATA and _delivered(self.plan.filter, flags[i]):
                for at in range(0, take, NBD_DATA_PER_MESSAGE):
                    n = min(NBD_DATA_PER_MESSAGE, take - at)
                    await client.pread_into(scratch[:n], offset + at)
                    self.digest.update(offset + at, scratch[:n])
            offset += take
            if offset >= self._rehash_until:
                rest = slice(i + 1 if take == length else i, None)
                lengths, flags = lengths[rest], flags[rest]
                kinds = kinds[rest] if kinds is not None else None
                if take < length:
                    lengths[0] = length - take
                return offset, lengths, flags, kinds
        return offset, lengths[:0], flags[:0], kinds[:0] if kinds is not None else None

    async def _shape(
        self,
        client: NBDClient,
        msg: _Message,
        offset: int,
        lengths: array[int],
        flags: array[int],
        kinds: array[int] | None,
    ) -> _Message:
        """Add one batch of rows to the messages; send every message that fills up."""
        plan = self.plan
        n = len(lengths)
        sel: list[int] | None = None
        if plan.filter == pb.EXTENT_FILTER_SET:
            sel = list(compress(range(n), flags))
        elif plan.filter == pb.EXTENT_FILTER_CLEAR:
            sel = list(compress(range(n), map(operator.not_, flags)))
        if plan.read_data:
            # bounds[i] is where row i starts, bounds[i + 1] where it ends.
            bounds = array("Q", accumulate(lengths, initial=offset))
            msg = await self._shape_with_data(client, msg, bounds, lengths, flags, kinds, sel)
            batch_end = bounds[-1]
        else:
            # Whole columns at a time: this is the path of maps with millions of extents.
            ends: array[int] | None = None
            if sel is None:
                deltas = array("Q", bytes(8 * n))
                batch_end = -1  # the running end below, once every row is placed
            else:
                bounds = array("Q", accumulate(lengths, initial=offset))
                batch_end = bounds[-1]
                ends = array("Q", map(bounds.__getitem__, [i + 1 for i in sel]))
                starts = map(bounds.__getitem__, sel)
                deltas = array("Q", map(operator.sub, starts, [msg.last, *ends[:-1]]))
                lengths = array("Q", map(lengths.__getitem__, sel))
                flags = array("Q", map(flags.__getitem__, sel))
                if kinds is not None:
                    kinds = array("B", map(kinds.__getitem__, sel))
            i, m, end = 0, len(lengths), offset
            while i < m:
                # A delta is relative to the end of the previous row, which is also where the
                # next message starts: cutting the columns anywhere keeps them right.
                take = min(plan.max_extents - len(msg), m - i)
                piece = lengths[i : i + take]
                msg.deltas.extend(deltas[i : i + take])
                msg.lengths.extend(piece)
                msg.flags.extend(flags[i : i + take])
                if kinds is not None:
                    msg.kinds.extend(kinds[i : i + take])
                i += take
                # Unfiltered rows touch: a message ends where the sum of its slice says (no
                # per-row bounds for millions of rows).
                end = ends[i - 1] if ends is not None else end + sum(piece)
                msg.last = msg.end = end
                if len(msg) >= plan.max_extents:
                    msg = await self._send(client, msg)
            if batch_end < 0:
                batch_end = end
        msg.end = batch_end
        if not len(msg) and time.monotonic() - self._last_send > PROGRESS_INTERVAL:
            msg = await self._send(client, msg)
        return msg

    async def _shape_with_data(
        self,
        client: NBDClient,
        msg: _Message,
        bounds: array[int],
        lengths: array[int],
        flags: array[int],
        kinds: array[int] | None,
        sel: list[int] | None,
    ) -> _Message:
        """Row by row: data extents are cut so that no message carries more than
        ``per_message`` bytes of data (at most 1 MiB)."""
        plan = self.plan
        cap = self.per_message
        for i in range(len(lengths)) if sel is None else sel:
            start, length = bounds[i], lengths[i]
            kind = kinds[i] if kinds is not None else pb.ALLOCATION_DATA
            if kind == pb.ALLOCATION_DATA:
                while msg.data_len + length > cap:
                    part = cap - msg.data_len
                    if part:
                        msg.add(start, part, flags[i], kind)
                        msg.reads.append((start, part))
                        msg.data_len += part
                    start += part
                    length -= part
                    msg = await self._send(client, msg)
                msg.reads.append((start, length))
                msg.data_len += length
            msg.add(start, length, flags[i], kind)
            if len(msg) >= plan.max_extents or msg.data_len >= cap:
                msg = await self._send(client, msg)
        return msg

    async def _send(self, client: NBDClient, msg: _Message) -> _Message:
        """Queue ``msg``: start reading its data, and write the message queued before it.

        One message stays queued so that the NBD reads of the next message overlap the gRPC
        write of the previous one; memory stays bounded at two messages per stream.
        """
        if self.shutdown.is_set():
            raise errors.shutting_down()
        reads = None
        if msg.reads:
            if not stream_budget().try_take(msg.data_len):
                # Over the gateway's data budget (gateway.security.limits): wait without
                # holding a message or a spare buffer, so that waiting pins nothing.
                await self._flush()
                self._spare = None
                await stream_budget().take(msg.data_len)
            # The data goes straight into the buffer the message is sent from, one read per
            # piece at its place in the message (a message may cut several extents; the NBD
            # client splits a read above the host's maximum payload).
            buf = DataMessageBuffer(self._head(msg), msg.data_len, self._spare, self._tail)
            self._spare = None
            reader: NBDClient | _LocalReads = client if self.local is None else self.local
            pieces, pos = [], 0
            for o, n in msg.reads:
                pieces.append((buf.data[pos : pos + n], o))
                pos += n
            reads = _Reads(buf, reader.pread_many_into(pieces))
        queued, self._queued = self._queued, (msg, reads)
        self._made += 1
        if queued is not None:
            await self._write(*queued)
        self._last_send = time.monotonic()
        return _Message(msg.end)

    async def _flush(self) -> None:
        """Write the queued message (the last one of the stream)."""
        queued, self._queued = self._queued, None
        if queued is not None:
            await self._write(*queued)

    def _drop_queued(self) -> None:
        queued, self._queued = self._queued, None
        if queued is not None and queued[1] is not None:
            # Its buffer is dropped with it: a cancelled read may still land there.
            landing = queued[1].landing
            landing.cancel()
            # Retrieve its outcome so that a failed read is not reported as never retrieved.
            landing.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _head_fields(self, msg: _Message) -> pb.StreamExtentsResponse:
        """The StreamExtentsResponse of ``msg`` without its columns and data (fields 1-4)."""
        return pb.StreamExtentsResponse(
            offset=msg.offset,
            next_offset=msg.end,
            resume_token=self.token(msg.end),
            range_end=self.range_end,
        )

    def _head(self, msg: _Message) -> pb.StreamExtentsResponse:
        """The StreamExtentsResponse of ``msg``, without its data."""
        resp = self._head_fields(msg)
        resp.offset_deltas.extend(msg.deltas)
        resp.lengths.extend(msg.lengths)
        resp.flags.extend(msg.flags)
        if self.plan.merge_allocation:
            resp.allocation.extend(msg.kinds)  # type: ignore[arg-type]  # proto enum values
        return resp

    async def _write(self, msg: _Message, reads: _Reads | None) -> None:
        if self.remaining:
            rest = pb.StreamRemainingDirtyResponse(
                offset=msg.offset,
                next_offset=msg.end,
                resume_token=self.token(msg.end),
                range_end=self.range_end,
            )
            rest.offset_deltas.extend(msg.deltas)
            rest.lengths.extend(msg.lengths)
            if self.shutdown.is_set():
                raise errors.shutting_down()
            await self.context.write(rest)
            self.messages += 1
            self.sent_offset = msg.end
            return
        message: PreparedMessage
        if reads is not None:
            await reads.landing
            data = reads.buf.data
            if self.digest is not None:
                # On the loop: a MiB takes blake3 about 0.3 ms here. In a thread (hashlib
                # and blake3 release the GIL) the hop and the GIL's return to a busy loop cost
                # more than the overlap gains: the gateway's CPU per GiB 2.87 to 2.35 s
                # inline (docs/benchmarks.md, "Ideas for the data path").
                _feed(self.digest, msg.reads, data)
        digest = b""
        if self.digest is not None:
            if msg.end == self.range_end:
                digest = self.digest.finish(self.range_end)
            self.states.put(self._stream_id, msg.end, self.digest)
        if reads is None or not self.plan.include_data:
            message = extents_message(
                self._head_fields(msg),
                msg.deltas,
                msg.lengths,
                msg.flags,
                msg.kinds if self.plan.merge_allocation else None,
                self._tail + tail_fields(digest=digest),
            )
        else:
            crc = crc32c(data)
            frame = None
            if self._compressor is not None:
                # zstd releases the GIL: the loop goes on while a core compresses.
                frame = await asyncio.to_thread(self._compressor.compress, data)
            extents, covered = len(msg), msg.end - msg.offset
            if frame is None:
                tail = tail_fields(crc, digest=digest)
                message = reads.buf.message(extents=extents, covered=covered, tail=tail)
            else:
                tail = tail_fields(crc, COMPRESSION_ZSTD, digest)
                message = reads.buf.compressed(frame, extents=extents, covered=covered, tail=tail)
        if reads is not None:
            self._spare = reads.buf.reuse()
        if self.shutdown.is_set():
            raise errors.shutting_down()
        await self.context.write(message)
        if reads is not None:
            stream_budget().give(msg.data_len)  # grpc has taken it
        self.messages += 1
        self.sent_offset = msg.end
        if self.digest is not None:
            self._sent_state = self.digest.state


@dataclass(frozen=True, slots=True)
class _Reads:
    """The NBD reads of a queued data message, landing in its buffer."""

    buf: DataMessageBuffer
    landing: asyncio.Future[Any]


def _feed(digest: RangeDigest, reads: list[tuple[int, int]], data: memoryview) -> None:
    """Hash a message's data: ``reads`` are the (offset, length) pieces laid end to end."""
    pos = 0
    for offset, length in reads:
        digest.update(offset, data[pos : pos + length])
        pos += length


def _delivered(flt: int, flags: int) -> bool:
    """Whether a row with ``flags`` passes the stream's filter (is delivered)."""
    if flt == pb.EXTENT_FILTER_SET:
        return bool(flags)
    if flt == pb.EXTENT_FILTER_CLEAR:
        return not flags
    return True


# base:allocation flags (HOLE 1, ZERO 2) -> the proto's Allocation: a hole that does not read as
# zeros must still be read (its contents are undefined, e.g. a backing file shows through).
_MASK = (NBD_STATE_HOLE | NBD_STATE_ZERO).__and__
_KIND = bytes([pb.ALLOCATION_DATA, pb.ALLOCATION_DATA, pb.ALLOCATION_ZERO, pb.ALLOCATION_HOLE])


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _until(batches: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T]:
    """The items of ``batches`` until ``stop`` is set, even while waiting for the next one
    (a slow NBD host must not hold up shutdown)."""
    while True:
        step: asyncio.Future[T] = asyncio.ensure_future(anext(batches))
        # A cancelled call may leave before it reads the step's end (StopAsyncIteration, or
        # an error): mark it read, or asyncio logs "Task exception was never retrieved".
        step.add_done_callback(_retrieved)
        stopper = asyncio.ensure_future(stop.wait())
        try:
            waiting: set[asyncio.Future[Any]] = {step, stopper}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not step.done():
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await step
        if step.cancelled():
            return
        try:
            item = step.result()
        except StopAsyncIteration:
            return
        yield item
