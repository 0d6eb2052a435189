"""The ``qmp`` host kind: disks of a running QEMU, reached through its monitor.

A :class:`QmpHost` is a :class:`~gateway.hosts.Host` whose NBD server is QEMU's own, started
by the gateway over QMP on a unix socket in the gateway's folder; every export of the host is
a block node (or device) of that QEMU, exported read-only under the gateway export's name.
Reads then go through the usual pools and NBD client. Before each probe the host makes sure
QEMU's NBD server and its exports are there (a restarted QEMU has neither): readiness follows
QEMU and its monitor both ways.

Errors of QEMU become GatewayErrors here (:func:`qmp_error`), never tracebacks.
"""

from __future__ import annotations

import errno
import hashlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from gateway import errors
from gateway.config import GatewayConfig, HostConfig
from gateway.errors import GatewayError
from gateway.hosts.pool import ExportPool, Host
from gateway.hosts.qmp_monitor import LIVE_EXPORT, BitmapInfo, Monitor, QMPFailure
from nbdcore.uri import NBDURI

log = logging.getLogger("nbdgw.qmp")


_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "busy": grpc.StatusCode.FAILED_PRECONDITION,
    "no_space": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "failed": grpc.StatusCode.FAILED_PRECONDITION,
}


def qmp_error(exc: QMPFailure, export: str, host: Host) -> GatewayError:
    """The gRPC status of a QMP failure met while working on ``export``."""
    if exc.kind == "unavailable":
        return errors.host_unavailable(export, host.name, str(exc), host.retry_after())
    return GatewayError(
        _CODES.get(exc.kind, grpc.StatusCode.FAILED_PRECONDITION),
        errors.Reason.HOST_COMMAND_FAILED,
        f"QEMU of export {export!r} (host {host.name}) refused {exc.command or 'a command'}: {exc}",
        {"export": export, "host": host.name, "command": exc.command, "qemu_error": str(exc)},
    )


def bitmap_exists(export: str, bitmap: str) -> GatewayError:
    return errors.resource_error(
        grpc.StatusCode.ALREADY_EXISTS,
        errors.Reason.BITMAP_EXISTS,
        f"export {export!r} already has a bitmap {bitmap!r}",
        {"export": export, "bitmap": bitmap},
        resource_type="nbdgw.dev/Bitmap",
        resource_name=f"exports/{export}/bitmaps/qemu:dirty-bitmap:{bitmap}",
        description="a bitmap of this name exists: remove it first or pick another name",
    )


def read_through_snapshot(export: str, context: str) -> GatewayError:
    why = (
        "a running QEMU's recording bitmap is read through a snapshot (CreateSnapshot, then"
        f" StreamExtents of {export}@SNAP): QEMU exports only frozen bitmaps read-only, and the"
        " snapshot's fork is the consistent answer while the VM writes"
    )
    return errors.precondition_failed(
        errors.Reason.BITMAP_BUSY,
        f"bitmap {context!r} of export {export!r}: {why}",
        {"export": export, "context": context},
        kind="SNAPSHOT_REQUIRED",
        subject=f"exports/{export}",
        why=why,
    )


def _key(name: str) -> str:
    # QEMU ids are at most 31 characters of a restricted alphabet: a digest of the name.
    return hashlib.blake2b(name.encode(), digest_size=6).hexdigest()


def nbd_socket_path(folder: Path, host: str) -> Path:
    """Where the gateway has QEMU's NBD server listen for host ``host`` (a unix socket path is
    at most 107 bytes: a digest of the host's name)."""
    return folder / f"{_key(host)}.nbd.sock"


