"""Sans-I/O server: requests, validation and reply encoding, driven with bytes."""

from __future__ import annotations

from array import array

import pytest

from nbdcore import wire
from nbdcore.constants import (
    NBD_REPLY_FLAG_DONE,
    Cmd,
    CmdFlag,
    Errno,
    ReplyType,
)
from nbdcore.exceptions import ClientProtocolError
from nbdcore.server import Disconnect, Request, ServerConnection, State
from tests.unit.test_server_support import Chunk, MiB, joined, parse_replies, transmission

CTX = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]


def send(
    conn: ServerConnection,
    cmd: int,
    offset: int = 0,
    length: int = 0,
    *,
    flags: int = 0,
    cookie: int = 1,
    payload: bytes = b"",
) -> list[object]:
    conn.receive_data(
        wire.encode_request(flags, cmd, cookie, offset, length, conn.extended_headers) + payload
    )
    return conn.events_received()


def error_of(conn: ServerConnection) -> int:
    (reply,) = parse_replies(joined(conn))
    if isinstance(reply, Chunk):
        assert reply.type == ReplyType.ERROR and reply.flags & NBD_REPLY_FLAG_DONE
        errno, _, _ = wire.decode_error_payload(reply.payload, False)
        return errno
    assert isinstance(reply, tuple)
    return int(reply[0])


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize(
    ("cmd", "offset", "length", "flags", "errno"),
    [
        (Cmd.READ, 4 * MiB, 1, 0, Errno.EINVAL),
        (Cmd.READ, 2**64 - 1, 2, 0, Errno.EINVAL),  # no integer overflow
        (Cmd.READ, 0, 33 * MiB, 0, Errno.EINVAL),
        (Cmd.TRIM, 4 * MiB - 1, 2, 0, Errno.EINVAL),
        (Cmd.WRITE_ZEROES, 4 * MiB, 1, 0, Errno.ENOSPC),
        (Cmd.FLUSH, 1, 0, 0, Errno.EINVAL),
        (Cmd.BLOCK_STATUS, 0, 512, 0, Errno.EINVAL),  # no context negotiated
        (42, 0, 0, 0, Errno.EINVAL),  # unknown command
        (Cmd.RESIZE, 0, 0, 0, Errno.EINVAL),
        (Cmd.READ, 0, 512, 1 << 9, Errno.EINVAL),  # unknown flag
        (Cmd.READ, 0, 512, CmdFlag.NO_HOLE, Errno.EINVAL),  # flag of another command
        (Cmd.READ, 0, 512, CmdFlag.PAYLOAD_LEN, Errno.EINVAL),  # extended only
    ],
)
def test_rejected_requests(
    structured: bool, cmd: int, offset: int, length: int, flags: int, errno: int
) -> None:
    conn = transmission(structured)
    assert send(conn, cmd, offset, length, flags=flags) == []
    assert error_of(conn) == errno
    assert conn.in_flight == 0
    # The connection is still usable.
    (req,) = send(conn, Cmd.READ, 0, 512, cookie=2)
    assert isinstance(req, Request) and req.cookie == 2


def test_df_needs_structured_replies() -> None:
    conn = transmission(False)
    send(conn, Cmd.READ, 0, 512, flags=CmdFlag.DF)
    assert error_of(conn) == Errno.EINVAL


def test_read_only_export_refuses_writes_with_eperm() -> None:
    conn = transmission(True, export="ro")
    assert send(conn, Cmd.WRITE, 0, 4, payload=b"abcd") == []
    assert error_of(conn) == Errno.EPERM
    send(conn, Cmd.TRIM, 0, 4)
    assert error_of(conn) == Errno.EPERM


def test_write_past_end_is_enospc_and_payload_drained() -> None:
    conn = transmission(True)
    assert send(conn, Cmd.WRITE, 4 * MiB - 2, 4, payload=b"abcd") == []
    assert error_of(conn) == Errno.ENOSPC
    (req,) = send(conn, Cmd.WRITE, 0, 4, payload=b"wxyz", cookie=9)
    assert isinstance(req, Request) and bytes(req.data or b"") == b"wxyz"


