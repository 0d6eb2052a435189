"""nbdcore.wire: round trips of every codec, and garbage never raising anything but WireError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdcore import wire
from nbdcore.constants import (
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_REQUEST_MAGIC,
    Info,
)
from nbdcore.wire import BlockSize, WireError

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)
nbd_text = st.text(
    st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=64
)


@given(nbd_text, st.lists(u16, max_size=20))
def test_info_request_round_trip(name: str, infos: list[int]) -> None:
    assert wire.decode_info_request(wire.encode_info_request(name, infos)) == (name, infos)


@given(nbd_text, st.lists(nbd_text, max_size=10))
def test_meta_context_request_round_trip(name: str, queries: list[str]) -> None:
    payload = wire.encode_meta_context_request(name, queries)
    assert wire.decode_meta_context_request(payload) == (name, queries)


@given(nbd_text, nbd_text)
def test_rep_server_round_trip(name: str, description: str) -> None:
    assert wire.decode_rep_server(wire.encode_rep_server(name, description)) == (name, description)


@given(u32, nbd_text)
def test_rep_meta_context_round_trip(cid: int, name: str) -> None:
    assert wire.decode_rep_meta_context(wire.encode_rep_meta_context(cid, name)) == (cid, name)


@given(u64, u16)
def test_info_export_round_trip(size: int, flags: int) -> None:
    assert wire.decode_info(wire.encode_info_export(size, flags)) == (Info.EXPORT, (size, flags))


@given(st.sampled_from([Info.NAME, Info.DESCRIPTION]), nbd_text)
def test_info_string_round_trip(kind: Info, text: str) -> None:
    assert wire.decode_info(wire.encode_info_string(kind, text)) == (kind, text)


@given(u32, u32, u32)
def test_info_block_size_round_trip(a: int, b: int, c: int) -> None:
    bs = BlockSize(a, b, c)
    assert wire.decode_info(wire.encode_info_block_size(bs)) == (Info.BLOCK_SIZE, bs)


@given(u16, u16, u64, u64, u32, st.booleans())
def test_request_layouts(
    flags: int, cmd: int, cookie: int, offset: int, length: int, ext: bool
) -> None:
    data = wire.encode_request(flags, cmd, cookie, offset, length, ext)
    if ext:
        assert wire.EXTENDED_REQUEST.unpack(data) == (
            NBD_EXTENDED_REQUEST_MAGIC, flags, cmd, cookie, offset, length,
        )  # fmt: skip
    else:
        assert wire.REQUEST.unpack(data) == (NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


@given(st.integers(1, 0xFFFFFFFF), nbd_text, st.one_of(st.none(), u64))
def test_error_payload_round_trip(errno: int, message: str, offset: int | None) -> None:
    payload = wire.encode_error_payload(errno, message, offset)
    errno2, message2, offset2 = wire.decode_error_payload(payload, offset is not None)
    assert (errno2, offset2) == (errno, offset)
    assert message2 == message


@given(u32, st.lists(st.tuples(u32, u32), min_size=1, max_size=50))
def test_block_status_compact_round_trip(cid: int, extents: list[tuple[int, int]]) -> None:
    got = wire.decode_block_status(wire.encode_block_status(cid, extents, False), False)
    assert got[0] == cid
    assert list(zip(got[1], got[2], strict=True)) == extents


@given(u32, st.lists(st.tuples(u64, u64), min_size=1, max_size=50))
def test_block_status_extended_round_trip(cid: int, extents: list[tuple[int, int]]) -> None:
    got = wire.decode_block_status(wire.encode_block_status(cid, extents, True), True)
    assert got[0] == cid
    assert list(zip(got[1], got[2], strict=True)) == extents


@given(u64, st.lists(u32, max_size=20))
def test_block_status_payload_round_trip(length: int, ids: list[int]) -> None:
    assert wire.decode_block_status_payload(wire.encode_block_status_payload(length, ids)) == (
        length,
        ids,
    )


def test_strings_obey_the_spec_limits() -> None:
    with pytest.raises(WireError, match="NUL"):
        wire.encode_string("a\0b")
    with pytest.raises(WireError, match="4096"):
        wire.encode_string("x" * 4097)
    assert wire.encode_string("é" * 2048) == "é".encode() * 2048
    with pytest.raises(WireError, match="UTF-8"):
        wire.decode_string(b"\xff\xfe")


def test_block_status_rejects_empty_and_ragged() -> None:
    with pytest.raises(WireError):
        wire.decode_block_status(b"\0\0\0\1", False)  # no extent
    with pytest.raises(WireError):
        wire.decode_block_status(b"\0\0\0\1" + bytes(12), False)
    with pytest.raises(WireError, match="count"):
        wire.decode_block_status(b"\0\0\0\1\0\0\0\2" + bytes(16), True)


DECODERS: list[Callable[[bytes], object]] = [
    wire.decode_info_request,
    wire.decode_meta_context_request,
    wire.decode_rep_server,
    wire.decode_rep_meta_context,
    wire.decode_info,
    lambda b: wire.decode_error_payload(b, False),
    lambda b: wire.decode_error_payload(b, True),
    lambda b: wire.decode_block_status(b, False),
    lambda b: wire.decode_block_status(b, True),
    wire.decode_block_status_payload,
]


@pytest.mark.parametrize("decode", DECODERS)
@given(data=st.binary(max_size=200))
def test_garbage_raises_only_wire_error(decode: Callable[[bytes], object], data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode(data)
