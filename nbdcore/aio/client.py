"""asyncio NBD client: sockets, TLS, timeouts and concurrency over :mod:`nbdcore.client`.

All protocol rules live in the sans-I/O core; this module moves bytes, matches replies to
waiting tasks and chooses which options to try (extended headers, falling back to structured
replies; GO, falling back to EXPORT_NAME on old servers).

Bulk READ payloads are received without an intermediate copy: the protocol is an
``asyncio.BufferedProtocol`` whose ``get_buffer`` hands the event loop the slice of the caller's
buffer that the core is waiting to fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar

from nbdcore import clear_ext, negotiate
from nbdcore.client import (
    ClientState,
    ConnectionClosed,
    Event,
    ExportReady,
    ExportsListed,
    Greeting,
    InfoReceived,
    MetaContextsListed,
    OptionFailed,
    Reply,
    SnapshotResult,
)
from nbdcore.constants import Opt, TransmissionFlag
from nbdcore.exceptions import (
    ConnectionLostError,
    HandshakeError,
    NBDError,
    NBDTimeoutError,
    OptionError,
    ServerProtocolError,
    UsageError,
    os_reason,
)
from nbdcore.session import ClientSession, StatusAnswer
from nbdcore.tls import TLSConfig
from nbdcore.uri import NBDURI
from nbdcore.wire import BlockSize

__all__ = [
    "ExportInfo",
    "NBDClient",
    "export_info",
    "list_exports",
    "list_meta_contexts",
]

_SCRATCH_SIZE: Final = 256 * 1024
_JOIN_SEND: Final = 64 * 1024  # queued chunks up to this much in all are joined into one write
_HEADER_READ: Final = 4096
_DISC_GRACE: Final = 3.0  # seconds a server gets to finish in-flight requests after DISC
_T = TypeVar("_T")


class _Window:
    """The requests a connection may have in flight: an ``asyncio.Semaphore`` whose slots can
    also be taken several at once without waiting (:meth:`take_up_to`) or waited for by a
    callback (:meth:`wait_one`), for batches of READs sent without a Task each. Waiters are
    served first come, first served."""

    __slots__ = ("_loop", "_waiters", "free")

    def __init__(self, size: int, loop: asyncio.AbstractEventLoop) -> None:
        self.free = size
        self._loop = loop
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take_up_to(self, n: int) -> int:
        """Take as many of ``n`` slots as are free now (none while somebody waits)."""
        if self._waiters:
            return 0
        k = min(n, self.free)
        self.free -= k
        return k

    def wait_one(self) -> asyncio.Future[None]:
        """A future done when a slot is handed over to its holder. A holder that gives up
        cancels it, or gives the slot back if it was already handed over."""
        fut: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(fut)
        return fut

    def forget(self, fut: asyncio.Future[None]) -> None:
        """A holder of :meth:`wait_one` gives up: the slot goes back if it was handed over."""
        if fut.done():
            if not fut.cancelled():
                self.give(1)
            return
        fut.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    async def take(self) -> None:
        if self.take_up_to(1):
            return
        fut = self.wait_one()
        try:
            await fut
        except asyncio.CancelledError:
            self.forget(fut)  # handed a slot just as we were cancelled: it goes on
            raise

    def give(self, n: int = 1) -> None:
        # A freed slot goes straight to the oldest waiter (``free`` is not raised for it), so
        # that a new caller cannot take it first.
        waiters = self._waiters
        while n and waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1
        self.free += n

    async def __aenter__(self) -> None:
        await self.take()

    async def __aexit__(self, *exc: object) -> None:
        self.give(1)


class _ReadBatch:
    """The READs of one :meth:`NBDClient.pread_many_into`: one future for all of them and no
    Task per READ (a Task, its coroutine and a Future per READ were about a fifth of the CPU
    of a 64 KiB READ, gathered 16 at a time).

    The batch takes the free slots of the in-flight window and sends that many READs at once;
    while some of its pieces are not sent, it also waits for the window's next freed slot (a
    callback, not a Task), and the slots of its own replies carry its next pieces. After the
    future is done (failed or cancelled) no more READs go out, and each reply still due gives
    its slot back when it arrives: the server owes it, and it may still land in its buffer."""

    __slots__ = ("_client", "_held", "_in_flight", "_next", "_pieces", "_waiting", "future")

    def __init__(self, client: NBDClient, pieces: Sequence[tuple[memoryview, int]]) -> None:
        self._client = client
        self._pieces = pieces
        self._next = 0  # the first piece not sent yet
        self._in_flight = 0  # sent, not answered
        self._held = 0  # slots freed by our replies, kept for the next pieces
        self._waiting: asyncio.Future[None] | None = None  # for a slot of the window
        self.future: asyncio.Future[None] = client._loop.create_future()

    def _unsent(self) -> int:
        """Pieces not sent and not covered by a held slot."""
        return len(self._pieces) - self._next - self._held

    def supply(self) -> None:
        """Send as many pieces as the window has free slots; wait for one if some are left."""
        k = self._client._slots.take_up_to(self._unsent())
        if k:
            self._send(k)
        if self._waiting is None and self._unsent() > 0 and not self.future.done():
            self._waiting = self._client._slots.wait_one()
            self._waiting.add_done_callback(self._slot_handed)

    def _slot_handed(self, waiting: asyncio.Future[None]) -> None:
        if waiting is not self._waiting:
            return  # forgotten: the window has its slot back
        self._waiting = None
        if waiting.cancelled():
            return
        failure = self._client._failure
        if self.future.done() or failure is not None or self._unsent() <= 0:
            # Not needed (every piece left has a slot) or no use: the slot goes on.
            self._client._slots.give(1)
            if failure is not None and not self.future.done():
                self.future.set_exception(failure)
            return
        self._send(1)
        self._send_held()
        self.supply()

    def _stop(self) -> None:
        """The future is done: give back the held slots, stop waiting for more."""
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self._client._slots.forget(waiting)
        self._client._slots.give(self._held)
        self._held = 0

    def _send(self, k: int) -> None:
        """Send the next ``k`` pieces, a slot of the window held for each."""
        client = self._client
        send_read, waiters = client._conn.send_read, client._waiters
        timeout = client._timeout
        sent_at = client._sent_at
        now = client._loop.time()
        pieces, first, end = self._pieces, self._next, self._next + k
        i = first
        try:
            while i < end:
                view, offset = pieces[i]
                cookie = send_read(offset, len(view), buffer=view)
                waiters[cookie] = self
                if timeout is not None:
                    sent_at[cookie] = now
                i += 1
        except NBDError as exc:
            # The core refused a piece (a read-only buffer, a range past the end...): the
            # batch fails; what was queued still goes out and gives its slot back when
            # answered, the slots of the rest are given back now.
            client._slots.give(end - i)
            if not self.future.done():
                self.future.set_exception(exc)
            self._stop()
        finally:
            self._in_flight += i - first
            self._next = i
            if self._waiting is not None and self._unsent() <= 0:
                # Every piece left has a slot: stop waiting in the window's queue, where a
                # waiter makes everyone else wait behind it.
                waiting, self._waiting = self._waiting, None
                client._slots.forget(waiting)
            if i > first:
                if timeout is not None and client._watchdog is None:
                    client._watchdog = client._loop.call_later(timeout, client._check_deadline)
                client._flush_soon()

    def reply(self, reply: Reply) -> None:
        self._in_flight -= 1
        fut = self.future
        if not fut.done() and reply.error is not None:
            fut.set_exception(reply.error)
        if fut.done():  # failed, or cancelled by the caller
            self._stop()
            self._client._slots.give(1)
            return
        if self._unsent() > 0:
            self._held += 1  # the slot stays with the batch, for its next piece
        else:
            self._client._slots.give(1)
        self._send_held()
        if not self._in_flight and self._next == len(self._pieces):
            fut.set_result(None)

    def _send_held(self) -> None:
        # The held slots' pieces go out once half of the batch's slots are back, or once every
        # piece left has one: READs that leave in bursts come back in bursts, and each wake-up
        # of the loop has several replies to parse. Sending each on its own slot doubled the
        # loop's iterations and the writes (docs/benchmarks.md).
        held = self._held
        if held and (held >= self._in_flight or held == len(self._pieces) - self._next):
            self._held = 0
            self._send(held)

    def fail(self, exc: NBDError) -> None:
        """The connection failed: no more replies will come."""
        self._client._slots.give(self._in_flight)
        self._in_flight = 0
        if not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()  # mark retrieved: the caller may have stopped waiting
        self._stop()


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    description: str | None
    size: int | None  # None when the server would not describe the export (INFO refused)
    flags: TransmissionFlag
    block_size: BlockSize | None
    meta_contexts: tuple[str, ...]


class _Protocol(asyncio.BufferedProtocol):
    def __init__(self, client: NBDClient) -> None:
        self._client = client
        self._conn = client._conn
        self._scratch = memoryview(bytearray(_SCRATCH_SIZE))
        self._direct = False
        # A duplicate of the plain socket, used to drain a READ payload without going back
        # to the event loop for every few hundred KiB (None under TLS).
        self._sock: socket.socket | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.type == socket.SOCK_STREAM:
            self._sock = socket.socket(sock.family, sock.type, fileno=os.dup(sock.fileno()))
            self._sock.setblocking(False)

    def stop_fast_path(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def get_buffer(self, sizehint: int) -> memoryview:
        conn = self._conn
        target = conn.get_buffer()
        if target is not None:
            self._direct = True
            return target
        self._direct = False
        if conn.reads_in_flight and conn.bytes_wanted < _HEADER_READ:
            # Next comes a reply header, likely followed by READ data that belongs in the
            # caller's buffer: read little, so the data is not copied twice.
            return self._scratch[:_HEADER_READ]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        conn = self._conn
        try:
            if self._direct:
                filled = conn.buffer_filled(nbytes)
                # Take what the kernel already holds now (the rest of the payload, the
                # replies behind it) rather than after another trip through the event loop.
                if not self._drain() and not filled:
                    return
            else:
                conn.receive_data(self._scratch[:nbytes])
                self._drain()
        except NBDError as exc:
            self._client._fail(exc)
            return
        self._client._dispatch()

    def _drain(self) -> bool:
        """Read what the kernel already holds: straight into the pending READ payload, and,
        while READ replies are outstanding, the replies behind it, so that replies that
        arrived together are parsed in one go instead of one trip through the event loop
        each (about a fifth of the CPU of a 64 KiB READ). Bounded by the requests in flight.
        True when something was parsed that may have made events; errors and EOF are left
        for the transport's next read to find."""
        sock = self._sock
        conn = self._conn
        if sock is None:
            return False
        parsed = False
        while True:
            target = conn.get_buffer()
            if target is not None:
                try:
                    n = sock.recv_into(target)
                except OSError:  # BlockingIOError included: nothing more for now
                    return parsed
                if n == 0:
                    return parsed
                if conn.buffer_filled(n):
                    parsed = True
                continue
            if not conn.reads_in_flight:
                return parsed
            # Between replies: the next header (and a little of its payload, copied once).
            head = self._scratch[:_HEADER_READ]
            try:
                n = sock.recv_into(head)
            except OSError:
                return parsed
            if n == 0:
                return parsed
            conn.receive_data(head[:n])
            parsed = True

    def eof_received(self) -> bool | None:
        self._conn.receive_eof()
        self._client._dispatch()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_fast_path()
        self._client._connection_lost(exc)

    def pause_writing(self) -> None:
        self._client._writable.clear()

    def resume_writing(self) -> None:
        self._client._writable.set()


