"""Resource bounds of the sans-I/O client against a hostile server (review M9).

A READ reply may be split into DATA/HOLE chunks in any order; a server must not be able to make
the client do unbounded (or quadratic) bookkeeping with a stream of tiny chunks.
"""

from __future__ import annotations

from itertools import pairwise

import pytest

from nbdcore.client import MIN_CONTENT_CHUNKS, ClientState, Reply, max_content_chunks
from nbdcore.exceptions import ServerProtocolError
from tests.unit.test_client_protocol import (
    data_chunk,
    hole_chunk,
    negotiated,
    none_chunk,
    only_reply,
)


def test_cap_follows_the_512_byte_alignment_the_spec_asks_for() -> None:
    assert max_content_chunks(0) == MIN_CONTENT_CHUNKS
    assert max_content_chunks(4096) == MIN_CONTENT_CHUNKS
    assert max_content_chunks(32 << 20) == (32 << 20) // 512 + 2


def test_one_byte_chunks_in_reverse_order_are_refused_at_the_cap() -> None:
    conn = negotiated()
    length = 4096
    cookie = conn.send_read(0, length)
    cap = max_content_chunks(length)
    stream = b"".join(data_chunk(cookie, off, b"x") for off in range(length - 1, -1, -1))
    with pytest.raises(ServerProtocolError, match=f"more than {cap} content chunks"):
        conn.receive_data(stream)
    assert conn.state is ClientState.FAILED


def test_cap_counts_holes_too() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 1024)
    stream = b"".join(
        hole_chunk(cookie, off, 1) if off % 2 else data_chunk(cookie, off, b"y")
        for off in range(1024)
    )
    with pytest.raises(ServerProtocolError, match="content chunks"):
        conn.receive_data(stream)


def test_largest_legal_split_in_reverse_order_is_reassembled() -> None:
    """A read split at every 512-byte mark, with a 1-byte and a 3-byte piece at its unaligned
    edges (exactly the cap), sent last piece first: accepted whole."""
    conn = negotiated()
    start, length = 511, (512 << 10) + 2
    cookie = conn.send_read(start, length)
    # Boundaries at every absolute 512-byte mark inside [start, start + length).
    cuts = [start, *range(512, start + length, 512), start + length]
    pieces = list(pairwise(cuts))
    assert len(pieces) == max_content_chunks(length)
    expected = bytearray(length)
    stream = []
    for i, (a, b) in enumerate(reversed(pieces)):
        if i % 3 == 0:
            stream.append(hole_chunk(cookie, a, b - a))
        else:
            body = bytes([i % 251 + 1]) * (b - a)
            expected[a - start : b - start] = body
            stream.append(data_chunk(cookie, a, body))
    conn.receive_data(b"".join(stream) + none_chunk(cookie))
    reply = only_reply(conn)
    assert reply.error is None and reply.data is not None
    assert bytes(reply.data) == bytes(expected)


def test_overlap_with_the_previous_chunk_fails_at_once() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 4096)
    conn.receive_data(data_chunk(cookie, 1000, b"a" * 100))
    with pytest.raises(ServerProtocolError, match="overlaps"):
        conn.receive_data(data_chunk(cookie, 900, b"b" * 101))


def test_overlap_out_of_order_is_found_when_the_reply_is_done() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 4096)
    # [1000, 1100), then [0, 500), then [1050, 1060): overlaps the first, not the last.
    conn.receive_data(
        data_chunk(cookie, 1000, b"a" * 100)
        + data_chunk(cookie, 0, b"b" * 500)
        + data_chunk(cookie, 1050, b"c" * 10)
    )
    assert conn.events_received() == []
    with pytest.raises(ServerProtocolError, match="overlaps"):
        conn.receive_data(none_chunk(cookie))
    assert conn.state is ClientState.FAILED


def test_overlap_that_would_pass_the_coverage_count_is_refused() -> None:
    """Overlapping chunks whose sizes add up to the read length (a gap hides elsewhere)."""
    conn = negotiated()
    cookie = conn.send_read(0, 1024)
    with pytest.raises(ServerProtocolError, match="overlaps"):
        conn.receive_data(
            data_chunk(cookie, 512, b"a" * 512)
            + data_chunk(cookie, 0, b"b" * 256)
            + data_chunk(cookie, 600, b"c" * 256)
            + none_chunk(cookie)
        )


def test_too_many_bytes_is_an_overlap_even_before_done() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 1024)
    conn.receive_data(data_chunk(cookie, 512, b"a" * 512) + data_chunk(cookie, 0, b"b" * 256))
    with pytest.raises(ServerProtocolError, match="overlaps"):
        conn.receive_data(data_chunk(cookie, 600, b"c" * 400))


def test_in_order_and_shuffled_chunks_still_complete() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 2048)
    conn.receive_data(
        data_chunk(cookie, 1024, b"c" * 1024)
        + hole_chunk(cookie, 512, 512)
        + data_chunk(cookie, 0, b"a" * 512)
        + none_chunk(cookie)
    )
    reply = only_reply(conn)
    assert isinstance(reply, Reply) and reply.data is not None
    assert bytes(reply.data) == b"a" * 512 + bytes(512) + b"c" * 1024
