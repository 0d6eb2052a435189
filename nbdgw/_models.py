"""What the client returns: frozen, slotted dataclasses and enums with the API's values.

The models are plain values, shared by :class:`nbdgw.Client` and :class:`nbdgw.AsyncClient`;
``_core`` builds them from the protobuf messages. Sizes are in bytes, as in the API. The
models of whole messages keep the message as ``raw`` (left out of ``==`` and ``repr``), so
that fields newer than this client are still at hand.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbdgw.errors import CallError


class _OpenEnum(enum.IntEnum):
    """A proto3 enum: a value newer than this client becomes a member named ``UNKNOWN_<n>``
    rather than an error, so a new gateway's answers still decode."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        if not isinstance(value, int):
            return None
        member = int.__new__(cls, value)
        member._name_ = f"UNKNOWN_{value}"
        member._value_ = value
        return member


class ExportState(_OpenEnum):
    """Whether an export's host is reachable (``nbdgw.v1.ExportState``)."""

    UNSPECIFIED = 0
    AVAILABLE = 1
    UNAVAILABLE = 2


class ClearMode(_OpenEnum):
    """How ClearRange acknowledges a bitmap (``nbdgw.v1.ClearMode``)."""

    UNSPECIFIED = 0
    AT_SOURCE = 1
    LEDGER_MASK = 2
    UNSUPPORTED = 3


class BitmapKind(_OpenEnum):
    """What a metadata context describes (``nbdgw.v1.BitmapKind``)."""

    UNSPECIFIED = 0
    ALLOCATION = 1
    DIRTY_BITMAP = 2
    ALLOCATION_DEPTH = 3
    OTHER = 4


class ExtentFilter(_OpenEnum):
    """Which extents a stream sends (``nbdgw.v1.ExtentFilter``): every extent, only those
    whose flags are set (dirty), or only those whose flags are 0 (clean)."""

    UNSPECIFIED = 0
    ALL = 1
    SET = 2
    CLEAR = 3


class Allocation(_OpenEnum):
    """Whether an extent's bytes must be read (``nbdgw.v1.Allocation``); UNSPECIFIED when the
    stream did not merge the allocation map."""

    UNSPECIFIED = 0
    DATA = 1
    ZERO = 2
    HOLE = 3


class SnapshotState(_OpenEnum):
    UNSPECIFIED = 0
    READY = 1
    BROKEN = 2


class SnapshotOnFull(_OpenEnum):
    """What a snapshot does when its preserved data would pass its limit."""

    UNSPECIFIED = 0
    BREAK_SNAPSHOT = 1
    FAIL_WRITE = 2


@dataclass(frozen=True, slots=True)
class BlockSizes:
    """The host's block size constraints (NBD_INFO_BLOCK_SIZE)."""

    minimum: int
    preferred: int
    maximum: int


@dataclass(frozen=True, slots=True)
class ExportFlags:
    """The export's transmission flags (NBD_FLAG_*), decoded."""

    can_flush: bool = False
    can_fua: bool = False
    rotational: bool = False
    can_trim: bool = False
    can_write_zeroes: bool = False
    can_df: bool = False
    can_multi_conn: bool = False
    can_cache: bool = False
    can_fast_zero: bool = False
    can_block_status_payload: bool = False


@dataclass(frozen=True, slots=True)
class Export:
    """A disk the gateway serves. ``id`` is what the calls take (``name`` works too)."""

    name: str  # exports/{id}
    id: str
    size: int
    state: ExportState
    host: str
    description: str = ""
    nbd_export_name: str = ""
    read_only: bool = False
    clear_mode: ClearMode = ClearMode.UNSPECIFIED
    generation: str = ""
    block_sizes: BlockSizes | None = None
    flags: ExportFlags = ExportFlags()
    transmission_flags: int = 0
    raw: Any = field(default=None, repr=False, compare=False)  # the protobuf message


@dataclass(frozen=True, slots=True)
class Bitmap:
    """One NBD metadata context of an export (a dirty bitmap, the allocation map...)."""

    name: str  # exports/{export}/bitmaps/{context}
    export: str  # the export's id
    context: str  # as the host names it: qemu:dirty-bitmap:backup, base:allocation
    kind: BitmapKind
    export_size: int
    granularity: int = 0  # 0: not known
    clear_mode: ClearMode = ClearMode.UNSPECIFIED
    clear_unsupported_reason: str = ""
    recording: bool | None = None  # None: not known
    dirty_bytes: int | None = None  # None: not known
    generation: str = ""
    raw: Any = field(default=None, repr=False, compare=False)  # the protobuf message


