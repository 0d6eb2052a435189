"""A blocking NBD client over :mod:`nbdcore.client`, for threads, scripts and bulk reads.

The same protocol core and option strategy (:mod:`nbdcore.negotiate`) as the asyncio client,
driven by plain socket calls. It exists because it is the fastest way to move READ data in
Python: a payload is received with one ``recv_into(MSG_WAITALL)`` straight into the caller's
buffer, and the waits for the server happen in the kernel with the GIL released, where the
asyncio client goes through the event loop for every piece the server's socket buffer lets
through (docs/benchmarks.md, client-read). Pipelining is explicit: :meth:`NBDClient.iter_reads`
keeps a window of requests in flight.

A client belongs to one thread at a time; it is not safe to share between threads.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Final

from nbdcore import negotiate
from nbdcore.client import (
    ClientState,
    ConnectionClosed,
    Event,
    ExportReady,
    Greeting,
    Reply,
)
from nbdcore.exceptions import (
    ConnectionLostError,
    HandshakeError,
    NBDError,
    NBDTimeoutError,
    UsageError,
    os_reason,
)
from nbdcore.session import ClientSession, StatusAnswer
from nbdcore.tls import TLSConfig
from nbdcore.uri import NBDURI

# ssl is imported when a connection starts TLS: a plain copy should not pay for it at start-up.
if TYPE_CHECKING:
    import ssl

__all__ = ["NBDClient"]

_SCRATCH_SIZE: Final = 256 * 1024
DEFAULT_REQUEST_SIZE: Final = 512 * 1024
DEFAULT_WINDOW: Final = 4
# What a blocking socket raises when SO_RCVTIMEO / SO_SNDTIMEO expire (EAGAIN); a TLS socket
# adds ssl.SSLWantReadError and ssl.SSLWantWriteError (NBDClient._start_tls).
_TIMED_OUT: Final[tuple[type[OSError], ...]] = (BlockingIOError,)


class NBDClient(ClientSession):
    """One NBD connection in transmission phase, blocking. Use :meth:`connect`."""

    def __init__(self, sock: socket.socket, timeout: float | None) -> None:
        super().__init__()
        self._sock: socket.socket | ssl.SSLSocket = sock
        self._timeout = timeout
        self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        self._done: dict[int, Reply] = {}  # replies received while waiting for another
        self._failure: NBDError | None = None
        self._closed = False
        self._head = 16  # bytes to read at the start of a reply, set once negotiated
        self._tls = False
        self._timed_out = _TIMED_OUT

    # --- connecting -------------------------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        uri: str | NBDURI,
        *,
        meta_contexts: Sequence[str] = (),
        tls: TLSConfig | None = None,
        extended_headers: bool = True,
        structured_replies: bool = True,
        timeout: float | None = 30.0,
    ) -> NBDClient:
        """Connect, negotiate and enter transmission on the URI's export (the arguments are
        those of :meth:`nbdcore.aio.client.NBDClient.connect`; the clear extension is the
        asyncio client's alone). ``timeout`` bounds connecting and every wait for the server:
        no byte for that long fails the connection."""
        u = NBDURI.parse(uri) if isinstance(uri, str) else uri
        try:
            if u.is_unix:
                assert u.socket is not None
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(u.socket)
                except BaseException:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection(u.address, timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except TimeoutError:
            raise NBDTimeoutError(f"timed out after {timeout} s connecting to {u}") from None
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {u}: {os_reason(exc)}") from exc
        # Blocking from now on, with kernel timeouts: a socket with a Python timeout is
        # non-blocking underneath, and MSG_WAITALL would return early.
        sock.settimeout(None)
        if timeout is not None:
            tv = _timeval(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self = cls(sock, timeout)
        try:
            self._negotiate(u, tls, meta_contexts, extended_headers, structured_replies)
        except BaseException:
            self._abort()
            raise
        return self

    def _negotiate(
        self,
        u: NBDURI,
        tls: TLSConfig | None,
        queries: Sequence[str],
        extended: bool,
        structured: bool,
    ) -> None:
        ev = self._next_event()
        if not isinstance(ev, Greeting):
            raise HandshakeError(f"expected the server's greeting, got {ev}")
        if tls is None and u.tls:
            tls = TLSConfig.from_uri(u)
        conn = self._conn
        self._drive(
            negotiate.start(conn, tls=tls is not None, extended=extended, structured=structured),
            u,
            tls,
        )
        ready = self._drive(
            negotiate.select_export(conn, u.export, queries),
            u,
            tls,
        )
        assert ready is not None
        self._entered(ready, u.export)
        # A reply header plus a data chunk's offset: 32 + 8 extended, 20 + 8 structured.
        self._head = 40 if conn.extended_headers else 28 if conn.structured_replies else 16

    def _drive(
        self, strategy: negotiate.Strategy, u: NBDURI, tls: TLSConfig | None
    ) -> ExportReady | None:
        ev: Event | None = None
        try:
            while True:
                step = strategy.send(ev)
                if step is negotiate.START_TLS:
                    assert tls is not None
                    self._start_tls(tls, u)
                    ev = None
                else:
                    self._flush()
                    ev = self._next_event()
        except StopIteration as stop:
            result: ExportReady | None = stop.value
            return result

    def _start_tls(self, tls: TLSConfig, u: NBDURI) -> None:
        import ssl

        hostname = tls.server_hostname or (None if u.is_unix else u.host)
        try:
            ctx = tls.client_context()
            if hostname is None:
                # A unix socket has no name to check: verify the chain only, as libnbd does.
                ctx.check_hostname = False
            self._sock = ctx.wrap_socket(self._sock, server_hostname=hostname)
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise HandshakeError(f"TLS handshake failed: {exc}") from exc
        except OSError as exc:
            raise ConnectionLostError(f"connection lost during the TLS handshake: {exc}") from exc
        self._tls = True
        self._timed_out = (*_TIMED_OUT, ssl.SSLWantReadError, ssl.SSLWantWriteError)
        self._conn.tls_established()

    # --- public attributes ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    # --- I/O --------------------------------------------------------------------------------------

    def _flush(self) -> None:
        data = self._conn.data_to_send()
        if not data:
            return
        try:
            self._sock.sendall(b"".join(data) if len(data) > 1 else data[0])
        except self._timed_out:  # SO_SNDTIMEO expired
            self._fail(NBDTimeoutError(f"the server took nothing for {self._timeout} s"))
        except OSError as exc:
            self._fail(ConnectionLostError(f"connection lost: {exc}"))

    def _receive(self) -> None:
        """One read from the socket into the connection: straight into a READ's buffer when
        the parser waits for one, else a small read (a header and what follows it)."""
        conn = self._conn
        sock = self._sock
        try:
            target = conn.get_buffer()
            if target is not None:
                if self._tls:  # no MSG_WAITALL on an SSLSocket
                    n = sock.recv_into(target)
                else:
                    n = sock.recv_into(target, 0, socket.MSG_WAITALL)
                if n:
                    conn.buffer_filled(n)
            else:
                # With READs in flight, read little (what the parser asked for, or a reply
                # header and a data chunk's offset), so that READ data is not copied through
                # the scratch buffer; what overshoots is parsed all the same.
                want = conn.bytes_wanted or self._head if conn.reads_in_flight else _SCRATCH_SIZE
                view = self._scratch[:want]
                n = sock.recv_into(view)
                if n:
                    conn.receive_data(view[:n])
            if not n:
                conn.receive_eof()
        except self._timed_out:  # SO_RCVTIMEO expired
            self._fail(NBDTimeoutError(f"no answer from the server within {self._timeout} s"))
        except NBDError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(ConnectionLostError(f"connection lost: {exc}"))

    def _next_event(self) -> Event:
        """Receive until the connection produces its next negotiation event."""
        while True:
            self._check_open()
            events = self._conn.events_received()
            if events:
                # Negotiation is one option at a time: at most one event per answer.
                ev = events[0]
                if isinstance(ev, ConnectionClosed):
                    self._fail(ConnectionLostError("the server closed the connection"))
                return ev
            self._receive()

    def _collect(self) -> None:
        for ev in self._conn.events_received():
            if isinstance(ev, Reply):
                self._done[ev.cookie] = ev
            elif isinstance(ev, ConnectionClosed):
                self._fail(ConnectionLostError("the server closed the connection"))

    def _wait(self, cookie: int) -> Reply:
        """Receive until the reply to ``cookie`` is in (others are kept for their callers)."""
        while True:
            reply = self._done.pop(cookie, None)
            if reply is not None:
                return reply
            self._check_open()
            self._receive()
            self._collect()

    def _call(self, cookie: int) -> Reply:
        self._flush()
        reply = self._wait(cookie)
        if reply.error is not None:
            raise reply.error
        return reply

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _fail(self, exc: NBDError) -> None:
        if self._failure is None:
            self._failure = exc
        self._abort()
        raise self._failure

    def _abort(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    # --- commands ---------------------------------------------------------------------------------

    def pread(self, offset: int, length: int, *, df: bool = False) -> bytes:
        buf = bytearray(length)
        if df:
            self._check_open()
            self._call(self._conn.send_read(offset, length, buffer=memoryview(buf), df=True))
        else:
            self.pread_into(buf, offset)
        return bytes(buf)

    def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf`` (in pipelined requests
        of at most :attr:`max_payload` bytes)."""
        view = memoryview(buf).cast("B")
        step = self.max_payload
        for _ in self._pipeline(
            ((offset + pos, view[pos : pos + step]) for pos in range(0, len(view), step)),
            DEFAULT_WINDOW,
        ):
            pass

    def iter_reads(
        self,
        ranges: Iterable[tuple[int, int]],
        *,
        request_size: int = DEFAULT_REQUEST_SIZE,
        window: int = DEFAULT_WINDOW,
        ordered: bool = False,
    ) -> Iterator[tuple[int, memoryview]]:
        """Read the ``(offset, length)`` ranges in requests of at most ``request_size`` bytes
        with ``window`` of them in flight; yield ``(offset, data)`` for each request as it
        completes (in the server's order, or in the order of the ranges when ``ordered``).
        ``data`` lives in a buffer that is reused once the iteration goes on: copy what must
        outlive the step. Memory: ``window + 1`` buffers of ``request_size``."""
        if window < 1 or request_size < 1:
            raise UsageError("window and request_size must be at least 1")
        size = min(request_size, self.max_payload)
        mb = self._conn.min_block
        if mb > 1:
            size = max(size - size % mb, mb)
        free = [memoryview(bytearray(size)) for _ in range(window + 1)]
        held: dict[int, memoryview] = {}  # offset of a read -> its whole buffer

        def requests() -> Iterator[tuple[int, memoryview]]:
            for start, length in ranges:
                for o in range(start, start + length, size):
                    buf = held[o] = free.pop()
                    yield o, buf[: min(size, start + length - o)]

        for offset, data in self._pipeline(requests(), window, ordered):
            yield offset, data
            free.append(held.pop(offset))  # the caller has moved on from it

    def _pipeline(
        self, reads: Iterator[tuple[int, memoryview]], window: int, ordered: bool = False
    ) -> Iterator[tuple[int, memoryview]]:
        """READs from ``reads`` with up to ``window`` in flight (completed ones waiting for
        an earlier one to be yielded, when ``ordered``, count too); (offset, view) as each
        completes. A failed read raises its RequestError once the others in flight are in,
        so the connection stays usable."""
        self._check_open()
        conn = self._conn
        in_flight: dict[int, tuple[int, memoryview]] = {}  # send order
        finished: dict[int, None] = {}  # arrival order
        error: NBDError | None = None
        exhausted = False
        try:
            while True:
                while not exhausted and error is None and len(in_flight) < window:
                    item = next(reads, None)
                    if item is None:
                        exhausted = True
                        break
                    offset, view = item
                    in_flight[conn.send_read(offset, len(view), buffer=view)] = item
                if not in_flight:
                    break
                self._flush()
                ready: list[int] = []
                while not ready:
                    self._check_open()
                    for cookie in [c for c in in_flight if c in self._done]:
                        reply = self._done.pop(cookie)
                        if reply.error is not None:
                            error = error or reply.error
                        finished[cookie] = None
                    if ordered:
                        for cookie in in_flight:
                            if cookie not in finished:
                                break
                            ready.append(cookie)
                    else:
                        ready = list(finished)
                    if not ready:
                        self._receive()
                        self._collect()
                for cookie in ready:
                    finished.pop(cookie, None)
                    item = in_flight.pop(cookie)
                    if error is None:
                        yield item
        finally:
            # Left early (the caller stopped iterating, or raised): let the reads still in
            # flight land before their buffers go back to the caller, so that nothing
            # writes into them later and the connection stays in step.
            if self._failure is None:
                with contextlib.suppress(NBDError):
                    self._flush()
                    for cookie in [c for c in in_flight if c not in finished]:
                        self._wait(cookie)
        if error is not None:
            raise error

    def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        step = self.max_payload
        cookies = []
        self._check_open()
        for pos in range(0, len(view), step):
            cookies.append(self._conn.send_write(offset + pos, view[pos : pos + step], fua=fua))
        self._flush()
        errors = [r.error for r in map(self._wait, cookies) if r.error is not None]
        if errors:
            raise errors[0]

    def flush(self) -> None:
        self._check_open()
        self._call(self._conn.send_flush())

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_open()
        self._call(self._conn.send_trim(offset, length, fua=fua))

    def zero(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        self._check_open()
        self._call(
            self._conn.send_write_zeroes(
                offset, length, no_hole=no_hole, fast_zero=fast_zero, fua=fua
            )
        )

    def cache(self, offset: int, length: int) -> None:
        self._check_open()
        self._call(self._conn.send_cache(offset, length))

    def block_status(
        self,
        offset: int,
        length: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> StatusAnswer:
        """One BLOCK_STATUS round trip: context name -> (lengths, flags), as
        :meth:`nbdcore.aio.client.NBDClient.block_status`."""
        call = self._status_request(offset, length, contexts, req_one)
        self._check_open()
        return call.answer(self._call(call.send()))

    # --- closing ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Send NBD_CMD_DISC and close (nothing is in flight between calls)."""
        if self._closed:
            return
        if self._failure is None and self._conn.state is ClientState.TRANSMISSION:
            self._conn.send_disc()
            with contextlib.suppress(NBDError):
                self._flush()
        if self._failure is None:
            self._failure = UsageError("the connection is closed")
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._abort()

    def __enter__(self) -> NBDClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
