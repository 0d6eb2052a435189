"""asyncio NBD server over :mod:`nbdcore.server` and :mod:`nbdcore.storage` images.

The protocol lives in the sans-I/O :class:`~nbdcore.server.ServerConnection`; this module only
moves bytes, runs the requests against the images and enforces the resource limits.

Where requests run:

- READ runs on the event loop: a page-cache read into a reused buffer is cheaper than a thread
  hop, and it keeps the hot path free of locks. The reply goes out with ``os.writev`` of the
  chunk headers and the data buffers (never joined) when the transport has nothing queued.
- Everything that changes an image or looks at its bitmaps (WRITE, WRITE_ZEROES, TRIM, FLUSH,
  BLOCK_STATUS) runs on one worker thread per image. One thread per image serialises them, so
  a FLUSH covers every write that was answered before it, on any connection: that is what makes
  CAN_MULTI_CONN true.

Requests of one connection run concurrently (up to ``max_in_flight``) and are answered as they
finish, so replies may come out of order, as the spec allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, Final, TypeVar

from nbdcore import wire
from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    DEFAULT_MAX_PAYLOAD,
    MAX_EXTENTS_PER_CHUNK,
    NBD_STATE_ZERO,
    Cmd,
    CmdFlag,
    Errno,
    TransmissionFlag,
)
from nbdcore.exceptions import ClientProtocolError, UsageError
from nbdcore.server import (
    Disconnect,
    ExportDescriptor,
    Negotiated,
    Request,
    ServerConnection,
    StartTLS,
)

if TYPE_CHECKING:
    from array import array

    from nbdcore.storage.image import Image

__all__ = ["ExportConfig", "NBDServer", "ServerLimits"]

log = logging.getLogger("nbdcore.server")

_READ_SIZE: Final = 256 * 1024
_IOV_MAX: Final = 1024
_T = TypeVar("_T")


@dataclass
class ExportConfig:
    """One export: an image, the name clients use, and which bitmaps it shows."""

    name: str
    image: Image
    description: str = ""
    read_only: bool = False
    bitmaps: Sequence[str] | None = None  # None: export every bitmap of the image


@dataclass
class ServerLimits:
    max_connections: int = 64
    max_in_flight: int = 64  # requests per connection being served at once
    max_option_length: int = 64 * 1024
    max_payload: int = DEFAULT_MAX_PAYLOAD
    handshake_timeout: float = 30.0
    max_extents: int = MAX_EXTENTS_PER_CHUNK  # per BLOCK_STATUS chunk


@dataclass
class _Export:
    config: ExportConfig
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="nbd-export")
    )

    @property
    def read_only(self) -> bool:
        return self.config.read_only or self.config.image.read_only

    def bitmap_names(self) -> list[str]:
        if self.config.bitmaps is None:
            return list(self.config.image.bitmaps)
        return list(self.config.bitmaps)

    def descriptor(self, max_payload: int) -> ExportDescriptor:
        flags = (
            TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.CAN_MULTI_CONN
            | TransmissionFlag.SEND_CACHE
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            flags |= (
                TransmissionFlag.SEND_TRIM
                | TransmissionFlag.SEND_WRITE_ZEROES
                | TransmissionFlag.SEND_FAST_ZERO
            )
        bitmaps = [CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + name for name in self.bitmap_names()]
        contexts = (CONTEXT_BASE_ALLOCATION, *bitmaps)
        return ExportDescriptor(
            name=self.config.name,
            size=self.config.image.size,
            flags=flags,
            description=self.config.description,
            contexts=contexts,
            block_size=wire.BlockSize(1, 4096, max_payload),
        )


# OS errno -> the NBD error value the spec fixes (anything else is EIO).
_ERRNO_MAP: Final = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOMEM: Errno.ENOMEM,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ENOTSUP: Errno.ENOTSUP,
    errno.EOPNOTSUPP: Errno.ENOTSUP,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> Errno:
    """The NBD error value for an exception raised while serving a request."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_MAP.get(exc.errno, Errno.EIO)
    if isinstance(exc, (UsageError, ValueError)):
        return Errno.EINVAL
    return Errno.EIO


