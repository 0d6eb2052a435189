"""The part of the client that does no I/O, shared by the blocking and the asyncio flavour:
requests, models from responses, errors from statuses, and the resume logic of streams.

The flavours only send calls, iterate and sleep: every decision (what to send next, whether
an error is worth a retry and after how long, whether a message continues the stream) is
made here, so both behave the same by construction.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

from nbdgw import _wire, errors
from nbdgw._models import (
    Bitmap,
    BitmapKind,
    BlockSizes,
    ByteRange,
    Checkpoint,
    ClearMode,
    ClearResult,
    Export,
    ExportFlags,
    ExportState,
    ExtentBatch,
    ExtentFilter,
    ForkedBitmap,
    GenerationChange,
    Release,
    RetryEvent,
    Snapshot,
    SnapshotOnFull,
    SnapshotState,
)
from nbdgw._options import Retry
from nbdgw.integrity import RangeDigest, check_request
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# StreamExtents is called through its own multicallable, with the in-place deserializer.
STREAM_EXTENTS = "/nbdgw.v1.BitmapService/StreamExtents"
EXPORTS_PREFIX = "exports/"

# The detail types the gateway sends (AIP-193); others are ignored, not fatal.
_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.DebugInfo,
)

# Unary calls that change nothing, or whose repetition is harmless (ClearRange, and
# SetExportGeneration with the same generation), are retried after UNAVAILABLE, and after a
# per-caller limit that says when to come back (see RetryState).
RETRYABLE_UNARY = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED"})
# A stream ends early and is resumed when the gateway or its host went away (UNAVAILABLE),
# the gateway cut a stream it found stalled (DEADLINE_EXCEEDED: the client sets no deadline
# on streams), or it refused one stream too many for now (RESOURCE_EXHAUSTED with RetryInfo).
RETRYABLE_STREAM = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"})


# --- errors ------------------------------------------------------------------------------------


def decode_details(trailers: Iterable[tuple[str, Any]] | None) -> tuple[Any, ...]:
    """The decoded ``google.rpc.Status`` details of a failed call's trailers."""
    raw = None
    for key, value in trailers or ():
        if key == STATUS_DETAILS_KEY:
            raw = value
    if not isinstance(raw, bytes):
        return ()
    status = status_pb2.Status()
    try:
        status.ParseFromString(raw)
    except Exception:  # a malformed trailer must not hide the error itself
        return ()
    details = []
    for packed in status.details:
        for cls in _DETAIL_TYPES:
            if packed.Is(cls.DESCRIPTOR):
                message = cls()
                packed.Unpack(message)
                details.append(message)
                break
    return tuple(details)


def error_from_rpc(exc: grpc.RpcError) -> errors.CallError:
    """The library's exception for a failed gRPC call (blocking or asyncio)."""
    call: Any = exc
    code = call.code() if hasattr(call, "code") else None
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    message = " ".join(((call.details() if hasattr(call, "details") else "") or "").split())
    trailers = call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    details = decode_details(trailers)
    reason, metadata = "", {}
    for d in details:
        if isinstance(d, error_details_pb2.ErrorInfo):
            reason, metadata = d.reason, dict(d.metadata)
            break
    cls = errors.error_class(name, reason)
    error = cls(message, code=name, reason=reason, metadata=metadata, details=details)
    error.__cause__ = exc  # tracebacks show the gRPC error underneath
    return error


class RetryState:
    """Counts the attempts of one call and says whether and when to try again."""

    def __init__(self, retry: Retry, retryable: frozenset[str], method: str) -> None:
        self.retry = retry
        self.retryable = retryable
        self.method = method
        self.attempt = 0

    def progressed(self) -> None:
        self.attempt = 0

    def next_delay(self, error: errors.CallError, position: int | None = None) -> RetryEvent:
        """When to try again; raises ``error`` when it is not worth another attempt."""
        self.attempt += 1
        error.attempts = self.attempt
        # RESOURCE_EXHAUSTED with RetryInfo is a rate or concurrency limit that passes; without,
        # a limit that waiting does not lift (the ledger's intervals of a generation).
        lasting = error.code == "RESOURCE_EXHAUSTED" and error.retry_after is None
        if error.code not in self.retryable or lasting or self.attempt > self.retry.attempts:
            raise error
        delay = self.retry.delay(self.attempt, error.retry_after)
        return RetryEvent(self.method, self.attempt, self.retry.attempts, delay, error, position)


# --- names and requests ------------------------------------------------------------------------


def export_id(name: str) -> str:
    return name.removeprefix(EXPORTS_PREFIX)


