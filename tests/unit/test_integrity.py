"""nbdgw.integrity: the digest's definition, checked against a direct computation of it;
nbdgw._wire: the client's check of a message's data (CRC32C, zstd); gateway.integrity: the
gateway's side."""

from __future__ import annotations

import hashlib
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.integrity import Compressor, check_request, crc32c
from nbdgw._wire import DecodeError, checked_data, parse_response  # the client's checks
from nbdgw.errors import DataCorrupted, StreamError
from nbdgw.integrity import DIGEST_BLOCK, DIGESTS, RangeDigest
from nbdgw.v1 import bitmap_service_pb2 as pb

B = DIGEST_BLOCK


def reference(algorithm: str, content: bytes, start: int) -> bytes:
    """The module docstring's definition, written out over the whole content of the range."""

    def h(data: bytes) -> bytes:
        x = DIGESTS[algorithm]()
        x.update(data)
        return bytes(x.digest())

    chain = h(b"nbdgw-digest-v1\0" + algorithm.encode())
    end = start + len(content)
    lo = start
    while lo < end:
        hi = min((lo // B + 1) * B, end)
        block = content[lo - start : hi - start]
        if block.count(0) != len(block):
            chain = h(chain + struct.pack(">QQ", lo, hi) + h(block))
        lo = hi
    return chain


def test_crc32c_is_castagnoli() -> None:
    assert crc32c(b"123456789") == 0xE3069283  # the check value of CRC-32C
    assert crc32c(b"6789", crc32c(b"12345")) == crc32c(b"123456789")


# Pieces: (gap before, length, fill byte); fill 0 makes a delivered piece of zeros.
pieces = st.lists(
    st.tuples(st.integers(0, 3 * B // 2), st.integers(1, 3 * B // 2), st.sampled_from([0, 0x5A])),
    max_size=5,
)


@settings(max_examples=40, deadline=None)
@given(
    algorithm=st.sampled_from(sorted(DIGESTS)),
    start=st.integers(0, 3 * B),
    parts=pieces,
    tail=st.integers(0, B),
    cut=st.integers(1, 1 << 19),
    resume_at=st.integers(0, 100),
)
def test_digest_matches_its_definition_however_it_is_fed(
    algorithm: str,
    start: int,
    parts: list[tuple[int, int, int]],
    tail: int,
    cut: int,
    resume_at: int,
) -> None:
    content = bytearray()
    placed = []
    for gap, length, fill in parts:
        content += bytes(gap)
        placed.append((start + len(content), bytes([fill]) * length))
        content += placed[-1][1]
    content += bytes(tail)
    if not content:
        content = bytearray(1)
    end = start + len(content)
    want = reference(algorithm, bytes(content), start)

    # Whole pieces.
    d = RangeDigest(algorithm, start)
    for offset, data in placed:
        d.update(offset, data)
    assert d.finish(end) == want

    # Cut in small pieces, and resumed after one of them (as a stream is, at a message end).
    small = [(o + i, data[i : i + cut]) for o, data in placed for i in range(0, len(data), cut)]
    d = RangeDigest(algorithm, start)
    stop = resume_at % (len(small) + 1)
    for offset, data in small[:stop]:
        d.update(offset, data)
    chain, lo = d.state
    position = d.position
    d = RangeDigest(algorithm, lo, chain=chain)
    for offset, data in small:  # the resumed side feeds the block's first part again
        if offset + len(data) > lo and offset < position:
            a = max(lo, offset)
            b = min(position, offset + len(data))
            d.update(a, data[a - offset : b - offset])
    for offset, data in small[stop:]:
        d.update(offset, data)
    assert d.finish(end) == want


def test_zero_data_and_holes_hash_alike() -> None:
    start, end = 100, 5 * B + 7
    d = RangeDigest("blake3", start)
    d.update(B + 3, b"x")
    hole = d.finish(end)
    d = RangeDigest("blake3", start)
    d.update(start, bytes(B - start))  # zero data, delivered
    d.update(B + 3, b"x")
    d.update(2 * B, bytes(2 * B))
    assert d.finish(end) == hole
    # ... but not a different byte, or the same byte elsewhere.
    other = RangeDigest("blake3", start)
    other.update(B + 4, b"x")
    assert other.finish(end) != hole


def test_digest_refuses_going_back() -> None:
    d = RangeDigest("sha256", 0)
    d.update(10, b"ab")
    with pytest.raises(ValueError, match="goes back"):
        d.update(11, b"c")
    with pytest.raises(ValueError, match="unknown digest"):
        RangeDigest("md5", 0)


def data_message(data: bytes, *, compress: bool = False) -> pb.StreamExtentsResponse:
    msg = pb.StreamExtentsResponse(offset=4096, next_offset=4096 + len(data), data=data)
    msg.data_crc32c = crc32c(data)
    if compress:
        frame = Compressor(3).compress(data)
        assert frame is not None
        msg.data = frame
        msg.data_compression = "zstd"
    return msg


def test_client_check_of_a_message() -> None:
    data = b"disk bytes " * 1000
    assert checked_data(data_message(data), len(data)) == data
    assert checked_data(data_message(data, compress=True), len(data)) == data
    bad = data_message(data)
    bad.data = data[:500] + b"X" + data[501:]
    with pytest.raises(DataCorrupted, match=r"\[4096, 15096\) is corrupt: CRC32C"):
        checked_data(bad, len(data))
    missing = data_message(data)
    missing.ClearField("data_crc32c")
    with pytest.raises(StreamError, match="no CRC32C"):
        checked_data(missing, len(data))


def test_client_check_refuses_a_bad_frame() -> None:
    msg = data_message(b"abc" * 5000, compress=True)
    frame = bytearray(msg.data)
    frame[len(frame) // 2] ^= 0xFF
    msg.data = bytes(frame)
    with pytest.raises(DataCorrupted):
        checked_data(msg, 15000)
    # A frame that would decompress to more than one message may hold is refused too.
    big = zstandard.ZstdCompressor().compress(bytes(4 << 20))
    bomb = pb.StreamExtentsResponse(offset=0, next_offset=1, data=big, data_compression="zstd")
    bomb.data_crc32c = 0
    with pytest.raises(DataCorrupted, match="does not decode"):
        checked_data(bomb, 4 << 20)
    odd = data_message(b"abc")
    odd.data_compression = "lz4"
    with pytest.raises(StreamError, match="lz4-compressed, which this client cannot read"):
        checked_data(odd, 3)


def test_compressor_keeps_incompressible_data_raw() -> None:
    assert Compressor(3).compress(hashlib.sha256(b"x").digest() * 1) is None


def test_check_request_names_the_field() -> None:
    assert check_request("", "", 0) == []
    assert check_request("blake3", "zstd", 19) == []
    names = [f for f, _ in check_request("md5", "gzip", 22)]
    assert names == ["digest", "compression", "compression_level"]
    assert [f for f, _ in check_request("", "", 5)] == ["compression_level"]
    assert check_request("", "zstd", 0) == []


def full_message(data: bytes) -> pb.StreamExtentsResponse:
    msg = data_message(data)
    msg.resume_token, msg.clear_token, msg.range_end = "resume", "clear", 1 << 40
    msg.offset_deltas.extend([0, 7, 300])
    msg.lengths.extend([len(data), 1 << 35, 5])
    msg.flags.extend([1, 0, 1])
    msg.allocation.extend([pb.ALLOCATION_DATA, pb.ALLOCATION_HOLE, pb.ALLOCATION_ZERO])
    msg.digest = bytes(32)
    return msg


@given(st.binary(max_size=3000))
@settings(max_examples=50)
def test_parse_response_is_protobuf_without_the_copy(data: bytes) -> None:
    msg = full_message(data)
    raw = msg.SerializeToString()
    got = parse_response(raw)
    assert isinstance(got.data, memoryview) and got.data.obj is raw  # a view, not a copy
    assert bytes(got.data) == data
    whole = pb.StreamExtentsResponse()
    whole.CopyFrom(got.message)
    whole.data = bytes(got.data)
    assert whole == msg
    assert got.next_offset == msg.next_offset and list(got.lengths) == list(msg.lengths)
    assert bytes(checked_data(got, len(data))) == data  # the CRC32C check reads the view


def test_parse_response_takes_fields_in_any_order_and_the_last_data() -> None:
    head = pb.StreamExtentsResponse(offset=5, next_offset=9).SerializeToString()
    tail = pb.StreamExtentsResponse(clear_token="t").SerializeToString()
    first = pb.StreamExtentsResponse(data=b"old").SerializeToString()
    second = pb.StreamExtentsResponse(data=b"new!").SerializeToString()
    raw = tail + first + head + second
    got = parse_response(raw)
    assert got.message == pb.StreamExtentsResponse(offset=5, next_offset=9, clear_token="t")
    assert bytes(got.data) == bytes(pb.StreamExtentsResponse.FromString(raw).data) == b"new!"
    assert bytes(parse_response(b"").data) == b""


def test_parse_response_refuses_what_protobuf_refuses() -> None:
    raw = full_message(b"x" * 100).SerializeToString()
    for bad in (raw[:-1], raw[:50], raw + b"\x80", bytes([9 << 3 | 2, 0xFF])):
        with pytest.raises(DecodeError):
            parse_response(bad)
    with pytest.raises(DecodeError):
        parse_response(bytes([9 << 3 | 3]))  # a group: never in this message
