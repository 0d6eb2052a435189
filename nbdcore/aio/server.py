"""asyncio NBD server over :mod:`nbdcore.server` and :mod:`nbdcore.storage` images.

The protocol lives in the sans-I/O :class:`~nbdcore.server.ServerConnection`; this module only
moves bytes, runs the requests against the images and enforces the resource limits.

Where requests run:

- READ of a raw file on a plain socket is answered on the event loop: its data is queued as a
  file span that the connection's sender thread passes to ``sendfile`` (page cache to socket,
  never through Python). Any other READ (snapshot, memory image, TLS) is read into a fresh
  buffer by the export's reader threads, off the loop. Replies leave with ``os.writev`` of
  chunk headers and payloads, never joined (see _SocketChannel); after STARTTLS, through an
  asyncio TLS transport. BLOCK_STATUS of a read-only raw file also runs on the loop; of a
  snapshot, in the reader threads.
- Everything that changes an image or looks at its bitmaps (WRITE, WRITE_ZEROES, TRIM, FLUSH,
  BLOCK_STATUS of a writable export) runs on one worker thread per image. One thread per image
  serialises them, so a FLUSH covers every write that was answered before it, on any
  connection: that is what makes CAN_MULTI_CONN true.

Requests of one connection run concurrently (up to ``max_in_flight``) and are answered as they
finish, so replies may come out of order, as the spec allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import select
import socket
import ssl
import stat
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from nbdcore import clear_ext, wire
from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    DEFAULT_MAX_PAYLOAD,
    NBD_STATE_ZERO,
    Cmd,
    CmdFlag,
    Errno,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdcore.exceptions import (
    ClientProtocolError,
    ConnectionLostError,
    OptionError,
    RequestError,
    UsageError,
)
from nbdcore.server import (
    DEFAULT_MAX_EXTENTS,
    Disconnect,
    ExportDescriptor,
    FileSpan,
    Negotiated,
    Payload,
    Request,
    ServerConnection,
    StartTLS,
)

if TYPE_CHECKING:
    from array import array

    from nbdcore.storage.bitmap import DirtyBitmap
    from nbdcore.storage.image import Image

__all__ = ["ExportConfig", "NBDServer", "ServerLimits"]

log = logging.getLogger("nbdcore.server")

_READ_SIZE: Final = 256 * 1024
_IOV_MAX: Final = 1024
_SNDBUF: Final = 4 * 1024 * 1024
_READERS: Final = 2  # threads per export reading what sendfile cannot send
_MMAP_READ: Final = 1024 * 1024  # read buffers from here on are anonymous mappings
# NBDServer.pread_into reads at most this much on the caller's loop (a page-cache copy of
# 2 MiB is ~0.2 ms here); the rest of a bigger read goes to the reader threads.
_INLINE_READ: Final = 2 * 1024 * 1024
_T = TypeVar("_T")
# Commands whose reply can be megabytes (BLOCK_STATUS: max_extents per context; the cleared
# runs of X_NBDGW_CLEAR; a READ that is not sendfile): built one at a time per connection,
# once the send queue drained.
_LARGE_REPLIES: Final = frozenset({Cmd.READ, Cmd.BLOCK_STATUS, Cmd.X_NBDGW_CLEAR})
# A unix socket's clients get the exports with no authentication (TLS aside): owner only,
# unless the caller widens it (a group, say).
UNIX_SOCKET_MODE: Final = 0o600


def _bind_unix(path: str, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the mode of the socket's inode (less the umask):
        # set before bind, there is no moment at which the file has a wider mode.
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        os.chmod(path, mode)  # the umask may have removed bits the caller asked for
    except BaseException:
        sock.close()
        raise
    return sock


def stale_unix_socket(path: str) -> bool:
    """Whether ``path`` is a socket file no server accepts on: only a refused connection says
    so. A connection accepted, or one that would wait (a live server with a full backlog),
    means a live server; any other file is not ours to remove."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            return False
    except FileNotFoundError:
        return True  # gone meanwhile: the bind may be retried
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False  # EAGAIN (backlog full) and the like: someone is there
    finally:
        probe.close()
    return False


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
    max_extents: int = DEFAULT_MAX_EXTENTS  # per BLOCK_STATUS chunk (qemu's 131072)
    max_buffered_writes: int = 64 * 1024 * 1024  # WRITE payload bytes held per connection
    close_timeout: float = 10.0  # to finish in-flight requests when a connection ends


