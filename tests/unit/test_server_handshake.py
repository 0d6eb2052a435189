"""Sans-I/O server: the handshake phase, driven with bytes."""

from __future__ import annotations

import pytest

from nbdcore import wire
from nbdcore.constants import (
    ClientFlag,
    Info,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdcore.exceptions import ClientProtocolError
from nbdcore.server import Disconnect, Negotiated, StartTLS, State
from tests.unit.test_server_support import MiB, go, joined, new_conn, opt, start


def test_unknown_client_flags_drop_the_connection() -> None:
    conn = new_conn()
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.CLIENT_FLAGS.pack(1 | 4))
    assert conn.state is State.CLOSED


def test_list_exports() -> None:
    conn = start()
    replies = opt(conn, Opt.LIST)
    servers = [wire.decode_rep_server(p) for _, t, p in replies if t == Rep.SERVER]
    assert servers == [("disk", "the disk"), ("ro", "")]
    assert replies[-1][1] == Rep.ACK


def test_list_with_data_is_invalid() -> None:
    conn = start()
    assert opt(conn, Opt.LIST, b"x")[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.LIST)[-1][1] == Rep.ACK  # still usable


def test_unknown_option_is_unsupported_and_payload_drained() -> None:
    conn = start()
    replies = opt(conn, 77, b"\xff" * 100)
    assert replies == [(77, Rep.ERR_UNSUP, replies[0][2])]
    # The next option parses, so the payload was consumed exactly.
    assert opt(conn, Opt.LIST)[-1][1] == Rep.ACK


def test_option_bad_magic() -> None:
    conn = start()
    with pytest.raises(ClientProtocolError):
        conn.receive_data(b"\0" * 16)


def test_option_too_long() -> None:
    conn = start(max_option_length=1024)
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.OPTION_HEADER.pack(0x49484156454F5054, Opt.INFO, 2000))


def test_info_unknown_export() -> None:
    conn = start()
    replies = opt(conn, Opt.INFO, wire.encode_info_request("nope", []))
    assert [t for _, t, _ in replies] == [Rep.ERR_UNKNOWN]


def test_info_bad_payload_is_invalid() -> None:
    conn = start()
    assert opt(conn, Opt.INFO, b"\0\0\0\x09ab")[-1][1] == Rep.ERR_INVALID


def test_go_sends_infos_then_acks() -> None:
    conn = start()
    opt(conn, Opt.STRUCTURED_REPLY)
    replies = go(conn, "disk", [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE])
    infos = dict(wire.decode_info(p) for _, t, p in replies if t == Rep.INFO)
    assert infos[Info.NAME] == "disk"
    assert infos[Info.DESCRIPTION] == "the disk"
    assert infos[Info.BLOCK_SIZE] == wire.BlockSize(1, 4096, 32 * MiB)
    size, flags = infos[Info.EXPORT]  # type: ignore[misc]
    assert size == 4 * MiB
    assert flags & TransmissionFlag.HAS_FLAGS and flags & TransmissionFlag.SEND_DF
    assert not flags & TransmissionFlag.READ_ONLY
    (event,) = conn.events_received()
    assert isinstance(event, Negotiated) and event.structured_replies
    assert conn.state is State.TRANSMISSION


def test_go_default_export() -> None:
    conn = start()
    go(conn, "")
    (event,) = conn.events_received()
    assert isinstance(event, Negotiated) and event.export.name == "disk"


def test_no_df_without_structured_replies() -> None:
    conn = start()
    replies = go(conn, "ro")
    infos = dict(wire.decode_info(p) for _, t, p in replies if t == Rep.INFO)
    _, flags = infos[Info.EXPORT]  # type: ignore[misc]
    assert flags & TransmissionFlag.READ_ONLY and not flags & TransmissionFlag.SEND_DF


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    flags = ClientFlag.C_FIXED_NEWSTYLE | (ClientFlag.C_NO_ZEROES if no_zeroes else 0)
    conn = start(flags)
    conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, b"ro"))
    data = joined(conn)
    assert len(data) == (10 if no_zeroes else 134)
    size, tflags = wire.EXPORT_NAME_REPLY.unpack_from(data)
    assert size == MiB and tflags & TransmissionFlag.READ_ONLY
    assert data[10:] == bytes(len(data) - 10)
    assert isinstance(conn.events_received()[0], Negotiated)


def test_export_name_unknown_disconnects() -> None:
    conn = start()
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, b"nope"))


def test_export_name_after_extended_headers_disconnects() -> None:
    conn = start()
    opt(conn, Opt.EXTENDED_HEADERS)
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, b"disk"))


def test_not_fixed_newstyle_allows_only_export_name() -> None:
    conn = start(0)
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.encode_option(Opt.LIST))
    conn = start(0)
    conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, b"disk"))
    assert len(joined(conn)) == 134


def test_abort() -> None:
    conn = start()
    assert opt(conn, Opt.ABORT) == [(Opt.ABORT, Rep.ACK, b"")]
    assert conn.events_received() == [Disconnect("abort")]
    assert conn.state is State.CLOSED


def test_eof_during_handshake() -> None:
    conn = start()
    conn.receive_data(b"IHAVE")
    conn.receive_eof()
    assert conn.events_received() == [Disconnect("eof")]


