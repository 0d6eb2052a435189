"""The clear extension in both sans-I/O roles, driven with bytes: negotiation rules, request
validation by the server, and the client's checks of hostile replies (nothing outside the
request may ever be reported as cleared)."""

from __future__ import annotations

import pytest

from nbdcore import clear_ext, wire
from nbdcore.client import ClientConnection, Reply
from nbdcore.constants import NBD_REPLY_FLAG_DONE, Cmd, CmdFlag, Errno, Opt, Rep, ReplyType
from nbdcore.exceptions import ServerProtocolError, UsageError
from nbdcore.server import Request, ServerConnection
from tests.unit.test_server_support import Chunk, go, joined, opt, parse_replies, start

B0, B1, ALLOC = "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1", "base:allocation"


def server(*, clear: bool = True, extended: bool = False, ask: bool = True) -> ServerConnection:
    conn = start(clear_extension=clear)
    first = Opt.EXTENDED_HEADERS if extended else Opt.STRUCTURED_REPLY
    assert opt(conn, first)[-1][1] == Rep.ACK
    if ask:
        rtype = opt(conn, Opt.X_NBDGW_CLEAR)[-1][1]
        assert rtype == (Rep.ACK if clear else Rep.ERR_UNSUP)
    payload = wire.encode_meta_context_request("disk", [ALLOC, B0, B1])
    assert opt(conn, Opt.SET_META_CONTEXT, payload)[-1][1] == Rep.ACK
    go(conn, "disk")
    (negotiated,) = conn.events_received()
    assert negotiated.clear_extension == (clear and ask)  # type: ignore[union-attr]
    return conn


def clear_request(
    conn: ServerConnection,
    offset: int,
    length: int,
    cid: int,
    *,
    flags: int = 0,
    raw: bytes | None = None,
) -> list[object]:
    payload = clear_ext.encode_clear_payload(length, cid) if raw is None else raw
    ext = conn.extended_headers
    if ext:
        flags |= CmdFlag.PAYLOAD_LEN
    head = wire.encode_request(flags, Cmd.X_NBDGW_CLEAR, 7, offset, len(payload), ext)
    conn.receive_data(head + payload)
    return conn.events_received()


def errno_of(conn: ServerConnection) -> int:
    (reply,) = parse_replies(joined(conn))
    assert isinstance(reply, Chunk) and reply.type == ReplyType.ERROR
    return wire.decode_error_payload(reply.payload, False)[0]


