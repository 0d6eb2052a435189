"""Sans-I/O NBD server connection: bytes in, events out, bytes to send.

A :class:`ServerConnection` speaks the fixed-newstyle handshake and the transmission phase for
one client. It never touches a socket or a disk: the I/O layer (``nbdcore.aio.server``) feeds it
with :meth:`~ServerConnection.receive_data`, reads :meth:`~ServerConnection.events_received`,
performs the requests it is given, answers them with the ``reply_*`` methods and writes whatever
:meth:`~ServerConnection.data_to_send` returns.

Everything the handshake needs to know about exports comes from an :class:`ExportCatalog`, so the
core answers every option itself (LIST, INFO, GO, the meta-context options...); requests it can
reject on their header alone (bad range, unknown command, read-only export...) are answered here
too and never reach the I/O layer. A client that breaks the protocol so that the stream cannot be
trusted any more gets :class:`~nbdcore.exceptions.ClientProtocolError` from ``receive_data``;
the caller then drops that connection.

States (everything that changes them is in ``_TRANSITIONS`` and in the parser, top to bottom)::

    CLIENT_FLAGS -> OPTIONS -> (TLS_HANDSHAKE -> OPTIONS) -> TRANSMISSION -> DISCONNECTING
                      \\-> CLOSED (ABORT, EOF, unknown export on EXPORT_NAME, protocol error)
"""

from __future__ import annotations

import enum
import json
import struct
from array import array
from bisect import bisect_left
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Final, NoReturn, Protocol, cast

from nbdcore import clear_ext, wire
from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    DEFAULT_MAX_PAYLOAD,
    IHAVEOPT,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_MAX_STRING,
    NBD_REPLY_FLAG_DONE,
    NBD_REQUEST_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Errno,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
    ReplyType,
    TransmissionFlag,
)
from nbdcore.exceptions import ClientProtocolError, OptionError, UsageError

__all__ = [
    "DEFAULT_MAX_EXTENTS",
    "Disconnect",
    "Event",
    "ExportCatalog",
    "ExportDescriptor",
    "FileSpan",
    "Negotiated",
    "Request",
    "ServerConnection",
    "StartTLS",
    "State",
]

# Compact requests carry u32 lengths; a WRITE payload up to that is drained (then EINVAL) rather
# than treated as an attack, because the spec asks servers to keep the connection usable.
_MAX_DRAIN: Final = 0xFFFFFFFF
_DRAIN_STEP: Final = 1 << 20
_LITTLE: Final = struct.pack("=H", 1) == b"\x01\x00"

# Plain ints: ``~`` on an IntFlag complements within the known bits only, hiding unknown ones.
_ALL_CMD_FLAGS: Final = int(
    CmdFlag.FUA
    | CmdFlag.NO_HOLE
    | CmdFlag.DF
    | CmdFlag.REQ_ONE
    | CmdFlag.FAST_ZERO
    | CmdFlag.PAYLOAD_LEN
)
_DEFAULT_BLOCK_SIZE: Final = wire.BlockSize(1, 4096, DEFAULT_MAX_PAYLOAD)
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
# Extents per BLOCK_STATUS chunk: qemu's 1 MiB of compact extents. The spec only says SHOULD
# NOT exceed 2^20, but 2^20 is 8 MiB (16 MiB extended) per context per reply (review H5).
DEFAULT_MAX_EXTENTS: Final = 131072


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_HANDSHAKE = "tls-handshake"
    TRANSMISSION = "transmission"
    DISCONNECTING = "disconnecting"
    CLOSED = "closed"


# (state, trigger) -> next state. The parser drives the triggers; nothing else moves the state.
_TRANSITIONS: Final[dict[tuple[State, str], State]] = {
    (State.CLIENT_FLAGS, "flags"): State.OPTIONS,
    (State.OPTIONS, "starttls"): State.TLS_HANDSHAKE,
    (State.TLS_HANDSHAKE, "tls-done"): State.OPTIONS,
    (State.OPTIONS, "go"): State.TRANSMISSION,
    (State.TRANSMISSION, "disc"): State.DISCONNECTING,
}


# --- What the core knows about exports ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExportDescriptor:
    """What negotiation needs to know about one export.

    ``flags`` are the export's own transmission flags (READ_ONLY, SEND_FLUSH, CAN_MULTI_CONN...);
    the connection adds HAS_FLAGS, and SEND_DF / BLOCK_STATUS_PAYLOAD when the negotiated reply
    format allows them. ``contexts`` lists the selectable metadata contexts in id order.
    """

    name: str
    size: int
    flags: TransmissionFlag
    description: str = ""
    contexts: tuple[str, ...] = (CONTEXT_BASE_ALLOCATION,)
    block_size: wire.BlockSize = _DEFAULT_BLOCK_SIZE


class ExportCatalog(Protocol):
    def lookup(self, name: str) -> ExportDescriptor | None:
        """The export a client names (``""`` is the default export), or None."""

    def exports(self) -> Sequence[ExportDescriptor]:
        """Every export, for NBD_OPT_LIST."""


class SnapshotCatalog(ExportCatalog, Protocol):
    """A catalog that also manages snapshots (NBD_OPT_X_NBDGW_SNAPSHOT,
    docs/extension-snapshot.md): ``snapshot`` takes the decoded JSON request and returns the
    JSON result (which may be ``{"error": {...}}``); OptionError refuses the option."""

    def snapshot(self, request: dict[str, Any]) -> dict[str, Any]: ...


