"""StreamExtents data messages serialized by the gateway (gateway.api.framing): byte for byte what
protobuf writes for the same message, parsed by the generated class into the same message, and
counted by the metrics without being parsed back."""

from __future__ import annotations

from array import array
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api.bitmaps import BitmapServicer
from gateway.api.framing import (
    DataMessageBuffer,
    PreparedMessage,
    add_bitmap_service,
    data_field_header,
    extents_message,
    packed_small,
    serializer,
    tail_fields,
)
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.conftest import KiB, MiB, QemuNBD, nbdinfo_map, rows_of
from tests.gateway.test_observability import value
from tests.gateway.test_service_qemu import config_for

U64 = st.integers(0, (1 << 64) - 1)
ROWS = st.integers(0, 40)


@st.composite
def messages(draw: st.DrawFn) -> tuple[dict[str, Any], bytes]:
    """The fields of a StreamExtentsResponse (without data), and its data."""
    n = draw(ROWS)
    fields: dict[str, Any] = {
        "offset": draw(U64),
        "next_offset": draw(U64),
        "resume_token": draw(st.text(max_size=80)),
        "range_end": draw(U64),
        "offset_deltas": draw(st.lists(U64, min_size=n, max_size=n)),
        "lengths": draw(st.lists(U64, min_size=n, max_size=n)),
        "flags": draw(st.lists(st.integers(0, (1 << 32) - 1), min_size=n, max_size=n)),
    }
    if draw(st.booleans()):
        kinds = st.sampled_from(list(pb.Allocation.values()))
        fields["allocation"] = draw(st.lists(kinds, min_size=n, max_size=n))
    # Lengths on both sides of each varint size boundary (1, 2 and 3 bytes).
    size = draw(st.sampled_from([1, 127, 128, 16383, 16384, 100_000]) | st.integers(1, 3000))
    data = draw(st.binary(min_size=1, max_size=min(size, 3000))).ljust(size, b"\xa5")
    return fields, data


def prepare(fields: dict[str, Any], data: bytes, spare: bytearray | None) -> PreparedMessage:
    buf = DataMessageBuffer(pb.StreamExtentsResponse(**fields), len(data), spare)
    # As the NBD reads do: each piece written at its place in the message.
    cut = len(data) // 3
    buf.data[:cut] = data[:cut]
    buf.data[cut:] = data[cut:]
    return buf.message(extents=len(fields["lengths"]), covered=7)


@settings(max_examples=200, deadline=None)
@given(messages(), st.none() | st.integers(0, 200_000))
def test_prepared_message_is_what_protobuf_writes(
    msg: tuple[dict[str, Any], bytes], spare_size: int | None
) -> None:
    fields, data = msg
    # A spare buffer from an earlier message, bigger or smaller, full of other bytes.
    spare = None if spare_size is None else bytearray(b"\xee" * spare_size)
    prepared = prepare(fields, data, spare)
    old = pb.StreamExtentsResponse(**fields, data=data)  # the message built the old way
    assert prepared.payload == old.SerializeToString()
    parsed = pb.StreamExtentsResponse.FromString(prepared.payload)
    assert parsed == old
    assert parsed.ListFields() == old.ListFields()  # every field, not only equality's view
    assert parsed.data == data
    assert prepared.data_bytes == len(data)
    assert prepared.extents == len(fields["lengths"])


SMALL = st.integers(0, 0x7F)


@st.composite
def columns(draw: st.DrawFn) -> dict[str, Any]:
    """The fields of an extents message: columns that are all small (one byte per value, the
    fast path), all zero (offset_deltas of an unfiltered stream), or anything (protobuf's)."""
    n = draw(ROWS)

    def column(big: st.SearchStrategy[int]) -> list[int]:
        kind = draw(st.sampled_from(["zero", "small", "big"]))
        if kind == "zero":
            return [0] * n
        return draw(st.lists(SMALL if kind == "small" else big, min_size=n, max_size=n))

    fields: dict[str, Any] = {
        "offset": draw(U64),
        "next_offset": draw(U64),
        "resume_token": draw(st.text(max_size=80)),
        "range_end": draw(U64),
        "offset_deltas": column(U64),
        "lengths": column(st.integers(1, (1 << 64) - 1)),
        "flags": column(st.integers(0, (1 << 32) - 1)),
    }
    if draw(st.booleans()):
        fields["allocation"] = draw(
            st.lists(st.sampled_from(list(pb.Allocation.values())), min_size=n, max_size=n)
        )
    return fields