def test_option_rules() -> None:
    # Not offered: any unknown option, ERR_UNSUP.
    conn = start()
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    assert opt(conn, Opt.X_NBDGW_CLEAR)[-1][1] == Rep.ERR_UNSUP
    conn = start(clear_extension=True)
    # Before structured replies: the reply could not be carried.
    assert opt(conn, Opt.X_NBDGW_CLEAR)[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    assert opt(conn, Opt.X_NBDGW_CLEAR, b"x")[-1][1] == Rep.ERR_INVALID  # no data allowed
    assert opt(conn, Opt.X_NBDGW_CLEAR)[-1][1] == Rep.ACK
    assert opt(conn, Opt.X_NBDGW_CLEAR)[-1][1] == Rep.ACK  # again: harmless


@pytest.mark.parametrize("extended", [False, True])
def test_valid_request_and_reply(extended: bool) -> None:
    conn = server(extended=extended)
    (req,) = clear_request(conn, 1000, 200000, 1)
    assert isinstance(req, Request) and req.command == Cmd.X_NBDGW_CLEAR
    assert (req.offset, req.length, req.contexts) == (1000, 200000, ((1, B0),))
    assert not req.flags & CmdFlag.PAYLOAD_LEN
    conn.reply_cleared(req, 65536, [(65536, 131072)])
    (chunk,) = parse_replies(joined(conn))
    assert isinstance(chunk, Chunk)
    assert chunk.type == ReplyType.X_NBDGW_CLEARED and chunk.flags & NBD_REPLY_FLAG_DONE
    assert clear_ext.decode_cleared(chunk.payload) == clear_ext.Cleared(
        1, 65536, ((65536, 131072),)
    )


@pytest.mark.parametrize(
    ("offset", "length", "cid", "raw", "flags"),
    [
        (0, 4096, 0, None, 0),  # base:allocation is not a bitmap
        (0, 4096, 9, None, 0),  # not negotiated
        (4 * 1024 * 1024 - 10, 4096, 1, None, 0),  # past the end
        (0, 4096, 1, b"\x00" * 12, 0),  # length 0
        (0, 4096, 1, b"\x00" * 11, 0),  # short payload
        (0, 4096, 1, None, CmdFlag.DF),  # a flag that means nothing here
    ],
)
def test_bad_requests_get_einval_and_the_connection_goes_on(
    offset: int, length: int, cid: int, raw: bytes | None, flags: int
) -> None:
    conn = server()
    assert clear_request(conn, offset, length, cid, raw=raw, flags=flags) == []
    assert errno_of(conn) == Errno.EINVAL
    (req,) = clear_request(conn, 0, 65536, 2)  # still in step: the next request parses
    assert req.contexts == ((2, B1),)  # type: ignore[union-attr]


@pytest.mark.parametrize("offered", [False, True])
def test_command_without_the_option_is_an_unknown_command(offered: bool) -> None:
    conn = server(clear=offered, ask=False, extended=True)
    assert clear_request(conn, 0, 4096, 1) == []
    assert errno_of(conn) == Errno.EINVAL


def test_extended_mode_requires_payload_len() -> None:
    conn = server(extended=True)
    payload = clear_ext.encode_clear_payload(4096, 1)
    head = wire.encode_request(0, Cmd.X_NBDGW_CLEAR, 7, 0, len(payload), True)
    conn.receive_data(head)  # without PAYLOAD_LEN nothing follows the header
    assert conn.events_received() == []
    assert errno_of(conn) == Errno.EINVAL


# --- the client against hostile replies ----------------------------------------------------


def pair(extended: bool = False) -> tuple[ClientConnection, ServerConnection]:
    srv = start(clear_extension=True)
    cli = ClientConnection()

    def pump() -> None:
        for _ in range(20):
            out = cli.data_to_send()
            if out:
                srv.receive_data(b"".join(bytes(b) for b in out))
            back = srv.data_to_send()
            if back:
                cli.receive_data(b"".join(bytes(b) for b in back))
            if not out and not back:
                return

    # start() consumed the server's greeting and sent it client flags; give the client a
    # greeting of its own and drop its flags (the server has them already).
    cli.receive_data(wire.encode_greeting(3))
    assert cli.data_to_send()
    for send in (
        cli.send_extended_headers if extended else cli.send_structured_reply,
        cli.send_x_nbdgw_clear,
        lambda: cli.send_set_meta_context("disk", [ALLOC, B0]),
        lambda: cli.send_go("disk"),
    ):
        send()
        pump()
    assert cli.clear_extension and cli.meta_contexts[B0] == 1
    cli.events_received()
    srv.events_received()
    return cli, srv


@pytest.mark.parametrize("extended", [False, True])
def test_client_round_trip(extended: bool) -> None:
    cli, srv = pair(extended)
    cookie = cli.send_clear(1000, 200000, 1)
    srv.receive_data(b"".join(bytes(b) for b in cli.data_to_send()))
    (req,) = srv.events_received()
    srv.reply_cleared(req, 65536, [(65536, 131072)])  # type: ignore[arg-type]
    cli.receive_data(b"".join(bytes(b) for b in srv.data_to_send()))
    (reply,) = cli.events_received()
    assert isinstance(reply, Reply) and reply.cookie == cookie
    assert reply.cleared == clear_ext.Cleared(1, 65536, ((65536, 131072),))


@pytest.mark.parametrize(
    "runs",
    [[(0, 65536)], [(65536, 262144)], [(65536 + 512, 65536)], [(131072, 65536), (65536, 65536)]],
)
def test_client_refuses_a_reply_claiming_more_than_asked(runs: list[tuple[int, int]]) -> None:
    cli, _ = pair()
    cookie = cli.send_clear(1000, 200000, 1)
    cli.data_to_send()
    body = clear_ext.encode_cleared(1, 65536, runs)
    head = wire.encode_chunk_header(
        NBD_REPLY_FLAG_DONE, ReplyType.X_NBDGW_CLEARED, cookie, len(body), False
    )
    with pytest.raises(ServerProtocolError):
        cli.receive_data(head + body)


def test_client_refuses_success_without_a_cleared_chunk() -> None:
    cli, _ = pair()
    cookie = cli.send_clear(0, 65536, 1)
    cli.data_to_send()
    with pytest.raises(ServerProtocolError):
        cli.receive_data(wire.encode_simple_reply(0, cookie))


def test_client_local_checks() -> None:
    cli, _ = pair()
    with pytest.raises(UsageError):
        cli.send_clear(0, 0, 1)  # empty
    with pytest.raises(UsageError):
        cli.send_clear(0, 65536, 5)  # not negotiated
    fresh = ClientConnection()
    with pytest.raises(UsageError):
        fresh.send_x_nbdgw_clear()  # before structured replies