def stream_request(
    export: str,
    context: str,
    *,
    offset: int,
    length: int | None,
    filter: ExtentFilter,
    merge_allocation: bool,
    include_data: bool,
    max_extents_per_message: int,
    resume_token: str,
    digest: str = "",
    compression: str = "",
    compression_level: int = 0,
) -> pb.StreamExtentsRequest:
    _refuse_bad_names(digest, compression, compression_level)
    req = pb.StreamExtentsRequest(
        export=export,
        context=context,
        offset=offset,
        filter=int(filter),  # type: ignore[arg-type]
        merge_allocation=merge_allocation,
        include_data=include_data,
        max_extents_per_message=max_extents_per_message,
        resume_token=resume_token,
        digest=digest,
        compression=compression,
        compression_level=compression_level,
    )
    if length is not None:
        req.length = length
    return req


def _refuse_bad_names(digest: str, compression: str, level: int) -> None:
    """What the gateway would refuse as INVALID_ARGUMENT (the same check), refused here before
    anything is sent; the field is named when the text does not name it."""
    for field_name, why in check_request(digest, compression, level)[:1]:
        raise errors.ConfigurationError(why if field_name in why else f"{field_name} {why}")


def remaining_request(
    export: str, bitmap: str, *, offset: int, length: int | None, resume_token: str
) -> pb.StreamRemainingDirtyRequest:
    req = pb.StreamRemainingDirtyRequest(
        export=export, bitmap=bitmap, offset=offset, resume_token=resume_token
    )
    if length is not None:
        req.length = length
    return req


DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


def checkpoint_name(export: str, checkpoint: str) -> str:
    """``exports/{export}/checkpoints/{checkpoint}``; a full name is taken as it is."""
    if checkpoint.startswith(EXPORTS_PREFIX):
        return checkpoint
    return f"{EXPORTS_PREFIX}{export_id(export)}/checkpoints/{checkpoint}"


def bitmap_name(export: str, bitmap: str) -> str:
    """``exports/{export}/bitmaps/{context}``; a bitmap name without ``:`` is
    ``qemu:dirty-bitmap:NAME``, and a full resource name is taken as it is."""
    if bitmap.startswith(EXPORTS_PREFIX):
        return bitmap
    context = bitmap if ":" in bitmap else DIRTY_BITMAP_PREFIX + bitmap
    return f"{EXPORTS_PREFIX}{export_id(export)}/bitmaps/{context}"


def checkpoint_from(m: spb.Checkpoint) -> Checkpoint:
    export, _, checkpoint_id = m.name.removeprefix(EXPORTS_PREFIX).partition("/checkpoints/")
    return Checkpoint(
        name=m.name,
        id=checkpoint_id,
        export=export,
        recording=m.recording,
        dirty_bytes=m.dirty_bytes,
        granularity=m.granularity_bytes,
        raw=m,
    )


def snapshot_name(export: str, snapshot: str) -> str:
    """``exports/{export}/snapshots/{snapshot}``; a full name is taken as it is."""
    if snapshot.startswith(EXPORTS_PREFIX):
        return snapshot
    return f"{EXPORTS_PREFIX}{export_id(export)}/snapshots/{snapshot}"


# --- models from responses ---------------------------------------------------------------------


def export_from(m: pb.Export) -> Export:
    f = m.flags
    return Export(
        name=m.name,
        id=export_id(m.name),
        size=m.size_bytes,
        state=ExportState(m.state),
        host=m.host,
        description=m.description,
        nbd_export_name=m.nbd_export_name,
        read_only=m.read_only,
        clear_mode=ClearMode(m.clear_mode),
        generation=m.generation,
        block_sizes=(
            BlockSizes(
                m.block_sizes.minimum_bytes,
                m.block_sizes.preferred_bytes,
                m.block_sizes.maximum_bytes,
            )
            if m.HasField("block_sizes")
            else None
        ),
        flags=ExportFlags(
            f.can_flush,
            f.can_fua,
            f.rotational,
            f.can_trim,
            f.can_write_zeroes,
            f.can_df,
            f.can_multi_conn,
            f.can_cache,
            f.can_fast_zero,
            f.can_block_status_payload,
        ),
        transmission_flags=m.transmission_flags,
        raw=m,
    )


