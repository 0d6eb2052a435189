"""The sans-I/O client driven with bytes: no sockets, no event loop."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nbdcore import wire
from nbdcore.client import (
    ClientConnection,
    ClientState,
    ConnectionClosed,
    ExportReady,
    ExportsListed,
    Greeting,
    InfoReceived,
    MetaContextsListed,
    OptionAcked,
    OptionFailed,
    Reply,
)
from nbdcore.constants import (
    CLISERV_MAGIC,
    IHAVEOPT,
    NBD_REPLY_FLAG_DONE,
    NBDMAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from nbdcore.exceptions import (
    OptionError,
    ProtocolError,
    RequestError,
    ServerProtocolError,
    UnsupportedServerError,
    UsageError,
)
from nbdcore.wire import BlockSize

GREETING = wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
FLAGS = (
    TransmissionFlag.HAS_FLAGS
    | TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_DF
    | TransmissionFlag.SEND_CACHE
)
SIZE = 1 << 20


def joined(conn: ClientConnection) -> bytes:
    return b"".join(bytes(c) for c in conn.data_to_send())


def rep(option: int, rtype: int, payload: bytes = b"") -> bytes:
    return wire.encode_option_reply(option, rtype, payload)


def go_replies(size: int = SIZE, flags: int = FLAGS, bs: BlockSize | None = None) -> bytes:
    out = rep(Opt.GO, Rep.INFO, wire.encode_info_export(size, flags))
    if bs is not None:
        out += rep(Opt.GO, Rep.INFO, wire.encode_info_block_size(bs))
    return out + rep(Opt.GO, Rep.ACK)


def negotiated(
    *,
    structured: bool = True,
    extended: bool = False,
    contexts: dict[str, int] | None = None,
    flags: int = FLAGS,
    bs: BlockSize | None = None,
) -> ClientConnection:
    """A connection in transmission, negotiated through the byte-level handshake."""
    conn = ClientConnection()
    conn.receive_data(GREETING)
    if extended:
        conn.send_extended_headers()
        conn.receive_data(rep(Opt.EXTENDED_HEADERS, Rep.ACK))
    elif structured:
        conn.send_structured_reply()
        conn.receive_data(rep(Opt.STRUCTURED_REPLY, Rep.ACK))
    if contexts:
        conn.send_set_meta_context("", list(contexts))
        conn.receive_data(
            b"".join(
                rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, wire.encode_rep_meta_context(i, n))
                for n, i in contexts.items()
            )
            + rep(Opt.SET_META_CONTEXT, Rep.ACK)
        )
    conn.send_go("")
    conn.receive_data(go_replies(flags=flags, bs=bs))
    conn.events_received()
    conn.data_to_send()
    assert conn.state is ClientState.TRANSMISSION
    return conn


def chunk(
    cookie: int, rtype: int, payload: bytes, *, done: bool = False, ext: bool = False
) -> bytes:
    flags = NBD_REPLY_FLAG_DONE if done else 0
    return wire.encode_chunk_header(flags, rtype, cookie, len(payload), ext) + payload


def data_chunk(cookie: int, offset: int, data: bytes, **kw: bool) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_DATA, wire.OFFSET.pack(offset) + data, **kw)


def hole_chunk(cookie: int, offset: int, size: int, **kw: bool) -> bytes:
    return chunk(cookie, ReplyType.OFFSET_HOLE, wire.OFFSET_HOLE.pack(offset, size), **kw)


def none_chunk(cookie: int, ext: bool = False) -> bytes:
    return chunk(cookie, ReplyType.NONE, b"", done=True, ext=ext)


def bs_chunk(cookie: int, cid: int, extents: list[tuple[int, int]], **kw: bool) -> bytes:
    ext = kw.get("ext", False)
    rtype = ReplyType.BLOCK_STATUS_EXT if ext else ReplyType.BLOCK_STATUS
    return chunk(cookie, rtype, wire.encode_block_status(cid, extents, ext), **kw)


def only_reply(conn: ClientConnection) -> Reply:
    events = conn.events_received()
    assert len(events) == 1, events
    ev = events[0]
    assert isinstance(ev, Reply)
    return ev


# --- handshake ---------------------------------------------------------------------------------


def test_greeting_sends_client_flags_and_accepts_options() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING[:5])
    assert conn.events_received() == []
    conn.receive_data(GREETING[5:])
    assert conn.events_received() == [
        Greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
    ]
    assert joined(conn) == struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
    assert conn.state is ClientState.NEGOTIATING


def test_greeting_without_no_zeroes_asks_only_fixed_newstyle() -> None:
    conn = ClientConnection()
    conn.receive_data(wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE))
    assert joined(conn) == struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE)


def test_oldstyle_server_is_rejected_clearly() -> None:
    conn = ClientConnection()
    with pytest.raises(UnsupportedServerError, match="oldstyle"):
        conn.receive_data(struct.pack(">QQ", NBDMAGIC, CLISERV_MAGIC) + bytes(136))


def test_non_fixed_newstyle_is_rejected_clearly() -> None:
    conn = ClientConnection()
    with pytest.raises(UnsupportedServerError, match="fixed newstyle"):
        conn.receive_data(wire.encode_greeting(0))


def test_bad_magic_is_a_server_protocol_error_and_sticks() -> None:
    conn = ClientConnection()
    with pytest.raises(ServerProtocolError, match="magic"):
        conn.receive_data(b"HTTP/1.1 200 OK\r\n\r\n")
    assert conn.state is ClientState.FAILED
    with pytest.raises(ServerProtocolError):
        conn.receive_data(b"more")


def test_go_with_infos_enters_transmission() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.events_received()
    joined(conn)
    conn.send_go("disk")
    sent = joined(conn)
    _, opt, _length = wire.OPTION_HEADER.unpack_from(sent)
    assert opt == Opt.GO
    name, infos = wire.decode_info_request(sent[16:])
    assert name == "disk" and set(infos) == {Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE}
    bs = BlockSize(512, 4096, 1 << 20)
    conn.receive_data(
        rep(Opt.GO, Rep.INFO, wire.encode_info_string(Info.NAME, "canonical"))
        + rep(Opt.GO, Rep.INFO, wire.encode_info_string(Info.DESCRIPTION, "a disk"))
        + rep(Opt.GO, Rep.INFO, b"\x00\x63unknown info is ignored")
        + go_replies(4096 * 10, FLAGS, bs)
    )
    ev = conn.events_received()
    assert ev == [ExportReady(Opt.GO, "canonical", "a disk", 40960, TransmissionFlag(FLAGS), bs)]
    assert conn.state is ClientState.TRANSMISSION
    assert conn.size == 40960 and conn.block_size == bs and conn.max_payload == 1 << 20


def test_go_error_is_an_event_and_negotiation_continues() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.events_received()
    conn.send_go("nope")
    conn.receive_data(rep(Opt.GO, Rep.ERR_UNKNOWN, b"no such export"))
    (ev,) = conn.events_received()
    assert isinstance(ev, OptionFailed)
    err = ev.error()
    assert isinstance(err, OptionError) and err.code == Rep.ERR_UNKNOWN
    assert "no such export" in str(err)
    assert conn.state is ClientState.NEGOTIATING


def test_go_ack_without_export_info_is_a_protocol_error() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_go("")
    with pytest.raises(ServerProtocolError, match="NBD_INFO_EXPORT"):
        conn.receive_data(rep(Opt.GO, Rep.ACK))


def test_export_name_fallback_with_and_without_zeroes() -> None:
    for hflags, pad in (
        (HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 0),
        (HandshakeFlag.FIXED_NEWSTYLE, 124),
    ):
        conn = ClientConnection()
        conn.receive_data(wire.encode_greeting(hflags))
        conn.events_received()
        conn.send_export_name("x")
        reply = wire.EXPORT_NAME_REPLY.pack(12345 * 512, FLAGS) + bytes(pad)
        conn.receive_data(reply[:-1])
        assert conn.events_received() == []
        conn.receive_data(reply[-1:])
        (ev,) = conn.events_received()
        assert isinstance(ev, ExportReady) and ev.size == 12345 * 512
        assert conn.state is ClientState.TRANSMISSION


def test_list_collects_servers() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.events_received()
    conn.send_list()
    conn.receive_data(
        rep(Opt.LIST, Rep.SERVER, wire.encode_rep_server("a", "first"))
        + rep(Opt.LIST, Rep.SERVER, wire.encode_rep_server("b"))
        + rep(Opt.LIST, Rep.ACK)
    )
    assert conn.events_received() == [ExportsListed((("a", "first"), ("b", "")))]


def test_info_does_not_leave_negotiation() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.events_received()
    conn.send_go("d", info=True)
    conn.receive_data(
        rep(Opt.INFO, Rep.INFO, wire.encode_info_export(512, FLAGS)) + rep(Opt.INFO, Rep.ACK)
    )
    (ev,) = conn.events_received()
    assert isinstance(ev, InfoReceived) and ev.size == 512
    assert conn.state is ClientState.NEGOTIATING


def test_set_meta_context_records_ids_and_rejects_duplicates() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_structured_reply()
    conn.receive_data(rep(Opt.STRUCTURED_REPLY, Rep.ACK))
    conn.send_set_meta_context("", ["base:allocation", "qemu:dirty-bitmap:b"])
    conn.receive_data(
        rep(
            Opt.SET_META_CONTEXT,
            Rep.META_CONTEXT,
            wire.encode_rep_meta_context(0, "base:allocation"),
        )
        + rep(
            Opt.SET_META_CONTEXT,
            Rep.META_CONTEXT,
            wire.encode_rep_meta_context(7, "qemu:dirty-bitmap:b"),
        )
        + rep(Opt.SET_META_CONTEXT, Rep.ACK)
    )
    events = conn.events_received()
    assert events[-1] == MetaContextsListed(
        Opt.SET_META_CONTEXT, (("base:allocation", 0), ("qemu:dirty-bitmap:b", 7))
    )
    assert conn.meta_contexts == {"base:allocation": 0, "qemu:dirty-bitmap:b": 7}
    conn.send_set_meta_context("", ["a:b", "a:c"])
    with pytest.raises(ServerProtocolError, match="context id 3"):
        conn.receive_data(
            rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, wire.encode_rep_meta_context(3, "a:b"))
            + rep(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, wire.encode_rep_meta_context(3, "a:c"))
        )


def test_contexts_of_another_export_are_dropped_at_go() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_structured_reply()
    conn.receive_data(rep(Opt.STRUCTURED_REPLY, Rep.ACK))
    conn.send_set_meta_context("other", ["base:allocation"])
    conn.receive_data(
        rep(
            Opt.SET_META_CONTEXT,
            Rep.META_CONTEXT,
            wire.encode_rep_meta_context(1, "base:allocation"),
        )
        + rep(Opt.SET_META_CONTEXT, Rep.ACK)
    )
    conn.send_go("")
    conn.receive_data(go_replies())
    assert conn.meta_contexts == {}
    with pytest.raises(UsageError, match="no metadata context"):
        conn.send_block_status(0, 512)


def test_reply_for_another_option_is_rejected() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_list()
    with pytest.raises(ServerProtocolError, match="option 7 while option 3"):
        conn.receive_data(rep(Opt.GO, Rep.ACK))


def test_wrong_reply_type_for_option_is_rejected() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_list()
    with pytest.raises(ServerProtocolError, match="not a valid answer"):
        conn.receive_data(rep(Opt.LIST, Rep.META_CONTEXT, b"\0\0\0\0a:b"))


def test_huge_option_reply_is_rejected_before_buffering() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_list()
    with pytest.raises(ServerProtocolError, match="implausibly long"):
        conn.receive_data(
            wire.OPTION_REPLY_HEADER.pack(0x3E889045565A9, Opt.LIST, Rep.SERVER, 1 << 31)
        )


def test_unsolicited_bytes_in_negotiation_are_rejected() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    with pytest.raises(ServerProtocolError, match="unsolicited"):
        conn.receive_data(b"\0")


def test_option_while_another_is_pending_is_a_usage_error() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_list()
    with pytest.raises(UsageError):
        conn.send_list()


def test_starttls_waits_for_upgrade_and_wipes_state() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_structured_reply()
    conn.receive_data(rep(Opt.STRUCTURED_REPLY, Rep.ACK))
    conn.send_starttls()
    conn.receive_data(rep(Opt.STARTTLS, Rep.ACK))
    assert conn.events_received()[-1] == OptionAcked(Opt.STARTTLS)
    assert conn.state is ClientState.TLS_UPGRADE
    conn.tls_established()
    assert conn.state is ClientState.NEGOTIATING and not conn.structured_replies


def test_abort_tolerates_eof_instead_of_ack() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.events_received()
    conn.send_abort()
    conn.receive_eof()
    assert conn.events_received() == [OptionAcked(Opt.ABORT), ConnectionClosed(expected=True)]
    assert conn.state is ClientState.CLOSED


def test_eof_with_pending_option_is_unexpected() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.events_received()
    conn.send_list()
    conn.receive_eof()
    assert conn.events_received() == [ConnectionClosed(expected=False)]


# --- transmission ------------------------------------------------------------------------------


def test_read_structured_chunks_in_any_order() -> None:
    conn = negotiated()
    cookie = conn.send_read(4096, 8192)
    _magic, _flags, cmd, c, off, length = wire.REQUEST.unpack(joined(conn))
    assert (cmd, c, off, length) == (Cmd.READ, cookie, 4096, 8192)
    wire_bytes = (
        data_chunk(cookie, 4096 + 6144, b"c" * 2048)
        + hole_chunk(cookie, 4096 + 2048, 4096)
        + data_chunk(cookie, 4096, b"a" * 2048)
        + none_chunk(cookie)
    )
    # Byte by byte: the parser must resume anywhere.
    for i in range(len(wire_bytes)):
        conn.receive_data(wire_bytes[i : i + 1])
    reply = only_reply(conn)
    assert reply.error is None and reply.data is not None
    assert bytes(reply.data) == b"a" * 2048 + bytes(4096) + b"c" * 2048


def test_read_done_on_last_data_chunk_and_zero_copy_buffer() -> None:
    buf = bytearray(b"\xff" * 1000)
    payload = bytes(range(250)) * 4
    conn2 = negotiated()
    cookie = conn2.send_read(0, 1000, buffer=memoryview(buf))
    whole = data_chunk(cookie, 0, payload, done=True)
    conn2.receive_data(whole[:40])
    target = conn2.get_buffer()
    assert target is not None and len(target) == 1000 - 12
    target[:500] = payload[12:512]  # what recv_into would do
    conn2.buffer_filled(500)
    conn2.receive_data(whole[40 + 500 :])
    reply = only_reply(conn2)
    assert reply.data is not None and reply.data.obj is buf
    assert bytes(buf) == payload


def test_read_error_offset_then_done() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 1024)
    conn.receive_data(
        data_chunk(cookie, 0, b"x" * 512)
        + chunk(cookie, ReplyType.ERROR_OFFSET, wire.encode_error_payload(5, "bad sector", 512))
        + none_chunk(cookie)
    )
    reply = only_reply(conn)
    assert isinstance(reply.error, RequestError)
    assert reply.error.errno == 5 and reply.error.offset == 512
    assert "bad sector" in str(reply.error)


def test_unknown_error_chunk_type_fails_only_the_request() -> None:
    conn = negotiated()
    cookie = conn.send_flush()
    conn.receive_data(chunk(cookie, 0x8077, wire.encode_error_payload(22, "odd"), done=True))
    assert only_reply(conn).error is not None
    assert conn.state is ClientState.TRANSMISSION


def test_simple_replies_without_structured() -> None:
    conn = negotiated(structured=False)
    c1 = conn.send_read(0, 4)
    c2 = conn.send_write(512, b"hello")
    c3 = conn.send_flush()
    joined(conn)
    conn.receive_data(
        wire.encode_simple_reply(0, c3)
        + wire.encode_simple_reply(28, c2)
        + wire.encode_simple_reply(0, c1)
        + b"data"
    )
    events = conn.events_received()
    assert [e.cookie for e in events if isinstance(e, Reply)] == [c3, c2, c1]
    assert isinstance(events[1], Reply) and events[1].error is not None
    assert events[1].error.errno == 28
    assert isinstance(events[2], Reply) and events[2].data is not None
    assert bytes(events[2].data) == b"data"


def test_write_sends_header_and_payload() -> None:
    conn = negotiated()
    cookie = conn.send_write(4096, b"abc" * 100, fua=True)
    sent = joined(conn)
    _magic, flags, cmd, c, off, length = wire.REQUEST.unpack_from(sent)
    assert (flags, cmd, c, off, length) == (CmdFlag.FUA, Cmd.WRITE, cookie, 4096, 300)
    assert sent[28:] == b"abc" * 100


def test_extended_requests_are_32_bytes_and_disc_has_no_reply() -> None:
    conn = negotiated(extended=True)
    cookie = conn.send_trim(0, 8192)
    sent = joined(conn)
    assert len(sent) == 32
    assert wire.EXTENDED_REQUEST.unpack(sent)[1:] == (0, Cmd.TRIM, cookie, 0, 8192)
    conn.receive_data(none_chunk(cookie, ext=True))
    assert only_reply(conn).error is None
    conn.send_disc()
    assert wire.EXTENDED_REQUEST.unpack(joined(conn))[2] == Cmd.DISC
    conn.receive_eof()
    assert conn.events_received() == [ConnectionClosed(expected=True)]


def test_usage_errors_before_anything_is_sent() -> None:
    conn = negotiated(
        flags=TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY,
        bs=BlockSize(512, 4096, 65536),
    )
    with pytest.raises(UsageError, match="read-only"):
        conn.send_write(0, b"x" * 512)
    with pytest.raises(UsageError, match="FLUSH"):
        conn.send_flush()
    with pytest.raises(UsageError, match="outside the export"):
        conn.send_read(SIZE, 512)
    with pytest.raises(UsageError, match="minimum block size"):
        conn.send_read(100, 512)
    with pytest.raises(UsageError, match="exceeds"):
        conn.send_read(0, 131072)
    assert joined(conn) == b"" and conn.in_flight == 0


def test_block_status_two_contexts_compact() -> None:
    conn = negotiated(contexts={"base:allocation": 0, "qemu:dirty-bitmap:b": 5})
    cookie = conn.send_block_status(0, 65536)
    conn.receive_data(
        bs_chunk(cookie, 5, [(65536, 1)])
        + bs_chunk(cookie, 0, [(4096, 0), (1 << 20, 3)], done=True)
    )
    reply = only_reply(conn)
    assert reply.extents is not None
    assert list(reply.extents[0].lengths) == [4096, 1 << 20]
    assert list(reply.extents[0].flags) == [0, 3]
    assert reply.extents[0].lengths.typecode == "Q"
    assert list(reply.extents[5].lengths) == [65536]


def test_block_status_extended_with_filter_payload() -> None:
    conn = negotiated(
        extended=True,
        contexts={"base:allocation": 0, "qemu:dirty-bitmap:b": 5},
        flags=FLAGS | TransmissionFlag.BLOCK_STATUS_PAYLOAD,
    )
    conn.send_block_status(0, SIZE, context_ids=[5])
    sent = joined(conn)
    _magic, flags, _cmd, _c, _off, length = wire.EXTENDED_REQUEST.unpack_from(sent)
    assert flags & CmdFlag.PAYLOAD_LEN and length == 12
    assert wire.decode_block_status_payload(sent[32:]) == (SIZE, [5])


def test_block_status_validation() -> None:
    cases = [
        ([(0, 1)], "zero-length"),
        ([(65536, 0), (4096, 0)], "before the last"),
    ]
    for extents, match in cases:
        conn = negotiated(contexts={"base:allocation": 0})
        cookie = conn.send_block_status(0, 65536)
        with pytest.raises(ServerProtocolError, match=match):
            conn.receive_data(bs_chunk(cookie, 0, extents, done=True))
    conn = negotiated(contexts={"base:allocation": 0})
    cookie = conn.send_block_status(0, 65536)
    with pytest.raises(ServerProtocolError, match="not asked"):
        conn.receive_data(bs_chunk(cookie, 9, [(512, 0)], done=True))
    conn = negotiated(contexts={"base:allocation": 0, "x:y": 1})
    cookie = conn.send_block_status(0, 65536)
    with pytest.raises(ServerProtocolError, match="lacks contexts"):
        conn.receive_data(bs_chunk(cookie, 0, [(512, 0)], done=True))
    conn = negotiated(contexts={"base:allocation": 0})
    cookie = conn.send_block_status(0, 65536, req_one=True)
    with pytest.raises(ServerProtocolError, match="REQ_ONE"):
        conn.receive_data(bs_chunk(cookie, 0, [(512, 0), (512, 1)], done=True))
    conn = negotiated(contexts={"base:allocation": 0})
    cookie = conn.send_block_status(0, 65536)
    with pytest.raises(ServerProtocolError, match="extended headers are off"):
        conn.receive_data(
            bs_chunk(cookie, 0, [(512, 0)], done=True, ext=False)[:0]
            + chunk(
                cookie,
                ReplyType.BLOCK_STATUS_EXT,
                wire.encode_block_status(0, [(512, 0)], True),
                done=True,
            )
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda c: data_chunk(c + 100, 0, b"x"), "unknown cookie"),
        (lambda c: data_chunk(c, 4000, b"x" * 200), "outside the read"),
        (lambda c: data_chunk(c, 0, b"x" * 100) + data_chunk(c, 50, b"y" * 10), "overlaps"),
        (lambda c: hole_chunk(c, 0, 0), "size 0"),
        (lambda c: chunk(c, ReplyType.OFFSET_HOLE, b"\0" * 11), "hole chunk of 11"),
        (lambda c: chunk(c, ReplyType.OFFSET_DATA, b"\0" * 8), "data chunk"),
        (lambda c: chunk(c, ReplyType.NONE, b"", done=False), "without NBD_REPLY_FLAG_DONE"),
        (lambda c: chunk(c, 77, b""), "unknown reply chunk type"),
        (lambda c: data_chunk(c, 0, b"x" * 10, done=True), "covers 10 of 4096"),
        (lambda c: wire.encode_simple_reply(0, c), "simple reply to READ"),
        (lambda c: chunk(c, ReplyType.BLOCK_STATUS, b"\0" * 12), "block status chunk in"),
        (lambda c: wire.STRUCTURED_REPLY.pack(0x668E33EF, 0, 1, c, 1 << 31), "data chunk of"),
        (lambda c: b"\xde\xad\xbe\xef" + bytes(16), "bad reply magic"),
        (lambda c: chunk(c, ReplyType.ERROR, b"\0\0\0\0\0\0", done=True), "error value 0"),
        (lambda c: chunk(c, ReplyType.ERROR, b"\0\0\0\5\0\x09abc", done=True), "exceeds"),
    ],
)
def test_hostile_read_replies(make, match) -> None:  # type: ignore[no-untyped-def]
    conn = negotiated()
    cookie = conn.send_read(0, 4096)
    other = conn.send_flush()
    with pytest.raises(ServerProtocolError, match=match):
        conn.receive_data(make(cookie))
    assert conn.state is ClientState.FAILED
    with pytest.raises(ServerProtocolError):
        conn.send_flush()
    assert other  # still in flight: the I/O layer fails it with the error


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_after_go_never_raise_anything_else(data: bytes) -> None:
    conn = negotiated(contexts={"base:allocation": 0})
    conn.send_read(0, 4096)
    conn.send_block_status(0, 4096)
    with contextlib.suppress(ProtocolError):
        conn.receive_data(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_in_negotiation_never_raise_anything_else(data: bytes) -> None:
    conn = ClientConnection()
    try:
        conn.receive_data(GREETING)
        conn.send_go("")
        conn.receive_data(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=8), st.randoms())
def test_chunk_reassembly_any_order_any_split(sizes: list[int], rnd) -> None:  # type: ignore[no-untyped-def]
    conn = negotiated()
    total = sum(sizes)
    cookie = conn.send_read(0, total)
    pieces = []
    pos = 0
    expected = bytearray(total)
    for i, n in enumerate(sizes):
        if i % 2:
            pieces.append(hole_chunk(cookie, pos, n))
        else:
            body = bytes([i + 1]) * n
            expected[pos : pos + n] = body
            pieces.append(data_chunk(cookie, pos, body))
        pos += n
    rnd.shuffle(pieces)
    stream = b"".join(pieces) + none_chunk(cookie)
    cut = sorted(rnd.sample(range(1, len(stream)), min(5, len(stream) - 1)))
    for a, b in zip([0, *cut], [*cut, len(stream)], strict=True):
        conn.receive_data(stream[a:b])
    reply = only_reply(conn)
    assert reply.data is not None and bytes(reply.data) == bytes(expected)


def test_ihaveopt_constant_matches_options_sent() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    joined(conn)
    conn.send_structured_reply()
    assert joined(conn) == struct.pack(">QII", IHAVEOPT, Opt.STRUCTURED_REPLY, 0)


def test_option_replies_are_capped_in_total() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_list()
    one = rep(Opt.LIST, Rep.SERVER, wire.encode_rep_server("x" * 4000, "d" * 4000))
    with pytest.raises(ServerProtocolError, match="bytes of replies to one option"):
        for _ in range(3000):
            conn.receive_data(one)


def test_df_read_gets_one_content_chunk() -> None:
    conn = negotiated()
    cookie = conn.send_read(0, 1024, df=True)
    assert wire.REQUEST.unpack(joined(conn))[1] == CmdFlag.DF
    with pytest.raises(ServerProtocolError, match="DF"):
        conn.receive_data(data_chunk(cookie, 0, b"a" * 512) + data_chunk(cookie, 512, b"b" * 512))


def _in_state(state: ClientState) -> ClientConnection:
    conn = ClientConnection()
    if state is ClientState.GREETING:
        return conn
    conn.receive_data(GREETING)
    if state is ClientState.OPTION_SENT:
        conn.send_list()
    elif state is ClientState.TLS_UPGRADE:
        conn.send_starttls()
        conn.receive_data(rep(Opt.STARTTLS, Rep.ACK))
    elif state in (ClientState.TRANSMISSION, ClientState.DISCONNECTING, ClientState.CLOSED):
        conn = negotiated(contexts={"base:allocation": 0})
        if state is not ClientState.TRANSMISSION:
            conn.send_disc()
        if state is ClientState.CLOSED:
            conn.receive_eof()
    assert conn.state is state
    conn.data_to_send()
    return conn


CALLS = {
    "go": lambda c: c.send_go(""),
    "list": lambda c: c.send_list(),
    "starttls": lambda c: c.send_starttls(),
    "set_meta": lambda c: c.send_set_meta_context("", ["base:allocation"]),
    "abort": lambda c: c.send_abort(),
    "read": lambda c: c.send_read(0, 512),
    "write": lambda c: c.send_write(0, b"x"),
    "flush": lambda c: c.send_flush(),
    "trim": lambda c: c.send_trim(0, 512),
    "zero": lambda c: c.send_write_zeroes(0, 512),
    "cache": lambda c: c.send_cache(0, 512),
    "block_status": lambda c: c.send_block_status(0, 512),
    "disc": lambda c: c.send_disc(),
    "tls_established": lambda c: c.tls_established(),
}
ALLOWED = {
    ClientState.NEGOTIATING: {"go", "list", "starttls", "set_meta", "abort"},
    ClientState.TLS_UPGRADE: {"tls_established"},
    ClientState.TRANSMISSION: {
        "read",
        "write",
        "flush",
        "trim",
        "zero",
        "cache",
        "block_status",
        "disc",
    },
}


@pytest.mark.parametrize("state", [s for s in ClientState if s is not ClientState.FAILED])
@pytest.mark.parametrize("call", sorted(CALLS))
def test_every_call_in_every_state(state: ClientState, call: str) -> None:
    """Each API call either works in a state (and sends something) or is a UsageError that
    sends nothing and changes nothing."""
    conn = _in_state(state)
    if call in ALLOWED.get(state, set()):
        CALLS[call](conn)
        assert joined(conn) or call == "tls_established"
    else:
        with pytest.raises(UsageError):
            CALLS[call](conn)
        assert conn.state is state and joined(conn) == b""


def test_extended_block_status_must_start_at_the_request_offset() -> None:
    conn = negotiated(extended=True, contexts={"base:allocation": 0})
    cookie = conn.send_block_status(4096, 8192)
    payload = wire.encode_block_status(0, [(8192, 0)], True)
    header = wire.encode_chunk_header(
        NBD_REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS_EXT, cookie, len(payload), True, 0
    )
    with pytest.raises(ServerProtocolError, match="not at the request offset 4096"):
        conn.receive_data(header + payload)
    conn = negotiated(extended=True, contexts={"base:allocation": 0})
    cookie = conn.send_block_status(4096, 8192)
    header = wire.encode_chunk_header(
        NBD_REPLY_FLAG_DONE, ReplyType.BLOCK_STATUS_EXT, cookie, len(payload), True, 4096
    )
    conn.receive_data(header + payload)
    assert only_reply(conn).extents is not None


def test_clear_text_after_starttls_ack_is_rejected() -> None:
    conn = ClientConnection()
    conn.receive_data(GREETING)
    conn.send_starttls()
    with pytest.raises(ServerProtocolError, match="after the STARTTLS"):
        conn.receive_data(rep(Opt.STARTTLS, Rep.ACK) + b"\x16\x03\x01")