@dataclass(frozen=True, slots=True)
class Extent:
    """A run ``[offset, offset + length)`` over which the context's flags are constant.
    ``allocation`` is UNSPECIFIED unless the stream merged the allocation map."""

    offset: int
    length: int
    flags: int
    allocation: Allocation = Allocation.UNSPECIFIED

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class DataChunk:
    """An extent of a data stream and its bytes. ``data`` is None when the extent reads as
    zeroes (allocation ZERO or HOLE: nothing to read); otherwise exactly ``length`` bytes, a
    read-only view into the message that carried them (``bytes(chunk.data)`` to copy)."""

    offset: int
    length: int
    flags: int
    allocation: Allocation
    data: memoryview | None

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ExtentBatch:
    """One StreamExtents message: the extents (and data) found in ``[offset, next_offset)``.

    ``raw`` is the message as received, with any field this version of the client does not
    know; every field reads as on the protobuf message, except that ``raw.data`` is a
    read-only view of the bytes received (as sent: compressed, if the stream asked for it)
    and ``raw.message`` the protobuf message without them. ``data`` (a data stream) is the
    message's data, decompressed and checked against its CRC32C: the bytes of the DATA
    extents, in order, a read-only view that copies nothing. ``resume_token`` continues a
    stream after this batch (``resume_token=`` of the iterators), even in another process.
    ``clear_token`` (a live writable export's dirty bitmap) is what a clear of the ranges
    this batch carried passes (``clear_range``): only what was not written since the batch
    was read is cleared.
    """

    offset: int
    next_offset: int
    range_end: int
    resume_token: str
    raw: Any = field(repr=False, compare=False)
    clear_token: str = ""
    data: memoryview | None = field(default=None, repr=False, compare=False)

    @property
    def digest(self) -> bytes:
        """In the last batch of a stream that asked for a ``digest``: the gateway's digest of
        the range (:mod:`nbdgw.integrity`); empty otherwise."""
        return bytes(self.raw.digest)

    def extents(self) -> Iterator[Extent]:
        msg = self.raw
        pos = msg.offset
        allocation = msg.allocation
        for i, (delta, length, flags) in enumerate(
            zip(msg.offset_deltas, msg.lengths, msg.flags, strict=True)
        ):
            pos += delta
            kind = Allocation(allocation[i]) if allocation else Allocation.UNSPECIFIED
            yield Extent(pos, length, flags, kind)
            pos += length

    def chunks(self) -> Iterator[DataChunk]:
        """The extents with their data (the stream must have been asked for data)."""
        data = self.data
        if data is None:
            data = memoryview(self.raw.data).toreadonly()
        pos = 0
        for e in self.extents():
            if e.allocation == Allocation.DATA:
                yield DataChunk(
                    e.offset, e.length, e.flags, e.allocation, data[pos : pos + e.length]
                )
                pos += e.length
            else:
                yield DataChunk(e.offset, e.length, e.flags, e.allocation, None)

    @property
    def complete(self) -> bool:
        """Whether the stream has covered its whole range with this batch."""
        return self.next_offset >= self.range_end


@dataclass(frozen=True, slots=True)
class RetryEvent:
    """A call about to be tried again (the client's ``on_retry`` gets one before each wait):
    ``method`` (``StreamExtents``...), retry number ``attempt`` of at most ``attempts``, the
    ``delay`` before it, the ``error`` that ended the previous attempt, and for a stream the
    ``position`` it resumes from (None before its first message)."""

    method: str
    attempt: int
    attempts: int
    delay: float
    error: CallError
    position: int | None = None

    def __str__(self) -> str:
        where = "" if self.position is None else f" at {self.position}"
        return (
            f"{self.method} interrupted{where} ({self.error}); retrying in {self.delay:.1f}s"
            f" (attempt {self.attempt} of {self.attempts})"
        )


@dataclass(frozen=True, slots=True)
class ByteRange:
    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ClearResult:
    """What ClearRange cleared: only whole granules inside the range (AT_SOURCE), or the range
    byte-exactly under ``generation`` (LEDGER_MASK). A ``conditional`` clear (made with a
    clear token) lists in ``kept`` the granules written since the token's batch was read:
    copy them again and clear them with the new copy's token."""

    cleared: tuple[ByteRange, ...]
    cleared_bytes: int
    clear_mode: ClearMode
    granularity: int
    generation: str
    raw: Any = field(repr=False, compare=False)
    kept: tuple[ByteRange, ...] = ()
    kept_bytes: int = 0
    conditional: bool = False


@dataclass(frozen=True, slots=True)
class GenerationChange:
    """The result of SetExportGeneration."""

    export: str  # the export's id
    generation: str
    previous_generation: str
    raw: Any = field(default=None, repr=False, compare=False)  # the protobuf message


@dataclass(frozen=True, slots=True)
class ForkedBitmap:
    """A dirty bitmap a snapshot forked: its copy on the snapshot export."""

    context: str
    granularity: int
    dirty_bytes: int


@dataclass(frozen=True, slots=True)
class Release:
    """What ReleaseSnapshot did: the forks merged back into the live bitmaps (``merged``:
    what each still held), and every snapshot it released (``released``, resource names
    ``exports/{export}/snapshots/{id}``): the one named and the rest of its consistency
    group.

    It iterates, counts and indexes as ``merged`` (the answer of nbdgw before 0.2, a tuple
    of the forks), so code written for that goes on working."""

    merged: tuple[ForkedBitmap, ...]
    released: tuple[str, ...]
    raw: Any = field(default=None, repr=False, compare=False)  # the protobuf message

    def __iter__(self) -> Iterator[ForkedBitmap]:
        return iter(self.merged)

    def __len__(self) -> int:
        return len(self.merged)

    def __getitem__(self, index: int) -> ForkedBitmap:
        return self.merged[index]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A point-in-time snapshot of an export. Read it through the export ``export`` (the
    form ``{export}@{id}``), which nothing writes, and clear its bitmaps there safely."""

    name: str  # exports/{export}/snapshots/{id}
    id: str
    export: str  # the snapshot's own export id, {export}@{id}
    parent: str  # the export it was taken of
    create_time: datetime
    forks: tuple[ForkedBitmap, ...]
    size: int
    cluster_size: int
    preserved_bytes: int
    max_preserved_bytes: int
    on_full: SnapshotOnFull
    state: SnapshotState
    raw: Any = field(default=None, repr=False, compare=False)  # the protobuf message


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint of an export: the instant a snapshot started it (``checkpoint=`` of
    :meth:`~nbdgw.Client.create_snapshot`), from which later snapshots fork what changed
    since (``since=``). The newest one records; older ones are closed intervals."""

    name: str  # exports/{export}/checkpoints/{id}
    id: str
    export: str
    recording: bool
    dirty_bytes: int
    granularity: int
    raw: Any = field(default=None, repr=False, compare=False)  # the protobuf message
