"""A tiny scripted NBD client for driving the sans-I/O server in unit tests (bytes only)."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from nbdcore import wire
from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    IHAVEOPT,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_REP_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
    NBDMAGIC,
    ClientFlag,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdcore.server import ExportDescriptor, ServerConnection

MiB = 1024 * 1024


@dataclass
class Catalog:
    items: list[ExportDescriptor] = field(default_factory=list)

    def lookup(self, name: str) -> ExportDescriptor | None:
        for e in self.items:
            if e.name == name:
                return e
        if name == "" and self.items:
            return self.items[0]
        return None

    def exports(self) -> Sequence[ExportDescriptor]:
        return self.items


WRITABLE = (
    TransmissionFlag.SEND_FLUSH
    | TransmissionFlag.SEND_FUA
    | TransmissionFlag.SEND_TRIM
    | TransmissionFlag.SEND_WRITE_ZEROES
    | TransmissionFlag.SEND_FAST_ZERO
    | TransmissionFlag.SEND_CACHE
    | TransmissionFlag.CAN_MULTI_CONN
)


def catalog() -> Catalog:
    return Catalog(
        [
            ExportDescriptor(
                "disk",
                4 * MiB,
                WRITABLE,
                "the disk",
                (CONTEXT_BASE_ALLOCATION, "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"),
            ),
            ExportDescriptor(
                "ro", 1 * MiB, TransmissionFlag.READ_ONLY | TransmissionFlag.SEND_FLUSH
            ),
        ]
    )


def joined(conn: ServerConnection) -> bytes:
    return b"".join(bytes(b) for b in conn.data_to_send())


def new_conn(**kw: object) -> ServerConnection:
    conn = ServerConnection(catalog(), **kw)  # type: ignore[arg-type]
    greeting = joined(conn)
    assert wire.GREETING.unpack(greeting)[:2] == (NBDMAGIC, IHAVEOPT)
    return conn


def start(flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES, **kw: object):  # type: ignore[no-untyped-def]
    conn = new_conn(**kw)
    conn.receive_data(wire.CLIENT_FLAGS.pack(flags))
    return conn


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = wire.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == NBD_REP_MAGIC
        pos += 20
        out.append((opt, rtype, data[pos : pos + length]))
        pos += length
    return out


def opt(conn: ServerConnection, option: int, payload: bytes = b"") -> list[tuple[int, int, bytes]]:
    conn.receive_data(wire.encode_option(option, payload))
    return option_replies(joined(conn))


def go(
    conn: ServerConnection, name: str = "disk", infos: Sequence[int] = ()
) -> list[tuple[int, int, bytes]]:
    replies = opt(conn, Opt.GO, wire.encode_info_request(name, list(infos)))
    assert replies[-1][1] == Rep.ACK, replies
    return replies


def transmission(
    structured: bool = True,
    extended: bool = False,
    contexts: Sequence[str] = (),
    export: str = "disk",
) -> ServerConnection:
    conn = start()
    if extended:
        assert opt(conn, Opt.EXTENDED_HEADERS)[-1][1] == Rep.ACK
    elif structured:
        assert opt(conn, Opt.STRUCTURED_REPLY)[-1][1] == Rep.ACK
    if contexts:
        r = opt(
            conn, Opt.SET_META_CONTEXT, wire.encode_meta_context_request(export, list(contexts))
        )
        assert r[-1][1] == Rep.ACK
    go(conn, export)
    conn.events_received()
    return conn


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes
    offset: int = 0  # extended header echo


def parse_replies(data: bytes, read_lengths: dict[int, int] | None = None) -> list[object]:
    """Parse simple replies (as (error, cookie, data)) and chunks (as Chunk)."""
    out: list[object] = []
    pos = 0
    read_lengths = read_lengths or {}
    while pos < len(data):
        (magic,) = struct.unpack_from(">I", data, pos)
        if magic == NBD_SIMPLE_REPLY_MAGIC:
            _, err, cookie = wire.SIMPLE_REPLY.unpack_from(data, pos)
            pos += 16
            n = read_lengths.get(cookie, 0) if err == 0 else 0
            out.append((err, cookie, data[pos : pos + n]))
            pos += n
        elif magic == NBD_STRUCTURED_REPLY_MAGIC:
            _, fl, typ, cookie, length = wire.STRUCTURED_REPLY.unpack_from(data, pos)
            pos += 20
            out.append(Chunk(fl, typ, cookie, data[pos : pos + length]))
            pos += length
        elif magic == NBD_EXTENDED_REPLY_MAGIC:
            _, fl, typ, cookie, offset, length = wire.EXTENDED_REPLY.unpack_from(data, pos)
            pos += 32
            out.append(Chunk(fl, typ, cookie, data[pos : pos + length], offset))
            pos += length
        else:
            raise AssertionError(f"bad reply magic {magic:#x} at {pos}")
    return out


CTX_ALL = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