class NBDServer:
    """Serves :class:`ExportConfig` exports over unix sockets and TCP.

    ``tls``: a server-side SSLContext (see ``nbdcore.tls.server_context``) enables STARTTLS;
    with ``tls_required`` nothing but STARTTLS and ABORT is accepted before TLS.
    """

    def __init__(
        self,
        exports: Sequence[ExportConfig] = (),
        *,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        limits: ServerLimits | None = None,
    ) -> None:
        if tls_required and tls is None:
            raise UsageError("tls_required needs a TLS context")
        self.tls = tls
        self.tls_required = tls_required
        self.limits = limits or ServerLimits()
        self._exports: dict[str, _Export] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[_Connection] = set()
        self._closing = False
        for export in exports:
            self.add_export(export)

    # --- exports ------------------------------------------------------------------------------

    def add_export(self, export: ExportConfig) -> None:
        if export.name in self._exports:
            raise UsageError(f"export {export.name!r} already exists")
        if export.bitmaps is not None:
            missing = [b for b in export.bitmaps if b not in export.image.bitmaps]
            if missing:
                raise UsageError(f"image has no bitmap named {', '.join(map(repr, missing))}")
        self._exports[export.name] = _Export(export)

    def remove_export(self, name: str) -> None:
        """New clients no longer see the export; connected ones keep using it."""
        try:
            export = self._exports.pop(name)
        except KeyError:
            raise UsageError(f"no export named {name!r}") from None
        export.worker.shutdown(wait=False)

    @property
    def exports(self) -> list[str]:
        return list(self._exports)

    # The ExportCatalog protocol of the sans-I/O core:
    def lookup(self, name: str) -> ExportDescriptor | None:
        export = self._find(name)
        return export.descriptor(self.limits.max_payload) if export else None

    def exports_list(self) -> list[ExportDescriptor]:
        return [e.descriptor(self.limits.max_payload) for e in self._exports.values()]

    def _find(self, name: str) -> _Export | None:
        export = self._exports.get(name)
        if export is None and name == "" and self._exports:
            # The empty name is the default export: the first one configured.
            export = next(iter(self._exports.values()))
        return export

    # --- listening ----------------------------------------------------------------------------

    async def start_unix(self, path: str) -> None:
        server = await asyncio.start_unix_server(self._accept, path, limit=_READ_SIZE)
        self._servers.append(server)

    async def start_tcp(self, host: str, port: int = 0) -> tuple[str, int]:
        server = await asyncio.start_server(self._accept, host, port, limit=_READ_SIZE)
        self._servers.append(server)
        addr = server.sockets[0].getsockname()
        return str(addr[0]), int(addr[1])

    async def close(self) -> None:
        """Stop listening, let every connection finish its in-flight requests, close them."""
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.stop()
        if self._connections:
            await asyncio.gather(*(c.done for c in list(self._connections)))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        for export in self._exports.values():
            export.worker.shutdown(wait=True)

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(s.serve_forever() for s in self._servers))

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or len(self._connections) >= self.limits.max_connections:
            log.warning("refusing a connection: limit of %d reached", self.limits.max_connections)
            writer.transport.abort()
            return
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)


class _Catalog:
    def __init__(self, server: NBDServer) -> None:
        self.server = server

    def lookup(self, name: str) -> ExportDescriptor | None:
        return self.server.lookup(name)

    def exports(self) -> Sequence[ExportDescriptor]:
        return self.server.exports_list()


