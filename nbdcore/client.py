"""The client side of an NBD connection, sans I/O: bytes in, events out.

:class:`ClientConnection` holds no socket. The I/O layer feeds it what the server sent
(:meth:`~ClientConnection.receive_data`, :meth:`~ClientConnection.receive_eof`, or the zero-copy
pair :meth:`~ClientConnection.get_buffer` / :meth:`~ClientConnection.buffer_filled`), collects
:meth:`~ClientConnection.events_received` and writes :meth:`~ClientConnection.data_to_send`.
Policy (which options to try, fallbacks, timeouts) lives above it, in ``nbdcore.aio.client``.

States and what moves between them. Calls and replies move the state only through the
``_TRANSITIONS`` table; EOF and protocol violations end any state::

    state            event / call                       next state
    ---------------  ---------------------------------  -----------------------------
    GREETING         newstyle greeting received          NEGOTIATING (client flags sent)
    NEGOTIATING      send_option(...)                    OPTION_SENT
    OPTION_SENT      final reply (ACK or error)          NEGOTIATING
    OPTION_SENT      ACK to STARTTLS                     TLS_UPGRADE
    OPTION_SENT      ACK to GO / EXPORT_NAME reply       TRANSMISSION
    OPTION_SENT      ACK to ABORT, or EOF after ABORT    CLOSED
    TLS_UPGRADE      tls_established()                   NEGOTIATING (negotiated state wiped)
    TRANSMISSION     send_disc()                         DISCONNECTING
    DISCONNECTING    EOF                                 CLOSED
    any              server breaks the protocol          FAILED (ServerProtocolError raised)
    any              EOF elsewhere                       CLOSED (ConnectionClosed event)

Parsing is one generator per phase, primed once and resumed whenever bytes arrive: it reads
messages top to bottom (``yield from self._read_exact(n)``). Every length the server claims is
checked against what the request allows before anything is allocated, so a hostile server cannot
make us buffer more than one bounded message.
"""

from __future__ import annotations

import enum
import struct
from array import array
from collections.abc import Generator, Sequence
from itertools import pairwise
from typing import Final

from nbdcore import clear_ext, wire
from nbdcore._record import Frozen
from nbdcore.constants import (
    CLISERV_MAGIC,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    DEFAULT_MAX_PAYLOAD,
    IHAVEOPT,
    MAX_EXTENTS_PER_CHUNK,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_MAX_STRING,
    NBD_REP_FLAG_ERROR,
    NBD_REP_MAGIC,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_ERROR_BIT,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STRUCTURED_REPLY_MAGIC,
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
    RequestError,
    ServerProtocolError,
    UnsupportedServerError,
    UsageError,
)
from nbdcore.wire import BlockSize, WireError

__all__ = [
    "BlockStatusResult",
    "ClientConnection",
    "ClientState",
    "ConnectionClosed",
    "ExportReady",
    "ExportsListed",
    "Greeting",
    "InfoReceived",
    "MetaContextsListed",
    "OptionAcked",
    "OptionFailed",
    "Reply",
]

# Caps on what the server may claim, checked before anything is allocated.
MAX_OPTION_REPLY: Final = 4 + 2 * NBD_MAX_STRING + 64  # the longest legal reply (SERVER) + slack
MAX_OPTION_REPLIES_TOTAL: Final = 16 * 1024 * 1024  # all the replies to one LIST, INFO...
MAX_ERROR_CHUNK: Final = 6 + NBD_MAX_STRING + 8
MAX_COMPACT_STATUS_CHUNK: Final = 4 + 8 * MAX_EXTENTS_PER_CHUNK
MAX_EXTENDED_STATUS_CHUNK: Final = 8 + 16 * MAX_EXTENTS_PER_CHUNK
MAX_COMPACT_LENGTH: Final = 0xFFFFFFFF
MIN_CONTENT_CHUNKS: Final = 64  # what any READ may be split into, however short
# The READ size for moving a disk's bytes (``nbd copy``, the gateway's data streams): what costs
# qemu-nbd 7.2 the least CPU per byte, and us too (fewer requests than 512 KiB). Not 1 MiB: each
# BLOCK_STATUS makes qemu-nbd 7.2 calloc and free a 1 MiB extent array, which sets glibc's mmap
# threshold just above 1 MiB, and a 1 MiB READ buffer (1 MiB plus its alignment) lands above it:
# from a fresh qemu-nbd, a new mmap per read, 220-235K page faults and 1.4-1.6 s of its CPU per
# 2 GiB; 1020 KiB had none, 960 KiB keeps a margin (bench/results/2026-12-07/copy/,
# docs/benchmarks.md). Servers with a smaller maximum payload get theirs.
BULK_READ: Final = 960 << 10
# Plain ints for the per-chunk paths: ``int & IntFlag`` goes through enum's __rand__.
_FLAG_DF: Final = int(CmdFlag.DF)