def test_oversized_write_is_drained_then_refused() -> None:
    conn = transmission(True)
    conn.receive_data(wire.encode_request(0, Cmd.WRITE, 1, 0, 33 * MiB, False))
    for _ in range(33):
        conn.receive_data(bytes(MiB))
    assert error_of(conn) == Errno.EOVERFLOW
    (req,) = send(conn, Cmd.FLUSH, cookie=3)
    assert isinstance(req, Request) and req.command == Cmd.FLUSH


def test_bad_request_magic_kills_the_connection() -> None:
    conn = transmission(True)
    with pytest.raises(ClientProtocolError):
        conn.receive_data(b"\x12\x34\x56\x78" + bytes(24))
    assert conn.state is State.CLOSED
    with pytest.raises(ClientProtocolError):
        conn.receive_data(b"x")


def test_compact_magic_under_extended_headers_is_a_violation() -> None:
    conn = transmission(extended=True)
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.encode_request(0, Cmd.READ, 1, 0, 512, False) + bytes(4))


def test_simple_read_reply() -> None:
    conn = transmission(False)
    (req,) = send(conn, Cmd.READ, 100, 10, cookie=7)
    assert isinstance(req, Request)
    conn.reply_read(req, [b"abcd", 2, b"efgh"])
    assert parse_replies(joined(conn), {7: 10}) == [(0, 7, b"abcd\0\0efgh")]


@pytest.mark.parametrize("extended", [False, True])
def test_structured_read_with_holes(extended: bool) -> None:
    conn = transmission(True, extended)
    (req,) = send(conn, Cmd.READ, 100, 10, cookie=7)
    assert isinstance(req, Request)
    conn.reply_read(req, [b"abcd", 2, b"efgh"])
    chunks = parse_replies(joined(conn))
    assert [c.type for c in chunks] == [  # type: ignore[attr-defined]
        ReplyType.OFFSET_DATA,
        ReplyType.OFFSET_HOLE,
        ReplyType.OFFSET_DATA,
    ]
    assert [c.flags for c in chunks] == [0, 0, NBD_REPLY_FLAG_DONE]  # type: ignore[attr-defined]
    assert chunks[0].payload == wire.OFFSET.pack(100) + b"abcd"  # type: ignore[attr-defined]
    assert chunks[1].payload == wire.OFFSET_HOLE.pack(104, 2)  # type: ignore[attr-defined]
    assert chunks[2].payload == wire.OFFSET.pack(106) + b"efgh"  # type: ignore[attr-defined]
    if extended:
        assert {c.offset for c in chunks} == {100}  # type: ignore[attr-defined]


def test_df_read_is_one_data_chunk() -> None:
    conn = transmission(True)
    (req,) = send(conn, Cmd.READ, 0, 6, flags=CmdFlag.DF)
    assert isinstance(req, Request)
    conn.reply_read(req, [b"ab", 2, b"cd"])
    (chunk,) = parse_replies(joined(conn))
    assert isinstance(chunk, Chunk)
    assert chunk.type == ReplyType.OFFSET_DATA and chunk.flags == NBD_REPLY_FLAG_DONE
    assert chunk.payload == wire.OFFSET.pack(0) + b"ab\0\0cd"


def test_zero_length_read() -> None:
    conn = transmission(True)
    (req,) = send(conn, Cmd.READ, 0, 0)
    assert isinstance(req, Request)
    conn.reply_read(req, [])
    (chunk,) = parse_replies(joined(conn))
    assert isinstance(chunk, Chunk) and chunk.type == ReplyType.NONE


@pytest.mark.parametrize("extended", [False, True])
def test_ok_reply(extended: bool) -> None:
    conn = transmission(True, extended)
    (req,) = send(conn, Cmd.FLUSH, cookie=5)
    assert isinstance(req, Request)
    conn.reply_ok(req)
    (reply,) = parse_replies(joined(conn))
    if extended:  # simple replies are forbidden with extended headers
        assert isinstance(reply, Chunk) and reply.type == ReplyType.NONE and reply.cookie == 5
    else:
        assert reply == (0, 5, b"")


def block_status(conn: ServerConnection) -> dict[int, tuple[list[int], list[int]]]:
    out = {}
    chunks = parse_replies(joined(conn))
    for i, c in enumerate(chunks):
        assert isinstance(c, Chunk)
        assert (c.flags & NBD_REPLY_FLAG_DONE) == (i == len(chunks) - 1)
        cid, lengths, flags = wire.decode_block_status(
            c.payload, c.type == ReplyType.BLOCK_STATUS_EXT
        )
        out[cid] = (list(lengths), list(flags))
    return out


