"""``nbdgw backup`` from a point-in-time snapshot (SnapshotService), so that a backup of a disk
under live writes is consistent.

By default a backup takes a snapshot where the gateway can (exports of nbdcore hosts: the
embedded one and ``nbdgw nbd serve``; the gateway answers others with SNAPSHOTS_NOT_SUPPORTED,
and an older gateway with UNIMPLEMENTED; the backup then reads the live export as before),
reads and clears the snapshot's export ``EXPORT@SNAP`` and, once complete, releases the
snapshot: what its fork still holds (nothing, with --clear) merges back into the live bitmap,
which meanwhile recorded the writes made since.

The snapshot's id is recorded in the state file *before* the snapshot is created, and is the
state's own (made from its start time), so no crash can leave a snapshot that no state file
names: a resumed run finds it again, or, when it is gone (released, or discarded by a host
that crashed: its fork went back into the live bitmap), takes a new one and starts over,
keeping the output (what it holds of ranges the new fork does not mark is still the disk's).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nbdgw
from gateway.cli.backup_state import BackupError, BackupState
from gateway.cli.common import (
    DIRTY_BITMAP_PREFIX,
    SINCE_PREFIX,
    describe_call_error,
    parse_size,
)
from nbdcore.tools import deprecated

if TYPE_CHECKING:
    from nbdgw import AsyncClient, Snapshot

_COMMAND = "nbdgw backup"


class CheckpointOrSaveEvery(argparse.Action):
    """``--checkpoint``: a checkpoint's name, as in every command. Until 0.2 it was also the
    old spelling of ``--save-every SIZE``: a value that reads as a size (``64M``, ``1048576``)
    means that, with a notice (name checkpoints with a letter in them)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if option_string == "--checkpoint":
            try:
                size = parse_size(str(values))
            except argparse.ArgumentTypeError:
                pass
            else:
                deprecated("--checkpoint SIZE", "--save-every SIZE")
                namespace.checkpoint = size
                return
        setattr(namespace, self.dest, values)


def add_arguments(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--no-snapshot",
        dest="snapshot_mode",
        action="store_const",
        const="never",
        default="auto",
        help="read the live export, not a point-in-time snapshot (by default a snapshot is "
        "taken where the gateway can: exports of nbdcore hosts and of running QEMU VMs)",
    )
    group.add_argument(
        "--snapshot",
        metavar="SNAPSHOT",
        help="read this existing snapshot of the export (SnapshotService); it is released "
        "when the backup is complete unless --keep-snapshot",
    )
    p.add_argument(
        "--keep-snapshot",
        action="store_true",
        help="do not release the snapshot when the backup is complete",
    )
    p.add_argument(
        "--checkpoint",
        "--checkpoint-id",
        dest="checkpoint_id",
        metavar="CHECKPOINT",
        default="",
        action=CheckpointOrSaveEvery,
        help="start checkpoint CHECKPOINT at the snapshot's instant (the next backup can read"
        " what changed since it with --since CHECKPOINT)",
    )
    p.add_argument(
        "--since",
        metavar="CHECKPOINT",
        default="",
        help="copy what changed since checkpoint CHECKPOINT (an earlier --checkpoint): the"
        " snapshot's view qemu:dirty-bitmap:since:CHECKPOINT; needs no --bitmap",
    )


def since_context(args: argparse.Namespace) -> str:
    """The context ``--since C`` reads ("" without it), refusing what it cannot go with."""
    if not args.since and not args.checkpoint_id:
        return ""
    if args.snapshot or args.snapshot_mode == "never":
        raise BackupError(
            "--checkpoint and --since take their own snapshot: not with --snapshot or"
            " --no-snapshot (use nbdgw snapshot create --checkpoint/--since, then --snapshot)"
        )
    if not args.since:
        return ""
    if args.bitmap or args.clear:
        raise BackupError(
            "--since reads the changes since a checkpoint: no --bitmap, and no --clear (the"
            " checkpoints keep the changes; delete old checkpoints instead)"
        )
    return f"{SINCE_PREFIX}{args.since}"


async def check_checkpoint(client: AsyncClient, export: str, checkpoint: str) -> None:
    """Refuse ``--since C`` before anything is written when the export has no checkpoint C."""
    try:
        ids = [c.id for c in await client.list_checkpoints(export)]
    except nbdgw.errors.CallError as exc:
        why = describe_call_error(exc, _COMMAND)
        raise BackupError(f"cannot read the checkpoints: {why}") from None
    if checkpoint not in ids:
        raise BackupError(
            f"export {export!r} has no checkpoint {checkpoint!r} (it has:"
            f" {', '.join(ids) or 'none'}): take a full backup with --checkpoint"
        )


def source_export(state: BackupState) -> str:
    """What the backup reads and clears: the export, or its snapshot's export."""
    return f"{state.export}@{state.snapshot}" if state.snapshot else state.export