@settings(max_examples=300, deadline=None)
@given(columns())
def test_extents_message_is_what_protobuf_writes(fields: dict[str, Any]) -> None:
    """Extent messages (no data) are serialized by the gateway, small columns packed by hand:
    byte for byte what protobuf writes, and parsed back as the same message."""
    head = pb.StreamExtentsResponse(
        offset=fields["offset"],
        next_offset=fields["next_offset"],
        resume_token=fields["resume_token"],
        range_end=fields["range_end"],
    )
    as_arrays = {k: array("Q", fields[k]) for k in ("offset_deltas", "lengths", "flags")}
    kinds = array("B", fields["allocation"]) if "allocation" in fields else None
    prepared = extents_message(
        head, as_arrays["offset_deltas"], as_arrays["lengths"], as_arrays["flags"], kinds
    )
    old = pb.StreamExtentsResponse(**fields)
    assert prepared.payload == old.SerializeToString()
    assert pb.StreamExtentsResponse.FromString(prepared.payload) == old
    assert prepared.extents == len(fields["lengths"]) and prepared.data_bytes == 0


def test_packed_small_takes_only_small_values() -> None:
    assert packed_small(5, array("Q")) == b""
    assert packed_small(5, array("Q", [0, 0, 0])) == bytes([5 << 3 | 2, 3, 0, 0, 0])
    assert packed_small(7, array("Q", [1, 127])) == bytes([7 << 3 | 2, 2, 1, 127])
    assert packed_small(7, array("Q", [1, 128])) is None
    # A small low byte with something above it is not small.
    for big in (256, 1 << 32, 1 << 63, 0x7F | 1 << 40):
        assert packed_small(6, array("Q", [3, big, 0])) is None
    assert packed_small(8, array("B", [0, 1, 2, 3])) == bytes([8 << 3 | 2, 4, 0, 1, 2, 3])


def test_buffer_is_reused_only_when_it_fits() -> None:
    head = pb.StreamExtentsResponse(offset=1, next_offset=2, resume_token="t")
    first = DataMessageBuffer(head, 100, None)
    first.data[:] = b"x" * 100
    one = first.message(extents=0, covered=1)
    spare = first.reuse()
    assert spare is not None
    second = DataMessageBuffer(head, 50, spare)
    second.data[:] = b"y" * 50
    two = second.message(extents=0, covered=1)
    assert second.reuse() is spare  # it fit
    assert pb.StreamExtentsResponse.FromString(two.payload).data == b"y" * 50
    assert pb.StreamExtentsResponse.FromString(one.payload).data == b"x" * 100  # a copy
    third = DataMessageBuffer(head, 10_000, spare)
    assert third.reuse() is not spare  # too small: a new one


def test_data_field_header() -> None:
    for n in (1, 127, 128, 300, 16384, MiB):
        m = pb.StreamExtentsResponse(data=bytes(n)).SerializeToString()
        assert m == data_field_header(n) + bytes(n)


def test_serializer_passes_other_messages_to_protobuf() -> None:
    ser = serializer(pb.StreamExtentsResponse.SerializeToString)
    m = pb.StreamExtentsResponse(offset=5, lengths=[1, 2], data=b"abc")
    assert ser(m) == m.SerializeToString()
    assert ser(PreparedMessage(b"\x08\x05", extents=0, covered=0, data_bytes=0)) == b"\x08\x05"


def test_add_bitmap_service_changes_only_stream_extents_serializer() -> None:
    class Keep:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            self.generic = handlers

        def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
            self.service, self.handlers = service, handlers

    servicer = BitmapServicer(None)  # type: ignore[arg-type]  # never called here
    generated, ours = Keep(), Keep()
    pb_grpc.add_BitmapServiceServicer_to_server(servicer, generated)  # type: ignore[arg-type]
    add_bitmap_service(servicer, ours)
    assert ours.service == generated.service == "nbdgw.v1.BitmapService"
    assert ours.handlers.keys() == generated.handlers.keys()
    for name, handler in generated.handlers.items():
        mine = ours.handlers[name]
        assert mine.request_deserializer == handler.request_deserializer
        assert mine.unary_stream == handler.unary_stream
        assert mine.unary_unary == handler.unary_unary
        if name == "StreamExtents":
            assert mine.response_serializer != handler.response_serializer
            payload = mine.response_serializer(
                PreparedMessage(b"\x10\x07", extents=0, covered=0, data_bytes=0)
            )
            assert payload == b"\x10\x07"
        else:
            assert mine.response_serializer == handler.response_serializer
    # The generic handler serves the same table (what grpc uses for unregistered lookups).
    (generic,) = ours.generic
    details = type("D", (), {"method": "/nbdgw.v1.BitmapService/StreamExtents"})()
    assert generic.service(details) is ours.handlers["StreamExtents"]