@pytest.mark.parametrize("extended", [False, True])
def test_block_status_clips_and_never_overshoots(extended: bool) -> None:
    conn = transmission(True, extended, contexts=CTX)
    (req,) = send(conn, Cmd.BLOCK_STATUS, 1000, 3000)
    assert isinstance(req, Request) and len(req.contexts) == 3
    answers = [(cid, [2000, 65536, 512], [1, 0, 1]) for cid, _ in req.contexts]
    conn.reply_block_status(req, answers)
    got = block_status(conn)
    assert set(got) == {cid for cid, _ in req.contexts}
    assert all(v == ([2000, 1000], [1, 0]) for v in got.values())


def test_block_status_req_one_and_extent_cap() -> None:
    conn = transmission(True, contexts=CTX[:1])
    (req,) = send(conn, Cmd.BLOCK_STATUS, 0, MiB, flags=CmdFlag.REQ_ONE)
    assert isinstance(req, Request)
    conn.reply_block_status(req, [(req.contexts[0][0], [512, 512], [0, 3])])
    assert list(block_status(conn).values()) == [([512], [0])]
    conn.max_extents = 3
    (req,) = send(conn, Cmd.BLOCK_STATUS, 0, MiB, cookie=2)
    assert isinstance(req, Request)
    conn.reply_block_status(req, [(req.contexts[0][0], array("Q", [512] * 10), [0, 1] * 5)])
    assert list(block_status(conn).values()) == [([512] * 3, [0, 1, 0])]


def test_block_status_filter_payload() -> None:
    conn = transmission(extended=True, contexts=CTX)
    ids = {name: cid for cid, name in conn.neg.meta_contexts.items()}
    want = ids["qemu:dirty-bitmap:b1"]
    payload = wire.encode_block_status_payload(8192, [want])
    (req,) = send(
        conn, Cmd.BLOCK_STATUS, 0, len(payload), flags=CmdFlag.PAYLOAD_LEN, payload=payload
    )
    assert isinstance(req, Request)
    assert req.contexts == ((want, "qemu:dirty-bitmap:b1"),) and req.length == 8192
    for bad in ([want, want], [999], []):
        payload = wire.encode_block_status_payload(8192, bad)
        assert (
            send(
                conn, Cmd.BLOCK_STATUS, 0, len(payload), flags=CmdFlag.PAYLOAD_LEN, payload=payload
            )
            == []
        )
        assert error_of(conn) == Errno.EINVAL
    # Payload on a command that takes none: drained, EINVAL, connection fine.
    assert send(conn, Cmd.FLUSH, 0, 3, flags=CmdFlag.PAYLOAD_LEN, payload=b"xyz") == []
    assert error_of(conn) == Errno.EINVAL
    assert isinstance(send(conn, Cmd.FLUSH)[0], Request)


def test_disc_ignores_the_rest() -> None:
    conn = transmission(True)
    (req,) = send(conn, Cmd.READ, 0, 512)
    events = send(conn, Cmd.DISC, cookie=2)
    assert events == [Disconnect("disc")]
    assert conn.state is State.DISCONNECTING
    conn.receive_data(b"garbage")
    assert conn.events_received() == []
    assert isinstance(req, Request)
    conn.reply_read(req, [bytes(512)])  # in-flight replies still go out
    assert conn.in_flight == 0 and joined(conn)


def test_many_requests_in_one_buffer() -> None:
    conn = transmission(True)
    data = b"".join(wire.encode_request(0, Cmd.READ, i, i * 512, 512, False) for i in range(100))
    conn.receive_data(data)
    events = conn.events_received()
    assert [e.cookie for e in events] == list(range(100))  # type: ignore[union-attr]
    assert conn.in_flight == 100


def test_zero_length_write_has_an_empty_payload() -> None:
    conn = transmission(True)
    (req,) = send(conn, Cmd.WRITE, 0, 0)
    assert isinstance(req, Request) and req.data is not None and len(req.data) == 0
    (req,) = send(conn, Cmd.WRITE, 8, 2, payload=b"ab", cookie=2)
    assert isinstance(req, Request) and bytes(req.data or b"") == b"ab"