def bitmap_from(m: pb.Bitmap) -> Bitmap:
    export = export_id(m.name.split("/bitmaps/", 1)[0])
    return Bitmap(
        name=m.name,
        export=export,
        context=m.context,
        kind=BitmapKind(m.kind),
        export_size=m.export_size_bytes,
        granularity=m.granularity_bytes,
        clear_mode=ClearMode(m.clear_mode),
        clear_unsupported_reason=m.clear_unsupported_reason,
        recording=m.recording if m.HasField("recording") else None,
        dirty_bytes=m.dirty_bytes if m.HasField("dirty_bytes") else None,
        generation=m.generation,
        raw=m,
    )


def clear_result_from(m: pb.ClearRangeResponse) -> ClearResult:
    return ClearResult(
        cleared=tuple(ByteRange(r.offset, r.length) for r in m.cleared_ranges),
        cleared_bytes=m.cleared_bytes,
        clear_mode=ClearMode(m.clear_mode),
        granularity=m.granularity_bytes,
        generation=m.generation,
        raw=m,
        kept=tuple(ByteRange(r.offset, r.length) for r in m.kept_ranges),
        kept_bytes=m.kept_bytes,
        conditional=m.conditional,
    )


def generation_from(m: pb.SetExportGenerationResponse) -> GenerationChange:
    return GenerationChange(export_id(m.export), m.generation, m.previous_generation, raw=m)


def forks_from(forks: Iterable[spb.ForkedBitmap]) -> tuple[ForkedBitmap, ...]:
    return tuple(ForkedBitmap(f.context, f.granularity_bytes, f.dirty_bytes) for f in forks)


def release_from(m: spb.ReleaseSnapshotResponse) -> Release:
    return Release(forks_from(m.merged), tuple(m.released), raw=m)


def snapshot_from(m: spb.Snapshot) -> Snapshot:
    parent, _, snap_id = m.name.removeprefix(EXPORTS_PREFIX).partition("/snapshots/")
    return Snapshot(
        name=m.name,
        id=snap_id,
        export=export_id(m.export),
        parent=parent,
        create_time=m.create_time.ToDatetime(tzinfo=UTC),
        forks=forks_from(m.forks),
        size=m.size_bytes,
        cluster_size=m.cluster_size_bytes,
        preserved_bytes=m.preserved_bytes,
        max_preserved_bytes=m.max_preserved_bytes,
        on_full=SnapshotOnFull(m.on_full),
        state=SnapshotState(m.state),
        raw=m,
    )


def remaining_ranges(m: pb.StreamRemainingDirtyResponse) -> Iterator[ByteRange]:
    pos = m.offset
    for delta, length in zip(m.offset_deltas, m.lengths, strict=True):
        pos += delta
        yield ByteRange(pos, length)
        pos += length


# --- streams -----------------------------------------------------------------------------------


class StreamResume:
    """The resume logic of one server stream (StreamExtents, StreamRemainingDirty).

    Each message says where the stream stands (``next_offset``) and carries a token that
    resumes it there. After a resumable error the same request is sent again with the token
    of the last message received (the error's own token only before any message), so the
    consumer sees no gap and no repeat; a message that does not start where the previous one
    ended is refused (StreamError) rather than passed on.
    """

    def __init__(self, method: str, request: Any, retry: Retry) -> None:
        self.request = type(request)()
        self.request.CopyFrom(request)  # unknown fields too: they pass through untouched
        self.retries = RetryState(retry, RETRYABLE_STREAM, method)
        self.position: int | None = None
        self.received = False
        self.done = False
        if not request.resume_token:
            has_offset = "resume_offset" in request.DESCRIPTOR.fields_by_name
            if has_offset and request.HasField("resume_offset"):
                self.position = request.resume_offset
            else:
                self.position = request.offset

    def accept(self, msg: Any) -> None:
        """Check that ``msg`` continues the stream, and move the resume point past it."""
        if self.position is not None and msg.offset != self.position:
            what = "a gap" if msg.offset > self.position else "a repeat"
            raise errors.StreamError(
                f"the gateway resumed the stream at {msg.offset}, not at {self.position}"
                f" where it stopped ({what})"
            )
        if msg.next_offset < msg.offset or not msg.resume_token:
            raise errors.StreamError(
                f"a stream message without a resume position ({msg.offset}-{msg.next_offset})"
            )
        self.position = msg.next_offset
        self.request.resume_token = msg.resume_token
        if "resume_offset" in self.request.DESCRIPTOR.fields_by_name:
            self.request.ClearField("resume_offset")
        self.retries.progressed()
        self.received = True
        self.done = msg.next_offset >= msg.range_end

    def ended(self) -> None:
        """The stream ended with OK: that promises the whole range was covered."""
        if self.received and not self.done:
            raise errors.StreamError(
                f"the stream ended at {self.position}, before the end of its range"
            )

    def failed(self, exc: grpc.RpcError) -> RetryEvent:
        """When to resume after ``exc``; raises the mapped error when it is fatal."""
        error = error_from_rpc(exc)
        # Before any message: the gateway's own resume point, if it gave one.
        if self.position is None and isinstance(error, errors.Unavailable) and error.resume_token:
            self.request.resume_token = error.resume_token
            self.position = error.resume_offset
        return self.retries.next_delay(error, self.position)


