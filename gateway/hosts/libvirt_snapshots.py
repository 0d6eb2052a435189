"""Point-in-time snapshots of libvirt-managed VMs: libvirt's pull-mode backup jobs.

CreateSnapshot on an export of a ``libvirt`` host starts one backup job for the domain (libvirt
keeps one job per domain): every disk the gateway serves of that domain is in it, a consistency
group (one instant for all). ``since_checkpoint`` C makes it incremental: each disk's export
also offers the changes since C, frozen at the instant, as ``qemu:dirty-bitmap:since:C`` (the
name the other host kinds give that view); ``checkpoint_id`` N has libvirt create checkpoint N
at the instant, in the same call. libvirt's NBD server listens on the host's socket in the
gateway's folder, and each disk's export ``EXPORT@SNAP`` is served by the gateway like any
snapshot; ClearRange on the view goes to the ledger under the snapshot's fixed generation.

ReleaseSnapshot ends the job (``abortJob``: a pull backup never ends by itself). The release
rule for the checkpoint N the snapshot created: it is kept, unless the consumer acknowledged
part of the view (ClearRange) but not all of it; then N is deleted, so that the consumer backs
up from C again. libvirt never clears a checkpoint's bitmap, and deleting N does not touch C's
tracking, so "since C" loses nothing whatever the rule does: the rule only decides whether N
remains a base to back up from. (docs/running-vms.md, "libvirt".)

Recovery: a job file in the folder, written before the job starts, names the snapshot, its
token (hence its ledger generation), its view and checkpoint. At the first probe that finds the
domain running, a job of ours still running is served again with its acknowledgements; a job
that is gone (the gateway died inside release, or the VM stopped) is finished by the release
rule from what the ledger holds; a job on our socket that no file names is ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import errors
from gateway.config import ExportConfig
from gateway.errors import GatewayError
from gateway.hosts.checkpoints import (
    CheckpointDelta,
    checkpoint_error,
    checkpoint_exists,
    checkpoint_not_found,
    read_dirty_runs,
)
from gateway.hosts.libvirt import (
    GRANULARITY,
    Checkpoint,
    LibvirtFailure,
    LibvirtHost,
    backup_xml,
    checkpoint_xml,
    host_key,
    libvirt_error,
    parse_backup,
    prepare_folder,
)
from gateway.hosts.libvirt_deltas import Instant, Links, instant_of, union
from gateway.hosts.pool import ExportPool
from gateway.hosts.qmp_snapshots import disk_busy
from gateway.ledger import Scope
from nbdcore.constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX
from nbdcore.storage.checkpoint import SINCE_PREFIX, order_error
from nbdcore.tools.snapshot_cmds import SEPARATOR

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger("nbdgw.libvirt")


@dataclass
class Job:
    """A backup job the gateway started, as its job file records it."""

    snapshot: str
    token: str
    since: str  # incremental from this checkpoint ("" full)
    checkpoint: str  # the checkpoint the job created ("" none)
    exports: dict[str, str]  # gateway export -> disk target
    created: float
    # The creation times of ``since`` and ``checkpoint`` as libvirt listed them once the job
    # had started (0: not known, a job file of an older gateway): what the job's view is
    # between (libvirt_deltas).
    since_created: int = 0
    checkpoint_created: int = 0
    # Each disk's source (libvirt_deltas: a disk is its target and its source) when the job
    # started: the link records this, not what the target holds when it is recorded.
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def view(self) -> str:
        return f"{SINCE_PREFIX}{self.since}" if self.since else ""

    @property
    def generation(self) -> str:
        return f"libvirt:{self.snapshot}:{self.token}"

    def pool_name(self, export: str) -> str:
        return f"{export}{SEPARATOR}{self.snapshot}"


def job_file(host: LibvirtHost) -> Path:
    return host.nbd_socket.with_suffix(".job.json")


def _save(host: LibvirtHost, job: Job) -> None:
    path = job_file(host)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(job), f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)  # the job file is the recovery's only memory: never half written


def links_of(host: LibvirtHost) -> Links:
    """The host's record of what was written between its checkpoints (libvirt_deltas), in
    the gateway's data folder: not in the host's folder, which QEMU's user may write."""
    return Links(host.folder.parent / "libvirt-links" / host_key(host.config.name))


def _instants(chain: list[Checkpoint]) -> dict[str, Instant]:
    return {c.name: instant_of(c) for c in chain}