def test_structured_reply_rules() -> None:
    conn = start()
    assert opt(conn, Opt.STRUCTURED_REPLY, b"x")[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.EXTENDED_HEADERS)[-1][1] == Rep.ACK
    assert opt(conn, Opt.EXTENDED_HEADERS)[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ERR_EXT_HEADER_REQD


def test_starttls_without_tls_is_policy() -> None:
    conn = start()
    assert opt(conn, Opt.STARTTLS)[-1][1] == Rep.ERR_POLICY


def test_starttls_wipes_negotiated_state() -> None:
    conn = start(tls_available=True)
    opt(conn, Opt.STRUCTURED_REPLY)
    assert opt(conn, Opt.STARTTLS, b"x")[-1][1] == Rep.ERR_INVALID
    assert opt(conn, Opt.STARTTLS) == [(Opt.STARTTLS, Rep.ACK, b"")]
    assert conn.events_received() == [StartTLS()]
    assert conn.state is State.TLS_HANDSHAKE
    conn.tls_established()
    assert not conn.structured_replies
    assert opt(conn, Opt.STARTTLS)[-1][1] == Rep.ERR_INVALID  # second STARTTLS
    # SET now fails: structured replies were forgotten.
    req = wire.encode_meta_context_request("disk", ["base:allocation"])
    assert opt(conn, Opt.SET_META_CONTEXT, req)[-1][1] == Rep.ERR_INVALID


def test_plaintext_after_starttls_is_a_violation() -> None:
    conn = start(tls_available=True)
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.encode_option(Opt.STARTTLS) + wire.encode_option(Opt.LIST))
    assert conn.state is State.CLOSED


def test_tls_required() -> None:
    conn = start(tls_available=True, tls_required=True)
    for option in (Opt.LIST, Opt.INFO, Opt.GO, Opt.STRUCTURED_REPLY, 99):
        assert opt(conn, option)[-1][1] == Rep.ERR_TLS_REQD
    with pytest.raises(ClientProtocolError):
        conn.receive_data(wire.encode_option(Opt.EXPORT_NAME, b"disk"))
    conn = start(tls_available=True, tls_required=True)
    assert opt(conn, Opt.STARTTLS)[-1][1] == Rep.ACK
    conn.tls_established()
    assert opt(conn, Opt.LIST)[-1][1] == Rep.ACK


def meta(conn, option: int, export: str, queries: list[str]):  # type: ignore[no-untyped-def]
    replies = opt(conn, option, wire.encode_meta_context_request(export, queries))
    found = [wire.decode_rep_meta_context(p) for _, t, p in replies if t == Rep.META_CONTEXT]
    return found, replies[-1][1]


def test_set_meta_context_needs_structured_replies() -> None:
    conn = start()
    assert meta(conn, Opt.SET_META_CONTEXT, "disk", ["base:allocation"]) == ([], Rep.ERR_INVALID)


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        ([], ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        (["base:"], ["base:allocation"]),
        (["qemu:"], ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        (["qemu:dirty-bitmap:"], ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
        (
            ["qemu:dirty-bitmap:b1", "nope:x", "base:allocation"],
            ["qemu:dirty-bitmap:b1", "base:allocation"],
        ),
        (["qemu:dirty-bitmap:zz"], []),
    ],
)
def test_list_meta_context(queries: list[str], expected: list[str]) -> None:
    conn = start()
    found, last = meta(conn, Opt.LIST_META_CONTEXT, "disk", queries)
    assert last == Rep.ACK
    assert [name for _, name in found] == expected
    assert all(cid == 0 for cid, _ in found)


def test_set_meta_context_exact_names_unique_ids() -> None:
    conn = start()
    opt(conn, Opt.STRUCTURED_REPLY)
    found, last = meta(
        conn,
        Opt.SET_META_CONTEXT,
        "disk",
        ["qemu:dirty-bitmap:b1", "base:", "base:allocation", "qemu:dirty-bitmap:", "x-y:z"],
    )
    assert last == Rep.ACK
    assert sorted(n for _, n in found) == ["base:allocation", "qemu:dirty-bitmap:b1"]
    assert len({cid for cid, _ in found}) == 2
    go(conn, "disk")
    (event,) = conn.events_received()
    assert isinstance(event, Negotiated)
    assert sorted(event.meta_contexts.values()) == ["base:allocation", "qemu:dirty-bitmap:b1"]


def test_meta_context_unknown_export_and_bad_payload() -> None:
    conn = start()
    opt(conn, Opt.STRUCTURED_REPLY)
    assert meta(conn, Opt.LIST_META_CONTEXT, "nope", [])[1] == Rep.ERR_UNKNOWN
    assert opt(conn, Opt.SET_META_CONTEXT, b"\0\0\0\x10disk")[-1][1] == Rep.ERR_INVALID


def test_contexts_forgotten_when_go_names_another_export() -> None:
    conn = start()
    opt(conn, Opt.STRUCTURED_REPLY)
    meta(conn, Opt.SET_META_CONTEXT, "disk", ["base:allocation"])
    go(conn, "ro")
    (event,) = conn.events_received()
    assert isinstance(event, Negotiated) and event.meta_contexts == {}


def test_failed_set_still_replaces() -> None:
    conn = start()
    opt(conn, Opt.STRUCTURED_REPLY)
    meta(conn, Opt.SET_META_CONTEXT, "disk", ["base:allocation"])
    assert meta(conn, Opt.SET_META_CONTEXT, "nope", ["base:allocation"])[1] == Rep.ERR_UNKNOWN
    go(conn, "disk")
    (event,) = conn.events_received()
    assert isinstance(event, Negotiated) and event.meta_contexts == {}


def test_byte_at_a_time() -> None:
    """The parser works whatever the fragmentation of the input."""
    conn = new_conn()
    stream = (
        wire.CLIENT_FLAGS.pack(3)
        + wire.encode_option(Opt.STRUCTURED_REPLY)
        + wire.encode_option(Opt.GO, wire.encode_info_request("disk", [Info.NAME]))
    )
    for i in range(len(stream)):
        conn.receive_data(stream[i : i + 1])
    assert conn.state is State.TRANSMISSION
    assert isinstance(conn.events_received()[0], Negotiated)
