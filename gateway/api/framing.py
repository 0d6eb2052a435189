"""StreamExtents messages serialized by the gateway itself, so that their data is copied once.

A data message (``include_data``) carries up to 1 MiB. Built the ordinary way, that MiB was
copied five times in user space: out of the NBD reply, into the protobuf field, by
``SerializeToString``, into grpc's slice, and once more when the interceptor read ``data`` to
count it. Here the NBD reads land straight in the buffer the message is sent from:

    [fields 1-8, serialized by protobuf][tag of ``data`` (9), length varint][data...][tail]

where the tail holds the fields numbered above ``data`` (``clear_token``, 10), so this is byte
for byte what ``SerializeToString`` writes for the same message (protobuf serializes known
fields in field number order); any parser reads it as that message. The one copy left is
the ``bytes`` grpc insists on (its aio ``write`` refuses a bytearray or a memoryview).

grpc only passes ``PreparedMessage`` through when the method's response serializer knows it:
:func:`add_bitmap_service` registers the generated BitmapService handlers with StreamExtents'
serializer replaced, and is the one place that does so.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable
from typing import Any, cast

import grpc

from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

# StreamExtentsResponse.data: field 9, wire type 2 (length-delimited).
_DATA_TAG = bytes([9 << 3 | 2])
# The fields after it (gateway.integrity): data_crc32c (13, fixed32: wire type 5, 4 bytes
# little-endian), data_compression (14) and digest (15), both length-delimited.
_CRC_TAG = bytes([13 << 3 | 5])
_COMPRESSION_TAG = bytes([14 << 3 | 2])
_DIGEST_TAG = bytes([15 << 3 | 2])
# Room for them at the end of a data message's buffer (5 + 2 + 4 + 2 + 32 bytes at most).
_TAIL_ROOM = 64

STREAM_EXTENTS = "StreamExtents"


def varint(value: int) -> bytes:
    """Protobuf's base-128 varint (unsigned)."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = bytes(range(0x80))


def packed_small(field: int, values: array[int]) -> bytes | None:
    """The packed encoding of a repeated varint field whose values are all below 128 (one byte
    each: the bytes are the values), or None when one is not. Done on the array's memory at C
    speed (a column of zeros, offset_deltas of an unfiltered stream, or small flags), instead
    of a Python int per value through protobuf."""
    n = len(values)
    if not n:
        return b""
    size = values.itemsize
    raw = values.tobytes()
    low = raw[0 if sys.byteorder == "little" else size - 1 :: size]
    # Every other byte of each value is zero, and no low byte has its top bit set.
    if raw.count(0) - low.count(0) != (size - 1) * n or low.translate(None, _SMALL):
        return None
    return bytes([field << 3 | 2]) + varint(n) + low


def extents_message(
    head: pb.StreamExtentsResponse,
    deltas: array[int],
    lengths: array[int],
    flags: array[int],
    kinds: array[int] | None,
    tail: bytes = b"",
) -> PreparedMessage:
    """A StreamExtentsResponse without data, serialized byte for byte as ``SerializeToString``
    would (fields in number order: the head's 1-4, then the columns 5-8, then ``tail``, the
    serialized fields above 9: ``clear_token``, then :func:`tail_fields`): the columns of
    small values are packed here, the others by protobuf (the fields of a message that holds
    only that column)."""
    parts = [head.SerializeToString()]
    for field, name, values in (
        (5, "offset_deltas", deltas),
        (6, "lengths", lengths),
        (7, "flags", flags),
        (8, "allocation", kinds),
    ):
        if values is None:
            continue
        packed = packed_small(field, values)
        if packed is None:
            column = pb.StreamExtentsResponse()
            getattr(column, name).extend(values)
            packed = column.SerializeToString()
        parts.append(packed)
    parts.append(tail)
    return PreparedMessage(
        b"".join(parts),
        extents=len(lengths),
        covered=head.next_offset - head.offset,
        data_bytes=0,
    )


def data_field_header(length: int) -> bytes:
    """What precedes ``length`` bytes of ``data`` in a serialized StreamExtentsResponse."""
    return _DATA_TAG + varint(length)


def tail_fields(crc32c: int | None = None, compression: str = "", digest: bytes = b"") -> bytes:
    """Fields 13-15 of a StreamExtentsResponse, serialized as protobuf does after ``data``."""
    out = b""
    if crc32c is not None:
        out += _CRC_TAG + crc32c.to_bytes(4, "little")
    if compression:
        raw = compression.encode()
        out += _COMPRESSION_TAG + varint(len(raw)) + raw
    if digest:
        out += _DIGEST_TAG + varint(len(digest)) + digest
    return out