def batch_from(msg: Any, data: memoryview | None = None) -> ExtentBatch:
    """The batch of one StreamExtents message (a :class:`~nbdgw._wire.ReceivedMessage` from
    the clients' streams); ``data``: its checked data (:func:`message_data`), for a data
    stream."""
    return ExtentBatch(
        msg.offset,
        msg.next_offset,
        msg.range_end,
        msg.resume_token,
        msg,
        msg.clear_token,
        data,
    )


def message_data(msg: Any) -> memoryview:
    """The data of a message, decompressed and checked: exactly the bytes of its DATA extents,
    and what the gateway read (its CRC32C, ``data_crc32c``, in every message with data)."""
    allocation = msg.allocation  # always there in a data stream; without it, no data
    need = 0
    if allocation:
        data = pb.ALLOCATION_DATA
        need = sum(n for n, a in zip(msg.lengths, allocation, strict=True) if a == data)
    return _wire.checked_data(msg, need)


class DigestCheck:
    """The client's own digest (:mod:`nbdgw.integrity`) of the data a stream delivers,
    compared with the one the gateway sends in the stream's last message.

    The digest covers the stream's whole range, so only a stream this client reads from the
    start of its range can be checked (its own resumes included); one resumed from a token of
    an earlier run cannot, and is refused. A match proves that what the client received, cut
    and resumed however it was, is what the gateway read: CRC32C checks each message on its
    own (a random corruption passes it once in 2^32 messages), the digest the whole."""

    def __init__(self, request: pb.StreamExtentsRequest) -> None:
        if not request.digest:
            raise errors.ConfigurationError("check_digest without a digest in the request")
        _refuse_bad_names(request.digest, "", 0)
        if not request.include_data:
            raise errors.ConfigurationError("a digest is checked on the data a stream delivers")
        if request.resume_token or request.HasField("resume_offset"):
            raise errors.ConfigurationError(
                "a digest covers the whole range: a stream resumed from an earlier run cannot"
                " check it (compare batch.digest with your own, as nbdgw backup does)"
            )
        self.start = request.offset
        self._digest = RangeDigest(request.digest, request.offset)
        self.done = False  # the last message came, and was compared

    def add(self, msg: Any, data: memoryview) -> None:
        """Hash the DATA rows of ``msg`` (its checked ``data``); at the last message, compare.
        Raises :class:`~nbdgw.errors.DataCorrupted` naming the range when they differ."""
        digest = self._digest
        if len(data):
            pos, at = msg.offset, 0
            data_kind = pb.ALLOCATION_DATA
            for delta, length, kind in zip(
                msg.offset_deltas, msg.lengths, msg.allocation, strict=True
            ):
                pos += delta
                if kind == data_kind:
                    digest.update(pos, data[at : at + length])
                    at += length
                pos += length
            if pos > msg.next_offset:
                raise errors.StreamError(
                    f"the message at {msg.offset} has rows up to {pos}, past its next_offset"
                    f" {msg.next_offset}"
                )
        if msg.next_offset < msg.range_end:
            return
        self.done = True
        mine = digest.finish(msg.range_end)
        theirs = bytes(msg.digest)
        where = f"[{self.start}, {msg.range_end})"
        if not theirs:
            raise errors.StreamError(f"the stream of {where} ended without the digest it asked for")
        if mine != theirs:
            raise errors.DigestMismatch(
                f"the data of {where} is corrupt: its {digest.algorithm} digest is"
                f" {mine.hex()} here and {theirs.hex()} at the gateway; every message passed"
                " its CRC32C, so discard all of the stream's data and read the range again",
                self.start,
                msg.range_end,
            )

    def ended(self) -> None:
        """The stream ended with OK: its last message, and so the verdict, must have come."""
        if not self.done:
            raise errors.StreamError(
                f"the stream from {self.start} ended without its last message: its digest"
                " was not checked"
            )


def check_data(batch: ExtentBatch) -> memoryview:
    """:func:`message_data` of a batch's message."""
    return message_data(batch.raw)