class QmpHost(Host):
    """A running QEMU: its monitor, and its NBD server on a socket the gateway chose."""

    first_probe_restores_state = True  # snapshot recovery (gateway.hosts.qmp_snapshots)

    def __init__(
        self,
        config: HostConfig,
        settings: GatewayConfig,
        on_change: Callable[[Host], Awaitable[None]] | None = None,
        *,
        folder: Path,
    ) -> None:
        assert config.qmp is not None
        self.folder = folder
        self.nbd_socket = nbd_socket_path(folder, config.name)
        super().__init__(
            config, settings, on_change, uri=NBDURI(scheme="nbd+unix", socket=str(self.nbd_socket))
        )
        timeout = config.command_timeout or settings.connect_timeout
        self.monitor = Monitor(config.qmp, f"nbdgw-{config.name}", timeout=timeout)
        # Called after each (re)connection to QEMU has been prepared: snapshot recovery.
        self.on_prepared: Callable[[QmpHost], Awaitable[None]] | None = None
        self._prepared_session = -1
        # Block nodes of the exports of snapshots (fleecing nodes), by gateway export.
        self.snapshot_nodes: dict[str, str] = {}

    @property
    def kind(self) -> str:
        return "qmp"

    def live_export_id(self, export: str) -> str:
        return LIVE_EXPORT.format(key=_key(export))

    async def prepare(self) -> None:
        """QEMU's NBD server on our socket and a read-only export of every configured disk."""
        self.folder.mkdir(parents=True, exist_ok=True)
        async with self.monitor.lock:
            await self.monitor.ensure_nbd_server(self.nbd_socket)
            present = await self.monitor.exports()
            for pool in list(self.pools):
                node = pool.config.node
                if not node:
                    continue  # a snapshot's export: its manager makes it
                export_id = self.live_export_id(pool.name)
                if export_id in present:
                    continue
                await self.monitor.add_export(
                    export_id,
                    await self.monitor.resolve(node),
                    pool.config.nbd_export,
                    description=pool.config.description or f"nbdgw export {pool.name}",
                )
            session = self.monitor.session
        if session != self._prepared_session:
            self._prepared_session = session
            if self.on_prepared is not None:
                await self.on_prepared(self)

    async def _probe_once(self) -> None:
        try:
            await self.prepare()
        except QMPFailure as exc:
            if exc.kind == "unavailable":
                # A connection failure for the Host machinery: down, probed with backoff.
                raise ConnectionRefusedError(errno.ECONNREFUSED, str(exc)) from None
            raise
        await super()._probe_once()

    def node_of(self, pool: ExportPool) -> str:
        return pool.config.node or self.snapshot_nodes.get(pool.name, "")

    async def bitmaps(self, pool: ExportPool) -> tuple[BitmapInfo, ...]:
        """The named bitmaps of the export's node, from QMP (no NBD connection)."""
        try:
            info = await self.monitor.node(self.node_of(pool))
        except QMPFailure as exc:
            if exc.kind == "unavailable":
                self.report_failure(ConnectionRefusedError(errno.ECONNREFUSED, str(exc)))
            raise qmp_error(exc, pool.name, self) from None
        return info.bitmaps

    async def add_bitmap(
        self, pool: ExportPool, name: str, granularity: int, persistent: bool
    ) -> BitmapInfo:
        node = pool.config.node
        if not node:
            raise errors.read_only(pool.name, name, "a snapshot's bitmaps are its forks")
        try:
            await self.monitor.add_bitmap(
                await self.monitor.resolve(node),
                name,
                granularity=granularity or None,
                persistent=persistent,
            )
        except QMPFailure as exc:
            if exc.kind == "exists":
                raise bitmap_exists(pool.name, name) from None
            raise qmp_error(exc, pool.name, self) from None
        for b in await self.bitmaps(pool):
            if b.name == name:
                return b
        raise errors.internal(f"QEMU added bitmap {name!r} but does not list it")

    async def remove_bitmap(self, pool: ExportPool, name: str) -> None:
        node = pool.config.node
        if not node:
            raise errors.read_only(pool.name, name, "a snapshot's forks go with the snapshot")
        found = {b.name: b for b in await self.bitmaps(pool)}
        if name not in found:
            ctx = f"qemu:dirty-bitmap:{name}"
            raise errors.bitmap_not_found(pool.name, ctx, [f"qemu:dirty-bitmap:{n}" for n in found])
        if found[name].busy:
            raise errors.bitmap_busy(
                pool.name, name, "a snapshot holds it; release the snapshot first"
            )
        try:
            await self.monitor.remove_bitmap(await self.monitor.resolve(node), name)
        except QMPFailure as exc:
            if exc.kind == "busy":
                raise errors.bitmap_busy(pool.name, name, str(exc)) from None
            raise qmp_error(exc, pool.name, self) from None

    async def close(self) -> None:
        # Leave QEMU as we found it: our exports go (its NBD server stays: stopping it would
        # cut whatever else a later gateway starts there).
        if self.monitor.connected:
            for pool in list(self.pools):
                if pool.config.node:
                    try:
                        await self.monitor.remove_export(self.live_export_id(pool.name))
                    except QMPFailure as exc:
                        log.info("host %s: export of %s not removed: %s", self.name, pool.name, exc)
        await super().close()
        await self.monitor.close()