class PreparedMessage:
    """A serialized StreamExtentsResponse, with the figures the metrics count (so that nothing
    parses it back: reading ``data`` of a protobuf message copies it)."""

    __slots__ = ("covered", "data_bytes", "extents", "payload")

    def __init__(self, payload: bytes, *, extents: int, covered: int, data_bytes: int) -> None:
        self.payload = payload
        self.extents = extents  # rows (len(lengths))
        self.covered = covered  # next_offset - offset
        self.data_bytes = data_bytes  # len(data)


class DataMessageBuffer:
    """The buffer of one data message: the serialized head, room for the data, then ``tail``
    (the serialized fields numbered above ``data``).

    ``data`` is the writable view the NBD reads go into (at their offsets within the message);
    :meth:`message` hands the whole thing to grpc. The bytearray is kept for the next message
    of the stream (:meth:`reuse`) once its bytes were taken, unless a read may still land in
    it (a cancelled read's late reply does, see NBDClient.pread_into).
    """

    __slots__ = ("_buf", "_end", "_fields", "_head", "_tail", "_total", "_view", "data")

    def __init__(
        self,
        head: pb.StreamExtentsResponse,
        data_len: int,
        spare: bytearray | None,
        tail: bytes = b"",
    ):
        fields = head.SerializeToString()
        prefix = fields + data_field_header(data_len)
        end = len(prefix) + data_len
        total = end + len(tail)
        # Room after ``tail`` for the fields that are only known once the data is in
        # (tail_fields: its CRC32C, the stream's digest).
        buf = spare if spare is not None and len(spare) >= total + _TAIL_ROOM else None
        if buf is None:
            buf = bytearray(total + _TAIL_ROOM)
        buf[: len(prefix)] = prefix
        buf[end:total] = tail
        self._buf: bytearray | None = buf
        self._view = memoryview(buf)
        self._fields = len(fields)  # the head's fields, before the data tag
        self._head = len(prefix)
        self._end = end  # of the data
        self._tail = len(tail)
        self._total = total
        self.data = self._view[len(prefix) : end]

    def message(self, *, extents: int, covered: int, tail: bytes = b"") -> PreparedMessage:
        """The message, once every read has landed; ``tail`` (:func:`tail_fields`, 13-15)
        follows the constructor's (``clear_token``, 10), where protobuf writes them."""
        assert self._buf is not None, "message() after reuse()"
        assert len(tail) <= _TAIL_ROOM
        end = self._total + len(tail)
        self._view[self._total : end] = tail
        payload = bytes(self._view[:end])
        return PreparedMessage(
            payload,
            extents=extents,
            covered=covered,
            data_bytes=self._total - self._head - self._tail,
        )

    def compressed(
        self, frame: bytes, *, extents: int, covered: int, tail: bytes
    ) -> PreparedMessage:
        """The message with ``frame`` (the data, compressed) in place of the data."""
        assert self._buf is not None, "compressed() after reuse()"
        payload = b"".join(
            (
                self._view[: self._fields],
                data_field_header(len(frame)),
                frame,
                self._view[self._end : self._total],
                tail,
            )
        )
        return PreparedMessage(payload, extents=extents, covered=covered, data_bytes=len(frame))

    def reuse(self) -> bytearray | None:
        """The bytearray, for the next message of the stream (after :meth:`message`)."""
        buf, self._buf = self._buf, None
        return buf


def serializer(generated: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """A response serializer that sends a :class:`PreparedMessage` as it is."""

    def serialize(message: Any) -> bytes:
        if type(message) is PreparedMessage:
            return message.payload
        return generated(message)

    return serialize


class _Collect:
    """Stands in for the server in the generated ``add_..._to_server``: keeps its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the generated code registers the same table both ways

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.service = service
        self.handlers = dict(handlers)


def add_bitmap_service(servicer: pb_grpc.BitmapServiceServicer, server: Any) -> None:
    """``add_BitmapServiceServicer_to_server``, with StreamExtents able to send
    :class:`PreparedMessage` (every other method exactly as generated)."""
    collect = _Collect()
    pb_grpc.add_BitmapServiceServicer_to_server(servicer, cast(Any, collect))
    handler = collect.handlers[STREAM_EXTENTS]
    collect.handlers[STREAM_EXTENTS] = handler._replace(
        response_serializer=serializer(handler.response_serializer)
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(collect.service, collect.handlers),)
    )
    server.add_registered_method_handlers(collect.service, collect.handlers)
