"""The ``libvirt`` host kind: disks of a VM that libvirt manages, reached through libvirt's API.

libvirt owns the QEMU of such a VM (nobody else may talk QMP to it), so the gateway uses what
libvirt offers: *checkpoints* (a persistent bitmap per disk per checkpoint, a parent chain,
deletion that merges) and *pull-mode backups* (libvirt starts QEMU's NBD server on a unix
socket and exports the disks at one instant, with the changes since a checkpoint as a frozen
bitmap). A disk has no NBD export outside a backup job, so a :class:`LibvirtHost`'s own exports
are read through a snapshot (gateway.hosts.libvirt_snapshots), and its address is the socket
its backup jobs listen on.

Every libvirt call is blocking: :class:`Libvirt` runs them in a thread, never on the gateway's
loop. libvirt errors become :class:`LibvirtFailure` (a kind and libvirt's words), and
GatewayErrors through :func:`libvirt_error`; a lost connection, a domain that stopped or is
undefined make the host *down* (readiness), probed again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import pwd
import threading
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from gateway import errors
from gateway.config import GatewayConfig, HostConfig
from gateway.errors import GatewayError
from gateway.hosts.pool import ExportPool, Host, KnownExport
from gateway.hosts.qmp_monitor import BitmapInfo
from nbdcore.aio.client import NBDClient
from nbdcore.constants import TransmissionFlag
from nbdcore.uri import NBDURI

log = logging.getLogger("nbdgw.libvirt")
T = TypeVar("T")

INSTALL = (
    "the libvirt Python binding (Debian: apt-get install python3-libvirt; scripts/install-deps.sh"
    " links it into the venv)"
)
# libvirt creates checkpoint bitmaps without a granularity: QEMU then uses the image's cluster
# size clamped to 4 KiB..64 KiB, 64 KiB for a default qcow2. libvirt does not report it.
GRANULARITY = 65536
QEMU_USER = "libvirt-qemu"  # Debian's: QEMU's user under libvirt (the folder trap)
ABORT_POLLS = 600  # x 50 ms: how long a backup job may take to end after abortJob


def _libvirt() -> Any:
    try:
        import libvirt
    except ImportError:
        raise LibvirtFailure("unavailable", f"libvirt is not installed: {INSTALL}") from None
    return libvirt


class LibvirtFailure(Exception):
    """A libvirt call failed. ``kind``: unavailable (connection lost, domain stopped or gone),
    not_found, exists, busy, invalid or failed."""

    def __init__(self, kind: str, message: str, operation: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.operation = operation


def _classify(lv: Any, exc: Any, operation: str) -> LibvirtFailure:
    code, domain, text = exc.get_error_code(), exc.get_error_domain(), str(exc)
    gone = {lv.VIR_ERR_NO_DOMAIN, lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_RPC}
    if code in gone or domain in (lv.VIR_FROM_RPC, lv.VIR_FROM_REMOTE) or "not running" in text:
        return LibvirtFailure("unavailable", text, operation)
    if code == lv.VIR_ERR_NO_DOMAIN_CHECKPOINT:
        return LibvirtFailure("not_found", text, operation)
    if "already exists" in text:
        return LibvirtFailure("exists", text, operation)
    if "job" in text and ("active" in text or "blocked" in text):
        return LibvirtFailure("busy", text, operation)
    if code in (lv.VIR_ERR_INVALID_ARG, lv.VIR_ERR_XML_ERROR, lv.VIR_ERR_XML_DETAIL):
        return LibvirtFailure("invalid", text, operation)
    return LibvirtFailure("failed", text, operation)


@dataclass(frozen=True)
class Disk:
    target: str  # vda
    source: str  # what its <source> names: an image file, a device, a pool/volume, a name
    driver: str  # qcow2, raw


@dataclass(frozen=True)
class Checkpoint:
    """One libvirt checkpoint: its parent and, per disk, whether it has a bitmap and libvirt's
    ``size`` (bytes changed since the checkpoint; only while the domain runs)."""

    name: str
    parent: str
    created: int
    disks: dict[str, int | None] = field(default_factory=dict)


class Libvirt:
    """One domain over one libvirt connection; every call in a thread, reconnecting as needed."""

    def __init__(self, uri: str, domain: str) -> None:
        self.uri = uri
        self.domain = domain
        self._conn: Any = None
        self._opening = threading.Lock()  # calls run in several threads: one connection

    async def call(self, operation: str, fn: Callable[[Any], T]) -> T:
        """``fn(domain)`` in a thread; libvirt errors as LibvirtFailure."""
        return await asyncio.to_thread(self._call, operation, fn)

    def _call(self, operation: str, fn: Callable[[Any], T]) -> T:
        lv = _libvirt()
        with self._opening:
            if self._conn is None:
                try:
                    self._conn = lv.open(self.uri)
                except lv.libvirtError as exc:  # libvirtd unreachable, whatever the code
                    raise LibvirtFailure("unavailable", str(exc), "open") from None
        try:
            return fn(self._conn.lookupByName(self.domain))
        except lv.libvirtError as exc:
            failure = _classify(lv, exc, operation)
            if failure.kind == "unavailable":
                self._drop()
            raise failure from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    async def close(self) -> None:
        await asyncio.to_thread(self._drop)

    # --- what the host asks -----------------------------------------------------------------

    async def run_id(self) -> int:
        """The running domain's id (a new one at each start); -1 when it is not running."""
        return int(await self.call("ID", lambda d: d.ID() if d.isActive() else -1))

    async def disks(self) -> list[Disk]:
        return parse_disks(await self.call("XMLDesc", lambda d: d.XMLDesc(0)))

    async def sources(self) -> dict[str, str]:
        """Each disk's source, by target (libvirt_deltas: a disk is its target and this)."""
        return {d.target: d.source for d in await self.disks()}

    async def capacity(self, disk: str) -> int:
        return int((await self.call("blockInfo", lambda d: d.blockInfo(disk)))[0])

    async def checkpoints(self) -> list[Checkpoint]:
        """The checkpoints, oldest first (parents before children)."""
        lv = _libvirt()

        def read(dom: Any) -> list[Checkpoint]:
            flags = lv.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN
            if dom.isActive():
                flags |= lv.VIR_DOMAIN_CHECKPOINT_XML_SIZE
            found = dom.listAllCheckpoints(lv.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
            return [parse_checkpoint(c.getXMLDesc(flags)) for c in found]

        return await self.call("listAllCheckpoints", read)

    async def create_checkpoint(self, name: str, disks: Sequence[str] = ()) -> None:
        xml = checkpoint_xml(name, disks)
        await self.call("checkpointCreateXML", lambda d: d.checkpointCreateXML(xml, 0))

    async def delete_checkpoint(self, name: str) -> None:
        """libvirt removes the checkpoint's bitmap (9.0: each checkpoint's bitmap records until
        it is deleted, so the older ones' "since" loses nothing; older libvirt merged it
        into its parent's)."""
        await self.call("checkpointDelete", lambda d: d.checkpointLookupByName(name).delete(0))

    async def backup_begin(self, backup: str, checkpoint: str | None) -> None:
        await self.call("backupBegin", lambda d: d.backupBegin(backup, checkpoint, 0))

    async def backup_xml(self) -> str | None:
        """The running backup job's XML; None when the domain has no backup job."""
        lv = _libvirt()

        def read(dom: Any) -> str | None:
            try:
                return str(dom.backupGetXMLDesc(0))
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN_BACKUP:
                    return None
                raise

        return await self.call("backupGetXMLDesc", read)

    async def abort_job(self) -> None:
        """End the domain's job (a pull backup never ends by itself); no job is fine."""
        lv = _libvirt()

        def abort(dom: Any) -> None:
            try:
                dom.abortJob()
            except lv.libvirtError as exc:
                if "no job" not in str(exc):
                    raise

        def gone(dom: Any) -> bool:
            try:
                dom.backupGetXMLDesc(0)
            except lv.libvirtError as exc:
                if exc.get_error_code() == lv.VIR_ERR_NO_DOMAIN_BACKUP:
                    return True
                raise
            return False

        await self.call("abortJob", abort)
        # libvirt ends the job asynchronously: the next backup would find it still there.
        for _ in range(ABORT_POLLS):
            if await self.call("backupGetXMLDesc", gone):
                return
            await asyncio.sleep(0.05)
        raise LibvirtFailure("busy", "the backup job did not end after abortJob", "abortJob")


def _source_of(source: ET.Element | None) -> str:
    """What a disk's <source> names, as one string: a file, a block device, a pool's volume, a
    network image with its servers, a vhost-user socket; for any other kind the element itself
    (without libvirt's ``index``, which moves with every block job)."""
    if source is None:
        return ""
    if source.get("volume"):
        return f"{source.get('pool', '')}/{source.get('volume')}"
    if source.get("protocol"):
        hosts = ",".join(
            f"{h.get('name', '')}:{h.get('port', '')}" for h in source.iterfind("host")
        )
        return f"{source.get('protocol')}://{hosts}/{source.get('name', '')}"
    for attribute in ("file", "dev", "path"):
        if source.get(attribute):
            return str(source.get(attribute))
    element = ET.Element(source.tag, {k: v for k, v in source.items() if k != "index"})
    element.extend(list(source))
    return ET.tostring(element, encoding="unicode")


def parse_disks(domain_xml: str) -> list[Disk]:
    out = []
    for disk in ET.fromstring(domain_xml).iterfind("devices/disk"):
        target = disk.find("target")
        if disk.get("device", "disk") != "disk" or target is None or not target.get("dev"):
            continue
        source, driver = disk.find("source"), disk.find("driver")
        out.append(
            Disk(
                target=str(target.get("dev")),
                source=_source_of(source),
                driver=str(driver.get("type", "")) if driver is not None else "",
            )
        )
    return out


def parse_checkpoint(text: str) -> Checkpoint:
    root = ET.fromstring(text)
    disks: dict[str, int | None] = {}
    for d in root.iterfind("disks/disk"):
        if d.get("checkpoint", "bitmap") == "bitmap":
            size = d.get("size")
            disks[str(d.get("name"))] = int(size) if size is not None else None
    return Checkpoint(
        name=root.findtext("name", ""),
        parent=root.findtext("parent/name", ""),
        created=int(root.findtext("creationTime", "0") or 0),
        disks=disks,
    )


def _x(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;")


def checkpoint_xml(name: str, disks: Sequence[str] = ()) -> str:
    """A checkpoint of every disk (or only ``disks``: the others get none)."""
    inner = "".join(f"<disk name='{_x(d)}' checkpoint='bitmap'/>" for d in disks)
    return (
        f"<domaincheckpoint><name>{_x(name)}</name>"
        + (f"<disks>{inner}</disks>" if inner else "")
        + "</domaincheckpoint>"
    )


def backup_xml(
    socket: Path, disks: dict[str, tuple[str, str, Path]], all_disks: Sequence[str], since: str
) -> str:
    """A pull-mode backup: QEMU's NBD server on ``socket``; ``disks``: target -> (export
    name, exported bitmap name, scratch image); the domain's other disks are left out."""
    items = []
    for target in all_disks:
        if target not in disks:
            items.append(f"<disk name='{_x(target)}' backup='no'/>")
            continue
        name, bitmap, scratch = disks[target]
        bitmap_attr = f" exportbitmap='{_x(bitmap)}'" if since else ""
        items.append(
            f"<disk name='{_x(target)}' backup='yes' type='file' exportname='{_x(name)}'"
            f"{bitmap_attr}><scratch file='{_x(str(scratch))}'/></disk>"
        )
    incremental = f"<incremental>{_x(since)}</incremental>" if since else ""
    return (
        f"<domainbackup mode='pull'>{incremental}"
        f"<server transport='unix' socket='{_x(str(socket))}'/>"
        f"<disks>{''.join(items)}</disks></domainbackup>"
    )


def parse_backup(text: str) -> tuple[str, str, dict[str, str]]:
    """A running backup job's (socket, incremental checkpoint, {disk: export name})."""
    root = ET.fromstring(text)
    server = root.find("server")
    socket = str(server.get("socket", "")) if server is not None else ""
    exports = {
        str(d.get("name")): str(d.get("exportname") or d.get("name"))
        for d in root.iterfind("disks/disk")
        if d.get("backup", "yes") == "yes"
    }
    return socket, root.findtext("incremental", ""), exports


# --- errors -------------------------------------------------------------------------------------

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "exists": grpc.StatusCode.ALREADY_EXISTS,
    "busy": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "failed": grpc.StatusCode.FAILED_PRECONDITION,
}


def libvirt_error(exc: LibvirtFailure, export: str, host: Host) -> GatewayError:
    """The gRPC status of a libvirt failure met while working on ``export``."""
    if exc.kind == "unavailable":
        host.report_failure(ConnectionRefusedError(errno.ECONNREFUSED, str(exc)))
        return errors.host_unavailable(export, host.name, str(exc), host.retry_after())
    return GatewayError(
        _CODES.get(exc.kind, grpc.StatusCode.FAILED_PRECONDITION),
        errors.Reason.HOST_COMMAND_FAILED,
        f"libvirt (host {host.name}) refused {exc.operation or 'a call'} for export"
        f" {export!r}: {exc}",
        {"export": export, "host": host.name, "command": exc.operation, "libvirt_error": str(exc)},
    )


def snapshot_required(export: str) -> GatewayError:
    why = (
        "libvirt serves a VM's disk over NBD only inside a pull-mode backup job: take a"
        f" snapshot (CreateSnapshot) and read {export}@SNAP"
    )
    return errors.precondition_failed(
        errors.Reason.BITMAP_BUSY,
        f"export {export!r} is read through a snapshot: {why}",
        {"export": export},
        kind="SNAPSHOT_REQUIRED",
        subject=f"exports/{export}",
        why=why,
    )


# --- the host -----------------------------------------------------------------------------------


def host_key(name: str) -> str:
    # A unix socket path is at most 107 bytes: a digest of the host's name.
    return hashlib.blake2b(name.encode(), digest_size=6).hexdigest()


def prepare_folder(folder: Path, export: str) -> None:
    """The folder of the backup sockets and scratch images. QEMU runs as libvirt-qemu and
    creates both there ("Permission denied" from the NBD server otherwise): when the gateway
    runs as root the folder is given to that user; its parents must let it through, which is
    checked here so that the error says what to do (DATA_DIR is 0700 when the gateway makes
    it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(QEMU_USER)
    except KeyError:
        return
    os.chown(folder, user.pw_uid, user.pw_gid)
    folder.chmod(0o750)
    for parent in folder.resolve().parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            through = st.st_mode & 0o100
        elif st.st_gid == user.pw_gid:
            through = st.st_mode & 0o010
        else:
            through = st.st_mode & 0o001
        if not through:
            why = (
                f"QEMU runs as {QEMU_USER} and creates the backup's socket and scratch images"
                f" in {folder}, but cannot pass through {parent}: chmod o+x {parent} (or"
                " choose a --data-dir it can reach)"
            )
            raise errors.precondition_failed(
                errors.Reason.HOST_COMMAND_FAILED,
                f"export {export!r} cannot be snapshotted: {why}",
                {"export": export, "folder": str(parent)},
                kind="FOLDER_PERMISSIONS",
                subject=str(parent),
                why=why,
            )


class LibvirtHost(Host):
    """A libvirt domain: its disks, its checkpoints, and the socket of its backup jobs."""

    first_probe_restores_state = True  # backup job recovery (gateway.hosts.libvirt_snapshots)

    def __init__(
        self,
        config: HostConfig,
        settings: GatewayConfig,
        on_change: Callable[[Host], Awaitable[None]] | None = None,
        *,
        folder: Path,
    ) -> None:
        assert config.libvirt is not None and config.domain is not None
        self.folder = folder
        self.nbd_socket = folder / f"{host_key(config.name)}.nbd.sock"
        super().__init__(
            config, settings, on_change, uri=NBDURI(scheme="nbd+unix", socket=str(self.nbd_socket))
        )
        self.libvirt = Libvirt(config.libvirt, config.domain)
        # Called after each probe that found the domain running: backup job recovery.
        self.on_running: Callable[[LibvirtHost], Awaitable[None]] | None = None
        self._recovered_run = -1  # the domain's run (its id) whose jobs were recovered
        # NBD export names of the snapshots served now (nothing else is on the socket).
        self.serving: set[str] = set()

    @property
    def kind(self) -> str:
        return "libvirt"

    async def _probe_once(self) -> None:
        try:
            run = await self.libvirt.run_id()
        except LibvirtFailure as exc:
            raise ConnectionRefusedError(errno.ECONNREFUSED, str(exc)) from None
        if run < 0:
            raise ConnectionRefusedError(
                errno.ECONNREFUSED, f"domain {self.config.domain} is not running"
            )
        # A new run of the domain (or the gateway's start): its jobs died with the last one.
        if run != self._recovered_run and self.on_running is not None:
            await self.on_running(self)
        self._recovered_run = run

    async def connect(self, nbd_export: str, contexts: Sequence[str]) -> NBDClient:
        if nbd_export not in self.serving:
            raise snapshot_required(nbd_export)
        return await super().connect(nbd_export, contexts)

    async def known(self, pool: ExportPool) -> KnownExport:
        """What a live disk's export is, from libvirt (it has no NBD export of its own)."""
        if pool.known is None or pool.config.node:
            try:
                size = await self.libvirt.capacity(pool.config.node or "")
            except LibvirtFailure as exc:
                raise libvirt_error(exc, pool.name, self) from None
            pool.known = KnownExport(
                nbd_export_name=pool.config.nbd_export,
                description=pool.config.description
                or f"disk {pool.config.node} of {self.config.domain}",
                size=size,
                flags=TransmissionFlag.HAS_FLAGS,
                block_size=None,
                read_only=False,
            )
        return pool.known

    async def checkpoints(self, export: str) -> list[Checkpoint]:
        try:
            return await self.libvirt.checkpoints()
        except LibvirtFailure as exc:
            raise libvirt_error(exc, export, self) from None

    async def bitmaps(self, pool: ExportPool) -> tuple[BitmapInfo, ...]:
        """The disk's bitmaps: one per checkpoint that has one on this disk (libvirt names the
        bitmap after the checkpoint); the newest records. ``count`` is libvirt's size: bytes
        changed since the checkpoint."""
        disk = pool.config.node or ""
        chain = await self.checkpoints(pool.name)
        parents = {c.parent for c in chain}
        return tuple(
            BitmapInfo(
                name=c.name,
                granularity=GRANULARITY,
                count=c.disks[disk] or 0,
                recording=c.name not in parents,
                persistent=True,
                busy=False,
            )
            for c in chain
            if disk in c.disks
        )

    async def add_bitmap(
        self, pool: ExportPool, name: str, granularity: int, persistent: bool
    ) -> BitmapInfo:
        """A new checkpoint ``name`` of every disk of the domain (libvirt's change tracking)."""
        if not pool.config.node:
            raise errors.read_only(pool.name, name, "a snapshot's bitmaps are its views")
        if granularity or not persistent:
            raise errors.invalid_field(
                "granularity_bytes" if granularity else "persistent",
                "libvirt's checkpoints are persistent, at QEMU's default granularity",
            )
        try:
            await self.libvirt.create_checkpoint(name)
        except LibvirtFailure as exc:
            if exc.kind == "exists":
                from gateway.hosts.qmp import bitmap_exists

                raise bitmap_exists(pool.name, name) from None
            raise libvirt_error(exc, pool.name, self) from None
        for b in await self.bitmaps(pool):
            if b.name == name:
                return b
        raise errors.internal(f"libvirt created checkpoint {name!r} but does not list it")

    async def remove_bitmap(self, pool: ExportPool, name: str) -> None:
        """Delete checkpoint ``name`` (libvirt removes its bitmap; see delete_checkpoint)."""
        if not pool.config.node:
            raise errors.read_only(pool.name, name, "a snapshot's views go with the snapshot")
        found = {b.name for b in await self.bitmaps(pool)}
        if name not in found:
            ctx = f"qemu:dirty-bitmap:{name}"
            raise errors.bitmap_not_found(pool.name, ctx, [f"qemu:dirty-bitmap:{n}" for n in found])
        try:
            await self.libvirt.delete_checkpoint(name)
        except LibvirtFailure as exc:
            if exc.kind == "busy":
                raise errors.bitmap_busy(pool.name, name, str(exc)) from None
            raise libvirt_error(exc, pool.name, self) from None

    async def close(self) -> None:
        await super().close()
        await self.libvirt.close()


async def discover_disks(config: HostConfig) -> list[Disk]:
    """The disks of a ``disks = "all"`` host's domain (at start)."""
    assert config.libvirt is not None and config.domain is not None
    lv = Libvirt(config.libvirt, config.domain)
    try:
        return await lv.disks()
    finally:
        await lv.close()
