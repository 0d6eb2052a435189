"""Point-in-time snapshots of the disks of a running QEMU (``qmp`` hosts).

CreateSnapshot of a qmp export runs the fleecing transaction of gateway.hosts.qmp_monitor for it and
for the other exports of its consistency group (one instant for all of them). Each snapshot is
then the gateway export ``EXPORT@SNAP``: QEMU's read-only NBD export of the fleecing node, whose
bitmaps are the forks, under the live bitmaps' names. The snapshot's point in time is fixed for
its whole life, so its ClearRange calls go to the ledger under a generation the gateway gives it
(``qmp:SNAP:TOKEN``) without the caller naming one.

ReleaseSnapshot releases the whole group. For each fork it reads what the fork holds (over NBD,
before the export goes), subtracts what the ledger says was acknowledged (a granule stays dirty
unless all of it was), and merges back into the live bitmap exactly the rest (a scratch image's
bitmap, see :meth:`Monitor.merge_ranges`), or nothing when all was acknowledged. The response
says how much each fork merged back.

Recovery (:meth:`QmpSnapshots.recover`, at every new monitor session): a fleecing node with its
job is served again (same generation: acknowledgements survive); one without its job (the
gateway died inside create) is rolled back by merging its forks whole; an image whose node is
gone (QEMU restarted) has its forks (which QEMU stored in it on a clean exit) merged back. A
bitmap is never left frozen and forgotten.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.config import ExportConfig
from gateway.errors import GatewayError
from gateway.hosts.checkpoints import (
    CheckpointDelta,
    checkpoint_error,
    checkpoint_not_found,
    read_dirty_runs,
)
from gateway.hosts.pool import ExportPool
from gateway.hosts.qmp import QmpHost, qmp_error
from gateway.hosts.qmp_monitor import (
    Fleece,
    QMPFailure,
    fleece_path,
    new_token,
)
from gateway.ledger import IntervalSet, Scope
from nbdcore.aio.client import NBDClient
from nbdcore.constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX
from nbdcore.extents import iter_extents
from nbdcore.storage import checkpoint as ckpt
from nbdcore.storage.checkpoint import SINCE_PREFIX
from nbdcore.storage.errors import CheckpointError
from nbdcore.tools.snapshot_cmds import SEPARATOR

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger("nbdgw.qmp")

DELTA_PREFIX = "nbdgw-d-"  # a checkpoint delta's scratch bitmap, and its export


class QmpSnapshotReason:
    """``nbdgw.v1.SnapshotErrorReason`` names (without prefix) of qmp snapshots."""

    DISK_BUSY = "DISK_BUSY"
    CHECKPOINT_NOT_FOUND = "CHECKPOINT_NOT_FOUND"
    CHECKPOINT_EXISTS = "CHECKPOINT_EXISTS"


def disk_busy(export: str, snapshot: str) -> GatewayError:
    why = (
        f"the disk has an open snapshot {snapshot!r}: QEMU keeps one point in time per disk;"
        " release it first"
    )
    return errors.precondition_failed(
        QmpSnapshotReason.DISK_BUSY,
        f"export {export!r} cannot take another snapshot: {why}",
        {"export": export, "snapshot": snapshot},
        kind="DISK_BUSY",
        subject=f"exports/{export}",
        why=why,
    )


@dataclass
class QmpSnapshot:
    export: str
    fleece: Fleece
    created: float
    host: QmpHost
    # What a release found unacknowledged in the forks, kept in case it fails part-way: the
    # retry cannot read the forks again (their export is gone by then), and merging them back
    # whole would drop every acknowledgement (safe, but the next backup copies it all again).
    unacknowledged: dict[str, list[tuple[int, int]]] | None = None

    @property
    def name(self) -> str:
        return self.fleece.snapshot

    @property
    def pool_name(self) -> str:
        return f"{self.export}{SEPARATOR}{self.name}"

    @property
    def generation(self) -> str:
        return generation_of(self.fleece)


def _checkpoint_id(fleece: Fleece) -> str:
    if fleece.checkpoint is None:
        return ""
    return ckpt.checkpoint_id(fleece.checkpoint[0])


def generation_of(fleece: Fleece) -> str:
    return f"qmp:{fleece.snapshot}:{fleece.token}"


class QmpSnapshots:
    """The open snapshots of every qmp export, and the exports that serve them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.open: dict[tuple[str, str], QmpSnapshot] = {}
        self.lock = asyncio.Lock()

    def attach(self, host: QmpHost) -> None:
        host.on_prepared = self.recover

    # --- helpers ------------------------------------------------------------------------------

    def _host(self, export: str) -> QmpHost:
        pool = self.gateway.pools.get(export)
        if pool is None:
            raise errors.export_not_found(export)
        assert isinstance(pool.host, QmpHost)
        return pool.host

    async def _ledger(self) -> Any:
        gw = self.gateway
        if gw.backend.ledger is None:
            await gw._open_ledger()
        return gw.backend.ledger

    async def _serve(self, snap: QmpSnapshot) -> None:
        """The gateway export of ``snap`` (QEMU's export exists already)."""
        gw = self.gateway
        base = gw.pools[snap.export]
        config = ExportConfig(
            name=snap.pool_name,
            host=base.config.host,
            nbd_export=snap.fleece.nbd_name,
            description=f"snapshot {snap.name} of {snap.export}",
            read_only=True,
            generation=snap.generation,
            fixed_generation=True,
        )
        snap.host.snapshot_nodes[snap.pool_name] = snap.fleece.fleece_node
        gw.pools[snap.pool_name] = ExportPool(config, snap.host)
        ledger = await self._ledger()
        await ledger.apply_config_generation(snap.pool_name, snap.generation)
        self.open[(snap.export, snap.name)] = snap

    async def _unserve(self, snap: QmpSnapshot) -> None:
        gw = self.gateway
        self.open.pop((snap.export, snap.name), None)
        snap.host.snapshot_nodes.pop(snap.pool_name, None)
        pool = gw.pools.pop(snap.pool_name, None)
        if pool is not None:
            if pool in pool.host.pools:
                pool.host.pools.remove(pool)
            if pool.config.nbd_export in pool.host.exports:
                pool.host.exports.remove(pool.config.nbd_export)
            await pool.close()

    def group(self, snap: QmpSnapshot) -> list[QmpSnapshot]:
        return sorted(
            (s for s in self.open.values() if s.fleece.token == snap.fleece.token),
            key=lambda s: s.fleece.index,
        )

    def _size(self, snap: QmpSnapshot) -> int:
        return snap.fleece.size

    def info(self, snap: QmpSnapshot, forks: dict[str, tuple[int, int]]) -> dict[str, Any]:
        """What gateway.hosts.snapshots.snapshot_message takes."""
        return {
            "name": snap.name,
            "created": snap.created,
            "forks": {b: {"granularity": g, "dirty_bytes": n} for b, (g, n) in forks.items()},
            "size": self._size(snap),
            "cluster_size": 65536,
            "used_bytes": 0,
            "max_bytes": 0,
            # QEMU's copy-before-write fails the guest's write when the fleecing image
            # cannot take the old data (its default, on-cbw-error=break-guest-write).
            "on_full": "fail-write",
            "broken": False,
            "group": [f"exports/{s.export}/snapshots/{s.name}" for s in self.group(snap)],
            "checkpoint": _checkpoint_id(snap.fleece),
        }

    async def _fork_state(self, snap: QmpSnapshot) -> dict[str, tuple[int, int]]:
        try:
            info = await snap.host.monitor.node(snap.fleece.fleece_node)
        except QMPFailure as exc:
            raise qmp_error(exc, snap.export, snap.host) from None
        return {b.name: (b.granularity, b.count) for b in info.bitmaps}

    # --- operations ---------------------------------------------------------------------------

    async def create(
        self,
        exports: list[str],
        snap_id: str,
        forks: list[str],
        cluster_size: int,
        *,
        checkpoint: str = "",
        since: str = "",
    ) -> list[dict[str, Any]]:
        hosts = {self._host(e) for e in exports}
        if len(hosts) != 1:
            raise errors.invalid_field(
                "group", "a consistency group is made of exports of one QEMU (one qmp host)"
            )
        host = hosts.pop()
        if not host.up:
            raise host.unavailable(exports[0])
        async with self.lock:
            fleeces: list[Fleece] = []
            token = new_token()
            for i, export in enumerate(exports):
                if (export, snap_id) in self.open:
                    from gateway.hosts.snapshots import snapshot_exists

                    raise snapshot_exists(export, snap_id)
                for (e, other), _ in self.open.items():
                    if e == export:
                        raise disk_busy(export, other)
                pool = self.gateway.pools[export]
                try:
                    node = await host.monitor.resolve(pool.config.node or "")
                    info = await host.monitor.node(node)
                except QMPFailure as exc:
                    raise qmp_error(exc, export, host) from None
                present = {b.name: b for b in info.bitmaps}
                chosen: dict[str, int] = {}
                for name in forks:
                    b = present.get(name)
                    if b is None:
                        raise errors.bitmap_not_found(
                            export,
                            CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + name,
                            [CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + n for n in present],
                        )
                    if b.inconsistent:
                        # QEMU stopped without storing it: its bits cannot be trusted.
                        raise errors.bitmap_busy(
                            export,
                            name,
                            "it is inconsistent (QEMU stopped without storing it): remove it"
                            " (RemoveBitmap), add it again and take a full backup",
                        )
                    if b.busy or not b.recording:
                        raise errors.bitmap_busy(
                            export, name, "it is in use by QEMU, or not recording (disabled)"
                        )
                    chosen[name] = b.granularity
                views, started = await self._checkpoint_plan(
                    host, export, node, checkpoint, since, chosen
                )
                fleeces.append(
                    Fleece(
                        export=export,
                        snapshot=snap_id,
                        token=token,
                        index=i,
                        node=node,
                        path=fleece_path(host.folder, export, snap_id, token, i),
                        forks=chosen,
                        nbd_name=f"{pool.config.nbd_export}{SEPARATOR}{snap_id}",
                        views=views,
                        checkpoint=started,
                    )
                )
            try:
                await host.monitor.create_fleeces(fleeces, cluster_size=cluster_size)
            except QMPFailure as exc:
                if exc.kind == "busy":
                    raise disk_busy(exports[0], "(not made by this gateway)") from None
                raise qmp_error(exc, exports[0], host) from None
            exported: list[Fleece] = []
            try:
                for f in fleeces:
                    await host.monitor.export_fleece(f)
                    exported.append(f)
            except QMPFailure as exc:
                # The forks hold the live bitmaps' bits: give them back before failing (and
                # leave alone an export of that id that is not ours).
                for f in fleeces:
                    try:
                        if f in exported:
                            await host.monitor.remove_export(f.export_id)
                        await self._give_back(host, f)
                    except QMPFailure as again:
                        log.error(
                            "snapshot %s of %s: rollback failed (%s); the recovery at the next"
                            " monitor session retries",
                            snap_id,
                            f.export,
                            again,
                        )
                raise qmp_error(exc, exports[0], host) from None
            snaps = [QmpSnapshot(f.export, f, f.created, host) for f in fleeces]
            for snap in snaps:
                await self._serve(snap)
            log.info("snapshot %s of %s taken in QEMU (token %s)", snap_id, exports, token)
            return [self.info(s, await self._fork_state(s)) for s in snaps]

    async def _checkpoint_plan(
        self,
        host: QmpHost,
        export: str,
        node: str,
        checkpoint: str,
        since: str,
        chosen: dict[str, int],
    ) -> tuple[dict[str, list[str]], tuple[str, str | None] | None]:
        """The since:C view to fork and the checkpoint to start, checked against the chain."""
        if not checkpoint and not since:
            return {}, None
        try:
            chain = await host.monitor.checkpoints(node)
        except QMPFailure as exc:
            raise qmp_error(exc, export, host) from None
        links = ckpt.chain_of((b.name, b.granularity, b.recording, b.count) for _, _, b in chain)
        try:
            plan = ckpt.plan(links, checkpoint, since)
        except CheckpointError as exc:
            raise checkpoint_error(export, exc) from None
        chosen.update(plan.granularity)
        return plan.views, plan.started

    async def list_checkpoints(self, export: str) -> list[dict[str, Any]]:
        host = self._host(export)
        pool = self.gateway.pools[export]
        try:
            chain = await host.monitor.checkpoints(
                await host.monitor.resolve(pool.config.node or "")
            )
        except QMPFailure as exc:
            raise qmp_error(exc, export, host) from None
        return [
            {"id": cid, "recording": b.recording, "dirty_bytes": b.count,
             "granularity": b.granularity}
            for _, cid, b in chain
        ]  # fmt: skip

    async def delete_checkpoint(self, export: str, checkpoint: str) -> str | None:
        host = self._host(export)
        pool = self.gateway.pools[export]
        async with self.lock:
            try:
                node = await host.monitor.resolve(pool.config.node or "")
                return await host.monitor.delete_checkpoint(node, checkpoint)
            except QMPFailure as exc:
                if exc.kind == "not_found" and "checkpoint" in str(exc):
                    raise checkpoint_not_found(export, checkpoint) from None
                if exc.kind == "busy":
                    raise errors.bitmap_busy(export, checkpoint, str(exc)) from None
                raise qmp_error(exc, export, host) from None

    async def checkpoint_delta(self, export: str, base: str, target: str) -> CheckpointDelta:
        """Written between checkpoints ``base`` and ``target``: QEMU merges the chain's
        bitmaps from ``base`` up to ``target`` into a disabled scratch bitmap that a
        read-only export of the disk's node offers; the gateway reads it over NBD, then drops
        both (a leftover of a gateway that died meanwhile goes at the next delta)."""
        host = self._host(export)
        pool = self.gateway.pools[export]
        async with self.lock:
            try:
                node = await host.monitor.resolve(pool.config.node or "")
                info = await host.monitor.node(node)
                for b in info.bitmaps:
                    if b.name.startswith(DELTA_PREFIX):
                        await host.monitor.remove_export(b.name)
                        await host.monitor.remove_bitmap(node, b.name)
                chain = ckpt.chain_of(
                    (b.name, b.granularity, b.recording, b.count) for b in info.bitmaps
                )
                try:
                    sources = ckpt.between(chain, base, target)
                except CheckpointError as exc:
                    raise checkpoint_error(export, exc) from None
                granularity = next(c.granularity for c in chain if c.id == base)
                if not sources:
                    return CheckpointDelta(export, base, target, info.size, granularity, [])
                scratch = DELTA_PREFIX + new_token()
                await host.monitor.execute(
                    "block-dirty-bitmap-add",
                    {"node": node, "name": scratch, "granularity": granularity,
                     "persistent": False, "disabled": True},
                )  # fmt: skip
                try:
                    await host.monitor.execute(
                        "block-dirty-bitmap-merge",
                        {"node": node, "target": scratch, "bitmaps": [c.bitmap for c in sources]},
                    )
                    await host.monitor.add_export(scratch, node, scratch, bitmaps=[scratch])
                    try:
                        runs = await self._read_bitmap(host, scratch, scratch)
                    finally:
                        await host.monitor.remove_export(scratch)
                finally:
                    await host.monitor.remove_bitmap(node, scratch)
            except QMPFailure as exc:
                raise qmp_error(exc, export, host) from None
        return CheckpointDelta(export, base, target, info.size, granularity, runs)

    async def _read_bitmap(
        self, host: QmpHost, nbd_name: str, bitmap: str
    ) -> list[tuple[int, int]]:
        """The dirty runs of ``bitmap`` on QEMU's NBD export ``nbd_name``."""
        config = ExportConfig(name=nbd_name, host=host.name, nbd_export=nbd_name, read_only=True)
        pool = ExportPool(config, host)
        try:
            return await read_dirty_runs(pool, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + bitmap)
        finally:
            if pool in host.pools:
                host.pools.remove(pool)
            if nbd_name in host.exports:
                host.exports.remove(nbd_name)
            await pool.close()

    async def list_infos(self, export: str) -> list[dict[str, Any]]:
        snaps = [s for s in self.open.values() if s.export == export]
        return [self.info(s, await self._fork_state(s)) for s in snaps]

    async def release(self, export: str, snap_id: str) -> dict[str, Any]:
        """Release the snapshot and its group; returns ``{"merged": {EXPORT: {bitmap:
        (granularity, bytes merged back)}}, "released": [names]}``."""
        async with self.lock:
            snap = self.open.get((export, snap_id))
            if snap is None:
                from gateway.hosts.snapshots import snapshot_not_found

                raise snapshot_not_found(export, snap_id)
            merged: dict[str, dict[str, tuple[int, int]]] = {}
            released = []
            for member in self.group(snap):
                merged[member.export] = await self._release_one(member)
                released.append(f"exports/{member.export}/snapshots/{member.name}")
            return {"merged": merged, "released": released}

    async def _unacknowledged(self, snap: QmpSnapshot) -> dict[str, list[tuple[int, int]]]:
        """Per fork: the granule-aligned ranges still dirty that nobody acknowledged (the
        last granule clipped to the disk's end: merge_ranges writes them into an image of the
        disk's size, which fails past its end)."""
        pool = self.gateway.pools[snap.pool_name]
        size = self._size(snap)
        contexts = [CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + b for b in snap.fleece.forks]
        ledger = await self._ledger()
        masks: dict[str, IntervalSet] = {
            ctx: await ledger.mask(Scope(snap.pool_name, ctx, snap.generation)) for ctx in contexts
        }
        out: dict[str, list[tuple[int, int]]] = {}

        async def read(client: NBDClient) -> None:
            for ctx in contexts:
                g = snap.fleece.forks[ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)]
                mask = masks[ctx]
                runs: list[tuple[int, int]] = []
                async for batch in iter_extents(client, [ctx]):
                    for off, length, (flags,) in batch.rows():
                        if not flags & 1:
                            continue
                        # A granule stays dirty unless every byte of it was acknowledged.
                        for gs in range(off - off % g, off + length, g):
                            n = min(g, size - gs) if size else g
                            if mask.covered(gs, gs + n) < n:
                                if runs and runs[-1][0] + runs[-1][1] == gs:
                                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                                else:
                                    runs.append((gs, n))
                out[ctx.removeprefix(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX)] = runs

        await pool.run(contexts, read)
        return out

    async def _release_one(self, snap: QmpSnapshot) -> dict[str, tuple[int, int]]:
        host, f = snap.host, snap.fleece
        forks = await self._fork_state(snap)
        todo = snap.unacknowledged
        if todo is None:
            try:
                todo = snap.unacknowledged = await self._unacknowledged(snap)
            except Exception as exc:
                # The fork could not be read: merging all of it back is the safe choice.
                log.warning("snapshot %s of %s: forks unreadable (%s); merging all back",
                            snap.name, snap.export, exc)  # fmt: skip
                todo = {}
        disk_size = self._size(snap)
        await self._unserve(snap)
        result: dict[str, tuple[int, int]] = {}
        try:
            async with host.monitor.lock:
                await host.monitor.remove_export(f.export_id)
                await host.monitor.cancel_job(f.job)
                for bitmap, (granularity, count) in forks.items():
                    ranges = todo.get(bitmap)
                    if bitmap.startswith(SINCE_PREFIX):
                        result[bitmap] = (granularity, 0)  # a view: the checkpoints keep it
                    elif ranges is None or not disk_size:
                        await host.monitor.merge_back(f, bitmap)
                        result[bitmap] = (granularity, count)
                    elif ranges:
                        scratch = f.path.with_suffix(f".{bitmap.encode().hex()[:16]}.merge")
                        await host.monitor.merge_ranges(
                            f, bitmap, granularity, disk_size, ranges, scratch
                        )
                        result[bitmap] = (granularity, sum(n for _, n in ranges))
                    else:
                        result[bitmap] = (granularity, 0)
                await host.monitor.drop_fleece(f)
        except (QMPFailure, OSError) as exc:
            # Still known, so that a retry finds it; the recovery at the next monitor session
            # serves it again (intact) or rolls it back (half released). An OSError is the
            # gateway's own file work for QEMU (a scratch or fleecing image): as QEMU's.
            await self._serve(snap)
            if isinstance(exc, OSError):
                exc = QMPFailure("no_space" if exc.errno == errno.ENOSPC else "failed", str(exc))
            raise qmp_error(exc, snap.export, host) from None
        ledger = await self._ledger()
        # The point in time is gone: its acknowledgements with it.
        await ledger.set_generation(snap.pool_name, f"released:{f.token}")
        log.info("snapshot %s of %s released; merged back %s", snap.name, snap.export, result)
        return result

    # --- recovery -----------------------------------------------------------------------------

    async def recover(self, host: QmpHost) -> None:
        """Find what earlier gateways (or this one, before QEMU restarted) left in QEMU."""
        async with self.lock:
            try:
                await host.monitor.drop_merge_leftovers(
                    host.folder, [p.name for p in host.pools if p.config.node]
                )
                found = await host.monitor.find_fleeces(host.folder)
                jobs = {j.get("device") for j in await host.monitor.execute("query-block-jobs")}
            except QMPFailure as exc:
                log.warning("host %s: recovery postponed: %s", host.name, exc)
                return
            live_tokens = {(f.export, f.snapshot, f.token) for f, live in found if live}
            for snap in list(self.open.values()):
                if (
                    snap.host is host
                    and (
                        snap.export,
                        snap.name,
                        snap.fleece.token,
                    )
                    not in live_tokens
                ):
                    log.warning("snapshot %s of %s: QEMU lost it", snap.name, snap.export)
                    await self._unserve(snap)
            for f, live in found:
                pool = self.gateway.pools.get(f.export)
                if pool is None and live:
                    # In this QEMU, of an export no longer configured (renamed?): its forks
                    # hold dirty bits that only a release under that name merges back.
                    log.warning(
                        "snapshot %s of %s is in QEMU (%s), but no export %s is configured:"
                        " its forks hold dirty bits; configure the export again to release it",
                        f.snapshot, f.export, f.fleece_node, f.export,
                    )  # fmt: skip
                    continue
                if pool is None or pool.host is not host or not pool.config.node:
                    continue  # another host's, or an export no longer configured
                try:
                    f.node = await host.monitor.resolve(pool.config.node)
                    f.nbd_name = f"{pool.config.nbd_export}{SEPARATOR}{f.snapshot}"
                    known = self.open.get((f.export, f.snapshot))
                    if live and f.job in jobs:
                        if known is None:
                            await self._readopt(host, f)
                        else:
                            await self._ensure_export(host, f)
                    elif live and known is not None and known.unacknowledged is not None:
                        # A release of ours stopped part-way (its job is gone): finish it with
                        # what it found unacknowledged, not by merging the forks back whole.
                        try:
                            await self._release_one(known)
                        except GatewayError as exc:
                            log.error("snapshot %s of %s: release not finished: %s",
                                      f.snapshot, f.export, exc.message)  # fmt: skip
                    elif live:
                        if known is not None:
                            await self._unserve(known)
                        await self._rollback(host, f)
                    else:
                        await self._merge_from_file(host, f)
                except QMPFailure as exc:
                    log.error("snapshot %s of %s: recovery failed: %s", f.snapshot, f.export, exc)

    async def _ensure_export(self, host: QmpHost, f: Fleece) -> None:
        if f.export_id not in await host.monitor.exports():
            await host.monitor.add_export(
                f.export_id, f.fleece_node, f.nbd_name, bitmaps=list(f.forks)
            )

    async def _readopt(self, host: QmpHost, f: Fleece) -> None:
        await self._ensure_export(host, f)
        # Without its record (an image of an older gateway), the image's mtime, which every
        # copy-before-write moves: a time after the instant.
        created = f.created or (f.path.stat().st_mtime if f.path.exists() else time.time())
        await self._serve(QmpSnapshot(f.export, f, created, host))
        log.info("snapshot %s of %s: served again after a restart", f.snapshot, f.export)

    async def _rollback(self, host: QmpHost, f: Fleece) -> None:
        await host.monitor.remove_export(f.export_id)
        await self._give_back(host, f)

    async def _give_back(self, host: QmpHost, f: Fleece) -> None:
        """Undo a fleece that is not served: its forks merged back whole, the node gone."""
        mon = host.monitor
        await mon.cancel_job(f.job)
        live = {b.name for b in (await mon.node(f.node)).bitmaps}
        for bitmap in f.forks:
            if bitmap in live:  # not a since:C view
                await mon.merge_back(f, bitmap)
        await mon.drop_fleece(f)
        log.warning(
            "snapshot %s of %s: half made; rolled back (forks merged)", f.snapshot, f.export
        )

    async def _merge_from_file(self, host: QmpHost, f: Fleece) -> None:
        mon = host.monitor
        node = f.fleece_node
        try:
            await mon.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": node,
                    "read-only": True,
                    "file": {"driver": "file", "filename": str(f.path), "read-only": True},
                },
            )
        except QMPFailure as exc:
            log.error(
                "snapshot %s of %s: image unreadable (%s); removed", f.snapshot, f.export, exc
            )
            f.remove_files()
            return
        merged: list[str] = []
        try:
            info = await mon.node(node)
            live = {b.name for b in (await mon.node(f.node)).bitmaps}
            for b in info.bitmaps:
                if b.name in live:
                    await mon.merge_back(f, b.name)
                    merged.append(b.name)
        finally:
            await mon.drop_fleece(f)
        if merged:
            log.warning("snapshot %s of %s: QEMU restarted; forks %s merged back", f.snapshot,
                        f.export, ", ".join(merged))  # fmt: skip
        else:
            # QEMU stores bitmaps only when it closes an image cleanly: killed, it stored
            # neither the forks nor the live bitmaps (those it had stored before are now
            # inconsistent, those it never stored are gone).
            log.warning(
                "snapshot %s of %s: QEMU restarted without storing the snapshot's forks (was it"
                " killed?): nothing to merge back. The disk's bitmaps of that time are"
                " inconsistent or gone (ListBitmaps): take a full backup",
                f.snapshot,
                f.export,
            )
