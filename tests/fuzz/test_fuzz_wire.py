"""Every nbdcore.wire decoder fed arbitrary bytes: a value or WireError, nothing else; and every
encoder's output decodes back to what was encoded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdcore import wire
from nbdcore.constants import NBD_MAX_STRING, Info
from tests.fuzz.support import FUZZ, tried

DECODERS: dict[str, Callable[[bytes], Any]] = {
    "decode_string": wire.decode_string,
    "decode_info_request": wire.decode_info_request,
    "decode_meta_context_request": wire.decode_meta_context_request,
    "decode_rep_server": wire.decode_rep_server,
    "decode_rep_meta_context": wire.decode_rep_meta_context,
    "decode_info": wire.decode_info,
    "decode_error_payload": lambda b: wire.decode_error_payload(b, False),
    "decode_error_payload+offset": lambda b: wire.decode_error_payload(b, True),
    "decode_block_status": lambda b: wire.decode_block_status(b, False),
    "decode_block_status_ext": lambda b: wire.decode_block_status(b, True),
    "decode_block_status_payload": wire.decode_block_status_payload,
}


def test_every_decoder_is_fuzzed() -> None:
    public = {n for n in dir(wire) if n.startswith("decode_")}
    assert public <= {n.split("+")[0].removesuffix("_ext") for n in DECODERS}


# Bytes that look like the messages: a length prefix that is sometimes right.
def framed() -> st.SearchStrategy[bytes]:
    def build(n: int, body: bytes, lie: int | None, tail: bytes) -> bytes:
        return (lie if lie is not None else n).to_bytes(4, "big") + body[:n] + tail

    return st.builds(
        build,
        st.integers(0, 40),
        st.binary(max_size=40),
        st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        st.binary(max_size=12),
    )


@pytest.mark.parametrize("name", sorted(DECODERS))
@FUZZ
@given(data=st.one_of(st.binary(max_size=200), framed()))
def test_decoder_raises_only_wire_error(name: str, data: bytes) -> None:
    tried(f"wire.{name}")
    for view in (data, memoryview(data)):
        try:
            DECODERS[name](view)
        except wire.WireError as exc:
            assert str(exc)


# NBD strings are UTF-8 without NUL (encoders refuse NUL with WireError).
text = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=60
)


def test_encoders_refuse_nul() -> None:
    with pytest.raises(wire.WireError, match="NUL"):
        wire.encode_rep_server("a\x00b")


@FUZZ
@given(text, st.lists(st.integers(0, 0xFFFF), max_size=8))
def test_info_request_round_trip(export: str, infos: list[int]) -> None:
    tried("wire.round_trip")
    if len(export.encode()) > NBD_MAX_STRING:
        return
    assert wire.decode_info_request(wire.encode_info_request(export, infos)) == (export, infos)


@FUZZ
@given(text, st.lists(text, max_size=6))
def test_meta_context_request_round_trip(export: str, queries: list[str]) -> None:
    tried("wire.round_trip")
    got = wire.decode_meta_context_request(wire.encode_meta_context_request(export, queries))
    assert got == (export, queries)


@FUZZ
@given(text, text, st.integers(0, 2**32 - 1))
def test_replies_round_trip(name: str, description: str, cid: int) -> None:
    tried("wire.round_trip")
    assert wire.decode_rep_server(wire.encode_rep_server(name, description)) == (name, description)
    assert wire.decode_rep_meta_context(wire.encode_rep_meta_context(cid, name)) == (cid, name)
    assert wire.decode_info(wire.encode_info_string(Info.NAME, name)) == (Info.NAME, name)


@FUZZ
@given(
    st.integers(1, 2**32 - 1),
    st.text(max_size=80),
    st.one_of(st.none(), st.integers(0, 2**64 - 1)),
)
def test_error_payload_round_trip(errno: int, message: str, offset: int | None) -> None:
    tried("wire.round_trip")
    got = wire.decode_error_payload(
        wire.encode_error_payload(errno, message, offset), offset is not None
    )
    assert got == (errno, message, offset)


@FUZZ
@given(
    st.booleans(),
    st.integers(0, 2**32 - 1),
    st.lists(
        st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), min_size=1, max_size=20
    ),
)
def test_block_status_round_trip(extended: bool, cid: int, extents: list[tuple[int, int]]) -> None:
    tried("wire.round_trip")
    got_cid, lengths, flags = wire.decode_block_status(
        wire.encode_block_status(cid, extents, extended), extended
    )
    assert got_cid == cid and list(zip(lengths, flags, strict=True)) == extents


@FUZZ
@given(st.integers(0, 2**64 - 1), st.lists(st.integers(0, 2**32 - 1), max_size=10))
def test_block_status_payload_round_trip(length: int, ids: list[int]) -> None:
    tried("wire.round_trip")
    assert wire.decode_block_status_payload(wire.encode_block_status_payload(length, ids)) == (
        length,
        ids,
    )