class NBDClient(ClientSession):
    """One NBD connection in transmission phase. Use :meth:`connect`."""

    def __init__(self, *, max_in_flight: int = 16, timeout: float | None = 30.0) -> None:
        if max_in_flight < 1:
            raise UsageError("max_in_flight must be at least 1")
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        self._protocol = _Protocol(self)
        self._waiters: dict[int, asyncio.Future[Reply] | _ReadBatch] = {}
        # When each request in flight was sent (loop time), oldest first: one timer watches the
        # oldest instead of a timeout context per request (a tenth of a small read's cost).
        self._sent_at: dict[int, float] = {}
        self._watchdog: asyncio.TimerHandle | None = None
        self._option_waiter: asyncio.Future[Event] | None = None
        self._greeting: asyncio.Future[Event] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._failure: NBDError | None = None
        self._slots = _Window(max_in_flight, self._loop)
        self._writable = asyncio.Event()
        self._writable.set()
        self._flush_pending = False  # a _flush_soon is scheduled

    # --- public attributes ----------------------------------------------------------------------

    @property
    def clear_extension(self) -> bool:
        """The server acknowledged NBD_OPT_X_NBDGW_CLEAR: :meth:`clear` works."""
        return self._conn.clear_extension

    @property
    def conditional_clears(self) -> bool:
        """The server acknowledged conditional clears (NBD_X_NBDGW_CLEAR_F_SINCE):
        :meth:`positions` and :meth:`clear_since` work."""
        return self._conn.clear_since

    @property
    def closed(self) -> bool:
        return self._closed.done()

    # --- connecting -------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        uri: str | NBDURI,
        *,
        meta_contexts: Sequence[str] = (),
        tls: TLSConfig | None = None,
        extended_headers: bool = True,
        structured_replies: bool = True,
        max_in_flight: int = 16,
        timeout: float | None = 30.0,  # noqa: ASYNC109 (the agreed API; applies per request)
        clear_extension: bool = False,
    ) -> NBDClient:
        """Connect, negotiate and enter transmission on the URI's export.

        ``meta_contexts`` are the SET_META_CONTEXT queries (any namespace, wildcards allowed);
        the contexts the server selected end up in :attr:`meta_contexts`.
        ``clear_extension``: ask for NBD_OPT_X_NBDGW_CLEAR (docs/extension-clear.md); a server
        without it refuses the option and the connection goes on without (see
        :attr:`clear_extension`).
        """
        u = NBDURI.parse(uri) if isinstance(uri, str) else uri
        self = cls(max_in_flight=max_in_flight, timeout=timeout)
        try:
            async with _deadline(timeout, f"connecting to {u}"):
                await self._start(u, tls, extended_headers, structured_replies)
                await self._go(u.export, list(meta_contexts), clear_extension)
        except BaseException:
            self._abort()
            raise
        return self

    async def _start(
        self, uri: NBDURI, tls: TLSConfig | None, extended: bool, structured: bool
    ) -> None:
        """Open the socket, read the greeting, upgrade to TLS, negotiate reply formats."""
        loop = self._loop
        try:
            if uri.is_unix:
                assert uri.socket is not None
                transport, _ = await loop.create_unix_connection(lambda: self._protocol, uri.socket)
            else:
                host, port = uri.address
                transport, _ = await loop.create_connection(lambda: self._protocol, host, port)
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {uri}: {os_reason(exc)}") from exc
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        await self._wait(self._greeting)
        if tls is None and uri.tls:
            tls = TLSConfig.from_uri(uri)
        strategy = negotiate.start(
            self._conn, tls=tls is not None, extended=extended, structured=structured
        )
        await self._drive(strategy, lambda: self._starttls(tls, uri))

    async def _drive(
        self,
        strategy: negotiate.Strategy,
        start_tls: Callable[[], Awaitable[None]] | None = None,
    ) -> ExportReady | None:
        """Run an option strategy of :mod:`nbdcore.negotiate` over this connection."""
        ev: Event | None = None
        try:
            while True:
                step = strategy.send(ev)
                if step is negotiate.START_TLS:
                    assert start_tls is not None
                    await start_tls()
                    ev = None
                else:
                    ev = await self._next_option_event()
        except StopIteration as stop:
            result: ExportReady | None = stop.value
            return result

    async def _starttls(self, tls: TLSConfig | None, uri: NBDURI) -> None:
        """The server acknowledged STARTTLS: wrap the connection in TLS."""
        assert tls is not None and self._transport is not None
        self._protocol.stop_fast_path()  # bytes on the socket are TLS records from now on
        hostname = tls.server_hostname or (None if uri.is_unix else uri.host)
        try:
            ctx = tls.client_context()
            if hostname is None:
                # A unix socket has no name to check: verify the chain only, as libnbd does.
                ctx.check_hostname = False
            transport = await self._loop.start_tls(
                self._transport, self._protocol, ctx, server_hostname=hostname
            )
        except (ssl.SSLError, ssl.CertificateError) as exc:
            raise HandshakeError(f"TLS handshake failed: {exc}") from exc
        except ConnectionError as exc:
            raise ConnectionLostError(f"connection lost during the TLS handshake: {exc}") from exc
        if transport is None:
            raise ConnectionLostError("connection closed during the TLS handshake")
        self._transport = transport
        self._conn.tls_established()

    async def _go(self, export: str, queries: list[str], clear_extension: bool = False) -> None:
        conn = self._conn
        ev = await self._drive(
            negotiate.select_export(conn, export, queries, clear_extension=clear_extension)
        )
        assert ev is not None
        self._entered(ev, export)

    # --- plumbing -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        for ev in self._conn.events_received():
            if isinstance(ev, Reply):
                self._sent_at.pop(ev.cookie, None)
                fut = self._waiters.pop(ev.cookie, None)
                if isinstance(fut, _ReadBatch):
                    fut.reply(ev)
                elif fut is not None and not fut.done():
                    fut.set_result(ev)
                # else: the waiter was cancelled; its reply is dropped here.
            elif isinstance(ev, Greeting):
                if not self._greeting.done():
                    self._greeting.set_result(ev)
            elif isinstance(ev, ConnectionClosed):
                self._fail(ConnectionLostError("the server closed the connection"))
            else:
                waiter = self._option_waiter
                self._option_waiter = None
                if waiter is not None and not waiter.done():
                    waiter.set_result(ev)
        self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            if len(data) > 1 and sum(map(len, data)) <= _JOIN_SEND:
                # Request headers (a gather of READs): one write, one syscall.
                self._transport.write(b"".join(data))
                return
            for chunk in data:
                self._transport.write(chunk)

    def _flush_soon(self) -> None:
        """Send what is queued once the tasks ready in this loop iteration have run: the
        requests of a gather (a message's READs) leave in one write, and the server is woken
        once, not per request."""
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_if_pending)

    def _flush_if_pending(self) -> None:
        if self._flush_pending:  # else a _flush since has sent everything
            self._flush()

    def _fail(self, exc: NBDError) -> None:
        """The connection is unusable: every waiter gets ``exc``, the socket is closed."""
        if self._failure is None:
            self._failure = exc
        for fut in [self._greeting, self._option_waiter, *self._waiters.values()]:
            if isinstance(fut, _ReadBatch):
                fut.fail(exc)
            elif fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: a waiter that was cancelled won't look
        self._waiters.clear()
        self._sent_at.clear()
        self._option_waiter = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._abort()

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        elif not self._closed.done():
            self._closed.set_result(None)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)
        self._writable.set()
        if self._waiters or self._option_waiter or not self._greeting.done():
            detail = f": {exc}" if exc else ""
            self._fail(ConnectionLostError(f"connection lost{detail}"))
        elif self._failure is None:
            self._failure = ConnectionLostError("the connection is closed")

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _wait(self, fut: asyncio.Future[_T]) -> _T:
        if self._timeout is None:
            return await fut
        try:
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError:
            exc = NBDTimeoutError(f"no answer from the server within {self._timeout} s")
            self._fail(exc)
            raise exc from None

    async def _option(self, send: Callable[[], None]) -> Event:
        self._check_open()
        send()
        return await self._next_option_event()

    async def _next_option_event(self) -> Event:
        """Send what the connection queued and wait for its answer to the pending option."""
        self._check_open()
        fut: asyncio.Future[Event] = self._loop.create_future()
        self._option_waiter = fut
        self._flush()
        return await self._wait(fut)

    async def _submit(self, send: Callable[[], int]) -> Reply:
        """Queue one request (``send`` returns its cookie) and wait for its reply. Called
        holding a slot of the in-flight window."""
        self._check_open()
        cookie = send()
        fut: asyncio.Future[Reply] = self._loop.create_future()
        self._waiters[cookie] = fut
        if self._timeout is not None:
            self._sent_at[cookie] = self._loop.time()
            if self._watchdog is None:
                self._watchdog = self._loop.call_later(self._timeout, self._check_deadline)
        self._flush_soon()
        if not self._writable.is_set():
            await self._writable.wait()
        reply = await fut
        if reply.error is not None:
            raise reply.error
        return reply

    def _check_deadline(self) -> None:
        """The watchdog: fail the connection when its oldest request has waited longer than
        the timeout, else look again when that one would be due. (A request whose caller was
        cancelled still counts: the server owes its reply.)"""
        self._watchdog = None
        if not self._sent_at or self._failure is not None:
            return
        assert self._timeout is not None
        due = next(iter(self._sent_at.values())) + self._timeout
        if self._loop.time() >= due:
            self._fail(NBDTimeoutError(f"no answer from the server within {self._timeout} s"))
        else:
            self._watchdog = self._loop.call_at(due, self._check_deadline)

    # --- commands ---------------------------------------------------------------------------------

    async def pread(self, offset: int, length: int, *, df: bool = False) -> bytes:
        if length <= self.max_payload:
            async with self._slots:
                reply = await self._submit(lambda: self._conn.send_read(offset, length, df=df))
            assert reply.data is not None
            return bytes(reply.data)
        if df:
            raise UsageError(f"a DF read is limited to {self.max_payload} bytes")
        buf = bytearray(length)
        await self.pread_into(buf, offset)
        return bytes(buf)

    async def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` straight into ``buf`` (split in pipelined
        requests above the server's maximum payload). If the call is cancelled, the server's
        late answer may still land in ``buf``."""
        view = memoryview(buf).cast("B")
        step = self.max_payload
        if len(view) <= step:
            async with self._slots:
                await self._submit(lambda: self._conn.send_read(offset, len(view), buffer=view))
            return
        await self._gather(
            [
                self.pread_into(view[pos : pos + step], offset + pos)
                for pos in range(0, len(view), step)
            ]
        )

    def pread_many_into(self, pieces: Sequence[tuple[memoryview, int]]) -> asyncio.Future[None]:
        """Read each ``(buf, offset)`` of ``pieces`` straight into its ``buf``, as
        :meth:`pread_into` does; the future is done when every piece has landed, or fails with
        the first error (a piece the client refuses included). The READs wait on one future,
        without a Task each (:class:`_ReadBatch`); a piece above the server's maximum payload
        makes the batch gathered :meth:`pread_into` calls instead. Cancelling the future does
        not stop the server: a READ already sent may still land in its ``buf``."""
        if self._failure is not None or not pieces:
            done: asyncio.Future[None] = self._loop.create_future()
            if self._failure is not None:
                done.set_exception(self._failure)
            else:
                done.set_result(None)
            return done
        step = self.max_payload
        if any(len(v) > step for v, _ in pieces):
            return asyncio.ensure_future(self._read_each(pieces))
        batch = _ReadBatch(self, pieces)
        batch.supply()
        return batch.future

    async def _read_each(self, pieces: Sequence[tuple[memoryview, int]]) -> None:
        # The coroutines are made here, in the task: a task cancelled before it starts then
        # leaves none behind unawaited.
        await self._gather([self.pread_into(v, o) for v, o in pieces])

    async def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        step = self.max_payload
        if len(view) <= step:
            async with self._slots:
                await self._submit(lambda: self._conn.send_write(offset, view, fua=fua))
            return
        await self._gather(
            [
                self.pwrite(view[pos : pos + step], offset + pos, fua=fua)
                for pos in range(0, len(view), step)
            ]
        )

    async def _gather(self, coros: list[Any]) -> None:
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def flush(self) -> None:
        await self._simple(self._conn.send_flush)

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._simple(lambda: self._conn.send_trim(offset, length, fua=fua))

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        await self._simple(
            lambda: self._conn.send_write_zeroes(
                offset, length, no_hole=no_hole, fast_zero=fast_zero, fua=fua
            )
        )

    async def cache(self, offset: int, length: int) -> None:
        await self._simple(lambda: self._conn.send_cache(offset, length))

    async def _simple(self, send: Callable[[], int]) -> None:
        async with self._slots:
            await self._submit(send)

    async def block_status(
        self,
        offset: int,
        length: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> StatusAnswer:
        """One BLOCK_STATUS round trip: context name -> (lengths, flags) arrays (typecode
        ``Q``), consecutive from ``offset``; the server may cover less than ``length`` and the
        last extent may run past it. ``contexts`` restricts the answer (with the server-side
        filter when the server offers BLOCK_STATUS_PAYLOAD)."""
        call = self._status_request(offset, length, contexts, req_one)
        async with self._slots:
            reply = await self._submit(call.send)
        return call.answer(reply)

    async def clear(
        self, offset: int, length: int, context: str, *, fua: bool = False
    ) -> clear_ext.Cleared:
        """NBD_CMD_X_NBDGW_CLEAR: clear the whole granules of ``[offset, offset + length)`` in
        the dirty bitmap ``context`` (a negotiated ``qemu:dirty-bitmap:NAME``). Returns what
        the server cleared, checked to lie in whole granules inside the range. ``fua``: the
        cleared bits reach stable storage before the reply."""
        if not self.clear_extension:
            raise UsageError("the server does not offer the clear extension")
        cid = self.meta_contexts.get(context)
        if cid is None:
            raise UsageError(f"context {context!r} was not negotiated")
        async with self._slots:
            reply = await self._submit(lambda: self._conn.send_clear(offset, length, cid, fua=fua))
        assert reply.cleared is not None
        return reply.cleared

    async def positions(self) -> dict[str, tuple[int, int]]:
        """NBD_CMD_X_NBDGW_POSITION: the current write-history position (history id, sequence)
        of every negotiated dirty bitmap, by context name. Take it *before* reading what will
        be cleared with :meth:`clear_since`: every write the reads may have missed is after
        it."""
        if not self.conditional_clears:
            raise UsageError("the server does not offer conditional clears")
        async with self._slots:
            reply = await self._submit(self._conn.send_position)
        assert reply.positions is not None
        names = {cid: name for name, cid in self.meta_contexts.items()}
        return {names[p.context_id]: (p.history_id, p.sequence) for p in reply.positions.values()}

    async def clear_since(
        self,
        offset: int,
        length: int,
        context: str,
        since: tuple[int, int],
        *,
        fua: bool = False,
    ) -> tuple[clear_ext.Cleared, clear_ext.Cleared]:
        """A conditional NBD_CMD_X_NBDGW_CLEAR: as :meth:`clear`, but only the granules not
        written after position ``since`` (from :meth:`positions`). Returns ``(cleared, kept)``:
        the kept runs may have changed after ``since``; read them again before clearing."""
        if not self.conditional_clears:
            raise UsageError("the server does not offer conditional clears")
        cid = self.meta_contexts.get(context)
        if cid is None:
            raise UsageError(f"context {context!r} was not negotiated")
        async with self._slots:
            reply = await self._submit(
                lambda: self._conn.send_clear(offset, length, cid, fua=fua, since=since)
            )
        assert reply.cleared is not None and reply.kept is not None
        return reply.cleared, reply.kept

    # --- closing ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Send NBD_CMD_DISC and close. The server finishes the requests in flight before it
        hangs up, so when some are in flight we keep reading (a few seconds at most) until
        it does."""
        if self._transport is None or self._closed.done():
            return
        if self._failure is None:
            if self._conn.state is ClientState.NEGOTIATING:
                with contextlib.suppress(NBDError):
                    await self._option(self._conn.send_abort)
            elif self._conn.state is ClientState.TRANSMISSION:
                self._conn.send_disc()
                self._flush()
                self._failure = UsageError("the connection is closed")
                if self._waiters:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_DISC_GRACE):
                            await asyncio.shield(self._closed)
        if self._failure is None:
            self._failure = UsageError("the connection is closed")
        if not self._closed.done():
            self._transport.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_DISC_GRACE):
                    await asyncio.shield(self._closed)
        if not self._closed.done():
            self._transport.abort()

    async def __aenter__(self) -> NBDClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # --- negotiation-only sessions ----------------------------------------------------------------

    async def _list_contexts(self, export: str, queries: Sequence[str]) -> list[str]:
        ev = await self._option(lambda: self._conn.send_list_meta_context(export, queries))
        if isinstance(ev, OptionFailed):
            raise ev.error()
        assert isinstance(ev, MetaContextsListed)
        return [name for name, _ in ev.contexts]

    async def _info(self, export: str) -> ExportInfo:
        ev = await self._option(lambda: self._conn.send_go(export, info=True))
        if isinstance(ev, OptionFailed):
            raise ev.error()
        assert isinstance(ev, InfoReceived)
        contexts: list[str] = []
        if self.structured_replies:
            with contextlib.suppress(OptionError):
                contexts = await self._list_contexts(export, ())
        return ExportInfo(
            ev.name if ev.name is not None else export,
            ev.description or None,
            ev.size,
            ev.flags,
            ev.block_size,
            tuple(contexts),
        )


@contextlib.asynccontextmanager
async def _session(
    uri: str | NBDURI, tls: TLSConfig | None, seconds: float | None
) -> AsyncIterator[tuple[NBDClient, NBDURI]]:
    """A connection kept in negotiation, for LIST / INFO / LIST_META_CONTEXT; ends with ABORT."""
    u = NBDURI.parse(uri) if isinstance(uri, str) else uri
    client = NBDClient(timeout=seconds)
    try:
        async with _deadline(seconds, f"connecting to {u}"):
            await client._start(u, tls, True, True)
        yield client, u
    finally:
        await client.close()


async def list_exports(
    uri: str | NBDURI,
    *,
    tls: TLSConfig | None = None,
    timeout: float | None = 30.0,  # noqa: ASYNC109
) -> list[ExportInfo]:
    """NBD_OPT_LIST, then NBD_OPT_INFO on each export."""
    async with _session(uri, tls, timeout) as (client, _):
        ev = await client._option(client._conn.send_list)
        if isinstance(ev, OptionFailed):
            raise ev.error()
        assert isinstance(ev, ExportsListed)
        result = []
        for name, description in ev.exports:
            try:
                info = await client._info(name)
            except OptionError:
                info = ExportInfo(name, None, None, TransmissionFlag(0), None, ())
            result.append(
                ExportInfo(
                    name,
                    description or info.description,
                    info.size,
                    info.flags,
                    info.block_size,
                    info.meta_contexts,
                )
            )
        return result


async def list_meta_contexts(
    uri: str | NBDURI,
    *,
    queries: Sequence[str] = (),
    tls: TLSConfig | None = None,
    timeout: float | None = 30.0,  # noqa: ASYNC109
) -> list[str]:
    """NBD_OPT_LIST_META_CONTEXT on the URI's export (no queries: everything it offers)."""
    async with _session(uri, tls, timeout) as (client, u):
        if not client.structured_replies:
            raise UsageError("the server does not support structured replies (no contexts)")
        return await client._list_contexts(u.export, queries)


async def export_info(
    uri: str | NBDURI,
    *,
    tls: TLSConfig | None = None,
    timeout: float | None = 30.0,  # noqa: ASYNC109
) -> ExportInfo:
    """NBD_OPT_INFO on the URI's export, without entering transmission."""
    async with _session(uri, tls, timeout) as (client, u):
        return await client._info(u.export)


async def nbdgw_snapshot(
    uri: str | NBDURI,
    request: dict[str, Any],
    *,
    tls: TLSConfig | None = None,
    timeout: float | None = 30.0,  # noqa: ASYNC109
) -> dict[str, Any]:
    """NBD_OPT_X_NBDGW_SNAPSHOT (docs/extension-snapshot.md): one snapshot management request
    (``{"op": "create" | "list" | "release", "export": ...}``) and its JSON result, which may be
    ``{"error": {"reason": ..., "message": ...}}``. A server without the extension fails with
    OptionError (NBD_REP_ERR_UNSUP)."""
    async with _session(uri, tls, timeout) as (client, _):
        payload = json.dumps(request).encode()
        ev = await client._option(lambda: client._conn.send_option(Opt.X_NBDGW_SNAPSHOT, payload))
        if isinstance(ev, OptionFailed):
            raise ev.error()
        assert isinstance(ev, SnapshotResult)
        try:
            result = json.loads(ev.result.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ServerProtocolError(f"NBD_OPT_X_NBDGW_SNAPSHOT result: {exc}") from None
        if not isinstance(result, dict):
            raise ServerProtocolError("NBD_OPT_X_NBDGW_SNAPSHOT result is not a JSON object")
        return result


@contextlib.asynccontextmanager
async def _deadline(seconds: float | None, what: str) -> AsyncIterator[None]:
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise NBDTimeoutError(f"timed out after {seconds} s {what}") from None
