"""Receiving StreamExtents messages without copying their data, and checking that data.

Parsing a 1 MiB data message with protobuf copies its data, and reading ``msg.data`` copies it
again. :func:`parse_response`, the response deserializer of both clients' StreamExtents call,
parses every other field and keeps ``data`` as a view of the bytes gRPC received; then
:func:`checked_data` decompresses it (zstd, when asked for) and checks its CRC32C, so that no
byte reaches a consumer unchecked. Both do no I/O.
"""

from __future__ import annotations

import threading
from typing import Any

from nbdgw import errors
from nbdgw.integrity import COMPRESSION_ZSTD
from nbdgw.v1 import bitmap_service_pb2 as pb

# StreamExtentsResponse.data: field 9, wire type 2 (length-delimited).
_DATA_FIELD = 9
_LENGTH_DELIMITED = 2

# A decompressed message never holds more data than the gateway puts in one (1 MiB); the bound
# keeps a hostile frame from making the client allocate more.
MAX_MESSAGE_DATA = 1 << 20

_EMPTY = memoryview(b"")
# One zstd decompression context per thread (a context is not thread-safe, and creating one
# per message costs more than decompressing a small one).
_local = threading.local()


class DecodeError(ValueError):
    """Bytes that are no StreamExtentsResponse."""


class ReceivedMessage:
    """A StreamExtentsResponse as it arrived, its data left where it arrived.

    Every field reads as on the message itself (``message``), except ``data``: a read-only
    view of the received bytes (as sent: still compressed when the stream asked for zstd).
    """

    __slots__ = ("data", "message")

    def __init__(self, message: pb.StreamExtentsResponse, data: memoryview) -> None:
        self.message = message
        self.data = data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = raw[pos]  # IndexError past the end: a truncated message
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def parse_response(raw: bytes) -> ReceivedMessage:
    """A StreamExtentsResponse deserializer for the data path: the top-level fields are walked
    (a dozen per message), the ``data`` field is cut out as a view of ``raw`` and the rest
    (a few hundred bytes) is parsed by protobuf. A repeated ``data`` field counts as
    protobuf counts it: the last one wins."""
    view = memoryview(raw)  # bytes: read-only
    rest: list[memoryview] = []
    data = view[:0]
    pos = kept = 0
    try:
        while pos < len(raw):
            start = pos
            key, pos = _varint(raw, pos)
            wire_type = key & 7
            if wire_type == 0:
                _, pos = _varint(raw, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == _LENGTH_DELIMITED:
                length, pos = _varint(raw, pos)
                if key >> 3 == _DATA_FIELD:
                    rest.append(view[kept:start])
                    data = view[pos : pos + length]
                    kept = pos + length
                pos += length
            else:
                raise ValueError(f"wire type {wire_type}")
        if pos != len(raw):
            raise ValueError("a field runs past the end")
    except (IndexError, ValueError) as exc:
        raise DecodeError(f"a StreamExtentsResponse that does not parse: {exc}") from None
    if not rest:  # no data field (a map, a digest-only stream): nothing to cut out
        return ReceivedMessage(pb.StreamExtentsResponse.FromString(raw), data)
    rest.append(view[kept:])
    return ReceivedMessage(pb.StreamExtentsResponse.FromString(b"".join(rest)), data)


def checked_data(msg: Any, data_bytes: int) -> memoryview:
    """The data of ``msg`` (a StreamExtentsResponse or a :class:`ReceivedMessage`), decompressed
    and checked: exactly ``data_bytes`` bytes (the lengths of its DATA extents) whose CRC32C is
    the message's ``data_crc32c``. A mismatch raises :class:`~nbdgw.errors.DataCorrupted` with
    the message's range, any other broken promise :class:`~nbdgw.errors.StreamError`."""
    raw = msg.data
    where = f"[{msg.offset}, {msg.next_offset})"
    if not raw:
        if data_bytes:
            raise errors.StreamError(
                f"the message at {msg.offset} carries 0 bytes of data for {data_bytes} bytes of"
                " DATA extents"
            )
        return _EMPTY
    if not msg.HasField("data_crc32c"):
        raise errors.StreamError(f"the data of {where} carries no CRC32C")
    data = memoryview(raw).toreadonly()
    if msg.data_compression:
        data = _decompress(msg, data, where)
    if len(data) != data_bytes:
        raise errors.StreamError(
            f"the message at {msg.offset} carries {len(data)} bytes of data for"
            f" {data_bytes} bytes of DATA extents"
        )
    import crc32c  # first data message only: its __init__ costs commands without data ~25 ms

    got = crc32c.crc32c(data)
    if got != msg.data_crc32c:
        raise errors.DataCorrupted(
            f"the data of {where} is corrupt: CRC32C {got:08x} where the gateway sent"
            f" {msg.data_crc32c:08x}",
            msg.offset,
            msg.next_offset,
        )
    return data


def _decompress(msg: Any, frame: memoryview, where: str) -> memoryview:
    if msg.data_compression != COMPRESSION_ZSTD:
        raise errors.StreamError(
            f"the data of {where} is {msg.data_compression}-compressed, which this client"
            " cannot read"
        )
    import zstandard  # only for streams that ask for compression

    try:
        # The gateway writes the content size in every frame: the bound is checked before
        # anything is allocated (decompress trusts the size a frame declares).
        size = zstandard.frame_content_size(frame)
        if not 0 <= size <= MAX_MESSAGE_DATA:
            raise zstandard.ZstdError(f"the frame declares {size} bytes")
        decompressor = getattr(_local, "zstd", None)
        if decompressor is None:
            decompressor = _local.zstd = zstandard.ZstdDecompressor()
        return memoryview(decompressor.decompress(frame)).toreadonly()
    except zstandard.ZstdError as exc:
        raise errors.DataCorrupted(
            f"the data of {where} is corrupt: its zstd frame does not decode ({exc})",
            msg.offset,
            msg.next_offset,
        ) from None
