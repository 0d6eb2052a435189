"""Point-in-time snapshots of the embedded host's exports, with forked bitmaps.

A snapshot of export ``EXPORT`` (see ``nbdcore.storage.snapshot``) becomes two exports at once:
``NBD_EXPORT@SNAP`` on the embedded NBD server (read-only, its forks as
``qemu:dirty-bitmap:NAME``) and the gateway export ``EXPORT@SNAP``, served by the BitmapService
like any other (StreamExtents with data, ClearRange on a fork). Releasing removes both before
it merges the forks back. Snapshots outlive a gateway restart (the image keeps them beside
it); :meth:`Snapshots.restore` exports them again at start.

Exports of other hosts are snapshotted through the host itself when it is an nbdcore host
(``nbdgw nbd serve``): the NBD option NBD_OPT_X_NBDGW_SNAPSHOT (docs/extension-snapshot.md)
creates, lists and releases them, and the host serves ``NBD_EXPORT@SNAP``; the gateway adds
the export ``EXPORT@SNAP`` of the same host when it creates or lists one. A host without the
option (qemu-nbd, nbdkit, nbd-server answer NBD_REP_ERR_UNSUP) has no snapshots.

Errors are GatewayErrors like the BitmapService's; the snapshot-specific reasons
(``SnapshotErrorReason`` in snapshot_service.proto) are built here, as gateway.security.access and
gateway.security.limits build theirs.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2

from gateway import errors
from gateway.api.names import context_name, decode_page, encode_page, export_id, page_size
from gateway.config import EMBEDDED_HOST
from gateway.config import ExportConfig as GatewayExportConfig
from gateway.errors import GatewayError
from gateway.hosts.checkpoints import (
    CheckpointDelta,
    checkpoint_error,
    read_dirty_runs,
    remote_checkpoint_error,
)
from gateway.hosts.libvirt import LibvirtHost
from gateway.hosts.pool import ExportPool
from gateway.hosts.qmp import QmpHost
from nbdcore.aio.client import nbdgw_snapshot
from nbdcore.constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX, Rep
from nbdcore.exceptions import OptionError
from nbdcore.storage import (
    NoSuchBitmapError,
    NoSuchSnapshotError,
    Snapshot,
    SnapshotError,
    SnapshotExistsError,
)
from nbdcore.storage import checkpoint as ckpt
from nbdcore.storage.errors import CheckpointError
from nbdcore.storage.snapshot import MAX_SNAPSHOTS, SnapshotLimitError, validate_snapshot_name
from nbdcore.tools.snapshot_cmds import SEPARATOR, snapshot_export
from nbdgw.v1 import snapshot_service_pb2 as spb

if TYPE_CHECKING:
    from gateway.hosts.libvirt_snapshots import LibvirtSnapshots
    from gateway.hosts.qmp_snapshots import QmpSnapshots
    from gateway.server import Gateway
    from nbdcore.storage import Image

log = logging.getLogger("nbdgw.snapshots")

_ON_FULL = {
    spb.SNAPSHOT_ON_FULL_UNSPECIFIED: "break",
    spb.SNAPSHOT_ON_FULL_BREAK_SNAPSHOT: "break",
    spb.SNAPSHOT_ON_FULL_FAIL_WRITE: "fail-write",
}
_ON_FULL_PB = {
    "break": spb.SNAPSHOT_ON_FULL_BREAK_SNAPSHOT,
    "fail-write": spb.SNAPSHOT_ON_FULL_FAIL_WRITE,
}


SNAPSHOT_TYPE = "nbdgw.dev/Snapshot"
# The short-lived snapshots that read a checkpoint delta of a remote nbdcore host.
DELTA_SNAPSHOT = "nbdgw-delta-"


class SnapshotReason:
    """ErrorInfo reasons: ``nbdgw.v1.SnapshotErrorReason`` names without their prefix."""

    SNAPSHOT_NOT_FOUND = "SNAPSHOT_NOT_FOUND"
    SNAPSHOT_EXISTS = "SNAPSHOT_EXISTS"
    SNAPSHOTS_NOT_SUPPORTED = "SNAPSHOTS_NOT_SUPPORTED"


def snapshot_not_found(export: str, snapshot: str) -> GatewayError:
    return errors.resource_error(
        grpc.StatusCode.NOT_FOUND,
        SnapshotReason.SNAPSHOT_NOT_FOUND,
        f"export {export!r} has no snapshot {snapshot!r} (never taken, or released already)",
        {"export": export, "snapshot": snapshot},
        resource_type=SNAPSHOT_TYPE,
        resource_name=f"exports/{export}/snapshots/{snapshot}",
        description="no snapshot of this name (a released snapshot is gone)",
    )


def snapshot_exists(export: str, snapshot: str) -> GatewayError:
    return errors.resource_error(
        grpc.StatusCode.ALREADY_EXISTS,
        SnapshotReason.SNAPSHOT_EXISTS,
        f"export {export!r} already has a snapshot {snapshot!r}",
        {"export": export, "snapshot": snapshot},
        resource_type=SNAPSHOT_TYPE,
        resource_name=f"exports/{export}/snapshots/{snapshot}",
        description="release it first, or choose another snapshot_id",
    )


def too_many_snapshots(export: str, why: str) -> GatewayError:
    """The export's image holds the most snapshots it may (``MAX_SNAPSHOTS``)."""
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        errors.Reason.RESOURCE_EXHAUSTED,
        f"export {export!r} cannot take another snapshot: {why}",
        {"export": export, "limit": str(MAX_SNAPSHOTS)},
        [
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=f"exports/{export}",
                        description=f"at most {MAX_SNAPSHOTS} snapshots per export: release one",
                    )
                ]
            )
        ],
    )