async def test_stream_over_qemu_nbd_is_canonical_and_counted(
    qemu_nbd: QemuNBD, start_gateway: Any
) -> None:
    """Messages of a real stream, taken as bytes off the wire: each is the canonical
    serialization of what the generated class parses; the data is the disk's; a message whose
    data comes from several extents has each at its place; the metrics count it all."""
    gw = await start_gateway(config_for(("vm", qemu_nbd.uri)))
    raw_disk = qemu_nbd.disk.raw.read_bytes()
    method = gw.channel.unary_stream("/nbdgw.v1.BitmapService/StreamExtents")
    request = pb.StreamExtentsRequest(export="vm", context="base:allocation", include_data=True)
    wire = [m async for m in method(request.SerializeToString())]
    messages = [pb.StreamExtentsResponse.FromString(w) for w in wire]
    for w, m in zip(wire, messages, strict=True):
        assert w == m.SerializeToString()
    rows = [r for m in messages for r in rows_of(m)]
    several = 0
    for m in messages:
        pos = 0
        data_rows = 0
        for start, length, _flags, kind in rows_of(m):
            if kind == pb.ALLOCATION_DATA:
                assert m.data[pos : pos + length] == raw_disk[start : start + length]
                pos += length
                data_rows += 1
            else:
                assert raw_disk[start : start + length] == bytes(length)
        assert pos == len(m.data) <= MiB
        several += data_rows >= 3
    assert several, "no message carried data from several extents"
    data_bytes = sum(n for _, n, _, kind in rows if kind == pb.ALLOCATION_DATA)
    assert data_bytes >= 8 * MiB + 64 * KiB
    # The host's own map, allocated ranges: what the stream carried data for.
    allocated = sum(n for _, n, f, _ in nbdinfo_map(qemu_nbd.uri, "base:allocation") if not f & 1)
    assert data_bytes >= allocated
    metrics = gw.gateway.metrics
    assert value(metrics, "nbdgw_data_bytes_streamed_total", export="vm") == data_bytes
    assert value(metrics, "nbdgw_extents_streamed_total", export="vm") == len(rows)
    assert value(metrics, "nbdgw_bytes_streamed_total", export="vm") == messages[-1].range_end


@settings(max_examples=100, deadline=None)
@given(
    messages(),
    st.none() | st.integers(0, (1 << 32) - 1),
    st.sampled_from(["", "zstd"]),
    st.sampled_from([b"", bytes(range(32))]),
    st.sampled_from(["", "a-clear-token"]),
)
def test_fields_after_data_are_what_protobuf_writes(
    msg: tuple[dict[str, Any], bytes],
    crc: int | None,
    compression: str,
    digest: bytes,
    clear_token: str,
) -> None:
    """data_crc32c, data_compression and digest (13-15) follow the data and clear_token (10),
    as protobuf writes them; in an extents message too (the digest of a stream's last
    message)."""
    fields, data = msg
    token = pb.StreamExtentsResponse(clear_token=clear_token).SerializeToString()
    buf = DataMessageBuffer(pb.StreamExtentsResponse(**fields), len(data), None, token)
    buf.data[:] = data
    tail = tail_fields(crc, compression, digest)
    prepared = buf.message(extents=len(fields["lengths"]), covered=7, tail=tail)
    want = pb.StreamExtentsResponse(
        **fields, data=data, data_compression=compression, clear_token=clear_token
    )
    want.digest = digest
    if crc is not None:
        want.data_crc32c = crc
    assert prepared.payload == want.SerializeToString()
    frame = bytes(reversed(data))  # stands for the compressed data
    packed = buf.compressed(frame, extents=1, covered=7, tail=tail)
    want.data = frame
    assert packed.payload == want.SerializeToString()
    assert packed.data_bytes == len(frame)