@dataclass
class _Export:
    config: ExportConfig
    worker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="nbd-export")
    )
    # Reads that cannot use sendfile (threads start on first use).
    reader: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(_READERS, thread_name_prefix="nbd-read")
    )
    connections: int = 0  # in transmission on this export

    def shutdown(self, wait: bool) -> None:
        self.worker.shutdown(wait=wait)
        self.reader.shutdown(wait=wait)

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
            flags |= TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES
            if self.config.image.can_zero_fast:
                # Never on a block device or a file system that cannot punch holes: there a
                # fast zero could only ever fail (spec: SHOULD NOT advertise it then).
                flags |= TransmissionFlag.SEND_FAST_ZERO
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
    ``clear_extension``: offer NBD_OPT_X_NBDGW_CLEAR, with which a client clears ranges of
    the exported bitmaps (docs/extension-clear.md); clients that do not ask never see it.
    ``snapshot_management``: answer NBD_OPT_X_NBDGW_SNAPSHOT, with which a client creates,
    lists and releases snapshots of the writable exports (docs/extension-snapshot.md); each
    snapshot is served as the read-only export ``EXPORT@SNAPSHOT``.
    """

    def __init__(
        self,
        exports: Sequence[ExportConfig] = (),
        *,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        limits: ServerLimits | None = None,
        clear_extension: bool = True,
        snapshot_management: bool = False,
    ) -> None:
        if tls_required and tls is None:
            raise UsageError("tls_required needs a TLS context")
        self.tls = tls
        self.tls_required = tls_required
        self.limits = limits or ServerLimits()
        self.clear_extension = clear_extension
        self.snapshot_management = snapshot_management
        self._exports: dict[str, _Export] = {}
        self._retired: list[_Export] = []
        self._listeners: list[tuple[socket.socket, asyncio.Task[None], str | None]] = []
        self._connections: dict[_Connection, asyncio.Task[None]] = {}
        self._closing = False
        for export in exports:
            self.add_export(export)

    # --- exports ------------------------------------------------------------------------------

    def add_export(self, export: ExportConfig) -> None:
        if export.name in self._exports:
            raise UsageError(f"export {export.name!r} already exists")
        try:
            # Both go on the wire as NBD strings: UTF-8, no NUL, at most 4096 bytes.
            wire.encode_string(export.name)
            wire.encode_string(export.description)
        except wire.WireError as exc:
            raise UsageError(f"export {export.name[:64]!r}: {exc}") from None
        if export.bitmaps is not None:
            missing = [b for b in export.bitmaps if b not in export.image.bitmaps]
            if missing:
                raise UsageError(f"image has no bitmap named {', '.join(map(repr, missing))}")
        self._exports[export.name] = _Export(export)

    def snapshot_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """One NBD_OPT_X_NBDGW_SNAPSHOT request (docs/extension-snapshot.md). Runs on the event
        loop: creating and releasing fsync a few small files (milliseconds), and wait for a
        write in progress on the image (its write lock orders them)."""
        from nbdcore.storage import (
            NoSuchBitmapError,
            NoSuchSnapshotError,
            Snapshot,
            SnapshotError,
            SnapshotExistsError,
        )

        if not self.snapshot_management:
            raise OptionError(Opt.X_NBDGW_SNAPSHOT, Rep.ERR_UNSUP, "snapshots are not offered")
        from nbdcore.storage import checkpoint as ckpt
        from nbdcore.storage.errors import (
            CheckpointError,
            CheckpointExistsError,
            CheckpointOrderError,
            NoSuchCheckpointError,
        )
        from nbdcore.storage.snapshot import MAX_SNAPSHOTS, SnapshotLimitError

        op, name, snap_id = request.get("op"), request.get("export"), request.get("snapshot")
        if op not in _SNAPSHOT_OPS or not isinstance(name, str):
            raise OptionError(
                Opt.X_NBDGW_SNAPSHOT,
                Rep.ERR_INVALID,
                f"need op {'|'.join(_SNAPSHOT_OPS)} and export",
            )
        if op in ("create", "release") and not isinstance(snap_id, str):
            raise OptionError(Opt.X_NBDGW_SNAPSHOT, Rep.ERR_INVALID, "need snapshot")
        export = self._exports.get(name)
        if export is None:
            return _snapshot_error("EXPORT_NOT_FOUND", f"no export named {name!r}")
        image = export.config.image
        if isinstance(image, Snapshot):
            return _snapshot_error("SNAPSHOTS_NOT_SUPPORTED", f"{name!r} is a snapshot itself")
        if export.read_only:
            return _snapshot_error("SNAPSHOTS_NOT_SUPPORTED", f"export {name!r} is read-only")
        try:
            if op == "list":
                return {"snapshots": [_snapshot_info(name, s) for s in image.snapshots.values()]}
            if op == "checkpoints":
                return {"checkpoints": [_checkpoint_info(c) for c in ckpt.chain(image)]}
            if op == "delete-checkpoint":
                return {"merged_into": ckpt.delete(image, str(request.get("checkpoint", "")))}
            assert isinstance(snap_id, str)
            if op == "create":
                chain = ckpt.chain(image)
                plan = ckpt.plan(
                    chain, str(request.get("checkpoint") or ""), str(request.get("since") or "")
                )
                between = request.get("between")
                if between:  # [A, B]: a view of what was written between checkpoints A and B
                    base, target = str(between[0]), str(between[1])
                    sources = ckpt.between(chain, base, target)
                    if sources:
                        plan.views[ckpt.between_view(base, target)] = [c.bitmap for c in sources]
                snap = image.create_snapshot(
                    snap_id,
                    bitmaps=list(request.get("bitmaps") or ()),
                    cluster_size=int(request.get("cluster_size") or 65536),
                    max_bytes=request.get("max_bytes") or None,
                    on_full=str(request.get("on_full") or "break"),
                    views=plan.views,
                    checkpoint=plan.started,
                )
                self.add_export(
                    ExportConfig(
                        f"{name}@{snap_id}",
                        snap,
                        description=f"snapshot {snap_id} of {name}",
                        read_only=True,
                    )
                )
                return {"snapshot": _snapshot_info(name, snap)}
            image.snapshot(snap_id)  # an unknown snapshot leaves the exports alone
            if f"{name}@{snap_id}" in self._exports:
                self.remove_export(f"{name}@{snap_id}")
            return {"merged": image.release_snapshot(snap_id)}
        except NoSuchCheckpointError as exc:
            return _snapshot_error("CHECKPOINT_NOT_FOUND", str(exc), checkpoint=exc.checkpoint)
        except CheckpointExistsError as exc:
            return _snapshot_error("CHECKPOINT_EXISTS", str(exc), checkpoint=exc.checkpoint)
        except CheckpointOrderError as exc:
            return _snapshot_error("INVALID_CHECKPOINT", str(exc), field="between")
        except CheckpointError as exc:
            return _snapshot_error("INVALID_CHECKPOINT", str(exc), field="checkpoint")
        except NoSuchBitmapError as exc:
            return _snapshot_error("BITMAP_NOT_FOUND", str(exc), bitmap=exc.name)
        except SnapshotExistsError as exc:
            return _snapshot_error("SNAPSHOT_EXISTS", str(exc))
        except SnapshotLimitError as exc:
            # INVALID_FIELD as before, so older gateways still understand it; "limit" says why.
            return _snapshot_error("INVALID_FIELD", str(exc), limit=str(MAX_SNAPSHOTS))
        except NoSuchSnapshotError as exc:
            return _snapshot_error("SNAPSHOT_NOT_FOUND", str(exc))
        except (SnapshotError, ValueError, TypeError) as exc:
            return _snapshot_error("INVALID_FIELD", str(exc))
        except OSError as exc:
            return _snapshot_error("FAILED", str(exc))

    def remove_export(self, name: str) -> None:
        """New clients no longer see the export; connected ones keep using it."""
        try:
            export = self._exports.pop(name)
        except KeyError:
            raise UsageError(f"no export named {name!r}") from None
        if export.connections:
            self._retired.append(export)  # its worker still serves them: freed by the last
        else:
            export.shutdown(wait=False)

    @property
    def retired_exports(self) -> int:
        """Removed exports still serving the clients connected to them."""
        return len(self._retired)

    def _attach(self, name: str) -> _Export | None:
        export = self._find(name)
        if export is not None:
            export.connections += 1
        return export

    def _detach(self, export: _Export) -> None:
        """A connection on ``export`` ended: the last one on a removed export frees it (its
        worker thread and, for a snapshot export, the released snapshot's forks)."""
        export.connections -= 1
        if export.connections == 0 and any(e is export for e in self._retired):
            self._retired = [e for e in self._retired if e is not export]
            export.shutdown(wait=False)

    @property
    def exports(self) -> list[str]:
        return list(self._exports)

    @property
    def connections(self) -> int:
        """Clients connected right now."""
        return len(self._connections)

    @property
    def queued_bytes(self) -> int:
        """Reply bytes waiting to be sent (not yet taken by the kernel), all clients together:
        at most about 2 * max_payload plus one reply per connection."""
        return sum(conn.channel.backlog() for conn in self._connections)

    def lookup(self, name: str) -> ExportDescriptor | None:
        export = self._find(name)
        return export.descriptor(self.limits.max_payload) if export else None

    async def pread_into(self, name: str, buf: memoryview, offset: int) -> None:
        """Read ``len(buf)`` bytes of export ``name`` at ``offset`` into ``buf``, as a READ
        would, without the wire: for the process that embeds this server (the gateway streams
        an embedded export's data this way, one copy from the image instead of a reply sent
        and received on the same event loop). What the page cache holds is read on the
        calling loop (Image.try_readinto, never waiting for the disk or a writer); the rest in
        the export's reader threads, like a READ that cannot use sendfile. If the call is
        cancelled, the read may still land in ``buf``. Errors: UsageError (no such export),
        RequestError (EINVAL out of range, EIO a failed read), ConnectionLostError (the server
        is closing)."""
        export = self._exports.get(name)
        if export is None:
            raise UsageError(f"no export named {name!r}")
        image = export.config.image
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if offset < 0 or offset + len(view) > image.size:
            raise RequestError(Errno.EINVAL, "read past the end of the export", offset)
        if self._closing:
            raise ConnectionLostError("the NBD server is closing")
        loop = asyncio.get_running_loop()
        try:
            # What the page cache holds is read here: handing a cached MiB to a thread cost
            # more (the hop, the GIL going back and forth) than the copy itself.
            done = image.try_readinto(view[:_INLINE_READ], offset)
            if done < len(view):
                await loop.run_in_executor(
                    export.reader, image.readinto, view[done:], offset + done
                )
        except OSError as exc:
            raise RequestError(Errno.EIO, str(exc), offset) from exc
        except RuntimeError as exc:  # the reader threads were shut down: the server closed
            raise ConnectionLostError("the NBD server closed") from exc

    def exports_list(self) -> list[ExportDescriptor]:
        return [e.descriptor(self.limits.max_payload) for e in self._exports.values()]

    def _find(self, name: str) -> _Export | None:
        export = self._exports.get(name)
        if export is None and name == "" and self._exports:
            # The empty name is the default export: the first one configured.
            export = next(iter(self._exports.values()))
        return export

    # --- listening ----------------------------------------------------------------------------

    async def start_unix(self, path: str, *, mode: int = UNIX_SOCKET_MODE) -> None:
        """Listen on the unix socket ``path``, created with ``mode`` whatever the umask (anyone
        who can connect can read, write and clear every export). A socket file left by a server
        that died (kill -9) is replaced; one that a live server still accepts on never is:
        that is EADDRINUSE, as for any other file in the way."""
        try:
            sock = _bind_unix(path, mode)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or not stale_unix_socket(path):
                raise
            log.warning("replacing %s: a stale socket nothing listens on", path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            sock = _bind_unix(path, mode)
        self._listen(sock, path)

    async def start_tcp(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen on TCP; returns the bound address (useful with port 0)."""
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except BaseException:
            sock.close()
            raise
        self._listen(sock, None)
        bound = sock.getsockname()
        return str(bound[0]), int(bound[1])

    def _listen(self, sock: socket.socket, path: str | None) -> None:
        sock.listen(128)
        sock.setblocking(False)
        task = asyncio.create_task(self._accept_loop(sock))
        self._listeners.append((sock, task, path))

    async def _accept_loop(self, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving the others
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                # A reply of 256 KiB should not need several trips through the event loop
                # (unix sockets default to 208 KiB; measured faster on TCP loopback too).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._closing or len(self._connections) >= self.limits.max_connections:
                log.warning("refusing a connection: %d clients connected", len(self._connections))
                sock.close()
                continue
            conn = _Connection(self, sock)
            task = asyncio.create_task(conn.run())
            self._connections[conn] = task
            task.add_done_callback(partial(self._forget, conn))

    def _forget(self, conn: _Connection, _task: object) -> None:
        self._connections.pop(conn, None)

    async def close(self) -> None:
        """Stop listening, let every connection finish its in-flight requests, close."""
        self._closing = True
        for sock, task, path in self._listeners:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            sock.close()
            if path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self._listeners.clear()
        for conn in list(self._connections):
            conn.stop()
        if self._connections:
            await asyncio.gather(*self._connections.values(), return_exceptions=True)
        for export in [*self._exports.values(), *self._retired]:
            export.shutdown(wait=True)
        self._retired.clear()

    async def __aenter__(self) -> NBDServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await asyncio.gather(*(task for _, task, _ in self._listeners))


class _Catalog:
    def __init__(self, server: NBDServer) -> None:
        self.server = server

    def lookup(self, name: str) -> ExportDescriptor | None:
        return self.server.lookup(name)

    def exports(self) -> Sequence[ExportDescriptor]:
        return self.server.exports_list()

    def snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.server.snapshot_request(request)


# --- byte channels ---------------------------------------------------------------------------

Buffer = bytes | bytearray | memoryview


class _SocketChannel:
    """A plain socket driven directly: ``recv_into`` a fixed buffer on the event loop, and a
    sender thread per connection that drains a queue with ``writev`` (buffers never copied or
    joined: asyncio 3.11 transports join and copy, which halved read throughput) and
    ``sendfile`` (file spans). The thread runs the kernel's copy work, with the GIL released,
    beside the event loop: the server uses more than one core. Buffers handed to ``send`` must
    not change until sent."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.queue: deque[Payload] = deque()
        self.queued = 0
        self.broken = False
        self._closing = False
        self._rbuf = bytearray(_READ_SIZE)
        self._cond = threading.Condition()
        self._drained = asyncio.Event()
        self._drained.set()
        self._thread = threading.Thread(target=self._send_thread, name="nbd-send", daemon=True)
        self._thread.start()

    async def recv(self) -> Buffer:
        n = await self.loop.sock_recv_into(self.sock, self._rbuf)
        return memoryview(self._rbuf)[:n]

    def send(self, items: list[Payload]) -> None:
        size = sum(len(b) for b in items)
        with self._cond:
            if self.broken:
                return
            self.queue.extend(items)
            self.queued += size
            self._cond.notify()
        self._drained.clear()

    def _push(self, items: Sequence[Payload]) -> tuple[int, int]:
        """Send what the socket takes now: writev for runs of buffers, sendfile for file
        spans. Returns (bytes sent of the first item not wholly sent, items wholly sent)."""
        i, n = 0, len(items)
        while i < n:
            item = items[i]
            try:
                if isinstance(item, FileSpan):
                    sent = os.sendfile(self.fd, item.fd, item.offset, item.length)
                    if sent == 0:
                        raise OSError(errno.EIO, "the image shrank under a read")
                    if sent < item.length:
                        return sent, i
                    i += 1
                    continue
                j = i + 1
                while j < n and j - i < _IOV_MAX and not isinstance(items[j], FileSpan):
                    j += 1
                batch = cast("list[Buffer]", items[i:j])
                sent = os.writev(self.fd, batch)
            except BlockingIOError:
                return 0, i
            except OSError as exc:
                self._break(exc)
                return 0, n
            for buf in batch:
                if sent < len(buf):
                    return sent, i
                sent -= len(buf)
                i += 1
        return 0, n

    def _send_thread(self) -> None:
        queue = self.queue
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while True:
            with self._cond:
                while not queue and not self._closing:
                    self._cond.wait()
                if not queue:
                    return
                items = list(islice(queue, _IOV_MAX))
            sent, done = self._push(items)
            with self._cond:
                if self.broken:
                    continue  # _break emptied the queue; wait for close
                for _ in range(done):
                    self.queued -= len(queue.popleft())
                if sent:
                    queue[0] = _rest(queue[0], sent)
                    self.queued -= sent
                empty = not queue
            if empty:
                self.loop.call_soon_threadsafe(self._check_drained)
            elif done < len(items):
                # The socket is full: wait until it drains (or breaks: abort shuts it down).
                poller.poll(1000)

    def _check_drained(self) -> None:
        with self._cond:
            empty = not self.queue
            if empty:
                self.queued = 0
        if empty:
            self._drained.set()

    def _break(self, exc: BaseException | None) -> None:
        if exc is not None:
            log.info("write failed: %s", exc)
        with self._cond:
            self.broken = True
            self.queue.clear()
            self.queued = 0
            self._cond.notify()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
            self.loop.call_soon_threadsafe(self._drained.set)

    def backlog(self) -> int:
        return self.queued

    async def drain(self, high: int) -> None:
        while self.queued > high and not self.broken:
            await self._drained.wait()

    async def flush(self) -> None:
        await self._drained.wait()

    def stop_reading(self) -> None:
        # A pending recv returns EOF: the connection then ends in order.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        self._break(None)

    async def _stop_thread(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    async def close(self) -> None:
        try:
            await self._stop_thread()
        finally:
            self.sock.close()

    async def start_tls(self, ctx: ssl.SSLContext, pending: list[Payload]) -> _TLSChannel:
        """Hand the socket to an asyncio TLS transport, sending ``pending`` (the STARTTLS ACK)
        only once reading is paused, so the client's first TLS record cannot be lost."""
        await self.flush()
        await self._stop_thread()
        protocol = _TLSProtocol()
        transport, _ = await self.loop.connect_accepted_socket(lambda: protocol, self.sock)
        transport.pause_reading()
        if protocol.chunks:
            raise ClientProtocolError("data after NBD_OPT_STARTTLS before the TLS handshake")
        for buf in pending:
            assert not isinstance(buf, FileSpan)  # only option replies are pending here
            transport.write(buf)
        tls_transport = await self.loop.start_tls(transport, protocol, ctx, server_side=True)
        if tls_transport is None:
            raise ConnectionResetError("TLS handshake ended the connection")
        protocol.transport = tls_transport
        return _TLSChannel(protocol)


class _TLSProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.chunks: deque[bytes] = deque()
        self.size = 0
        self.eof = False
        self.read_paused = False
        self.readable = asyncio.Event()
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        self.readable.set()
        if self.size > 4 * _READ_SIZE and isinstance(self.transport, asyncio.ReadTransport):
            self.transport.pause_reading()
            self.read_paused = True

    def eof_received(self) -> bool:
        self.eof = True
        self.readable.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.readable.set()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


class _TLSChannel:
    """The channel after STARTTLS: an asyncio TLS transport (it keeps references to the
    buffers it is given, which is why READ buffers are never reused)."""

    def __init__(self, protocol: _TLSProtocol) -> None:
        self.protocol = protocol
        transport = protocol.transport
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.broken = False

    async def recv(self) -> Buffer:
        p = self.protocol
        while not p.chunks and not p.eof:
            p.readable.clear()
            await p.readable.wait()
        if not p.chunks:
            return b""
        data = p.chunks.popleft()
        p.size -= len(data)
        if p.read_paused and p.size < _READ_SIZE:
            p.read_paused = False
            self.transport.resume_reading()
        return data

    def send(self, items: list[Payload]) -> None:
        if self.transport.is_closing():
            return
        for item in items:
            if isinstance(item, FileSpan):
                # TLS encrypts in user space anyway: load the span.
                data = os.pread(item.fd, item.length, item.offset)
                if len(data) != item.length:
                    self.transport.abort()  # the image shrank: the reply cannot be finished
                    return
                item = data
            self.transport.write(item)

    def backlog(self) -> int:
        return self.transport.get_write_buffer_size()

    async def drain(self, high: int) -> None:
        if not self.transport.is_closing():
            await self.protocol.writable.wait()

    async def flush(self) -> None:
        await self.drain(0)

    def stop_reading(self) -> None:
        self.protocol.eof = True
        self.protocol.readable.set()

    def abort(self) -> None:
        self.transport.abort()

    async def close(self) -> None:
        self.transport.close()


Channel = _SocketChannel | _TLSChannel


def _rest(item: Payload, sent: int) -> Payload:
    """What is left of ``item`` after ``sent`` bytes of it went out."""
    if isinstance(item, FileSpan):
        return FileSpan(item.fd, item.offset + sent, item.length - sent)
    return memoryview(item)[sent:]


class _Connection:
    def __init__(self, server: NBDServer, sock: socket.socket) -> None:
        self.server = server
        self.channel: Channel = _SocketChannel(sock)
        try:
            self._peer = str(sock.getpeername() or "unix")
        except OSError:
            self._peer = "?"
        limits = server.limits
        self.proto = ServerConnection(
            _Catalog(server),
            tls_available=server.tls is not None,
            tls_required=server.tls_required,
            max_option_length=limits.max_option_length,
            max_payload=limits.max_payload,
            max_extents=limits.max_extents,
            clear_extension=server.clear_extension,
        )
        self.sem = asyncio.Semaphore(limits.max_in_flight)
        self.write_bytes = 0
        self._write_done = asyncio.Event()
        self._large_reply = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        self.export: _Export | None = None
        self.negotiated: Negotiated | None = None

    def stop(self) -> None:
        """Server shutdown: stop reading, finish what is in flight, close."""
        self.channel.stop_reading()

    # --- main loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._session()
        finally:
            if self.export is not None:
                self.server._detach(self.export)

    async def _session(self) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.server.limits.handshake_timeout, self._handshake_expired)
        try:
            self._send()
            await self._loop(timer)
        except ClientProtocolError as exc:
            log.info("closing connection from %s: %s", self._peer, exc)
            self.channel.abort()
        except (ConnectionError, ssl.SSLError, TimeoutError) as exc:
            log.info("connection from %s lost: %s", self._peer, exc)
            self.channel.abort()
        except OSError as exc:
            log.info("connection from %s failed: %s", self._peer, exc)
            self.channel.abort()
        except Exception:
            log.exception("connection from %s failed", self._peer)
            self.channel.abort()
        finally:
            timer.cancel()
            self.proto.close()
            # Finish what is in flight and send it, but a client that stopped reading must
            # not hold the server hostage: after close_timeout, drop it.
            grace = self.server.limits.close_timeout
            try:
                async with asyncio.timeout(grace):
                    if self.tasks:
                        await asyncio.gather(*self.tasks, return_exceptions=True)
                    await self.channel.flush()
            except Exception as exc:  # TimeoutError included
                log.info("dropping connection from %s: %r", self._peer, exc)
                self.channel.abort()
                if self.tasks:
                    await asyncio.gather(*self.tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.channel.close()

    def _handshake_expired(self) -> None:
        if self.negotiated is None:
            log.info("handshake timeout from %s", self._peer)
            self.channel.abort()

    async def _loop(self, timer: asyncio.TimerHandle) -> None:
        proto = self.proto
        high = 2 * self.server.limits.max_payload
        while True:
            data = await self.channel.recv()
            if data:
                proto.receive_data(data)
            else:
                proto.receive_eof()
            stop = False
            for event in proto.events_received():
                if isinstance(event, Request):
                    if event.command == Cmd.WRITE and event.data is not None:
                        await self._reserve_write(len(event.data))
                    await self.sem.acquire()
                    self._dispatch(event)
                    if self.channel.backlog() > high:
                        # Inline READs of one batch could otherwise queue without bound.
                        await self.channel.drain(high)
                elif isinstance(event, Negotiated):
                    timer.cancel()
                    self.negotiated = event
                    self.export = self.server._attach(event.export.name)
                    if self.export is None:  # removed between lookup and now
                        raise ClientProtocolError("export was removed during the handshake")
                    log.info(
                        "%s: export %r, %s, contexts %s",
                        self._peer,
                        event.export.name,
                        "extended headers"
                        if event.extended_headers
                        else "structured replies"
                        if event.structured_replies
                        else "simple replies",
                        sorted(event.meta_contexts.values()),
                    )
                elif isinstance(event, StartTLS):
                    await self._start_tls()
                elif isinstance(event, Disconnect):
                    stop = True
            self._send()
            if stop:
                return
            await self.channel.drain(high)

    async def _reserve_write(self, n: int) -> None:
        """Bound the memory held by WRITE payloads waiting for the disk: stop reading from
        this client until enough of them are done (one is always let through)."""
        limit = self.server.limits.max_buffered_writes
        while self.write_bytes and self.write_bytes + n > limit:
            self._write_done.clear()
            await self._write_done.wait()
        self.write_bytes += n

    async def _start_tls(self) -> None:
        assert self.server.tls is not None
        channel = self.channel
        if not isinstance(channel, _SocketChannel):
            raise ClientProtocolError("STARTTLS on a TLS channel")
        pending = self.proto.data_to_send()
        self.channel = await channel.start_tls(self.server.tls, pending)
        self.proto.tls_established()

    # --- output -------------------------------------------------------------------------------

    def _send(self) -> None:
        bufs = self.proto.data_to_send()
        if bufs:
            self.channel.send(bufs)

    async def _drain(self) -> None:
        await self.channel.drain(2 * self.server.limits.max_payload)

    # --- requests -----------------------------------------------------------------------------

    def _sendfile_fd(self) -> int | None:
        """The image's file descriptor when READ data can go out with sendfile: a raw file
        on a plain socket (TLS encrypts in user space; snapshots and memory have no fd)."""
        assert self.export is not None
        if not isinstance(self.channel, _SocketChannel):
            return None
        fd: int | None = getattr(self.export.config.image.disk, "fd", None)
        return fd

    def _dispatch(self, req: Request) -> None:
        if req.command == Cmd.READ and self._sendfile_fd() is not None:
            # Inline: see the module docstring. The semaphore slot is released right away.
            try:
                self._read_request(req)
            finally:
                self.sem.release()
            return
        task = asyncio.create_task(self._serve(req))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _read_request(self, req: Request) -> None:
        """A READ of a raw file on a plain socket: the data goes from the page cache to the
        socket with sendfile and never enters Python, so it is answered on the loop."""
        assert self.export is not None
        try:
            pieces = _read_pieces(
                self.export.config.image, self._sendfile_fd(), req, self.proto.structured_replies
            )
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
            if req.command in _LARGE_REPLIES:
                # Wait for the backlog to drain BEFORE building the reply, one at a time:
                # otherwise every request in flight queues its megabytes first and waits
                # after, and a client that reads nothing holds 64 replies (review H5).
                async with self._large_reply:
                    await self._drain()
                    await self._answer(req)
            else:
                await self._answer(req)
            await self._drain()
        finally:
            self.sem.release()

    async def _answer(self, req: Request) -> None:
        try:
            await self._perform(req)
        except Exception as exc:
            self._fail_request(req, exc)
        finally:
            if req.command == Cmd.WRITE and req.data is not None:
                self.write_bytes -= len(req.data)
                self._write_done.set()
        self._send()

    async def _perform(self, req: Request) -> None:
        assert self.export is not None
        image = self.export.config.image
        fua = CmdFlag.FUA in req.flags
        cmd = req.command
        if cmd == Cmd.READ:
            # No sendfile (snapshot, memory image, TLS): the data is read into a buffer in the
            # export's reader threads, never on the loop that every client (and, embedded, the
            # gateway's gRPC) shares: a 32 MiB snapshot read stalled it for 300 ms (review M7).
            loop = asyncio.get_running_loop()
            pieces = await loop.run_in_executor(
                self.export.reader, _read_pieces, image, None, req, self.proto.structured_replies
            )
            self.proto.reply_read(req, pieces)
            return
        if cmd == Cmd.WRITE:
            assert req.data is not None
            await self._in_worker(_write, image, req.data, req.offset, fua)
        elif cmd == Cmd.FLUSH:
            await self._in_worker(image.flush)
        elif cmd == Cmd.TRIM:
            if req.length:
                await self._in_worker(_trim, image, req.offset, req.length, fua)
        elif cmd == Cmd.WRITE_ZEROES:
            # FAST_ZERO: the image refuses (ENOTSUP, nothing written) if it cannot be fast.
            may_trim = CmdFlag.NO_HOLE not in req.flags
            fast = CmdFlag.FAST_ZERO in req.flags
            if req.length:
                await self._in_worker(_zero, image, req.offset, req.length, may_trim, fua, fast)
        elif cmd == Cmd.CACHE:
            # Advisory: ask the kernel to read ahead; a memory image has nothing to do.
            fd = getattr(image.disk, "fd", None)
            if fd is not None and req.length and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, req.offset, req.length, os.POSIX_FADV_WILLNEED)
        elif cmd == Cmd.BLOCK_STATUS:
            args = (
                image,
                req.contexts,
                req.offset,
                req.length,
                1 if CmdFlag.REQ_ONE in req.flags else self.server.limits.max_extents,
            )
            if self.export.read_only and getattr(image.disk, "fd", None) is not None:
                # Nothing writes this export: no need to order it after writes, and the
                # thread hop costs more latency than the work itself (one run per request).
                answers = _block_status(*args)
            elif self.export.read_only:
                # A snapshot: its base:allocation walks under the snapshot's lock, which a
                # live write's copy-before-write holds: not on the loop (review M7).
                loop = asyncio.get_running_loop()
                answers = await loop.run_in_executor(self.export.reader, _block_status, *args)
            else:
                answers = await self._in_worker(_block_status, *args)
            self.proto.reply_block_status(req, answers)
            return
        elif cmd == Cmd.X_NBDGW_CLEAR:
            # In the export's worker, ordered with the writes of this connection; the bitmap's
            # lock orders it with everything else (see nbdcore.storage.image).
            ((_cid, context),) = req.contexts
            name = context[len(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX) :]
            if req.since is not None:
                granularity, runs, kept = await self._in_worker(
                    _clear_since, image, name, req.offset, req.length, req.since, fua
                )
                self.proto.reply_cleared(req, granularity, runs, kept)
                return
            granularity, runs = await self._in_worker(
                _clear, image, name, req.offset, req.length, fua
            )
            self.proto.reply_cleared(req, granularity, runs)
            return
        elif cmd == Cmd.X_NBDGW_POSITION:
            # On the loop: a position is read under the bitmap's lock, which a write holds
            # only while it stamps a few bits. Any write that completed before this request
            # arrived is at or before the position; a reader that waits for this reply before
            # reading sees the data of every such write.
            positions = [
                _bitmap(image, context[len(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX) :]).position
                for _cid, context in req.contexts
            ]
            self.proto.reply_positions(req, positions)
            return
        else:  # pragma: no cover - the core only lets known commands through
            raise ValueError(f"unexpected command {cmd!r}")
        self.proto.reply_ok(req)


def _snapshot_error(reason: str, message: str, **more: str) -> dict[str, Any]:
    return {"error": {"reason": reason, "message": message, **more}}


_SNAPSHOT_OPS = (
    "create",
    "list",
    "release",
    "checkpoints",
    "delete-checkpoint",
)


def _checkpoint_info(link: Any) -> dict[str, Any]:
    return {
        "id": link.id,
        "recording": link.recording,
        "dirty_bytes": link.dirty_bytes,
        "granularity": link.granularity,
    }


def _snapshot_info(export: str, snap: Any) -> dict[str, Any]:
    return {**snap.info(), "export": f"{export}@{snap.name}"}


def _write(image: Image, data: bytes | bytearray | memoryview, offset: int, fua: bool) -> None:
    image.write(memoryview(data), offset, fua=fua)


def _bitmap(image: Image, name: str) -> DirtyBitmap:
    bitmap = image.bitmaps.get(name)
    if bitmap is None:
        raise OSError(errno.EINVAL, f"bitmap {name!r} no longer exists")
    return bitmap


def _clear_since(
    image: Image, name: str, offset: int, length: int, since: tuple[int, int], fua: bool
) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    bitmap = _bitmap(image, name)
    # Refused (NBD_EOVERFLOW) before anything is cleared when the reply could not carry it.
    runs, kept = image.clear_bitmap_range_since(
        name, offset, length, since, max_runs=clear_ext.MAX_CLEARED_RUNS
    )
    if fua:
        image.flush()
    return bitmap.granularity, runs, kept


def _clear(
    image: Image, name: str, offset: int, length: int, fua: bool
) -> tuple[int, list[tuple[int, int]]]:
    bitmap = _bitmap(image, name)
    runs = image.clear_bitmap_range(name, offset, length)
    if fua:
        image.flush()  # the bits (and the data) on stable storage before the reply
    return bitmap.granularity, runs


def _read_pieces(
    image: Image, fd: int | None, req: Request, structured: bool
) -> list[Payload | int]:
    """The pieces of a READ reply: data (a file span for sendfile when ``fd`` is given, else a
    fresh buffer, fresh because the channel may still hold the previous one) and, with
    structured replies, hole lengths (OFFSET_HOLE chunks: nothing to read, nothing to send)."""
    pieces: list[Payload | int] = []
    if structured and CmdFlag.DF not in req.flags and req.length:
        for off, length, flags in image.disk.allocation(req.offset, req.length):
            if flags & NBD_STATE_ZERO:
                pieces.append(length)
            else:
                pieces.append(_data(image, fd, off, length))
    elif req.length:
        pieces.append(_data(image, fd, req.offset, req.length))
    return pieces


def _data(image: Image, fd: int | None, offset: int, length: int) -> Payload:
    if fd is not None:
        return FileSpan(fd, offset, length)
    # bytearray(n) zeroes n bytes holding the GIL (a 32 MiB read stalled the event loop
    # ~20 ms from the reader thread); an anonymous mapping gets its zero pages from the kernel.
    buf = memoryview(mmap.mmap(-1, length) if length >= _MMAP_READ else bytearray(length))
    image.readinto(buf, offset)
    return buf


def _trim(image: Image, offset: int, length: int, fua: bool) -> None:
    image.trim(offset, length, fua=fua)


def _zero(image: Image, offset: int, length: int, may_trim: bool, fua: bool, fast: bool) -> None:
    image.write_zeroes(offset, length, may_trim=may_trim, fua=fua, fast=fast)


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
            fast = getattr(bitmap, "runs", None)
            if fast is not None:
                # Storage's array fast path: merged runs, no Python loop per extent.
                lengths_, flags_ = fast(offset, length, limit=max_extents)
                answers.append((cid, lengths_, flags_))
                continue
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