# --- Events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartTLS:
    """STARTTLS was acknowledged: send what is queued, run the TLS handshake as the server,
    then call :meth:`ServerConnection.tls_established`."""


@dataclass(frozen=True, slots=True)
class Negotiated:
    """The handshake ended: transmission starts on ``export``."""

    export: ExportDescriptor
    flags: TransmissionFlag  # as sent to the client
    structured_replies: bool
    extended_headers: bool
    meta_contexts: dict[int, str]
    clear_extension: bool = False  # NBD_OPT_X_NBDGW_CLEAR was acknowledged
    clear_since: bool = False  # ... with NBD_X_NBDGW_CLEAR_F_SINCE (conditional clears)


@dataclass(frozen=True, slots=True)
class Request:
    """A valid transmission request for the I/O layer to perform and answer.

    ``data`` is the WRITE payload. For BLOCK_STATUS, ``contexts`` holds the (id, name) pairs to
    answer (all selected ones, or the filter's), and ``length`` the effect length. For
    X_NBDGW_CLEAR, ``contexts`` holds the one bitmap context to clear, ``length`` the effect
    length and ``since`` the position of a conditional clear (answer with
    :meth:`ServerConnection.reply_cleared`, with the kept runs when ``since`` is set). For
    X_NBDGW_POSITION, ``contexts`` holds the negotiated dirty bitmaps (answer with
    :meth:`ServerConnection.reply_positions`).
    """

    cookie: int
    command: Cmd
    flags: CmdFlag
    offset: int
    length: int
    data: bytes | bytearray | memoryview | None = None
    contexts: tuple[tuple[int, str], ...] = ()
    since: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session (DISC, ABORT, EOF). ``reason`` says which."""

    reason: str


Event = StartTLS | Negotiated | Request | Disconnect


@dataclass(slots=True)
class _Negotiation:
    """State the handshake accumulates; STARTTLS resets it to the defaults."""

    structured: bool = False
    extended: bool = False
    meta_export: str | None = None  # export the last SET_META_CONTEXT named
    meta_contexts: dict[int, str] = field(default_factory=dict)
    clear: bool = False  # NBD_OPT_X_NBDGW_CLEAR acknowledged
    clear_since: bool = False  # ... with NBD_X_NBDGW_CLEAR_F_SINCE


@dataclass(frozen=True, slots=True)
class FileSpan:
    """READ payload that the I/O layer sends straight from a file (``sendfile``) instead of
    loading it: the core only needs its length."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


Buffer = bytes | bytearray | memoryview
Payload = Buffer | FileSpan