class _Connection:
    def __init__(
        self, server: NBDServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.transport = writer.transport
        limits = server.limits
        self.proto = ServerConnection(
            _Catalog(server),
            tls_available=server.tls is not None,
            tls_required=server.tls_required,
            max_option_length=limits.max_option_length,
            max_payload=limits.max_payload,
            max_extents=limits.max_extents,
        )
        self.sem = asyncio.Semaphore(limits.max_in_flight)
        self.tasks: set[asyncio.Task[None]] = set()
        self.export: _Export | None = None
        self.negotiated: Negotiated | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._stopping = False
        self._reading = False
        self._task: asyncio.Task[Any] | None = None
        self._fd = -1
        self._free: list[bytearray] = []
        self._peer = writer.get_extra_info("peername") or "unix"
        sock = writer.get_extra_info("socket")
        if sock is not None:
            self._fd = sock.fileno()
        # Keep replies flowing: the default 64 KiB high-water mark would stall every read.
        self.transport.set_write_buffer_limits(high=4 * 1024 * 1024)

    def stop(self) -> None:
        """Server shutdown: stop reading, finish what is in flight, close."""
        self._stopping = True
        if self._reading and self._task is not None:
            self._task.cancel()

    # --- main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.server.limits.handshake_timeout, self._handshake_expired)
        try:
            self._send()
            await self._loop(timer)
        except ClientProtocolError as exc:
            log.info("closing connection from %s: %s", self._peer, exc)
            self.transport.abort()
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.info("connection from %s lost: %s", self._peer, exc)
            self.transport.abort()
        except Exception:
            log.exception("connection from %s failed", self._peer)
            self.transport.abort()
        finally:
            timer.cancel()
            self.proto.close()
            if self.tasks:
                await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                if not self.transport.is_closing():
                    await self.writer.drain()
                self.writer.close()
                await self.writer.wait_closed()
            if not self.done.done():
                self.done.set_result(None)

    def _handshake_expired(self) -> None:
        if self.negotiated is None:
            log.info("handshake timeout from %s", self._peer)
            self.transport.abort()
            self.stop()

    async def _read(self) -> bytes:
        if self._stopping:
            return b""
        self._reading = True
        try:
            return await self.reader.read(_READ_SIZE)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self._stopping or task is None:
                raise
            task.uncancel()
            return b""
        finally:
            self._reading = False

    async def _loop(self, timer: asyncio.TimerHandle) -> None:
        proto = self.proto
        while True:
            data = await self._read()
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            stop = False
            for event in proto.events_received():
                if isinstance(event, Request):
                    await self.sem.acquire()
                    self._dispatch(event)
                elif isinstance(event, Negotiated):
                    timer.cancel()
                    self.negotiated = event
                    self.export = self.server._find(event.export.name)
                    if self.export is None:  # removed between lookup and now
                        raise ClientProtocolError("export was removed during the handshake")
                elif isinstance(event, StartTLS):
                    await self._start_tls()
                elif isinstance(event, Disconnect):
                    stop = True
            self._send()
            if stop:
                return
            if self.transport.get_write_buffer_size() > 0:
                await self.writer.drain()

    async def _start_tls(self) -> None:
        assert self.server.tls is not None
        self._send()
        await self.writer.drain()
        await self.writer.start_tls(self.server.tls)
        self.transport = self.writer.transport
        self._fd = -1  # the fast writev path bypasses the transport: never under TLS
        self.proto.tls_established()

    # --- output -------------------------------------------------------------------------------

    def _send(self) -> None:
        """Write what the core queued. On a plain socket with nothing buffered, one writev
        sends headers and payloads straight from their buffers; whatever the kernel does not
        take goes to the transport (which copies it), so buffers are free when this returns."""
        bufs = self.proto.data_to_send()
        if not bufs or self.transport.is_closing():
            return
        if self._fd >= 0 and self.transport.get_write_buffer_size() == 0:
            while bufs:
                batch = bufs[:_IOV_MAX]
                try:
                    sent = os.writev(self._fd, batch)
                except BlockingIOError:
                    break
                except OSError as exc:
                    log.info("write to %s failed: %s", self._peer, exc)
                    self.transport.abort()
                    return
                # Drop what was fully sent, slice what was partly sent.
                i = 0
                while i < len(batch) and sent >= len(batch[i]):
                    sent -= len(batch[i])
                    i += 1
                rest = bufs[i:]
                if sent and rest:
                    rest[0] = memoryview(rest[0])[sent:]
                bufs = rest
                if i < len(batch):
                    break  # the socket is full
        for buf in bufs:
            self.transport.write(buf)

    async def _drain(self) -> None:
        if self.transport.get_write_buffer_size() > 0 and not self.transport.is_closing():
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    # --- requests -----------------------------------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        if req.command == Cmd.READ:
            # Inline: see the module docstring. The semaphore slot is released right away.
            try:
                self._read_request(req)
            finally:
                self.sem.release()
            return
        task = asyncio.create_task(self._serve(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _take_buffer(self, length: int) -> memoryview:
        # Buffers are reused only when the fast path is on: a TLS transport keeps references.
        if self._fd >= 0:
            for i, buf in enumerate(self._free):
                if len(buf) >= length:
                    del self._free[i]
                    self._free.append(buf)
                    return memoryview(buf)[:length]
            buf = bytearray(length)
            if len(self._free) < 4:
                self._free.append(buf)
            else:
                self._free[0] = buf
            return memoryview(buf)
        return memoryview(bytearray(length))

    def _read_request(self, req: Request) -> None:
        assert self.export is not None
        image = self.export.config.image
        try:
            buf = self._take_buffer(req.length)
            pieces: list[memoryview | int] = []
            if self.proto.structured_replies and CmdFlag.DF not in req.flags and req.length:
                # Holes become OFFSET_HOLE chunks: nothing to read, nothing to send.
                for off, length, flags in image.disk.allocation(req.offset, req.length):
                    if flags & NBD_STATE_ZERO:
                        pieces.append(length)
                    else:
                        view = buf[off - req.offset : off - req.offset + length]
                        image.readinto(view, off)
                        pieces.append(view)
            elif req.length:
                image.readinto(buf, req.offset)
                pieces.append(buf)
        except Exception as exc:
            self._fail_request(req, exc)
        else:
            self.proto.reply_read(req, pieces)
        self._send()

    def _fail_request(self, req: Request, exc: BaseException) -> None:
        code = nbd_errno(exc)
        if code == Errno.EIO and not isinstance(exc, OSError):
            log.exception("%s failed", req.command.name, exc_info=exc)
        self.proto.reply_error(req, code, str(exc))

    async def _in_worker(self, func: Callable[..., _T], *args: Any) -> _T:
        assert self.export is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.export.worker, func, *args)

    async def _serve(self, req: Request) -> None:
        try:
            try:
                await self._perform(req)
            except Exception as exc:
                self._fail_request(req, exc)
            self._send()
            await self._drain()
        finally:
            self.sem.release()

    async def _perform(self, req: Request) -> None:
        assert self.export is not None
        image = self.export.config.image
        fua = CmdFlag.FUA in req.flags
        cmd = req.command
        if cmd == Cmd.WRITE:
            assert req.data is not None
            await self._in_worker(_write, image, req.data, req.offset, fua)
        elif cmd == Cmd.FLUSH:
            await self._in_worker(image.flush)
        elif cmd == Cmd.TRIM:
            if req.length:
                await self._in_worker(_trim, image, req.offset, req.length, fua)
        elif cmd == Cmd.WRITE_ZEROES:
            no_hole = CmdFlag.NO_HOLE in req.flags
            if CmdFlag.FAST_ZERO in req.flags and no_hole:
                # Zeroing without a hole may mean writing zeros, which is no faster than the
                # client writing them: FAST_ZERO asks us to say so instead (spec: ENOTSUP).
                self.proto.reply_error(req, Errno.ENOTSUP, "zeroing would not be fast")
                return
            if req.length:
                await self._in_worker(_zero, image, req.offset, req.length, not no_hole, fua)
        elif cmd == Cmd.CACHE:
            pass  # advisory; the page cache is shared, so there is nothing useful to do
        elif cmd == Cmd.BLOCK_STATUS:
            answers = await self._in_worker(
                _block_status,
                image,
                req.contexts,
                req.offset,
                req.length,
                1 if CmdFlag.REQ_ONE in req.flags else self.server.limits.max_extents,
            )
            self.proto.reply_block_status(req, answers)
            return
        else:  # pragma: no cover - the core only lets known commands through
            raise ValueError(f"unexpected command {cmd!r}")
        self.proto.reply_ok(req)


def _write(image: Image, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
    image.write(memoryview(data), offset, fua=fua)


def _trim(image: Image, offset: int, length: int, fua: bool) -> None:
    image.trim(offset, length, fua=fua)


def _zero(image: Image, offset: int, length: int, may_trim: bool, fua: bool) -> None:
    image.write_zeroes(offset, length, may_trim=may_trim, fua=fua)


def _block_status(
    image: Image,
    contexts: tuple[tuple[int, str], ...],
    offset: int,
    length: int,
    max_extents: int,
) -> list[tuple[int, array[int], array[int]]]:
    from array import array

    answers = []
    for cid, name in contexts:
        if name == CONTEXT_BASE_ALLOCATION:
            runs = image.disk.allocation(offset, length)
        else:
            bitmap = image.bitmaps.get(name[len(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX) :])
            if bitmap is None:
                raise OSError(errno.EINVAL, f"bitmap of {name} no longer exists")
            runs = bitmap.extents(offset, length)
        lengths: array[int] = array("Q")
        flags: array[int] = array("Q")
        last = -1
        for _, n, f in islice(runs, max_extents):
            # Merge equal neighbours: fewer extents, same meaning.
            if f == last:
                lengths[-1] += n
            else:
                lengths.append(n)
                flags.append(f)
                last = f
        answers.append((cid, lengths, flags))
    return answers