def max_content_chunks(length: int) -> int:
    """The most DATA/HOLE chunks accepted for a READ of ``length`` bytes: the spec asks for
    512-aligned chunks where possible, which gives at most length // 512 + 2."""
    return max(MIN_CONTENT_CHUNKS, length // 512 + 2)


class ClientState(enum.Enum):
    GREETING = "GREETING"
    NEGOTIATING = "NEGOTIATING"
    OPTION_SENT = "OPTION_SENT"
    TLS_UPGRADE = "TLS_UPGRADE"
    TRANSMISSION = "TRANSMISSION"
    DISCONNECTING = "DISCONNECTING"
    CLOSED = "CLOSED"
    FAILED = "FAILED"


S = ClientState

# (state, trigger) -> next state. Triggers are method or event names.
_TRANSITIONS: Final[dict[tuple[ClientState, str], ClientState]] = {
    (S.GREETING, "greeting"): S.NEGOTIATING,
    (S.NEGOTIATING, "send_option"): S.OPTION_SENT,
    (S.OPTION_SENT, "option_done"): S.NEGOTIATING,
    (S.OPTION_SENT, "starttls_acked"): S.TLS_UPGRADE,
    (S.OPTION_SENT, "export_ready"): S.TRANSMISSION,
    (S.OPTION_SENT, "abort_done"): S.CLOSED,
    (S.TLS_UPGRADE, "tls_established"): S.NEGOTIATING,
    (S.TRANSMISSION, "send_disc"): S.DISCONNECTING,
}


# --- Events ------------------------------------------------------------------------------------
# Immutable records (nbdcore/_record.py): Final for mypy, frozen at run time.


class Greeting(Frozen):
    """The server's newstyle greeting; the client flags are already queued in reply."""

    __slots__ = ("handshake_flags",)
    handshake_flags: Final[HandshakeFlag]

    def __init__(self, handshake_flags: HandshakeFlag) -> None:
        self.handshake_flags = handshake_flags


class OptionAcked(Frozen):
    """NBD_REP_ACK to an option with no other result (STRUCTURED_REPLY, STARTTLS...)."""

    __slots__ = ("option",)
    option: Final[int]

    def __init__(self, option: int) -> None:
        self.option = option


class SnapshotResult(Frozen):
    """The JSON result of NBD_OPT_X_NBDGW_SNAPSHOT (docs/extension-snapshot.md), undecoded."""

    __slots__ = ("option", "result")
    option: Final[int]
    result: Final[bytes]

    def __init__(self, option: int, result: bytes) -> None:
        self.option = option
        self.result = result


class OptionFailed(Frozen):
    """The server answered the option with an NBD_REP_ERR_* reply."""

    __slots__ = ("code", "message", "option")
    option: Final[int]
    code: Final[int]
    message: Final[str]

    def __init__(self, option: int, code: int, message: str) -> None:
        self.option = option
        self.code = code
        self.message = message

    def error(self) -> OptionError:
        return OptionError(self.option, self.code, self.message)


class ExportsListed(Frozen):
    """Complete answer to NBD_OPT_LIST: (name, description) pairs."""

    __slots__ = ("exports",)
    exports: Final[tuple[tuple[str, str], ...]]

    def __init__(self, exports: tuple[tuple[str, str], ...]) -> None:
        self.exports = exports


class MetaContextsListed(Frozen):
    """Complete answer to LIST_META_CONTEXT or SET_META_CONTEXT: (name, id) pairs."""

    __slots__ = ("contexts", "option")
    option: Final[int]
    contexts: Final[tuple[tuple[str, int], ...]]

    def __init__(self, option: int, contexts: tuple[tuple[str, int], ...]) -> None:
        self.option = option
        self.contexts = contexts


class InfoReceived(Frozen):
    """Complete successful answer to NBD_OPT_INFO (the connection stays in negotiation)."""

    __slots__ = ("block_size", "description", "flags", "name", "option", "size")
    option: Final[int]
    name: Final[str | None]
    description: Final[str | None]
    size: Final[int]
    flags: Final[TransmissionFlag]
    block_size: Final[BlockSize | None]

    def __init__(
        self,
        option: int,
        name: str | None,
        description: str | None,
        size: int,
        flags: TransmissionFlag,
        block_size: BlockSize | None,
    ) -> None:
        self.option = option
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.block_size = block_size


class ExportReady(Frozen):
    """GO succeeded (or EXPORT_NAME was answered): transmission starts."""

    __slots__ = ("block_size", "description", "flags", "name", "option", "size")
    option: Final[int]
    name: Final[str | None]
    description: Final[str | None]
    size: Final[int]
    flags: Final[TransmissionFlag]
    block_size: Final[BlockSize | None]

    def __init__(
        self,
        option: int,
        name: str | None,
        description: str | None,
        size: int,
        flags: TransmissionFlag,
        block_size: BlockSize | None,
    ) -> None:
        self.option = option
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags
        self.block_size = block_size


class BlockStatusResult(Frozen):
    """Extents of one context: consecutive from the request offset."""

    __slots__ = ("context_id", "flags", "lengths")
    context_id: Final[int]
    lengths: Final[array[int]]
    flags: Final[array[int]]

    def __init__(self, context_id: int, lengths: array[int], flags: array[int]) -> None:
        self.context_id = context_id
        self.lengths = lengths
        self.flags = flags


class Reply(Frozen):
    """The request ``cookie`` is complete (final chunk or simple reply received).

    ``error`` is set when the server reported a failure. ``data`` is the buffer a READ filled;
    ``extents`` maps context id to its answer for BLOCK_STATUS; ``cleared`` is the answer to
    X_NBDGW_CLEAR (checked: only whole granules inside the request), and ``kept`` that of a
    conditional one; ``positions`` is the answer to X_NBDGW_POSITION, by context id.
    """

    __slots__ = ("cleared", "command", "cookie", "data", "error", "extents", "kept", "positions")
    cookie: Final[int]
    command: Final[Cmd]
    error: Final[RequestError | None]
    data: Final[memoryview | None]
    extents: Final[dict[int, BlockStatusResult] | None]
    cleared: Final[clear_ext.Cleared | None]
    kept: Final[clear_ext.Cleared | None]
    positions: Final[dict[int, clear_ext.Position] | None]

    def __init__(
        self,
        cookie: int,
        command: Cmd,
        error: RequestError | None = None,
        data: memoryview | None = None,
        extents: dict[int, BlockStatusResult] | None = None,
        cleared: clear_ext.Cleared | None = None,
        kept: clear_ext.Cleared | None = None,
        positions: dict[int, clear_ext.Position] | None = None,
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.error = error
        self.data = data
        self.extents = extents
        self.cleared = cleared
        self.kept = kept
        self.positions = positions


class ConnectionClosed(Frozen):
    """The server closed the connection (EOF). ``expected`` is False when something was
    still pending: the I/O layer fails the waiters with ConnectionLostError."""

    __slots__ = ("expected",)
    expected: Final[bool]

    def __init__(self, expected: bool) -> None:
        self.expected = expected


Event = (
    Greeting
    | OptionAcked
    | OptionFailed
    | ExportsListed
    | MetaContextsListed
    | InfoReceived
    | ExportReady
    | Reply
    | ConnectionClosed
    | SnapshotResult
)


# --- Requests in flight --------------------------------------------------------------------------


class _Request:
    __slots__ = (
        "buffer",
        "chunks",
        "cleared",
        "command",
        "context_ids",
        "cookie",
        "covered",
        "ends",
        "error",
        "extents",
        "flags",
        "in_order",
        "kept",
        "length",
        "offset",
        "positions",
        "since",
        "starts",
    )

    def __init__(
        self,
        cookie: int,
        command: Cmd,
        flags: int,
        offset: int,
        length: int,
        buffer: memoryview | None = None,
        context_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.cookie = cookie
        self.command = command
        self.flags = flags
        self.offset = offset
        self.length = length
        self.buffer = buffer  # READ destination
        self.context_ids = context_ids  # BLOCK_STATUS: contexts that must answer
        # READ coverage: [start, end) ranges relative to the request offset, in arrival order;
        # ``in_order`` while each started at or after the previous end (else sorted at the end).
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.in_order = True
        self.covered = 0
        self.error: RequestError | None = None
        self.extents: dict[int, BlockStatusResult] = {}
        self.chunks = 0
        self.cleared: clear_ext.Cleared | None = None  # X_NBDGW_CLEAR answer
        self.since = False  # a conditional X_NBDGW_CLEAR: a kept chunk must follow
        self.kept: clear_ext.Cleared | None = None
        self.positions: dict[int, clear_ext.Position] = {}


class _PendingOption:
    __slots__ = (
        "block_size",
        "contexts",
        "description",
        "export",
        "export_info",
        "features",
        "name",
        "option",
        "received",
        "results",
        "servers",
    )

    def __init__(self, option: int, export: str = "") -> None:
        self.option = option
        self.export = export
        self.servers: list[tuple[str, str]] = []
        self.contexts: list[tuple[str, int]] = []
        self.name: str | None = None
        self.description: str | None = None
        self.export_info: tuple[int, int] | None = None
        self.block_size: BlockSize | None = None
        self.received = 0  # bytes of replies so far, capped by MAX_OPTION_REPLIES_TOTAL
        self.results: list[bytes] = []  # NBD_REP_X_NBDGW_SNAPSHOT payloads
        self.features = 0  # NBD_OPT_X_NBDGW_CLEAR: the features asked for


_ZEROES: Final = bytes(1 << 20)


def _zero_fill(view: memoryview) -> None:
    n = len(view)
    pos = 0
    while pos < n:
        step = min(n - pos, len(_ZEROES))
        view[pos : pos + step] = _ZEROES[:step]
        pos += step


class ClientConnection:
    """Sans-I/O NBD client connection (one socket's worth of protocol state)."""

    def __init__(self) -> None:
        self.state = ClientState.GREETING
        self.handshake_flags = HandshakeFlag(0)
        self.structured_replies = False
        self.extended_headers = False
        # NBD_OPT_X_NBDGW_CLEAR acknowledged (docs/extension-clear.md), with F_SINCE.
        self.clear_extension = False
        self.clear_since = False
        # After SET_META_CONTEXT: name -> id; valid for the export the SET named.
        self.meta_contexts: dict[str, int] = {}
        self._meta_export: str | None = None
        self.export_name: str | None = None
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.block_size: BlockSize | None = None
        self._block_size_requested = False

        self._events: list[Event] = []
        self._out: list[bytes | memoryview] = []
        self._buf = bytearray()
        self._target: memoryview | None = None  # zero-copy destination being filled
        self._eof = False
        self._error: ServerProtocolError | None = None
        self._pending: _PendingOption | None = None
        self._requests: dict[int, _Request] = {}
        # Hints that let the I/O layer size its reads: READ requests in flight, and how many
        # more bytes the message being parsed needs (0: at a message boundary).
        self.reads_in_flight = 0
        self.bytes_wanted = 0
        self._next_cookie = 1
        self._parser: Generator[None, None, None] = self._parse_greeting()
        next(self._parser)

    # --- state --------------------------------------------------------------------------------

    def _transition(self, trigger: str) -> None:
        try:
            self.state = _TRANSITIONS[self.state, trigger]
        except KeyError:
            raise UsageError(f"cannot {trigger} in state {self.state.name}") from None

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    @property
    def max_payload(self) -> int:
        """Largest READ/WRITE payload the server accepts."""
        if self.block_size is not None and self.block_size.maximum != 0xFFFFFFFF:
            return min(self.block_size.maximum, DEFAULT_MAX_PAYLOAD)
        return DEFAULT_MAX_PAYLOAD

    @property
    def min_block(self) -> int:
        if self.block_size is not None and self._block_size_requested:
            return max(self.block_size.minimum, 1)
        return 1

    # --- I/O surface ----------------------------------------------------------------------------

    def events_received(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes | memoryview]:
        out, self._out = self._out, []
        return out

    def get_buffer(self) -> memoryview | None:
        """Where the next bytes from the socket should go when the parser waits for a bulk
        payload (READ data): the I/O layer reads straight into it and calls
        :meth:`buffer_filled`. None means "use receive_data"."""
        target = self._target
        if target is not None and len(target) and not self._buf:
            return target
        return None

    def buffer_filled(self, n: int) -> bool:
        """``n`` bytes were written at the start of the view :meth:`get_buffer` returned.
        Returns False when the payload is still incomplete: no event can have been produced,
        so the I/O layer may skip looking (the common case while a large READ streams in)."""
        assert self._target is not None and 0 < n <= len(self._target)
        target = self._target[n:]
        self._target = target
        if len(target):
            return False
        self._run()
        return True

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if self.state is ClientState.CLOSED:
            return
        target = self._target
        if target is not None and len(target) and not self._buf:
            k = min(len(target), len(data))
            target[:k] = data[:k]
            self._target = target[k:]
            data = data[k:]
        if len(data):
            self._buf += data
        self._run()

    def receive_eof(self) -> None:
        if self._eof or self._error is not None:
            return
        self._eof = True
        state = self.state
        if state is ClientState.OPTION_SENT and self._pending and self._pending.option == Opt.ABORT:
            # The spec lets a server close instead of acknowledging ABORT.
            self._pending = None
            self.state = ClientState.CLOSED
            self._events.append(OptionAcked(Opt.ABORT))
            self._events.append(ConnectionClosed(expected=True))
            return
        expected = state is ClientState.CLOSED or (
            state is ClientState.DISCONNECTING and not self._requests
        )
        expected = expected or (
            state in (ClientState.NEGOTIATING, ClientState.TRANSMISSION) and not self._requests
        )
        self.state = ClientState.CLOSED
        self._pending = None
        self._events.append(ConnectionClosed(expected=expected))

    def tls_established(self) -> None:
        """The I/O layer finished the TLS handshake after STARTTLS: negotiation restarts and
        everything negotiated before TLS is forgotten, as the spec requires."""
        self._transition("tls_established")
        self.structured_replies = False
        self.extended_headers = False
        self.clear_extension = False
        self.clear_since = False
        self.meta_contexts = {}
        self._meta_export = None

    def _run(self) -> None:
        try:
            next(self._parser)
        except StopIteration:
            pass
        except ServerProtocolError as exc:
            self._fail(exc)
        except (WireError, struct.error, UnicodeDecodeError, ValueError) as exc:
            self._fail(ServerProtocolError(str(exc)))
        except UnsupportedServerError:
            self.state = ClientState.FAILED
            raise

    def _fail(self, exc: ServerProtocolError) -> None:
        self.state = ClientState.FAILED
        self._error = exc
        self._target = None
        raise exc

    # --- readers used by the parser generators -----------------------------------------------

    def _read_exact(self, n: int) -> Generator[None, None, bytes]:
        if len(self._buf) < n:
            self.bytes_wanted = n - len(self._buf)
            while len(self._buf) < n:
                yield
            self.bytes_wanted = 0
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _read_into(self, view: memoryview) -> Generator[None, None, None]:
        k = min(len(view), len(self._buf))
        if k:
            view[:k] = self._buf[:k]
            del self._buf[:k]
        if k < len(view):
            self._target = view[k:]
            while len(self._target):
                if self._buf:
                    # receive_data only appends to _buf once the target is full, but keep
                    # the invariant explicit.
                    k = min(len(self._target), len(self._buf))
                    self._target[:k] = self._buf[:k]
                    del self._buf[:k]
                    self._target = self._target[k:]
                    continue
                yield
            self._target = None

    def _skip(self, n: int) -> Generator[None, None, None]:
        while n:
            while not self._buf:
                yield
            k = min(n, len(self._buf))
            del self._buf[:k]
            n -= k

    # --- handshake --------------------------------------------------------------------------------

    def _parse_greeting(self) -> Generator[None, None, None]:
        head = yield from self._read_exact(16)
        magic, second = struct.unpack(">QQ", head)
        if magic != NBDMAGIC:
            raise ServerProtocolError(f"bad greeting magic {magic:#x} (not an NBD server?)")
        if second == CLISERV_MAGIC:
            raise UnsupportedServerError(
                "the server speaks the oldstyle handshake, which has no options; only fixed "
                "newstyle servers are supported"
            )
        if second != IHAVEOPT:
            raise ServerProtocolError(f"bad greeting magic {second:#x} after NBDMAGIC")
        (hflags,) = struct.unpack(">H", (yield from self._read_exact(2)))
        flags = HandshakeFlag(hflags)
        if not flags & HandshakeFlag.FIXED_NEWSTYLE:
            raise UnsupportedServerError(
                "the server does not offer fixed newstyle negotiation; it is not supported"
            )
        self.handshake_flags = flags
        cflags = ClientFlag.C_FIXED_NEWSTYLE
        if flags & HandshakeFlag.NO_ZEROES:
            cflags |= ClientFlag.C_NO_ZEROES
        self._out.append(wire.CLIENT_FLAGS.pack(cflags))
        self._transition("greeting")
        self._events.append(Greeting(flags))
        yield from self._parse_option_replies()

    def send_option(self, option: int, payload: bytes = b"", *, export: str = "") -> None:
        """Send any option (the typed helpers below are preferred)."""
        self._transition("send_option")
        self._pending = _PendingOption(int(option), export)
        self._out.append(wire.encode_option(option, payload))

    def send_go(self, export: str = "", *, info: bool = False, block_size: bool = True) -> None:
        """NBD_OPT_GO (or NBD_OPT_INFO with ``info=True``) asking for NAME, DESCRIPTION and,
        when ``block_size``, BLOCK_SIZE (then the client MUST obey the limits)."""
        infos: list[int] = [Info.NAME, Info.DESCRIPTION]
        if block_size:
            infos.append(Info.BLOCK_SIZE)
        payload = wire.encode_info_request(export, infos)
        self.send_option(Opt.INFO if info else Opt.GO, payload, export=export)
        if not info:
            self._block_size_requested = block_size

    def send_export_name(self, export: str = "") -> None:
        if self.extended_headers:
            raise UsageError("NBD_OPT_EXPORT_NAME is forbidden after extended headers")
        self.send_option(Opt.EXPORT_NAME, wire.encode_string(export), export=export)
        self._block_size_requested = False

    def send_list(self) -> None:
        self.send_option(Opt.LIST)

    def send_starttls(self) -> None:
        self.send_option(Opt.STARTTLS)

    def send_structured_reply(self) -> None:
        self.send_option(Opt.STRUCTURED_REPLY)

    def send_extended_headers(self) -> None:
        self.send_option(Opt.EXTENDED_HEADERS)

    def send_x_nbdgw_clear(self, features: int = 0) -> None:
        """NBD_OPT_X_NBDGW_CLEAR (after structured replies or extended headers): ACK turns on
        ``clear_extension`` (and ``clear_since`` when ``features`` has F_SINCE); servers
        without the extension answer ERR_UNSUP, servers without a feature ERR_INVALID."""
        if not (self.structured_replies or self.extended_headers):
            raise UsageError("NBD_OPT_X_NBDGW_CLEAR needs structured replies first")
        self.send_option(Opt.X_NBDGW_CLEAR, clear_ext.encode_features(features))
        assert self._pending is not None
        self._pending.features = features

    def send_abort(self) -> None:
        self.send_option(Opt.ABORT)

    def send_list_meta_context(self, export: str, queries: Sequence[str] = ()) -> None:
        payload = wire.encode_meta_context_request(export, list(queries))
        self.send_option(Opt.LIST_META_CONTEXT, payload, export=export)

    def send_set_meta_context(self, export: str, queries: Sequence[str]) -> None:
        payload = wire.encode_meta_context_request(export, list(queries))
        self.send_option(Opt.SET_META_CONTEXT, payload, export=export)

    def _parse_option_replies(self) -> Generator[None, None, None]:
        while True:
            if self.state is ClientState.TRANSMISSION:
                yield from self._parse_transmission()
                return
            if self.state is ClientState.TLS_UPGRADE:
                # The server speaks TLS next; nothing in clear text may follow the ACK.
                if self._buf:
                    raise ServerProtocolError("data after the STARTTLS acknowledgement")
                while self.state is ClientState.TLS_UPGRADE:
                    if self._buf:
                        raise ServerProtocolError("data during the TLS upgrade")
                    yield
                continue
            if self.state is not ClientState.OPTION_SENT:
                if self._buf:
                    raise ServerProtocolError(
                        f"{len(self._buf)} unsolicited bytes while no option is pending"
                    )
                yield
                continue
            pending = self._pending
            assert pending is not None
            if pending.option == Opt.EXPORT_NAME:
                yield from self._parse_export_name_reply(pending)
                continue
            head = yield from self._read_exact(wire.OPTION_REPLY_HEADER.size)
            magic, option, rtype, length = wire.OPTION_REPLY_HEADER.unpack(head)
            if magic != NBD_REP_MAGIC:
                raise ServerProtocolError(f"bad option reply magic {magic:#x}")
            if option != pending.option:
                raise ServerProtocolError(
                    f"reply for option {option} while option {pending.option} is pending"
                )
            if length > MAX_OPTION_REPLY:
                raise ServerProtocolError(f"option reply of {length} bytes is implausibly long")
            pending.received += wire.OPTION_REPLY_HEADER.size + length
            if pending.received > MAX_OPTION_REPLIES_TOTAL:
                raise ServerProtocolError(
                    f"more than {MAX_OPTION_REPLIES_TOTAL} bytes of replies to one option"
                )
            payload = yield from self._read_exact(length)
            self._option_reply(pending, rtype, payload)

    def _parse_export_name_reply(self, pending: _PendingOption) -> Generator[None, None, None]:
        head = yield from self._read_exact(wire.EXPORT_NAME_REPLY.size)
        size, tflags = wire.EXPORT_NAME_REPLY.unpack(head)
        if not self.handshake_flags & HandshakeFlag.NO_ZEROES:
            yield from self._skip(wire.EXPORT_NAME_REPLY_ZEROES)
        pending.export_info = (size, tflags)
        self._enter_transmission(pending)

    def _option_reply(self, pending: _PendingOption, rtype: int, payload: bytes) -> None:
        option = pending.option
        if rtype & NBD_REP_FLAG_ERROR:
            message = wire.decode_string(payload[:NBD_MAX_STRING], "error message")
            self._pending = None
            self._transition("option_done")
            if option == Opt.SET_META_CONTEXT:
                # A failed SET still replaces the active set (with nothing).
                self.meta_contexts = {}
                self._meta_export = None
            self._events.append(OptionFailed(option, rtype, message))
            return
        if rtype == Rep.ACK:
            if payload:
                raise ServerProtocolError("NBD_REP_ACK with a payload")
            self._option_acked(pending)
            return
        if rtype == Rep.SERVER and option == Opt.LIST:
            pending.servers.append(wire.decode_rep_server(payload))
        elif rtype == Rep.INFO and option in (Opt.INFO, Opt.GO):
            kind, value = wire.decode_info(payload)
            if kind == Info.EXPORT:
                assert isinstance(value, tuple)
                pending.export_info = value
            elif kind == Info.NAME:
                assert isinstance(value, str)
                pending.name = value
            elif kind == Info.DESCRIPTION:
                assert isinstance(value, str)
                pending.description = value
            elif kind == Info.BLOCK_SIZE:
                assert isinstance(value, BlockSize)
                _check_block_size(value)
                pending.block_size = value
            # Unknown info types are ignored, as the spec says.
        elif rtype == Rep.META_CONTEXT and option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            cid, name = wire.decode_rep_meta_context(payload)
            if option == Opt.SET_META_CONTEXT:
                if any(c == cid for _, c in pending.contexts):
                    raise ServerProtocolError(f"context id {cid} given to two contexts")
                if any(n == name for n, _ in pending.contexts):
                    raise ServerProtocolError(f"context {name!r} selected twice")
            pending.contexts.append((name, cid))
        elif rtype == Rep.X_NBDGW_SNAPSHOT and option == Opt.X_NBDGW_SNAPSHOT:
            if pending.results:
                raise ServerProtocolError("two results to NBD_OPT_X_NBDGW_SNAPSHOT")
            pending.results.append(payload)
        else:
            raise ServerProtocolError(
                f"reply type {_rep_name(rtype)} is not a valid answer to option {option}"
            )

    def _option_acked(self, pending: _PendingOption) -> None:
        option = pending.option
        self._pending = None
        if option == Opt.GO:
            self._enter_transmission(pending)
            return
        if option == Opt.STARTTLS:
            self._transition("starttls_acked")
            self._events.append(OptionAcked(option))
            return
        if option == Opt.ABORT:
            self._transition("abort_done")
            self._events.append(OptionAcked(option))
            return
        self._transition("option_done")
        if option == Opt.INFO:
            if pending.export_info is None:
                raise ServerProtocolError("NBD_OPT_INFO acknowledged without NBD_INFO_EXPORT")
            size, tflags = pending.export_info
            self._events.append(
                InfoReceived(
                    option,
                    pending.name,
                    pending.description,
                    size,
                    TransmissionFlag(tflags),
                    pending.block_size,
                )
            )
        elif option == Opt.LIST:
            self._events.append(ExportsListed(tuple(pending.servers)))
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            if option == Opt.SET_META_CONTEXT:
                self.meta_contexts = dict(pending.contexts)
                self._meta_export = pending.export
            self._events.append(MetaContextsListed(option, tuple(pending.contexts)))
        elif option == Opt.X_NBDGW_SNAPSHOT:
            if not pending.results:
                raise ServerProtocolError("NBD_OPT_X_NBDGW_SNAPSHOT acknowledged without a result")
            self._events.append(SnapshotResult(option, pending.results[0]))
        else:
            if option == Opt.STRUCTURED_REPLY:
                self.structured_replies = True
            elif option == Opt.EXTENDED_HEADERS:
                self.extended_headers = True
            elif option == Opt.X_NBDGW_CLEAR:
                self.clear_extension = True
                self.clear_since = bool(pending.features & clear_ext.NBD_X_NBDGW_CLEAR_F_SINCE)
            self._events.append(OptionAcked(option))

    def _enter_transmission(self, pending: _PendingOption) -> None:
        if pending.export_info is None:
            raise ServerProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
        size, tflags = pending.export_info
        flags = TransmissionFlag(tflags)
        if not flags & TransmissionFlag.HAS_FLAGS:
            raise ServerProtocolError(f"transmission flags {tflags:#x} lack NBD_FLAG_HAS_FLAGS")
        if size >= 1 << 63:
            raise ServerProtocolError(f"export size {size} does not fit in a signed 64-bit int")
        self._transition("export_ready")
        self.export_name = pending.export
        self.size = size
        self.flags = flags
        self.block_size = pending.block_size
        if self._meta_export != pending.export:
            # Contexts negotiated for another export do not carry over (qemu forgets them).
            self.meta_contexts = {}
        self._events.append(
            ExportReady(
                pending.option,
                pending.name,
                pending.description,
                size,
                flags,
                pending.block_size,
            )
        )

    # --- transmission: requests -------------------------------------------------------------------

    def _new_request(
        self, command: Cmd, flags: int, offset: int, length: int, *, bounds: bool = True
    ) -> _Request:
        if self.state is not ClientState.TRANSMISSION:
            if self._error is not None:
                raise self._error
            raise UsageError(f"cannot send {command.name} in state {self.state.name}")
        if offset < 0 or length < 0:
            raise UsageError("negative offset or length")
        if bounds and (offset > self.size or length > self.size - offset):
            raise UsageError(
                f"range [{offset}, {offset + length}) is outside the export (size {self.size})"
            )
        if not self.extended_headers and length > MAX_COMPACT_LENGTH:
            raise UsageError(f"length {length} needs extended headers")
        mb = self.min_block
        if mb > 1 and (offset % mb or length % mb):
            raise UsageError(
                f"offset {offset} and length {length} must be multiples of the server's "
                f"minimum block size {mb}"
            )
        cookie = self._next_cookie
        self._next_cookie = (cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        req = _Request(cookie, command, flags, offset, length)
        self._requests[cookie] = req
        return req

    def _header(self, req: _Request, flags: int | None = None, length: int | None = None) -> bytes:
        return wire.encode_request(
            req.flags if flags is None else flags,
            req.command,
            req.cookie,
            req.offset,
            req.length if length is None else length,
            self.extended_headers,
        )

    def _need(self, flag: TransmissionFlag, what: str) -> None:
        if not self.flags & flag:
            raise UsageError(f"the export does not support {what}")

    def _writable(self) -> None:
        if self.flags & TransmissionFlag.READ_ONLY:
            raise UsageError("the export is read-only")

    def _fua(self, fua: bool) -> int:
        if fua:
            self._need(TransmissionFlag.SEND_FUA, "FUA")
            return CmdFlag.FUA
        return 0

    def send_read(
        self, offset: int, length: int, *, buffer: memoryview | None = None, df: bool = False
    ) -> int:
        """Queue NBD_CMD_READ; the data lands in ``buffer`` (allocated if None)."""
        if length > self.max_payload:
            raise UsageError(f"read of {length} bytes exceeds the {self.max_payload}-byte limit")
        flags = 0
        if df:
            self._need(TransmissionFlag.SEND_DF, "DF")
            flags |= CmdFlag.DF
        if buffer is not None:
            buffer = memoryview(buffer).cast("B")
            if len(buffer) != length:
                raise UsageError(f"buffer of {len(buffer)} bytes for a {length}-byte read")
            if buffer.readonly:
                raise UsageError("read buffer is read-only")
        req = self._new_request(Cmd.READ, flags, offset, length)
        req.buffer = buffer if buffer is not None else memoryview(bytearray(length))
        self.reads_in_flight += 1
        self._out.append(self._header(req))
        return req.cookie

    def send_write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> int:
        self._writable()
        view = memoryview(data).cast("B")
        if len(view) > self.max_payload:
            raise UsageError(
                f"write of {len(view)} bytes exceeds the {self.max_payload}-byte limit"
            )
        # Under extended headers the length field is the payload length and PAYLOAD_LEN is
        # optional for WRITE (qemu accepts both), so the header is the same as ever.
        req = self._new_request(Cmd.WRITE, self._fua(fua), offset, len(view))
        self._out.append(self._header(req))
        if len(view):
            self._out.append(view)
        return req.cookie

    def send_flush(self) -> int:
        self._need(TransmissionFlag.SEND_FLUSH, "FLUSH")
        req = self._new_request(Cmd.FLUSH, 0, 0, 0)
        self._out.append(self._header(req))
        return req.cookie

    def send_trim(self, offset: int, length: int, *, fua: bool = False) -> int:
        self._writable()
        self._need(TransmissionFlag.SEND_TRIM, "TRIM")
        req = self._new_request(Cmd.TRIM, self._fua(fua), offset, length)
        self._out.append(self._header(req))
        return req.cookie

    def send_write_zeroes(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> int:
        self._writable()
        self._need(TransmissionFlag.SEND_WRITE_ZEROES, "WRITE_ZEROES")
        flags = self._fua(fua)
        if no_hole:
            flags |= CmdFlag.NO_HOLE
        if fast_zero:
            self._need(TransmissionFlag.SEND_FAST_ZERO, "FAST_ZERO")
            flags |= CmdFlag.FAST_ZERO
        req = self._new_request(Cmd.WRITE_ZEROES, flags, offset, length)
        self._out.append(self._header(req))
        return req.cookie

    def send_cache(self, offset: int, length: int) -> int:
        self._need(TransmissionFlag.SEND_CACHE, "CACHE")
        req = self._new_request(Cmd.CACHE, 0, offset, length)
        self._out.append(self._header(req))
        return req.cookie

    def send_block_status(
        self,
        offset: int,
        length: int,
        *,
        req_one: bool = False,
        context_ids: Sequence[int] | None = None,
    ) -> int:
        """Queue NBD_CMD_BLOCK_STATUS for every negotiated context, or only ``context_ids``
        (sent as the filter payload, which needs extended headers and BLOCK_STATUS_PAYLOAD)."""
        if not self.meta_contexts:
            raise UsageError("no metadata context was negotiated for this export")
        if not self.structured_replies and not self.extended_headers:
            raise UsageError("block status needs structured replies")
        if length == 0:
            raise UsageError("block status of an empty range")
        flags = CmdFlag.REQ_ONE if req_one else 0
        known = set(self.meta_contexts.values())
        if context_ids is not None:
            ids = list(dict.fromkeys(context_ids))
            if not ids or not set(ids) <= known:
                raise UsageError(f"context ids {list(context_ids)} were not negotiated")
            if not (self.extended_headers and self.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD):
                raise UsageError("the server does not accept a block status filter")
            req = self._new_request(Cmd.BLOCK_STATUS, flags | CmdFlag.PAYLOAD_LEN, offset, length)
            req.context_ids = frozenset(ids)
            payload = wire.encode_block_status_payload(length, ids)
            self._out.append(self._header(req, length=len(payload)))
            self._out.append(payload)
        else:
            req = self._new_request(Cmd.BLOCK_STATUS, flags, offset, length)
            req.context_ids = frozenset(known)
            self._out.append(self._header(req))
        return req.cookie

    def send_position(self) -> int:
        """Queue NBD_CMD_X_NBDGW_POSITION: the write-history position of every negotiated dirty
        bitmap (F_SINCE only)."""
        if not self.clear_since:
            raise UsageError("the server did not acknowledge NBD_X_NBDGW_CLEAR_F_SINCE")
        ids = [
            cid
            for name, cid in self.meta_contexts.items()
            if name.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)
        ]
        if not ids:
            raise UsageError("no dirty bitmap context was negotiated")
        req = self._new_request(Cmd.X_NBDGW_POSITION, 0, 0, 0)
        req.context_ids = frozenset(ids)
        self._out.append(self._header(req))
        return req.cookie

    def send_clear(
        self,
        offset: int,
        length: int,
        context_id: int,
        *,
        fua: bool = False,
        since: tuple[int, int] | None = None,
    ) -> int:
        """Queue NBD_CMD_X_NBDGW_CLEAR: clear the whole granules of ``[offset, offset +
        length)`` in the dirty bitmap negotiated as ``context_id``; with ``since`` (a position:
        history id, sequence) only those not written after it (F_SINCE only)."""
        if not self.clear_extension:
            raise UsageError("the server did not acknowledge NBD_OPT_X_NBDGW_CLEAR")
        if since is not None and not self.clear_since:
            raise UsageError("the server did not acknowledge NBD_X_NBDGW_CLEAR_F_SINCE")
        if context_id not in self.meta_contexts.values():
            raise UsageError(f"context id {context_id} was not negotiated")
        if length <= 0 or offset < 0 or offset > self.size or length > self.size - offset:
            raise UsageError(
                f"clear range [{offset}, {offset + length}) is empty or outside the export"
                f" (size {self.size})"
            )
        flags = self._fua(fua)
        payload = clear_ext.encode_clear_payload(length, context_id, since)
        if self.extended_headers:
            flags |= CmdFlag.PAYLOAD_LEN
        # The effect length travels in the payload (64 bits in both modes); the header's length
        # field is the payload's.
        req = self._new_request(Cmd.X_NBDGW_CLEAR, flags, offset, 0)
        req.length = length
        req.context_ids = frozenset((context_id,))
        req.since = since is not None
        self._out.append(self._header(req, length=len(payload)))
        self._out.append(payload)
        return req.cookie

    def send_disc(self) -> None:
        """NBD_CMD_DISC: no reply; the server finishes what is in flight, then closes."""
        self._transition("send_disc")
        self._out.append(wire.encode_request(0, Cmd.DISC, 0, 0, 0, self.extended_headers))

    # --- transmission: replies --------------------------------------------------------------------

    def _parse_transmission(self) -> Generator[None, None, None]:
        extended = self.extended_headers
        structured = self.structured_replies or extended
        read_exact = self._read_exact
        while True:
            while len(self._buf) < 4:
                yield
            (magic,) = wire.MAGIC32.unpack_from(self._buf, 0)
            if magic == NBD_SIMPLE_REPLY_MAGIC and not extended:
                head = yield from read_exact(wire.SIMPLE_REPLY.size)
                _, errno, cookie = wire.SIMPLE_REPLY.unpack(head)
                yield from self._simple_reply(errno, cookie, structured)
            elif magic == NBD_STRUCTURED_REPLY_MAGIC and structured and not extended:
                head = yield from read_exact(wire.STRUCTURED_REPLY.size)
                _, flags, rtype, cookie, length = wire.STRUCTURED_REPLY.unpack(head)
                yield from self._chunk(flags, rtype, cookie, length, None)
            elif magic == NBD_EXTENDED_REPLY_MAGIC and extended:
                head = yield from read_exact(wire.EXTENDED_REPLY.size)
                _, flags, rtype, cookie, offset, length = wire.EXTENDED_REPLY.unpack(head)
                yield from self._chunk(flags, rtype, cookie, length, offset)
            else:
                mode = "extended" if extended else "structured" if structured else "simple"
                raise ServerProtocolError(f"bad reply magic {magic:#x} ({mode} replies)")

    def _lookup(self, cookie: int) -> _Request:
        req = self._requests.get(cookie)
        if req is None:
            raise ServerProtocolError(f"reply for unknown cookie {cookie:#x}")
        return req

    def _simple_reply(
        self, errno: int, cookie: int, structured: bool
    ) -> Generator[None, None, None]:
        req = self._lookup(cookie)
        if req.command == Cmd.READ and structured:
            raise ServerProtocolError("simple reply to READ after structured replies")
        if req.command == Cmd.BLOCK_STATUS and errno == 0:
            raise ServerProtocolError("simple success reply to BLOCK_STATUS")
        if req.command in (Cmd.X_NBDGW_CLEAR, Cmd.X_NBDGW_POSITION) and errno == 0:
            raise ServerProtocolError(f"simple success reply to {req.command.name}")
        if req.chunks:
            raise ServerProtocolError(f"simple reply after chunks for cookie {cookie:#x}")
        if errno:
            req.error = RequestError(errno)
        elif req.command == Cmd.READ and req.length:
            assert req.buffer is not None
            yield from self._read_into(req.buffer)
            req.covered = req.length
        self._complete(req)

    def _complete(self, req: _Request) -> None:
        del self._requests[req.cookie]
        if req.command == Cmd.READ:
            self.reads_in_flight -= 1
            if not req.in_order:
                self._check_disjoint(req)
        if req.error is None:
            if req.command == Cmd.READ and req.covered != req.length:
                raise ServerProtocolError(f"READ reply covers {req.covered} of {req.length} bytes")
            if req.command == Cmd.BLOCK_STATUS:
                missing = req.context_ids - req.extents.keys()
                if missing:
                    raise ServerProtocolError(
                        f"BLOCK_STATUS reply lacks contexts {sorted(missing)}"
                    )
            if req.command == Cmd.X_NBDGW_CLEAR and req.cleared is None:
                raise ServerProtocolError("X_NBDGW_CLEAR succeeded without a cleared chunk")
            if req.command == Cmd.X_NBDGW_CLEAR and req.since:
                if req.kept is None:
                    raise ServerProtocolError("a conditional X_NBDGW_CLEAR without a kept chunk")
                assert req.cleared is not None
                try:
                    clear_ext.check_disjoint(req.cleared, req.kept)
                except WireError as exc:
                    raise ServerProtocolError(str(exc)) from None
            if req.command == Cmd.X_NBDGW_POSITION and req.positions.keys() != req.context_ids:
                raise ServerProtocolError("X_NBDGW_POSITION reply lacks a bitmap's position")
        if req.command == Cmd.READ and req.error is None:
            self._events.append(Reply(req.cookie, req.command, None, req.buffer))
        elif req.command == Cmd.BLOCK_STATUS and req.error is None:
            self._events.append(Reply(req.cookie, req.command, None, None, req.extents))
        elif req.command == Cmd.X_NBDGW_CLEAR and req.error is None:
            self._events.append(Reply(req.cookie, req.command, cleared=req.cleared, kept=req.kept))
        elif req.command == Cmd.X_NBDGW_POSITION and req.error is None:
            self._events.append(Reply(req.cookie, req.command, positions=req.positions))
        else:
            self._events.append(Reply(req.cookie, req.command, req.error))

    def _chunk(
        self, flags: int, rtype: int, cookie: int, length: int, header_offset: int | None
    ) -> Generator[None, None, None]:
        req = self._lookup(cookie)
        req.chunks += 1
        cmd = req.command
        done = bool(flags & NBD_REPLY_FLAG_DONE)
        if rtype == ReplyType.NONE:
            if length:
                raise ServerProtocolError(f"NBD_REPLY_TYPE_NONE with {length} payload bytes")
            if not done:
                raise ServerProtocolError("NBD_REPLY_TYPE_NONE without NBD_REPLY_FLAG_DONE")
        elif rtype == ReplyType.OFFSET_DATA:
            if cmd != Cmd.READ:
                raise ServerProtocolError(f"data chunk in the reply to {cmd.name}")
            if length <= 8 or length - 8 > req.length:
                raise ServerProtocolError(
                    f"data chunk of {length} bytes for a {req.length}-byte read"
                )
            (offset,) = wire.OFFSET.unpack((yield from self._read_exact(8)))
            start = self._claim(req, offset, length - 8)
            assert req.buffer is not None
            yield from self._read_into(req.buffer[start : start + length - 8])
        elif rtype == ReplyType.OFFSET_HOLE:
            if cmd != Cmd.READ:
                raise ServerProtocolError(f"hole chunk in the reply to {cmd.name}")
            if length == wire.OFFSET_HOLE.size:
                offset, size = wire.OFFSET_HOLE.unpack((yield from self._read_exact(length)))
            elif length == wire.OFFSET_HOLE_EXT.size and self.extended_headers:
                offset, size = wire.OFFSET_HOLE_EXT.unpack((yield from self._read_exact(length)))
            else:
                raise ServerProtocolError(f"hole chunk of {length} bytes (must be 12)")
            if size == 0:
                raise ServerProtocolError("hole chunk of size 0")
            start = self._claim(req, offset, size)
            assert req.buffer is not None
            _zero_fill(req.buffer[start : start + size])
        elif rtype in (ReplyType.BLOCK_STATUS, ReplyType.BLOCK_STATUS_EXT):
            extended = rtype == ReplyType.BLOCK_STATUS_EXT
            if cmd != Cmd.BLOCK_STATUS:
                raise ServerProtocolError(f"block status chunk in the reply to {cmd.name}")
            if extended != self.extended_headers:
                raise ServerProtocolError(
                    f"{ReplyType(rtype).name} chunk while extended headers are "
                    f"{'on' if self.extended_headers else 'off'}"
                )
            if header_offset is not None and header_offset != req.offset:
                # Extended headers echo the request offset, where the extents start.
                raise ServerProtocolError(
                    f"block status extents start at {header_offset}, not at the request "
                    f"offset {req.offset}"
                )
            limit = MAX_EXTENDED_STATUS_CHUNK if extended else MAX_COMPACT_STATUS_CHUNK
            if length > limit:
                raise ServerProtocolError(f"block status chunk of {length} bytes is too long")
            payload = yield from self._read_exact(length)
            self._block_status_chunk(req, payload, extended)
        elif rtype == ReplyType.X_NBDGW_CLEARED and cmd == Cmd.X_NBDGW_CLEAR:
            if length > clear_ext.MAX_CLEARED_CHUNK:
                raise ServerProtocolError(f"cleared chunk of {length} bytes is too long")
            if req.cleared is not None:
                raise ServerProtocolError("two cleared chunks for one X_NBDGW_CLEAR")
            payload = yield from self._read_exact(length)
            try:
                cleared = clear_ext.decode_cleared(payload)
                if cleared.context_id not in req.context_ids:
                    raise WireError(f"cleared chunk for context id {cleared.context_id}")
                # What lets the caller promise that nothing outside the range was cleared.
                clear_ext.check_cleared(cleared, req.offset, req.length, self.size)
            except WireError as exc:
                raise ServerProtocolError(str(exc)) from None
            req.cleared = cleared
        elif rtype == ReplyType.X_NBDGW_KEPT and cmd == Cmd.X_NBDGW_CLEAR and req.since:
            if length > clear_ext.MAX_CLEARED_CHUNK:
                raise ServerProtocolError(f"kept chunk of {length} bytes is too long")
            if req.kept is not None:
                raise ServerProtocolError("two kept chunks for one X_NBDGW_CLEAR")
            payload = yield from self._read_exact(length)
            try:
                kept = clear_ext.decode_cleared(payload)
                if kept.context_id not in req.context_ids:
                    raise WireError(f"kept chunk for context id {kept.context_id}")
                clear_ext.check_cleared(kept, req.offset, req.length, self.size)
            except WireError as exc:
                raise ServerProtocolError(str(exc)) from None
            req.kept = kept
        elif rtype == ReplyType.X_NBDGW_POSITION and cmd == Cmd.X_NBDGW_POSITION:
            if length != clear_ext.POSITION_CHUNK.size:
                raise ServerProtocolError(f"position chunk of {length} bytes")
            position = clear_ext.decode_position((yield from self._read_exact(length)))
            if position.context_id not in req.context_ids:
                raise ServerProtocolError(f"position for context id {position.context_id}")
            if position.context_id in req.positions:
                raise ServerProtocolError(f"two positions for context id {position.context_id}")
            req.positions[position.context_id] = position
        elif rtype & NBD_REPLY_TYPE_ERROR_BIT:
            # ERROR, ERROR_OFFSET, and unknown error types (which fail only this request).
            if length > MAX_ERROR_CHUNK:
                raise ServerProtocolError(f"error chunk of {length} bytes is too long")
            payload = yield from self._read_exact(length)
            with_offset = rtype == ReplyType.ERROR_OFFSET
            errno, message, offset = wire.decode_error_payload(payload, with_offset)
            if with_offset:
                assert offset is not None
                if cmd != Cmd.READ:
                    raise ServerProtocolError(f"ERROR_OFFSET in the reply to {cmd.name}")
                if not req.offset <= offset < req.offset + req.length:
                    raise ServerProtocolError(f"ERROR_OFFSET {offset} outside the request")
            if req.error is None:
                req.error = RequestError(errno, message, offset)
        else:
            raise ServerProtocolError(f"unknown reply chunk type {rtype}")
        if done:
            self._complete(req)

    def _claim(self, req: _Request, offset: int, size: int) -> int:
        """Record [offset, offset+size) as delivered for READ ``req``; the server may send
        chunks in any order but never twice for the same bytes. Returns the buffer index."""
        start = offset - req.offset
        end = start + size
        if start < 0 or end > req.length:
            raise ServerProtocolError(
                f"chunk [{offset}, {offset + size}) outside the read "
                f"[{req.offset}, {req.offset + req.length})"
            )
        if req.flags & _FLAG_DF and req.starts:
            raise ServerProtocolError("more than one content chunk despite NBD_CMD_FLAG_DF")
        # Bounded and O(1) per chunk (review M9): a sorted insert per chunk let a server
        # sending 1-byte chunks in reverse order stall the event loop for minutes.
        cap = max_content_chunks(req.length)
        if len(req.starts) >= cap:
            raise ServerProtocolError(
                f"more than {cap} content chunks for a {req.length}-byte read"
            )
        if req.starts and start < req.ends[-1]:
            if end > req.starts[-1]:
                raise ServerProtocolError(f"chunk [{offset}, {offset + size}) overlaps another")
            req.in_order = False  # the other overlaps are found once the reply is done
        req.covered += size
        if req.covered > req.length:
            raise ServerProtocolError(f"chunk [{offset}, {offset + size}) overlaps another")
        req.starts.append(start)
        req.ends.append(end)
        return start

    def _check_disjoint(self, req: _Request) -> None:
        """Content chunks that came out of order: none may overlap another (O(n log n) once)."""
        ranges = sorted(zip(req.starts, req.ends, strict=True))
        for (_, end), (start, _) in pairwise(ranges):
            if start < end:
                raise ServerProtocolError(
                    f"chunk at offset {req.offset + start} overlaps another "
                    f"(ending at {req.offset + end})"
                )

    def _block_status_chunk(self, req: _Request, payload: bytes, extended: bool) -> None:
        cid, lengths, flags = wire.decode_block_status(payload, extended)
        if cid not in req.context_ids:
            raise ServerProtocolError(f"block status for context id {cid}, which was not asked")
        if cid in req.extents:
            raise ServerProtocolError(f"two block status chunks for context id {cid}")
        if 0 in lengths:  # (a C scan, a little faster than min over 131072 extents)
            raise ServerProtocolError(f"zero-length extent for context id {cid}")
        if req.flags & CmdFlag.REQ_ONE and len(lengths) != 1:
            raise ServerProtocolError(f"{len(lengths)} extents despite REQ_ONE")
        # Only the last extent may run past the end of the request.
        if sum(lengths) - lengths[-1] >= req.length:
            raise ServerProtocolError(
                f"extents for context id {cid} run past the request before the last one"
            )
        if not extended:
            lengths = array("Q", lengths)
            flags = array("Q", flags)
        req.extents[cid] = BlockStatusResult(cid, lengths, flags)


def _check_block_size(bs: BlockSize) -> None:
    def pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    if not (pow2(bs.minimum) and bs.minimum <= 65536):
        raise ServerProtocolError(f"minimum block size {bs.minimum} is not a power of 2 <= 64K")
    # The preferred size is only a hint, so a server getting it wrong is tolerated.
    if bs.maximum < bs.minimum:
        raise ServerProtocolError(f"maximum payload {bs.maximum} below the minimum block size")


def _rep_name(rtype: int) -> str:
    try:
        return "NBD_REP_" + Rep(rtype).name
    except ValueError:
        return str(rtype)