def _load(host: LibvirtHost) -> Job | None:
    try:
        return Job(**json.loads(job_file(host).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        log.error("host %s: job file unreadable (%s); ignored", host.name, exc)
        return None


def _no_record(export: str, base: str, target: str, why: str) -> GatewayError:
    # As the CSI service answers a host that has no change tracking at all.
    return errors.precondition_failed(
        "CHANGE_TRACKING_UNAVAILABLE",
        f"export {export!r}: {why}",
        {"export": export, "base": base, "target": target},
        kind="CHECKPOINT_DELTA",
        subject=f"exports/{export}/checkpoints/{target}",
        why=why,
    )


class LibvirtSnapshots:
    """The backup jobs of every libvirt host and the exports that serve them."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.jobs: dict[str, Job] = {}  # host name -> its open job
        self.lock = asyncio.Lock()

    def attach(self, host: LibvirtHost) -> None:
        host.on_running = self.recover

    def _host(self, export: str) -> LibvirtHost:
        pool = self.gateway.pools.get(export)
        if pool is None:
            raise errors.export_not_found(export)
        assert isinstance(pool.host, LibvirtHost)
        return pool.host

    def _disks(self, host: LibvirtHost) -> dict[str, str]:
        """The host's configured exports: gateway export -> disk target."""
        return {p.name: p.config.node for p in host.pools if p.config.node}

    async def _ledger(self) -> Any:
        gw = self.gateway
        if gw.backend.ledger is None:
            await gw._open_ledger()
        return gw.backend.ledger

    async def _serve(self, host: LibvirtHost, job: Job) -> None:
        gw = self.gateway
        ledger = await self._ledger()
        for export in job.exports:
            name = job.pool_name(export)
            config = ExportConfig(
                name=name,
                host=host.name,
                nbd_export=name,
                description=f"snapshot {job.snapshot} of {export}",
                read_only=True,
                generation=job.generation,
                fixed_generation=True,
            )
            host.serving.add(name)
            gw.pools[name] = ExportPool(config, host)
            await ledger.apply_config_generation(name, job.generation)
        self.jobs[host.name] = job

    async def _unserve(self, host: LibvirtHost, job: Job) -> None:
        gw = self.gateway
        self.jobs.pop(host.name, None)
        for export in job.exports:
            name = job.pool_name(export)
            host.serving.discard(name)
            pool = gw.pools.pop(name, None)
            if pool is None:
                continue
            if pool in host.pools:
                host.pools.remove(pool)
            if name in host.exports:
                host.exports.remove(name)
            await pool.close()

    def _job_of(self, export: str, snap_id: str) -> tuple[LibvirtHost, Job]:
        host = self._host(export)
        job = self.jobs.get(host.name)
        if job is None or job.snapshot != snap_id or export not in job.exports:
            from gateway.hosts.snapshots import snapshot_not_found

            raise snapshot_not_found(export, snap_id)
        return host, job

    async def info(self, host: LibvirtHost, job: Job, export: str) -> dict[str, Any]:
        """What gateway.hosts.snapshots.snapshot_message takes."""
        pool = self.gateway.pools[job.pool_name(export)]
        forks: dict[str, dict[str, int]] = {}
        if job.view:
            runs = await read_dirty_runs(pool, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + job.view)
            forks[job.view] = {"granularity": GRANULARITY, "dirty_bytes": sum(n for _, n in runs)}
        size = (await host.known(self.gateway.pools[export])).size
        return {
            "name": job.snapshot,
            "created": job.created,
            "forks": forks,
            "size": size,
            "cluster_size": GRANULARITY,
            "used_bytes": 0,
            "max_bytes": 0,
            # QEMU's copy-before-write under libvirt fails the guest's write when the scratch
            # image cannot take the old data.
            "on_full": "fail-write",
            "broken": False,
            "group": [f"exports/{e}/snapshots/{job.snapshot}" for e in job.exports],
            "checkpoint": job.checkpoint,
        }

    # --- operations ---------------------------------------------------------------------------

    async def create(
        self,
        exports: list[str],
        snap_id: str,
        forks: list[str],
        *,
        checkpoint: str = "",
        since: str = "",
    ) -> list[dict[str, Any]]:
        hosts = {self._host(e) for e in exports}
        if len(hosts) != 1:
            raise errors.invalid_field(
                "group", "a consistency group is made of disks of one libvirt domain (one host)"
            )
        host = hosts.pop()
        if forks:
            raise errors.invalid_field(
                "bitmaps",
                "libvirt's change tracking is its checkpoints: use since_checkpoint (the view"
                f" qemu:dirty-bitmap:{SINCE_PREFIX}C) and checkpoint_id",
            )
        if not host.up:
            raise host.unavailable(exports[0])
        async with self.lock:
            open_job = self.jobs.get(host.name)
            if open_job is not None:
                if open_job.snapshot == snap_id:
                    from gateway.hosts.snapshots import snapshot_exists

                    raise snapshot_exists(exports[0], snap_id)
                raise disk_busy(exports[0], open_job.snapshot)
            chain = {c.name for c in await host.checkpoints(exports[0])}
            if since and since not in chain:
                raise checkpoint_not_found(exports[0], since)
            if checkpoint and checkpoint in chain:
                raise checkpoint_exists(exports[0], checkpoint)
            # The whole domain in one job: every disk the gateway serves of it.
            disks = self._disks(host)
            job = Job(snap_id, secrets.token_hex(4), since, checkpoint, disks, time.time())
            try:
                prepare_folder(host.folder, exports[0])
                all_disks = [d.target for d in await host.libvirt.disks()]
                spec = {
                    disk: (
                        job.pool_name(export),
                        job.view,
                        host.folder / f"{host.nbd_socket.stem}.{job.token}.{disk}.scratch",
                    )
                    for export, disk in disks.items()
                }
                host.nbd_socket.unlink(missing_ok=True)  # a dead job's: QEMU will not bind
                _save(host, job)  # before the job exists: a crash leaves nothing unnamed
                await host.libvirt.backup_begin(
                    backup_xml(host.nbd_socket, spec, all_disks, since),
                    checkpoint_xml(checkpoint) if checkpoint else None,
                )
                if since and checkpoint:
                    await self._note_instants(host, job)
            except LibvirtFailure as exc:
                job_file(host).unlink(missing_ok=True)
                if exc.kind == "busy":
                    raise disk_busy(
                        exports[0], "(a libvirt job the gateway did not start)"
                    ) from None
                if exc.kind == "exists" and checkpoint:
                    raise checkpoint_exists(exports[0], checkpoint) from None
                raise libvirt_error(exc, exports[0], host) from None
            await self._serve(host, job)
            log.info("snapshot %s of %s: libvirt backup job started (token %s)", snap_id,
                     list(disks), job.token)  # fmt: skip
            await self._record_links(host, job)
            first = next(e for e in exports if e in disks)
            return [await self.info(host, job, first)]

    async def list_infos(self, export: str) -> list[dict[str, Any]]:
        host = self._host(export)
        job = self.jobs.get(host.name)
        if job is None or export not in job.exports:
            return []
        return [await self.info(host, job, export)]

    async def release(self, export: str, snap_id: str) -> dict[str, Any]:
        """End the job; returns ``{"merged": {EXPORT: {view: (granularity, bytes)}},
        "released": [names]}`` (bytes: what was left unacknowledged when the checkpoint the
        snapshot created was deleted for it, else 0)."""
        async with self.lock:
            host, job = self._job_of(export, snap_id)
            remaining: int | None = 0
            acknowledged = False
            # Normally done at creation; again in case the gateway died in between.
            await self._record_links(host, job)
            if job.view:
                try:
                    remaining, acknowledged = await self._unacknowledged(job)
                except Exception as exc:
                    log.warning("snapshot %s: view unreadable (%s)", snap_id, exc)
                    remaining, acknowledged = None, await self._any_ack(job)
            await self._unserve(host, job)
            try:
                await host.libvirt.abort_job()
                deleted = await self._apply_rule(host, job, remaining, acknowledged)
            except LibvirtFailure as exc:
                await self._serve(host, job)  # still known: a retry, or recovery, ends it
                raise libvirt_error(exc, export, host) from None
            await self._forget(host, job)
            merged = {
                e: (
                    {job.view: (GRANULARITY, (remaining or 0) if deleted else 0)}
                    if job.view
                    else {}
                )
                for e in job.exports
            }
            log.info("snapshot %s released (checkpoint %s %s)", snap_id, job.checkpoint or "-",
                     "deleted" if deleted else "kept")  # fmt: skip
            return {
                "merged": merged,
                "released": [f"exports/{e}/snapshots/{snap_id}" for e in job.exports],
            }

    async def _unacknowledged(self, job: Job) -> tuple[int, bool]:
        """(bytes of the view not acknowledged, whether anything was acknowledged)."""
        ledger = await self._ledger()
        context = CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + job.view
        left, any_ack = 0, False
        for export in job.exports:
            name = job.pool_name(export)
            mask = await ledger.mask(Scope(name, context, job.generation))
            for off, length in await read_dirty_runs(self.gateway.pools[name], context):
                covered = mask.covered(off, off + length)
                left += length - covered
                any_ack = any_ack or covered > 0
            any_ack = any_ack or bool(mask.covered(0, 1 << 62))
        return left, any_ack

    async def _any_ack(self, job: Job) -> bool:
        if not job.view:
            return False
        ledger = await self._ledger()
        context = CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + job.view
        for export in job.exports:
            mask = await ledger.mask(Scope(job.pool_name(export), context, job.generation))
            if mask.covered(0, 1 << 62):
                return True
        return False

    async def _apply_rule(
        self, host: LibvirtHost, job: Job, remaining: int | None, acknowledged: bool
    ) -> bool:
        """Delete the checkpoint the job created when the consumer acknowledged part of the
        view but not all (``remaining`` None: unknown, so not all); returns whether it did."""
        if not job.checkpoint or not acknowledged or remaining == 0:
            return False
        chain = {c.name for c in await host.libvirt.checkpoints()}
        if job.checkpoint in chain:
            await host.libvirt.delete_checkpoint(job.checkpoint)
        return True

    async def _forget(self, host: LibvirtHost, job: Job) -> None:
        ledger = await self._ledger()
        for export in job.exports:
            # The point in time is gone: its acknowledgements with it.
            await ledger.set_generation(job.pool_name(export), f"released:{job.token}")
        job_file(host).unlink(missing_ok=True)

    # --- checkpoints --------------------------------------------------------------------------

    async def list_checkpoints(self, export: str) -> list[dict[str, Any]]:
        host = self._host(export)
        disk = self.gateway.pools[export].config.node or ""
        chain = await host.checkpoints(export)
        parents = {c.parent for c in chain}
        return [
            {"id": c.name, "recording": c.name not in parents,
             "dirty_bytes": c.disks.get(disk) or 0, "granularity": GRANULARITY}
            for c in chain
            if disk in c.disks
        ]  # fmt: skip

    async def delete_checkpoint(self, export: str, checkpoint: str) -> str | None:
        host = self._host(export)
        async with self.lock:
            chain = await host.checkpoints(export)
            found = {c.name: c for c in chain}
            if checkpoint not in found:
                raise checkpoint_not_found(export, checkpoint)
            try:
                await host.libvirt.delete_checkpoint(checkpoint)
            except LibvirtFailure as exc:
                if exc.kind == "not_found":
                    raise checkpoint_not_found(export, checkpoint) from None
                if exc.kind == "busy":
                    raise errors.bitmap_busy(export, checkpoint, str(exc)) from None
                raise libvirt_error(exc, export, host) from None
            return found[checkpoint].parent or None

    async def checkpoint_delta(self, export: str, base: str, target: str) -> CheckpointDelta:
        """Written between checkpoints ``base`` and ``target``: the union of the links the
        gateway recorded from one to the other (libvirt_deltas: libvirt cannot say)."""
        host = self._host(export)
        pool = self.gateway.pools[export]
        disk = pool.config.node or ""
        chain = await host.checkpoints(export)
        instants = _instants(chain)
        for name in (base, target):
            if name not in instants:
                raise checkpoint_not_found(export, name)
        size = (await host.known(pool)).size
        if base == target:
            return CheckpointDelta(export, base, target, size, GRANULARITY, [])
        parents = {c.name: c.parent for c in chain}
        older, at = set(), parents[target]
        while at and at not in older:
            older.add(at)
            at = parents.get(at, "")
        if base not in older:
            raise checkpoint_error(export, order_error(base, target))
        links = links_of(host)
        try:
            source = (await host.libvirt.sources()).get(disk, "")
        except LibvirtFailure as exc:
            raise libvirt_error(exc, export, host) from None
        async with self.lock:  # no prune meanwhile
            path = await asyncio.to_thread(
                links.path, disk, source, instants[base], instants[target]
            )
            if path is None:
                raise _no_record(
                    export,
                    base,
                    target,
                    f"the gateway has no record of what was written to disk {disk} between"
                    f" checkpoints {base!r} and {target!r}: libvirt only tells what changed"
                    " since a checkpoint up to now, so the gateway records it when a snapshot"
                    " incremental from one checkpoint creates the next (CreateSnapshot with"
                    " since_checkpoint and checkpoint_id); checkpoints made otherwise (virsh,"
                    " AddBitmap, a snapshot without since_checkpoint) have none, and a record"
                    " that failed says why in the gateway's log",
                )
            try:
                runs = await asyncio.to_thread(union, path)
            except (OSError, ValueError) as exc:
                raise _no_record(
                    export, base, target, f"the gateway's record is unreadable: {exc}"
                ) from None
        return CheckpointDelta(export, base, target, size, GRANULARITY, runs)

    async def _note_instants(self, host: LibvirtHost, job: Job) -> None:
        """Write down, in the job file, which checkpoints the job's view is between: libvirt's
        list right after the job started (a name may later be deleted and taken again)."""
        try:
            instants = _instants(await host.libvirt.checkpoints())
            if job.since in instants and job.checkpoint in instants:
                job.since_created = instants[job.since][1]
                job.checkpoint_created = instants[job.checkpoint][1]
                job.sources = await host.libvirt.sources()
                _save(host, job)
        except (LibvirtFailure, OSError) as exc:
            # The job runs: serve it. Only its link will be missing (logged).
            job.checkpoint_created = 0
            log.warning("snapshot %s: the instants of its view not noted (%s)", job.snapshot, exc)

    async def _record_links(self, host: LibvirtHost, job: Job) -> None:
        """Keep what the job's view shows, "since ``job.since``" frozen at the instant
        ``job.checkpoint`` was created, as the link between the two for every disk of the job
        (once per job: at creation, and at release in case the gateway died in between). Only
        when libvirt still lists the very checkpoints the job started with. A failure is
        logged: the snapshot serves its backup all the same, and a GetMetadataDelta that needs
        the link says it has none."""
        if not (job.since and job.checkpoint and job.checkpoint_created):
            return
        base = (job.since, job.since_created)
        target = (job.checkpoint, job.checkpoint_created)
        links = links_of(host)
        try:
            instants = _instants(await host.libvirt.checkpoints())
            if instants.get(job.since) != base or instants.get(job.checkpoint) != target:
                log.warning(
                    "snapshot %s: checkpoint %s or %s is no longer the one the job started"
                    " with; the writes between them are not recorded",
                    job.snapshot, job.since, job.checkpoint,
                )  # fmt: skip
                return
            have = {(k.job, k.disk) for k in await asyncio.to_thread(links.links)}
            # A job file of an older gateway has no sources: the disks' as they are now.
            sources = job.sources or await host.libvirt.sources()
            for export, disk in job.exports.items():
                if (job.token, disk) in have:
                    continue
                pool = self.gateway.pools[job.pool_name(export)]
                runs = await read_dirty_runs(pool, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + job.view)
                size = (await host.known(self.gateway.pools[export])).size
                source = sources.get(disk, "")
                await asyncio.to_thread(
                    links.record, job.token, disk, source, base, target, size, runs
                )
                removed = await asyncio.to_thread(links.prune, disk, source, instants.values())
                if removed:
                    log.info("host %s: %d links of disk %s no longer of use, removed",
                             host.name, removed, disk)  # fmt: skip
        except Exception as exc:
            log.warning(
                "snapshot %s: could not record the writes between checkpoints %s and %s (%s);"
                " GetMetadataDelta between them will say so",
                job.snapshot, job.since, job.checkpoint, exc,
            )  # fmt: skip

    # --- recovery -----------------------------------------------------------------------------

    async def recover(self, host: LibvirtHost) -> None:
        """Find what an earlier gateway (or this one, before the domain stopped) left."""
        async with self.lock:
            try:
                running = await host.libvirt.backup_xml()
            except LibvirtFailure as exc:
                log.warning("host %s: recovery postponed: %s", host.name, exc)
                raise ConnectionRefusedError(str(exc)) from None
            job = _load(host)
            ours = running is not None and parse_backup(running)[0] == str(host.nbd_socket)
            known = self.jobs.get(host.name)
            if known is not None and not (ours and job is not None and job.token == known.token):
                await self._unserve(host, known)
            if job is None:
                if ours:
                    log.warning("host %s: a backup job on our socket that no file names: ended",
                                host.name)  # fmt: skip
                    await host.libvirt.abort_job()
                return
            if ours:
                if self.jobs.get(host.name) is None:
                    await self._serve(host, job)
                    log.info("snapshot %s: backup job served again", job.snapshot)
                return
            # The job is gone: finish its release from what the ledger says.
            deleted = await self._apply_rule(host, job, None, await self._any_ack(job))
            await self._forget(host, job)
            fate = "deleted" if deleted else "kept"
            log.warning(
                "snapshot %s: its backup job was gone; released (checkpoint %s %s)",
                job.snapshot, job.checkpoint or "-", fate,
            )  # fmt: skip