def snapshots_not_supported(export: str, why: str) -> GatewayError:
    return errors.precondition_failed(
        SnapshotReason.SNAPSHOTS_NOT_SUPPORTED,
        f"export {export!r} cannot be snapshotted: {why}",
        {"export": export},
        kind="SNAPSHOTS",
        subject=f"exports/{export}",
        why=why,
    )


def snapshot_export_id(export: str, snapshot: str) -> str:
    """The gateway export of a snapshot: ``EXPORT@SNAP``."""
    return f"{export}{SEPARATOR}{snapshot}"


def snapshot_name(value: str, field_name: str = "name") -> tuple[str, str]:
    """``exports/{export}/snapshots/{snapshot}`` -> (export, snapshot)."""
    parts = value.split("/")
    if len(parts) != 4 or parts[0] != "exports" or parts[2] != "snapshots" or "" in parts:
        raise errors.invalid_field(
            field_name, f"{value!r} is not a snapshot name (exports/EXPORT/snapshots/SNAPSHOT)"
        )
    return parts[1], parts[3]


class Snapshots:
    """The snapshots of the gateway's embedded images and the exports that serve them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.lock = asyncio.Lock()  # one create or release at a time: exports come and go
        self.qmp: QmpSnapshots  # exports of running QEMU VMs (set by the gateway)
        self.libvirt: LibvirtSnapshots  # exports of libvirt-managed VMs (set by the gateway)

    def _pool(self, export: str) -> ExportPool:
        pool = self.gateway.pools.get(export)
        if pool is None:
            raise errors.export_not_found(export)
        if SEPARATOR in export and pool.config.read_only:
            raise snapshots_not_supported(export, "it is a snapshot itself")
        return pool

    def _image(self, export: str) -> Image | None:
        """The writable embedded image of ``export``; None for an export of another host."""
        pool = self._pool(export)
        image = self.gateway.images.get(export)
        if pool.host.name != EMBEDDED_HOST or image is None:
            return None
        if isinstance(image, Snapshot):
            raise snapshots_not_supported(export, "it is a snapshot itself")
        if image.read_only:
            raise snapshots_not_supported(export, "its image is open read-only")
        return image

    # --- exports of snapshots -----------------------------------------------------------------

    def restore(self) -> None:
        """Export the snapshots the images kept across a restart."""
        for export, image in list(self.gateway.images.items()):
            if isinstance(image, Snapshot):
                continue
            for snap in image.snapshots.values():
                self._add_exports(export, snap)
                log.info("export %s: snapshot %s is back", export, snap.name)

    def _add_exports(self, export: str, snap: Snapshot) -> None:
        gw = self.gateway
        config = gw.config.exports[export]
        server = gw.nbd_server
        host = gw.hosts.get(EMBEDDED_HOST)
        assert server is not None and host is not None  # there is an embedded image
        nbd = snapshot_export(config.nbd_export, snap, f"snapshot {snap.name} of {export}")
        name = snapshot_export_id(export, snap.name)
        server.add_export(nbd)
        pool_config = GatewayExportConfig(
            name=name,
            host=EMBEDDED_HOST,
            nbd_export=nbd.name,
            description=nbd.description,
            read_only=True,
        )
        gw.pools[name] = ExportPool(pool_config, host)
        gw.images[name] = snap

    def _add_remote_export(self, export: str, snap_id: str) -> None:
        """The gateway export of a remote host's snapshot (the host serves it already)."""
        gw = self.gateway
        name = snapshot_export_id(export, snap_id)
        if name in gw.pools:
            return
        pool = gw.pools[export]
        config = GatewayExportConfig(
            name=name,
            host=pool.config.host,
            nbd_export=f"{pool.config.nbd_export}{SEPARATOR}{snap_id}",
            description=f"snapshot {snap_id} of {export}",
            read_only=True,
        )
        gw.pools[name] = ExportPool(config, pool.host)

    async def _remote(self, export: str, request: dict[str, Any]) -> dict[str, Any]:
        """One NBD_OPT_X_NBDGW_SNAPSHOT request to the export's host; its errors as
        GatewayErrors."""
        pool = self._pool(export)
        host = pool.host
        if not host.up:
            raise host.unavailable(export)
        request = {**request, "export": pool.config.nbd_export}
        # A connection like any other: counted against the host's limit (qemu-nbd -e N makes
        # one more client wait, it does not refuse it).
        await host._reserve()
        try:
            result = await nbdgw_snapshot(
                host.uri_for(pool.config.nbd_export),
                request,
                tls=host.config.tls,
                timeout=host.settings.connect_timeout,
            )
        except OptionError as exc:
            if exc.code in (Rep.ERR_UNSUP, Rep.ERR_POLICY):
                raise snapshots_not_supported(
                    export,
                    f"its host {host.name} does not take snapshots (only nbdcore hosts answer"
                    " NBD_OPT_X_NBDGW_SNAPSHOT; QEMU takes them only through its monitor)",
                ) from None
            raise
        except Exception as exc:
            host.report_failure(exc)
            raise
        finally:
            host._release()
        err = result.get("error")
        if not isinstance(err, dict):
            return result
        reason, message = err.get("reason"), str(err.get("message", ""))
        snap_id = str(request.get("snapshot", ""))
        ckpt_err = remote_checkpoint_error(export, err)
        if ckpt_err is not None:
            raise ckpt_err
        if reason == "BITMAP_NOT_FOUND":
            ctx = CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + str(err.get("bitmap", ""))
            raise errors.bitmap_not_found(export, ctx)
        if reason == "SNAPSHOT_EXISTS":
            raise snapshot_exists(export, snap_id)
        if reason == "SNAPSHOT_NOT_FOUND":
            raise snapshot_not_found(export, snap_id)
        if reason in ("SNAPSHOTS_NOT_SUPPORTED", "EXPORT_NOT_FOUND"):
            raise snapshots_not_supported(export, f"its host says: {message}")
        if reason == "INVALID_FIELD" and ("limit" in err or "snapshots already" in message):
            # The snapshot limit comes as INVALID_FIELD with "limit" (older hosts: words only).
            raise too_many_snapshots(export, f"its host says: {message}")
        if reason == "INVALID_FIELD":
            field = "cluster_size_bytes" if "cluster" in message else "snapshot_id"
            raise errors.invalid_field(field, message)
        raise errors.internal(f"host {host.name}, snapshot of export {export!r}: {message}")

    async def _remove_exports(self, export: str, snap_name: str) -> None:
        gw = self.gateway
        name = snapshot_export_id(export, snap_name)
        pool = gw.pools.pop(name, None)
        gw.images.pop(name, None)
        if pool is not None:
            host = pool.host
            if pool in host.pools:
                host.pools.remove(pool)
            if pool.config.nbd_export in host.exports:
                host.exports.remove(pool.config.nbd_export)
            await pool.close()
            server = gw.nbd_server if pool.host.name == EMBEDDED_HOST else None
            if server is not None and pool.config.nbd_export in server.exports:
                server.remove_export(pool.config.nbd_export)

    # --- operations ---------------------------------------------------------------------------

    async def create(self, request: spb.CreateSnapshotRequest) -> spb.Snapshot:
        violations: list[tuple[str, str]] = []
        export = ""
        try:
            export = export_id(request.parent, "parent")
        except GatewayError as err:
            violations += errors.field_violations(err)
        forks: list[str] = []
        for i, value in enumerate(request.bitmaps):
            try:
                ctx = context_name(value, f"bitmaps[{i}]")
            except GatewayError as err:
                violations += errors.field_violations(err)
                continue
            if not ctx.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
                violations.append((f"bitmaps[{i}]", f"{ctx!r}: only dirty bitmaps fork"))
                continue
            forks.append(ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX))
        if request.on_full not in _ON_FULL:
            violations.append(("on_full", f"unknown value {request.on_full}"))
        group: list[str] = []
        for i, value in enumerate(request.group):
            try:
                group.append(export_id(value, f"group[{i}]"))
            except GatewayError as err:
                violations += errors.field_violations(err)
        if request.snapshot_id:
            # Checked here for every kind of host: a VM's snapshot id names files (its fleecing
            # image) and NBD exports (EXPORT@SNAP), and must survive a restart's recovery.
            try:
                validate_snapshot_name(request.snapshot_id)
            except SnapshotError as exc:
                violations.append(("snapshot_id", str(exc)))
        if request.checkpoint_id:
            try:
                ckpt.validate_id(request.checkpoint_id)
            except CheckpointError as exc:
                violations.append(("checkpoint_id", str(exc)))
        if violations:
            raise errors.invalid_fields(violations)
        snap_id = request.snapshot_id or time.strftime(
            "snap-%Y%m%dT%H%M%SZ-", time.gmtime()
        ) + secrets.token_hex(2)
        vm = self._vm(export)
        if vm is self.qmp:
            if request.max_preserved_bytes:
                raise errors.invalid_field(
                    "max_preserved_bytes",
                    "a running QEMU's fleecing image is bounded only by its file system",
                )
            members = list(dict.fromkeys([export, *group]))
            for member in members[1:]:
                if self._vm(member) is not self.qmp:
                    raise errors.invalid_field("group", f"{member!r} is not a qmp export")
            infos = await self.qmp.create(
                members,
                snap_id,
                forks,
                request.cluster_size_bytes or 65536,
                checkpoint=request.checkpoint_id,
                since=request.since_checkpoint,
            )
            return snapshot_message(export, infos[0])
        if vm is self.libvirt:
            if request.max_preserved_bytes:
                raise errors.invalid_field(
                    "max_preserved_bytes",
                    "libvirt's scratch images are bounded only by their file system",
                )
            members = list(dict.fromkeys([export, *group]))
            for member in members[1:]:
                if self._vm(member) is not self.libvirt:
                    raise errors.invalid_field("group", f"{member!r} is not a libvirt export")
            infos = await self.libvirt.create(
                members,
                snap_id,
                forks,
                checkpoint=request.checkpoint_id,
                since=request.since_checkpoint,
            )
            return snapshot_message(export, infos[0])
        if group:
            raise errors.invalid_field(
                "group", "consistency groups are for qmp and libvirt exports"
            )
        image = self._image(export)
        if image is None:
            async with self.lock:
                result = await self._remote(
                    export,
                    {
                        "op": "create",
                        "snapshot": snap_id,
                        "bitmaps": forks,
                        "cluster_size": request.cluster_size_bytes or 65536,
                        "max_bytes": request.max_preserved_bytes or None,
                        "on_full": _ON_FULL[request.on_full],
                        "checkpoint": request.checkpoint_id,
                        "since": request.since_checkpoint,
                    },
                )
                self._add_remote_export(export, snap_id)
            log.info("export %s: snapshot %s taken by its host", export, snap_id)
            return snapshot_message(export, result["snapshot"])
        async with self.lock:
            try:
                plan = ckpt.plan(ckpt.chain(image), request.checkpoint_id, request.since_checkpoint)
                snap = await asyncio.to_thread(
                    image.create_snapshot,
                    snap_id,
                    bitmaps=forks,
                    cluster_size=request.cluster_size_bytes or 65536,
                    max_bytes=request.max_preserved_bytes or None,
                    on_full=_ON_FULL[request.on_full],
                    views=plan.views,
                    checkpoint=plan.started,
                )
            except CheckpointError as exc:
                raise checkpoint_error(export, exc) from None
            except NoSuchBitmapError as exc:
                offered = [CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + b for b in image.bitmaps]
                raise errors.bitmap_not_found(
                    export, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + exc.name, offered
                ) from None
            except SnapshotExistsError:
                raise snapshot_exists(export, snap_id) from None
            except SnapshotLimitError as exc:
                raise too_many_snapshots(export, str(exc)) from None
            except SnapshotError as exc:
                field = "cluster_size_bytes" if "cluster" in str(exc) else "snapshot_id"
                raise errors.invalid_field(field, str(exc)) from None
            try:
                self._add_exports(export, snap)
            except BaseException:
                # Not served, so not usable: give the bits back rather than hold them.
                await self._remove_exports(export, snap_id)
                await asyncio.to_thread(image.release_snapshot, snap_id)
                raise
        log.info("export %s: snapshot %s taken (forks %s)", export, snap_id, forks)
        return snapshot_message(export, snap.info())

    async def list(self, request: spb.ListSnapshotsRequest) -> spb.ListSnapshotsResponse:
        export = export_id(request.parent, "parent")
        size = page_size(request.page_size)
        image = None
        if (vm := self._vm(export)) is not None:
            infos = await vm.list_infos(export)
        elif (image := self._image(export)) is None:
            result = await self._remote(export, {"op": "list"})
            infos = list(result.get("snapshots", []))
            for info in infos:  # served by the host: make them exports here too
                self._add_remote_export(export, info["name"])
        else:
            infos = [s.info() for s in image.snapshots.values()]
        snaps = sorted(infos, key=lambda s: (s["created"], s["name"]))
        scope = f"snapshots/{export}"
        start = decode_page(request.page_token, scope, len(snaps))
        page = snaps[start : start + size]
        end = start + len(page)
        return spb.ListSnapshotsResponse(
            snapshots=[snapshot_message(export, s) for s in page],
            next_page_token=encode_page(scope, end) if end < len(snaps) else "",
        )

    def _vm(self, export: str) -> QmpSnapshots | LibvirtSnapshots | None:
        """The snapshots of ``export``'s VM host kind (a disk of a running QEMU or of a libvirt
        domain: the same methods), or None for an nbdcore or plain NBD host."""
        pool = self._pool(export)
        if not pool.config.node:
            return None
        if isinstance(pool.host, QmpHost):
            return self.qmp
        if isinstance(pool.host, LibvirtHost):
            return self.libvirt
        return None

    async def checkpoints(self, export: str) -> builtins.list[dict[str, Any]]:
        """The chain of ``export``, oldest first: ``{"id", "recording", "dirty_bytes",
        "granularity"}`` each."""
        if (vm := self._vm(export)) is not None:
            return await vm.list_checkpoints(export)
        image = self._image(export)
        if image is None:
            result = await self._remote(export, {"op": "checkpoints"})
            return list(result.get("checkpoints", []))
        return [
            {"id": c.id, "recording": c.recording, "dirty_bytes": c.dirty_bytes,
             "granularity": c.granularity}
            for c in ckpt.chain(image)
        ]  # fmt: skip

    async def checkpoint_delta(self, export: str, base: str, target: str) -> CheckpointDelta:
        """The ranges written between checkpoints ``base`` and ``target`` of ``export`` (the
        CSI GetMetadataDelta): any kind of host. Raises CHECKPOINT_NOT_FOUND when the chain
        has no ``base`` or ``target``, INVALID_ARGUMENT when ``base`` is the newer."""
        if (vm := self._vm(export)) is not None:
            return await vm.checkpoint_delta(export, base, target)
        image = self._image(export)
        if image is None:
            return await self._remote_delta(export, base, target)
        try:
            granularity, runs = await asyncio.to_thread(ckpt.delta, image, base, target)
        except CheckpointError as exc:
            raise checkpoint_error(export, exc) from None
        return CheckpointDelta(export, base, target, image.size, granularity, runs)

    async def _remote_delta(self, export: str, base: str, target: str) -> CheckpointDelta:
        """A remote nbdcore host: a short-lived snapshot whose one fork is the view
        ``between:A:B``, read over NBD like any fork, then released (a view merges back
        nowhere). A leftover of a gateway killed meanwhile is released at the next delta."""
        async with self.lock:
            listed = await self._remote(export, {"op": "list"})
            for info in listed.get("snapshots", []):
                if str(info["name"]).startswith(DELTA_SNAPSHOT):
                    await self._remove_exports(export, info["name"])
                    await self._remote(export, {"op": "release", "snapshot": info["name"]})
            snap_id = DELTA_SNAPSHOT + secrets.token_hex(4)
            request = {"op": "create", "snapshot": snap_id, "between": [base, target]}
            result = await self._remote(export, request)
            try:
                view = ckpt.between_view(base, target)
                fork = result["snapshot"]["forks"].get(view)
                runs: builtins.list[tuple[int, int]] = []
                if fork is not None:
                    self._add_remote_export(export, snap_id)
                    pool = self.gateway.pools[snapshot_export_id(export, snap_id)]
                    runs = await read_dirty_runs(pool, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + view)
                    granularity = int(fork["granularity"])
                else:  # base == target
                    chain = (await self._remote(export, {"op": "checkpoints"}))["checkpoints"]
                    granularity = next(int(c["granularity"]) for c in chain if c["id"] == base)
            finally:
                await self._remove_exports(export, snap_id)
                await self._remote(export, {"op": "release", "snapshot": snap_id})
        size = int(result["snapshot"]["size"])
        return CheckpointDelta(export, base, target, size, granularity, runs)

    async def delete(self, export: str, checkpoint: str) -> str | None:
        """Delete a checkpoint of ``export``, merging its interval into the older neighbour;
        returns the neighbour's id (None: it was the oldest)."""
        if (vm := self._vm(export)) is not None:
            return await vm.delete_checkpoint(export, checkpoint)
        image = self._image(export)
        async with self.lock:
            if image is None:
                result = await self._remote(
                    export, {"op": "delete-checkpoint", "checkpoint": checkpoint}
                )
                into = result.get("merged_into")
                return str(into) if into else None
            try:
                return await asyncio.to_thread(ckpt.delete, image, checkpoint)
            except CheckpointError as exc:
                raise checkpoint_error(export, exc) from None

    async def list_checkpoints(
        self, request: spb.ListCheckpointsRequest
    ) -> spb.ListCheckpointsResponse:
        export = export_id(request.parent, "parent")
        return spb.ListCheckpointsResponse(
            checkpoints=[
                spb.Checkpoint(
                    name=f"exports/{export}/checkpoints/{c['id']}",
                    recording=c["recording"],
                    dirty_bytes=c["dirty_bytes"],
                    granularity_bytes=c["granularity"],
                )
                for c in await self.checkpoints(export)
            ]
        )

    async def delete_checkpoint(
        self, request: spb.DeleteCheckpointRequest
    ) -> spb.DeleteCheckpointResponse:
        parts = request.name.split("/")
        if len(parts) != 4 or parts[0] != "exports" or parts[2] != "checkpoints" or "" in parts:
            raise errors.invalid_field(
                "name", f"{request.name!r} is not exports/EXPORT/checkpoints/CHECKPOINT"
            )
        export, checkpoint = parts[1], parts[3]
        into = await self.delete(export, checkpoint)
        log.info("export %s: checkpoint %s deleted (merged into %s)", export, checkpoint, into)
        return spb.DeleteCheckpointResponse(
            merged_into=f"exports/{export}/checkpoints/{into}" if into else ""
        )

    async def release(self, request: spb.ReleaseSnapshotRequest) -> spb.ReleaseSnapshotResponse:
        if not request.name:
            raise errors.invalid_field("name", "required: exports/EXPORT/snapshots/SNAPSHOT")
        export, snap_id = snapshot_name(request.name)
        if (vm := self._vm(export)) is not None:
            done = await vm.release(export, snap_id)
            return spb.ReleaseSnapshotResponse(
                merged=[
                    spb.ForkedBitmap(
                        context=CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + name,
                        granularity_bytes=g,
                        dirty_bytes=n,
                    )
                    for forks in done["merged"].values()
                    for name, (g, n) in forks.items()
                ],
                released=done["released"],
            )
        image = self._image(export)
        if image is None:
            async with self.lock:
                await self._remove_exports(export, snap_id)
                result = await self._remote(export, {"op": "release", "snapshot": snap_id})
            merged_bits = result.get("merged", {})
            return spb.ReleaseSnapshotResponse(
                merged=[
                    spb.ForkedBitmap(
                        context=CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + name, dirty_bytes=int(n)
                    )
                    for name, n in merged_bits.items()
                ],
                released=[f"exports/{export}/snapshots/{snap_id}"],  # no groups here
            )
        async with self.lock:
            snap = image.snapshots.get(snap_id)
            if snap is None:
                raise snapshot_not_found(export, snap_id)
            granularity = {name: b.granularity for name, b in snap.bitmaps.items()}
            # New clients no longer find it; then the forks merge back.
            await self._remove_exports(export, snap_id)
            try:
                counts = await asyncio.to_thread(image.release_snapshot, snap_id)
            except NoSuchSnapshotError:
                raise snapshot_not_found(export, snap_id) from None
            except BaseException:
                if snap_id in image.snapshots:  # still there: serve it again
                    self._add_exports(export, image.snapshots[snap_id])
                raise
        log.info("export %s: snapshot %s released", export, snap_id)
        merged = [
            spb.ForkedBitmap(
                context=CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + name,
                granularity_bytes=granularity[name],
                dirty_bytes=n,  # counted as it merged: clears that raced the release are in
            )
            for name, n in counts.items()
        ]
        return spb.ReleaseSnapshotResponse(
            merged=merged, released=[f"exports/{export}/snapshots/{snap_id}"]
        )


def snapshot_message(export: str, info: dict[str, Any]) -> spb.Snapshot:
    """The API's Snapshot from ``Snapshot.info()`` (local, or sent by a remote host)."""
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(info["created"] * 1e9))
    name = info["name"]
    return spb.Snapshot(
        name=f"exports/{export}/snapshots/{name}",
        export=f"exports/{snapshot_export_id(export, name)}",
        create_time=created,
        forks=[
            spb.ForkedBitmap(
                context=CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + fork,
                granularity_bytes=f["granularity"],
                dirty_bytes=f["dirty_bytes"],
            )
            for fork, f in info["forks"].items()
        ],
        size_bytes=info["size"],
        cluster_size_bytes=info["cluster_size"],
        preserved_bytes=info["used_bytes"],
        max_preserved_bytes=info["max_bytes"] or 0,
        on_full=_ON_FULL_PB[info["on_full"]],
        state=spb.SNAPSHOT_STATE_BROKEN if info["broken"] else spb.SNAPSHOT_STATE_READY,
        group=info.get("group", []) if len(info.get("group", [])) > 1 else [],
        checkpoint_id=info.get("checkpoint", ""),
    )
