"""Protocol answers the sans-I/O server gives on its own, from what the export declares
(review L20, L21): FAST_ZERO that cannot be fast, and a clear of a bitmap that is not (or no
longer) exported. None of them reaches the I/O layer as a Request."""

from __future__ import annotations

import dataclasses

import pytest

from nbdcore import clear_ext, wire
from nbdcore.constants import Cmd, CmdFlag, Errno, Info, Opt, Rep, TransmissionFlag
from nbdcore.server import Request, ServerConnection
from tests.unit.test_server_support import Catalog, catalog, go, opt
from tests.unit.test_server_transmission import error_of, send

B0 = "qemu:dirty-bitmap:b0"


def connect(cat: Catalog, **kw: object) -> ServerConnection:
    conn = ServerConnection(cat, **kw)  # type: ignore[arg-type]
    conn.data_to_send()
    conn.receive_data(wire.CLIENT_FLAGS.pack(3))
    assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    return conn


def test_fast_zero_with_no_hole_is_enotsup_before_any_io() -> None:
    conn = connect(catalog())
    go(conn, "disk")
    conn.events_received()
    flags = CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE
    assert send(conn, Cmd.WRITE_ZEROES, 0, 65536, flags=flags) == []
    assert error_of(conn) == Errno.ENOTSUP
    assert conn.in_flight == 0
    # A fast zero that may punch goes to the I/O layer, which can still refuse it.
    (req,) = send(conn, Cmd.WRITE_ZEROES, 0, 65536, flags=CmdFlag.FAST_ZERO, cookie=2)
    assert isinstance(req, Request) and req.flags == CmdFlag.FAST_ZERO


def test_fast_zero_needs_the_export_to_declare_it() -> None:
    """An export without SEND_FAST_ZERO (a block device, a file system without holes) never
    advertises it, and a client that sends the flag anyway is refused before any I/O."""
    cat = catalog()
    slow = dataclasses.replace(
        cat.items[0], flags=cat.items[0].flags & ~TransmissionFlag.SEND_FAST_ZERO
    )
    cat.items[0] = slow
    conn = connect(cat)
    replies = go(conn, "disk")
    infos = dict(wire.decode_info(p) for _, t, p in replies if t == Rep.INFO)
    export_info = infos[Info.EXPORT]
    assert isinstance(export_info, tuple)
    sent = int(export_info[1])
    assert TransmissionFlag.SEND_FAST_ZERO not in TransmissionFlag(sent)
    assert TransmissionFlag.SEND_WRITE_ZEROES in TransmissionFlag(sent)
    conn.events_received()
    assert send(conn, Cmd.WRITE_ZEROES, 0, 4096, flags=CmdFlag.FAST_ZERO) == []
    assert error_of(conn) == Errno.EINVAL
    (req,) = send(conn, Cmd.WRITE_ZEROES, 0, 4096, cookie=2)
    assert isinstance(req, Request)


@pytest.mark.parametrize("still_exported", [True, False])
def test_clear_of_a_bitmap_the_export_no_longer_has(still_exported: bool) -> None:
    """The catalog changed between SET_META_CONTEXT and GO: the context id was negotiated,
    but the export the connection runs on does not have the bitmap: EINVAL from the core."""
    cat = catalog()
    conn = connect(cat, clear_extension=True)
    assert opt(conn, Opt.X_NBDGW_CLEAR)[-1][1] == Rep.ACK
    payload = wire.encode_meta_context_request("disk", [B0])
    assert opt(conn, Opt.SET_META_CONTEXT, payload)[-1][1] == Rep.ACK
    if not still_exported:
        old = cat.items[0]
        cat.items[0] = dataclasses.replace(old, contexts=old.contexts[:1])
    go(conn, "disk")
    conn.events_received()
    body = clear_ext.encode_clear_payload(65536, 1)
    head = wire.encode_request(0, Cmd.X_NBDGW_CLEAR, 9, 0, len(body), False)
    conn.receive_data(head + body)
    events = conn.events_received()
    if still_exported:
        (req,) = events
        assert isinstance(req, Request) and req.contexts == ((1, B0),)
    else:
        assert events == []
        assert error_of(conn) == Errno.EINVAL
        assert conn.in_flight == 0