def snapshot_id(state: BackupState) -> str:
    """An id of the state's own, so that a resumed run recognises the snapshot it took."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(state.started))
    return f"backup-{stamp}-{int(state.started * 1e6) % 1_000_000:06d}"


def _not_supported(exc: nbdgw.errors.CallError) -> bool:
    # UNIMPLEMENTED: a gateway without SnapshotService.
    return exc.code == "UNIMPLEMENTED" or isinstance(exc, nbdgw.errors.SnapshotsNotSupported)


async def takes_snapshots(client: AsyncClient, export: str) -> bool:
    """Whether the gateway takes snapshots of ``export`` (asked without taking one)."""
    try:
        await client.list_snapshots(export)
    except nbdgw.errors.CallError as exc:
        if _not_supported(exc):
            return False
        raise
    return True


async def find_snapshot(client: AsyncClient, export: str, snapshot: str) -> Snapshot | None:
    for snap in await client.list_snapshots(export):
        if snap.id == snapshot:
            return snap
    return None


async def take_snapshot(
    client: AsyncClient,
    args: argparse.Namespace,
    state: BackupState,
    spath: Path,
    note: Callable[[str], None],
) -> None:
    """Choose what the backup reads (``state.snapshot``, saved): a snapshot taken now or found
    again, or "" for the live export."""
    try:
        if state.snapshot:
            found = await find_snapshot(client, state.export, state.snapshot)
            if found is not None and found.state != nbdgw.SnapshotState.BROKEN:
                return
            if args.snapshot:
                why = "is gone" if found is None else "is broken (it ran out of space)"
                raise BackupError(f"snapshot {state.snapshot!r} of {state.export!r} {why}")
            if found is not None:
                # Ours, and useless now: release it (its fork merges back) and start over.
                await release_snapshot(client, state)
                note(f"snapshot {state.snapshot} ran out of space; taking a new one")
            else:
                # Its fork went back into the live bitmap: a new snapshot holds it.
                note(
                    f"snapshot {state.snapshot} is gone (released, or discarded by a host that"
                    " crashed); taking a new one and starting over"
                )
            state.next_offset = 0
            state.pending_clear = []
            state.complete = False
        elif args.resume:
            return  # it read the live export so far: a snapshot now would mix two instants
        elif args.snapshot:
            found = await find_snapshot(client, state.export, args.snapshot)
            if found is None:
                raise BackupError(f"export {state.export!r} has no snapshot {args.snapshot!r}")
            if found.state == nbdgw.SnapshotState.BROKEN:
                raise BackupError(
                    f"snapshot {args.snapshot!r} is broken (it ran out of space): release it"
                    " (its forks merge back) and take a new one"
                )
            state.snapshot = args.snapshot
            state.save(spath)
            return
        elif args.snapshot_mode == "never":
            return
        state.snapshot = snapshot_id(state)
        state.save(spath)  # before it exists: see the module docstring
        since = (
            state.context.removeprefix(SINCE_PREFIX)
            if state.context.startswith(SINCE_PREFIX)
            else ""
        )
        dirty = state.context.startswith(DIRTY_BITMAP_PREFIX) and not since
        forks = [state.context] if dirty else []
        checkpoint = args.checkpoint_id
        while True:
            try:
                await client.create_snapshot(
                    state.export,
                    snapshot_id=state.snapshot,
                    bitmaps=forks,
                    checkpoint=checkpoint,
                    since=since,
                )
                return
            except nbdgw.errors.AlreadyExists as exc:
                if await find_snapshot(client, state.export, state.snapshot) is not None:
                    return  # taken just before a crash: ours
                if checkpoint and args.resume and exc.reason == "CHECKPOINT_EXISTS":
                    # Started with this backup's first snapshot, which is gone: kept.
                    checkpoint = ""
                    continue
                raise BackupError(describe_call_error(exc, _COMMAND)) from None
            except nbdgw.errors.CallError as exc:
                if _not_supported(exc) and not (checkpoint or since):
                    state.snapshot = ""  # not an nbdcore host: read the live export
                    state.save(spath)
                    return
                raise
    except nbdgw.errors.CallError as exc:
        if _not_supported(exc) and not state.snapshot:
            return
        why = describe_call_error(exc, _COMMAND)
        raise BackupError(f"cannot take a snapshot: {why}") from None


async def release_snapshot(client: AsyncClient, state: BackupState) -> None:
    """Release the backup's snapshot: its fork's remaining bits merge back."""
    try:
        await client.release_snapshot(state.export, state.snapshot)
    except nbdgw.errors.NotFound:
        pass  # released already: fine
    except nbdgw.errors.CallError as exc:
        raise BackupError(
            f"the backup is complete but its snapshot {state.snapshot} was not released:"
            f" {describe_call_error(exc, _COMMAND)}; release it with 'nbdgw snapshot release"
            f" {state.export} {state.snapshot}'"
        ) from None