class ServerConnection:
    """One client's NBD session, server side.

    ``tls_available``: STARTTLS can be offered. ``tls_required``: every option but STARTTLS and
    ABORT gets ERR_TLS_REQD until TLS is up (FORCEDTLS). ``max_option_length`` bounds the option
    payload the server reads; ``max_payload`` the READ/WRITE size it serves (advertised as the
    maximum block size). ``clear_extension``: acknowledge NBD_OPT_X_NBDGW_CLEAR
    (docs/extension-clear.md); otherwise it is an unknown option, answered ERR_UNSUP.
    """

    def __init__(
        self,
        catalog: ExportCatalog,
        *,
        tls_available: bool = False,
        tls_required: bool = False,
        max_option_length: int = 64 * 1024,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_extents: int = DEFAULT_MAX_EXTENTS,
        clear_extension: bool = False,
    ) -> None:
        if tls_required and not tls_available:
            raise UsageError("tls_required needs tls_available")
        self.catalog = catalog
        self.tls_available = tls_available
        self.tls_required = tls_required
        self.max_option_length = max_option_length
        self.max_payload = max_payload
        self.max_extents = max_extents
        self.clear_extension = clear_extension
        self.state = State.CLIENT_FLAGS
        self.tls_active = False
        self.no_zeroes = False
        self.fixed_newstyle = False
        self.neg = _Negotiation()
        self.export: ExportDescriptor | None = None
        self.transmission_flags = TransmissionFlag(0)
        self.in_flight = 0
        self._buf = bytearray()
        self._eof = False
        self._events: list[Event] = []
        self._out: list[Payload] = [
            wire.encode_greeting(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES)
        ]
        self._parser = self._parse()
        next(self._parser)

    # --- public surface -----------------------------------------------------------------------

    @property
    def structured_replies(self) -> bool:
        return self.neg.structured

    @property
    def extended_headers(self) -> bool:
        return self.neg.extended

    def receive_data(self, data: Buffer) -> None:
        """Feed bytes from the client. Raises ClientProtocolError if they break the protocol."""
        if self.state is State.CLOSED:
            if data:
                raise ClientProtocolError("data after the connection was closed")
            return
        if self.state is State.DISCONNECTING:
            return  # the client sends nothing after DISC; ignore whatever it does send
        if self.state is State.TLS_HANDSHAKE and data:
            # The I/O layer runs the TLS handshake on the raw stream; plaintext arriving here
            # means the client pipelined bytes after STARTTLS before the ACK.
            self._fail("data after NBD_OPT_STARTTLS before the TLS handshake")
        self._buf += data
        self._run()

    def receive_eof(self) -> None:
        """The client closed its side."""
        self._eof = True
        if self.state in (State.CLOSED, State.DISCONNECTING):
            return
        if self._buf and self.state is not State.TRANSMISSION:
            pass  # a truncated option: nothing to answer
        self.state = State.CLOSED
        self._events.append(Disconnect("eof"))

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[Payload]:
        """Buffers to write, in order (headers and payloads kept apart, never joined)."""
        out, self._out = self._out, []
        return out

    def tls_established(self) -> None:
        """The TLS handshake that followed STARTTLS succeeded. The spec wipes everything
        negotiated before it, so options start over."""
        if self.state is not State.TLS_HANDSHAKE:
            raise UsageError(f"tls_established in state {self.state.value}")
        self.tls_active = True
        self.neg = _Negotiation()
        self._move("tls-done")
        self._run()

    def close(self) -> None:
        """The I/O layer gave up on the connection; nothing more is parsed."""
        self.state = State.CLOSED

    # --- replies (transmission) ---------------------------------------------------------------

    def reply_ok(self, request: Request) -> None:
        """Success for a command without reply data (WRITE, FLUSH, TRIM, ...)."""
        self._done(request)
        if self.neg.extended:
            # Extended headers forbid simple replies: a NONE chunk carries the success.
            self._out.append(self._chunk_header(NBD_REPLY_FLAG_DONE, ReplyType.NONE, request, 0))
        else:
            self._out.append(wire.encode_simple_reply(0, request.cookie))

    def reply_error(self, request: Request, errno: int, message: str = "") -> None:
        self._done(request)
        self._queue_error(request.cookie, request.offset, errno, message)

    def reply_read(self, request: Request, pieces: Iterable[Payload | int]) -> None:
        """Answer a READ. ``pieces`` cover the request in order: a buffer or FileSpan is data,
        an int is that many bytes of hole (sent as an OFFSET_HOLE chunk, or as zeros where
        holes cannot be expressed: simple replies and DF)."""
        self._done(request)
        cookie, offset = request.cookie, request.offset
        plain = not self.neg.structured or CmdFlag.DF in request.flags
        parts: list[tuple[int, Payload | int]] = []
        pos = offset
        for piece in pieces:
            n = piece if isinstance(piece, int) else len(piece)
            if n == 0:
                continue
            if plain and isinstance(piece, int):
                piece = bytes(piece)
            parts.append((pos, piece))
            pos += n
        if pos != offset + request.length:
            raise UsageError(f"read pieces cover {pos - offset} bytes, not {request.length}")
        out = self._out
        if not self.neg.structured:
            out.append(wire.encode_simple_reply(0, cookie))
            out.extend(p for _, p in parts if not isinstance(p, int))
            return
        if not parts:
            out.append(self._chunk_header(NBD_REPLY_FLAG_DONE, ReplyType.NONE, request, 0))
            return
        if CmdFlag.DF in request.flags and len(parts) > 1:
            total = request.length
            out.append(
                self._chunk_header(NBD_REPLY_FLAG_DONE, ReplyType.OFFSET_DATA, request, 8 + total)
            )
            out.append(wire.OFFSET.pack(offset))
            out.extend(p for _, p in parts if not isinstance(p, int))
            return
        last = len(parts) - 1
        for i, (at, piece) in enumerate(parts):
            flags = NBD_REPLY_FLAG_DONE if i == last else 0
            if isinstance(piece, int):
                # The hole stays offset u64 + size u32 under extended headers too (qemu >= 8.2
                # rejects a 16-byte hole chunk); a read is at most max_payload long anyway.
                body = wire.OFFSET_HOLE.pack(at, piece)
                out.append(self._chunk_header(flags, ReplyType.OFFSET_HOLE, request, len(body)))
                out.append(body)
            else:
                out.append(
                    self._chunk_header(flags, ReplyType.OFFSET_DATA, request, 8 + len(piece))
                )
                out.append(wire.OFFSET.pack(at))
                out.append(piece)

    def reply_block_status(
        self,
        request: Request,
        answers: Sequence[tuple[int, Sequence[int] | array[int], Sequence[int] | array[int]]],
    ) -> None:
        """Answer a BLOCK_STATUS: one (context id, lengths, flags) per requested context.

        The extents must start at the request offset; this method enforces the rest of the
        spec: at most ``max_extents`` per chunk, one extent with REQ_ONE, and no overshoot of
        the request (the last extent is clipped), so a caller can pass raw runs.
        """
        self._done(request)
        ext = self.neg.extended
        end_limit = request.length
        last = len(answers) - 1
        for i, (cid, lengths, flags) in enumerate(answers):
            n = min(len(lengths), self.max_extents)
            if CmdFlag.REQ_ONE in request.flags:
                n = min(n, 1)
            if n == 0:
                raise UsageError("a block status answer needs at least one extent")
            lens = _u64(lengths[:n])
            if sum(lens) > end_limit:
                # Never overshoot: clip the extent that reaches the end and stop there.
                ends = list(accumulate(lens))
                j = bisect_left(ends, end_limit)
                lens[j] -= ends[j] - end_limit
                n = j + 1
                del lens[n:]
            # Interleave (length, flags) as big-endian u64 pairs, all at C speed; compact
            # chunks take the low 32-bit half of each (lengths are clipped to the u32 request).
            pairs = array("Q", bytes(16 * n))
            pairs[0::2] = lens
            pairs[1::2] = _u64(flags[:n])
            if _LITTLE:
                pairs.byteswap()
            if ext:
                header = wire.BLOCK_STATUS_EXT_HEADER.pack(cid, n)
                rtype = ReplyType.BLOCK_STATUS_EXT
                body = pairs.tobytes()
            else:
                header = wire.BLOCK_STATUS_HEADER.pack(cid)
                rtype = ReplyType.BLOCK_STATUS
                body = memoryview(pairs).cast("B").cast("I")[1::2].tobytes()
            flags_ = NBD_REPLY_FLAG_DONE if i == last else 0
            self._out.append(self._chunk_header(flags_, rtype, request, len(header) + len(body)))
            self._out.append(header)
            self._out.append(body)

    def reply_cleared(
        self,
        request: Request,
        granularity: int,
        runs: Sequence[tuple[int, int]],
        kept: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        """Success for X_NBDGW_CLEAR: the byte runs cleared (whole granules inside the
        request), in one NBD_REPLY_TYPE_X_NBDGW_CLEARED chunk; for a conditional clear
        (``request.since``) followed by the NBD_REPLY_TYPE_X_NBDGW_KEPT chunk of ``kept``."""
        if (kept is None) != (request.since is None):
            raise UsageError("kept runs answer a conditional clear, and only one")
        self._done(request)
        (cid, _name), *_ = request.contexts
        body = clear_ext.encode_cleared(cid, granularity, list(runs))
        last = kept is None
        header = self._chunk_header(
            NBD_REPLY_FLAG_DONE if last else 0, ReplyType.X_NBDGW_CLEARED, request, len(body)
        )
        self._out.append(header)
        self._out.append(body)
        if kept is not None:
            body = clear_ext.encode_cleared(cid, granularity, list(kept))
            header = self._chunk_header(
                NBD_REPLY_FLAG_DONE, ReplyType.X_NBDGW_KEPT, request, len(body)
            )
            self._out.append(header)
            self._out.append(body)

    def reply_positions(self, request: Request, positions: Sequence[tuple[int, int]]) -> None:
        """Success for X_NBDGW_POSITION: the ``(history id, sequence)`` of each context of
        ``request.contexts``, in that order, one NBD_REPLY_TYPE_X_NBDGW_POSITION chunk each."""
        if len(positions) != len(request.contexts):
            raise UsageError("one position per context of the request")
        self._done(request)
        last = len(positions) - 1
        for i, ((cid, _name), (history_id, sequence)) in enumerate(
            zip(request.contexts, positions, strict=True)
        ):
            body = clear_ext.encode_position(cid, history_id, sequence)
            flags = NBD_REPLY_FLAG_DONE if i == last else 0
            self._out.append(
                self._chunk_header(flags, ReplyType.X_NBDGW_POSITION, request, len(body))
            )
            self._out.append(body)

    # --- internals: output --------------------------------------------------------------------

    def _done(self, request: Request) -> None:
        if self.state not in (State.TRANSMISSION, State.DISCONNECTING, State.CLOSED):
            raise UsageError("reply outside transmission")
        self.in_flight -= 1

    def _chunk_header(self, flags: int, rtype: int, request: Request, length: int) -> bytes:
        return wire.encode_chunk_header(
            flags, rtype, request.cookie, length, self.neg.extended, request.offset
        )

    def _queue_error(self, cookie: int, offset: int, errno: int, message: str) -> None:
        if self.neg.structured:
            body = wire.encode_error_payload(errno, message)
            self._out.append(
                wire.encode_chunk_header(
                    NBD_REPLY_FLAG_DONE,
                    ReplyType.ERROR,
                    cookie,
                    len(body),
                    self.neg.extended,
                    offset,
                )
            )
            self._out.append(body)
        else:
            self._out.append(wire.encode_simple_reply(errno, cookie))

    def _reply(self, option: int, rtype: int, payload: bytes = b"") -> None:
        self._out.append(wire.encode_option_reply(option, rtype, payload))

    def _error(self, option: int, rtype: Rep, message: str) -> None:
        # Cut at the limit without splitting a UTF-8 sequence (names in messages are the
        # client's own, and may be long).
        text = message.encode("utf-8")[:NBD_MAX_STRING].decode("utf-8", "ignore")
        self._reply(option, rtype, text.encode("utf-8"))

    # --- internals: parsing -------------------------------------------------------------------

    def _move(self, trigger: str) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise UsageError(f"no transition {trigger!r} from {self.state.value}") from None

    def _at(self, state: State) -> bool:
        # A method, not an inline comparison, because the state changes behind mypy's back.
        return self.state is state

    def _fail(self, message: str) -> NoReturn:
        self.state = State.CLOSED
        raise ClientProtocolError(message)

    def _run(self) -> None:
        try:
            next(self._parser)
        except StopIteration:
            self.state = State.CLOSED if self.state is not State.DISCONNECTING else self.state
        except ClientProtocolError:
            self.state = State.CLOSED
            raise
        except wire.WireError as exc:  # pragma: no cover - parsers catch these themselves
            self.state = State.CLOSED
            raise ClientProtocolError(str(exc)) from exc

    def _read(self, n: int) -> Generator[None, None, bytes]:
        while len(self._buf) < n:
            yield
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _read_payload(self, n: int) -> Generator[None, None, bytearray]:
        """A payload of n bytes, gathered without quadratic copying."""
        out = bytearray()
        while len(out) < n:
            if not self._buf:
                yield
                continue
            take = min(n - len(out), len(self._buf))
            if not out and take == len(self._buf):
                out, self._buf = self._buf, bytearray()
            else:
                out += memoryview(self._buf)[:take]
                del self._buf[:take]
        return out

    def _drain(self, n: int) -> Generator[None, None, None]:
        while n:
            if not self._buf:
                yield
                continue
            take = min(n, len(self._buf))
            del self._buf[:take]
            n -= take

    def _parse(self) -> Generator[None, None, None]:
        yield  # primed
        (cflags,) = wire.CLIENT_FLAGS.unpack((yield from self._read(4)))
        if cflags & ~_KNOWN_CLIENT_FLAGS:
            # Spec: unknown client flags MUST make the server drop the connection.
            self._fail(f"unknown client flags {cflags:#x}")
        self.fixed_newstyle = bool(cflags & ClientFlag.C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(cflags & ClientFlag.C_NO_ZEROES)
        self._move("flags")
        while self._at(State.OPTIONS):
            yield from self._option()
            if self._at(State.TLS_HANDSHAKE):
                if self._buf:
                    self._fail("data after NBD_OPT_STARTTLS before the TLS handshake")
                yield  # wait for tls_established()
                if not self._at(State.OPTIONS):
                    self._fail("data after NBD_OPT_STARTTLS before the TLS handshake")
        while self._at(State.TRANSMISSION):
            yield from self._request()

    # --- handshake ----------------------------------------------------------------------------

    def _option(self) -> Generator[None, None, None]:
        magic, option, length = wire.OPTION_HEADER.unpack((yield from self._read(16)))
        if magic != IHAVEOPT:
            self._fail(f"bad option magic {magic:#x}")
        if length > self.max_option_length:
            # Reading it would let one client make us buffer anything; qemu also disconnects.
            self._fail(f"option {option} of {length} bytes exceeds {self.max_option_length}")
        payload = yield from self._read(length)
        if not self.fixed_newstyle and option != Opt.EXPORT_NAME:
            # Without fixed newstyle the client cannot understand error replies.
            self._fail(f"option {option} without fixed newstyle")
        if self.tls_required and not self.tls_active and option not in (Opt.STARTTLS, Opt.ABORT):
            if option == Opt.EXPORT_NAME:
                self._fail("NBD_OPT_EXPORT_NAME before TLS on a TLS-only server")
            self._error(option, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
            return
        handler = {
            Opt.EXPORT_NAME: self._opt_export_name,
            Opt.ABORT: self._opt_abort,
            Opt.LIST: self._opt_list,
            Opt.STARTTLS: self._opt_starttls,
            Opt.INFO: self._opt_info_go,
            Opt.GO: self._opt_info_go,
            Opt.STRUCTURED_REPLY: self._opt_structured_reply,
            Opt.EXTENDED_HEADERS: self._opt_extended_headers,
            Opt.LIST_META_CONTEXT: self._opt_meta_context,
            Opt.SET_META_CONTEXT: self._opt_meta_context,
        }.get(option)
        if option == Opt.X_NBDGW_CLEAR and self.clear_extension:
            handler = self._opt_x_nbdgw_clear
        if option == Opt.X_NBDGW_SNAPSHOT and hasattr(self.catalog, "snapshot"):
            handler = self._opt_x_nbdgw_snapshot
        if handler is None:
            self._error(option, Rep.ERR_UNSUP, f"option {option} is not supported")
            return
        handler(option, payload)

    def _flags_for(self, export: ExportDescriptor) -> TransmissionFlag:
        flags = export.flags | TransmissionFlag.HAS_FLAGS
        if self.neg.structured:
            flags |= TransmissionFlag.SEND_DF
        if self.neg.extended:
            flags |= TransmissionFlag.BLOCK_STATUS_PAYLOAD
        return flags

    def _lookup(self, option: int, name: str) -> ExportDescriptor | None:
        export = self.catalog.lookup(name)
        if export is None:
            self._error(option, Rep.ERR_UNKNOWN, f"export {name!r} does not exist")
        return export

    def _opt_export_name(self, option: int, payload: bytes) -> None:
        if self.neg.extended:
            self._fail("NBD_OPT_EXPORT_NAME after extended headers")
        try:
            name = wire.decode_string(payload, "export name")
        except wire.WireError as exc:
            self._fail(str(exc))
        export = self.catalog.lookup(name)
        if export is None:
            # EXPORT_NAME has no error reply: the spec's answer is to disconnect.
            self._fail(f"NBD_OPT_EXPORT_NAME: export {name!r} does not exist")
            return
        self._start_transmission(export)
        flags = self.transmission_flags
        self._out.append(wire.EXPORT_NAME_REPLY.pack(export.size, flags))
        if not self.no_zeroes:
            self._out.append(bytes(wire.EXPORT_NAME_REPLY_ZEROES))

    def _opt_abort(self, option: int, payload: bytes) -> None:
        # Data on ABORT is ignored (spec); the client may close before reading the ACK.
        self._reply(option, Rep.ACK)
        self.state = State.CLOSED
        self._events.append(Disconnect("abort"))

    def _opt_list(self, option: int, payload: bytes) -> None:
        if payload:
            self._error(option, Rep.ERR_INVALID, "NBD_OPT_LIST carries no data")
            return
        for export in self.catalog.exports():
            self._reply(option, Rep.SERVER, wire.encode_rep_server(export.name, export.description))
        self._reply(option, Rep.ACK)

    def _opt_starttls(self, option: int, payload: bytes) -> None:
        if not self.tls_available:
            self._error(option, Rep.ERR_POLICY, "TLS is not configured on this server")
        elif payload:
            self._error(option, Rep.ERR_INVALID, "NBD_OPT_STARTTLS carries no data")
        elif self.tls_active:
            self._error(option, Rep.ERR_INVALID, "TLS is already active")
        else:
            self._reply(option, Rep.ACK)
            self._move("starttls")
            self._events.append(StartTLS())

    def _opt_structured_reply(self, option: int, payload: bytes) -> None:
        if payload:
            self._error(option, Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY carries no data")
        elif self.neg.extended:
            self._error(option, Rep.ERR_EXT_HEADER_REQD, "extended headers are already on")
        elif self.neg.structured:
            self._error(option, Rep.ERR_INVALID, "structured replies are already on")
        else:
            self.neg.structured = True
            self._reply(option, Rep.ACK)

    def _opt_extended_headers(self, option: int, payload: bytes) -> None:
        if payload:
            self._error(option, Rep.ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS carries no data")
        elif self.neg.extended:
            self._error(option, Rep.ERR_INVALID, "extended headers are already on")
        else:
            self.neg.extended = True
            self.neg.structured = True
            self._reply(option, Rep.ACK)

    def _opt_x_nbdgw_clear(self, option: int, payload: bytes) -> None:
        try:
            # Every feature asked for is implemented, or the option fails as a whole.
            features = clear_ext.decode_features(payload)
        except wire.WireError as exc:
            self._error(option, Rep.ERR_INVALID, str(exc))
            return
        if not self.neg.structured:
            # The reply to the command is a chunk.
            self._error(option, Rep.ERR_INVALID, "negotiate structured replies first")
        else:
            self.neg.clear = True
            self.neg.clear_since = bool(features & clear_ext.NBD_X_NBDGW_CLEAR_F_SINCE)
            self._reply(option, Rep.ACK)

    def _opt_x_nbdgw_snapshot(self, option: int, payload: bytes) -> None:
        try:
            request = json.loads(payload.decode("utf-8"))
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
        except (UnicodeDecodeError, ValueError) as exc:
            self._error(option, Rep.ERR_INVALID, f"NBD_OPT_X_NBDGW_SNAPSHOT: {exc}")
            return
        try:
            result = cast("SnapshotCatalog", self.catalog).snapshot(request)
        except OptionError as exc:
            self._error(option, Rep(exc.code), exc.server_message)
            return
        self._reply(option, Rep.X_NBDGW_SNAPSHOT, json.dumps(result).encode())
        self._reply(option, Rep.ACK)

    def _opt_info_go(self, option: int, payload: bytes) -> None:
        try:
            name, infos = wire.decode_info_request(payload)
        except wire.WireError as exc:
            self._error(option, Rep.ERR_INVALID, str(exc))
            return
        if len(name.encode()) > NBD_MAX_STRING:
            self._error(option, Rep.ERR_INVALID, "export name longer than 4096 bytes")
            return
        export = self._lookup(option, name)
        if export is None:
            return
        flags = self._flags_for(export)
        if Info.NAME in infos:
            self._reply(option, Rep.INFO, wire.encode_info_string(Info.NAME, export.name))
        if Info.DESCRIPTION in infos and export.description:
            self._reply(
                option, Rep.INFO, wire.encode_info_string(Info.DESCRIPTION, export.description)
            )
        # Always sent: a client that did not ask still benefits from knowing the limits.
        self._reply(option, Rep.INFO, wire.encode_info_block_size(export.block_size))
        self._reply(option, Rep.INFO, wire.encode_info_export(export.size, flags))
        self._reply(option, Rep.ACK)
        if option == Opt.GO:
            self._start_transmission(export)

    def _start_transmission(self, export: ExportDescriptor) -> None:
        if self.neg.meta_export != export.name:
            # Contexts negotiated for another export do not carry over (spec, qemu).
            self.neg.meta_contexts = {}
        self.export = export
        self.transmission_flags = self._flags_for(export)
        self._move("go")
        self._events.append(
            Negotiated(
                export,
                self.transmission_flags,
                self.neg.structured,
                self.neg.extended,
                dict(self.neg.meta_contexts),
                self.neg.clear,
                self.neg.clear_since,
            )
        )

    def _opt_meta_context(self, option: int, payload: bytes) -> None:
        is_set = option == Opt.SET_META_CONTEXT
        if is_set:
            # Every SET replaces the active set, even one that fails.
            self.neg.meta_contexts = {}
            self.neg.meta_export = None
            if not self.neg.structured:
                self._error(option, Rep.ERR_INVALID, "negotiate structured replies first")
                return
        try:
            name, queries = wire.decode_meta_context_request(payload)
        except wire.WireError as exc:
            self._error(option, Rep.ERR_INVALID, str(exc))
            return
        if len(name.encode()) > NBD_MAX_STRING:
            self._error(option, Rep.ERR_INVALID, "export name longer than 4096 bytes")
            return
        export = self._lookup(option, name)
        if export is None:
            return
        if is_set:
            selected = self._select(export, queries)
            for cid, ctx in selected.items():
                self._reply(option, Rep.META_CONTEXT, wire.encode_rep_meta_context(cid, ctx))
            self.neg.meta_contexts = selected
            self.neg.meta_export = export.name
        else:
            for ctx in self._match_list(export, queries):
                self._reply(option, Rep.META_CONTEXT, wire.encode_rep_meta_context(0, ctx))
        self._reply(option, Rep.ACK)

    @staticmethod
    def _match_list(export: ExportDescriptor, queries: list[str]) -> list[str]:
        """LIST semantics: no query lists everything; an empty leaf is a wildcard."""
        if not queries:
            return list(export.contexts)
        found: list[str] = []
        for query in queries:
            if len(query.encode()) > NBD_MAX_STRING:
                continue  # oversized queries are skipped, like qemu does
            for ctx in export.contexts:
                if ctx in found:
                    continue
                if ctx == query or (_is_wildcard(query) and ctx.startswith(query)):
                    found.append(ctx)
        return found

    @staticmethod
    def _select(export: ExportDescriptor, queries: list[str]) -> dict[int, str]:
        """SET semantics: only exact names select; the id is the context's index."""
        wanted = set(queries)
        return {i: ctx for i, ctx in enumerate(export.contexts) if ctx in wanted}

    # --- transmission -------------------------------------------------------------------------

    def _request(self) -> Generator[None, None, None]:
        ext = self.neg.extended
        header = yield from self._read(32 if ext else 28)
        if ext:
            magic, flags, cmd, cookie, offset, length = wire.EXTENDED_REQUEST.unpack(header)
            if magic != NBD_EXTENDED_REQUEST_MAGIC:
                self._fail(f"bad extended request magic {magic:#x}")
        else:
            magic, flags, cmd, cookie, offset, length = wire.REQUEST.unpack(header)
            if magic != NBD_REQUEST_MAGIC:
                self._fail(f"bad request magic {magic:#x}")

        # How many payload bytes follow the header: WRITE always carries its length; with
        # extended headers PAYLOAD_LEN says the length field is a payload for any command.
        payload_len = 0
        if cmd == Cmd.WRITE or (ext and flags & CmdFlag.PAYLOAD_LEN):
            payload_len = length
        elif cmd == Cmd.X_NBDGW_CLEAR and self.neg.clear and not ext:
            # The extension's command always carries its payload, like WRITE.
            payload_len = length
        if cmd == Cmd.DISC:
            self._move("disc")
            self._events.append(Disconnect("disc"))
            return
        if payload_len > self.max_payload:
            if payload_len > _MAX_DRAIN:
                self._fail(f"request payload of {payload_len} bytes")
            yield from self._drain(payload_len)
            self._reject(cookie, offset, Errno.EOVERFLOW, "payload exceeds the maximum")
            return
        data: bytearray | None = None
        if payload_len:
            data = yield from self._read_payload(payload_len)
        elif cmd == Cmd.WRITE:
            data = bytearray()  # a zero-length WRITE still has a (empty) payload
        self.in_flight += 1
        assert self.export is not None
        req = self._validate(cookie, cmd, flags, offset, length, data)
        if req is not None:
            self._events.append(req)

    def _reject(self, cookie: int, offset: int, errno: Errno, message: str) -> None:
        self._queue_error(cookie, offset, errno, message)

    def _validate(
        self, cookie: int, cmd: int, flags: int, offset: int, length: int, data: bytearray | None
    ) -> Request | None:
        export = self.export
        assert export is not None
        tflags = self.transmission_flags

        def reject(errno: Errno, message: str) -> None:
            self.in_flight -= 1
            self._reject(cookie, offset, errno, message)

        try:
            command = Cmd(cmd)
        except ValueError:
            reject(Errno.EINVAL, f"unknown command {cmd}")
            return None
        if command == Cmd.RESIZE:
            reject(Errno.EINVAL, "NBD_CMD_RESIZE is not supported")
            return None
        if command == Cmd.X_NBDGW_CLEAR:
            return self._validate_clear(cookie, flags, offset, data, reject)
        if command == Cmd.X_NBDGW_POSITION:
            return self._validate_position(cookie, flags, offset, length, data, reject)
        if flags & ~_ALL_CMD_FLAGS:
            reject(Errno.EINVAL, f"unknown command flags {flags:#x}")
            return None
        fl = CmdFlag(flags)
        allowed = CmdFlag(0)
        if TransmissionFlag.SEND_FUA in tflags:
            allowed |= CmdFlag.FUA
        if self.neg.extended:
            allowed |= CmdFlag.PAYLOAD_LEN
        if command == Cmd.READ and self.neg.structured:
            allowed |= CmdFlag.DF
        elif command == Cmd.WRITE_ZEROES:
            allowed |= CmdFlag.NO_HOLE
            if TransmissionFlag.SEND_FAST_ZERO in tflags:
                allowed |= CmdFlag.FAST_ZERO
        elif command == Cmd.BLOCK_STATUS:
            allowed |= CmdFlag.REQ_ONE
        if flags & ~int(allowed):
            bad = flags & ~int(allowed)
            reject(Errno.EINVAL, f"flags {bad:#x} not valid for {command.name}")
            return None

        contexts: tuple[tuple[int, str], ...] = ()
        if command == Cmd.BLOCK_STATUS:
            if not self.neg.meta_contexts:
                reject(Errno.EINVAL, "no metadata context was negotiated")
                return None
            if data is not None:
                # The filter payload: effect length and the subset of context ids wanted.
                if TransmissionFlag.BLOCK_STATUS_PAYLOAD not in tflags:
                    reject(Errno.EINVAL, "block status payload not negotiated")
                    return None
                try:
                    length, ids = wire.decode_block_status_payload(memoryview(data))
                except wire.WireError as exc:
                    reject(Errno.EINVAL, str(exc))
                    return None
                if not ids or len(set(ids)) != len(ids):
                    reject(Errno.EINVAL, "empty or duplicate context ids in the filter")
                    return None
                if any(i not in self.neg.meta_contexts for i in ids):
                    reject(Errno.EINVAL, "unknown context id in the filter")
                    return None
                contexts = tuple((i, self.neg.meta_contexts[i]) for i in ids)
                data = None
            else:
                contexts = tuple(self.neg.meta_contexts.items())
        elif data is not None and command != Cmd.WRITE:
            reject(Errno.EINVAL, f"{command.name} carries no payload")
            return None

        writes = (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
        if command in writes and TransmissionFlag.READ_ONLY in tflags:
            reject(Errno.EPERM, "the export is read-only")
            return None
        if command == Cmd.FLUSH:
            if offset or length:
                reject(Errno.EINVAL, "NBD_CMD_FLUSH needs offset and length 0")
                return None
        elif offset > export.size or length > export.size - offset:
            errno = Errno.ENOSPC if command in (Cmd.WRITE, Cmd.WRITE_ZEROES) else Errno.EINVAL
            reject(errno, f"range {offset}+{length} is outside the {export.size}-byte export")
            return None
        if command == Cmd.READ and length > self.max_payload:
            reject(Errno.EOVERFLOW if CmdFlag.DF in fl else Errno.EINVAL, "read too large")
            return None
        if command == Cmd.BLOCK_STATUS and length == 0:
            reject(Errno.EINVAL, "block status of length 0")
            return None
        if command == Cmd.TRIM and TransmissionFlag.SEND_TRIM not in tflags:
            reject(Errno.EINVAL, "trim not supported")
            return None
        if CmdFlag.FAST_ZERO in fl and CmdFlag.NO_HOLE in fl:
            # Zeroing without a hole may mean writing zeroes, no faster than the client
            # writing them: the spec has a FAST_ZERO that cannot be fast fail with ENOTSUP,
            # before anything is changed. (Whether a hole is fast is the export's to say:
            # SEND_FAST_ZERO is only in its flags when it is, and the I/O layer refuses one
            # that turns out not to be, e.g. after a failed punch.)
            reject(Errno.ENOTSUP, "zeroing without a hole would not be fast")
            return None
        return Request(cookie, command, fl, offset, length, data, contexts)

    def _validate_clear(
        self,
        cookie: int,
        flags: int,
        offset: int,
        data: bytearray | None,
        reject: Callable[[Errno, str], None],
    ) -> Request | None:
        """NBD_CMD_X_NBDGW_CLEAR: only after the option, payload (length, context id), a
        negotiated dirty bitmap context, a range inside the export."""
        export = self.export
        assert export is not None
        if not self.neg.clear:
            reject(Errno.EINVAL, "NBD_CMD_X_NBDGW_CLEAR without NBD_OPT_X_NBDGW_CLEAR")
            return None
        allowed = CmdFlag.PAYLOAD_LEN if self.neg.extended else 0
        if TransmissionFlag.SEND_FUA in self.transmission_flags:
            allowed |= CmdFlag.FUA
        if flags & ~int(allowed) or (self.neg.extended and not flags & CmdFlag.PAYLOAD_LEN):
            reject(Errno.EINVAL, f"flags {flags:#x} not valid for NBD_CMD_X_NBDGW_CLEAR")
            return None
        try:
            clear = clear_ext.decode_clear_payload(
                data if data is not None else b"", since=self.neg.clear_since
            )
        except wire.WireError as exc:
            reject(Errno.EINVAL, str(exc))
            return None
        name = self.neg.meta_contexts.get(clear.context_id)
        if name is None:
            reject(Errno.EINVAL, f"context id {clear.context_id} was not negotiated")
            return None
        if not name.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
            reject(Errno.EINVAL, f"{name} is not a dirty bitmap")
            return None
        if name not in export.contexts:
            # Negotiated contexts come from the export, so only a catalog that changed under
            # a connection gets here; the export's list is the one that counts.
            reject(Errno.EINVAL, f"{name} is not exported")
            return None
        if offset > export.size or clear.length > export.size - offset:
            reject(Errno.EINVAL, f"range {offset}+{clear.length} is outside the export")
            return None
        fl = CmdFlag(flags & ~CmdFlag.PAYLOAD_LEN)
        ctx = ((clear.context_id, name),)
        return Request(cookie, Cmd.X_NBDGW_CLEAR, fl, offset, clear.length, None, ctx, clear.since)

    def _validate_position(
        self,
        cookie: int,
        flags: int,
        offset: int,
        length: int,
        data: bytearray | None,
        reject: Callable[[Errno, str], None],
    ) -> Request | None:
        """NBD_CMD_X_NBDGW_POSITION: only with F_SINCE, no flags, offset and length 0, no
        payload; it answers for every negotiated dirty bitmap, of which there must be one."""
        if not self.neg.clear_since:
            reject(Errno.EINVAL, "NBD_CMD_X_NBDGW_POSITION without NBD_X_NBDGW_CLEAR_F_SINCE")
            return None
        if flags or offset or length or data is not None:
            reject(Errno.EINVAL, "NBD_CMD_X_NBDGW_POSITION takes no flags, range or payload")
            return None
        contexts = tuple(
            (cid, name)
            for cid, name in self.neg.meta_contexts.items()
            if name.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
        )
        if not contexts:
            reject(Errno.EINVAL, "no dirty bitmap context was negotiated")
            return None
        return Request(cookie, Cmd.X_NBDGW_POSITION, CmdFlag(0), 0, 0, None, contexts)


def _u64(values: Sequence[int] | array[int]) -> array[int]:
    """``values`` as a fresh ``array("Q")``, copied at C speed when they already are 64-bit."""
    if isinstance(values, array) and values.itemsize == 8:
        out = array("Q")
        out.frombytes(values.tobytes())
        return out
    return array("Q", values)


def _is_wildcard(query: str) -> bool:
    """``base:``, ``qemu:`` and ``qemu:dirty-bitmap:`` list every context below them."""
    return query.endswith(":") and query in (
        "base:",
        "qemu:",
        CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    )
