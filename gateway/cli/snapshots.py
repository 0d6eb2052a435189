"""``nbdgw snapshot create|list|release`` and ``nbdgw checkpoint list|delete``: the
SnapshotService of a running gateway, for any kind of host that takes snapshots and
checkpoints (embedded, qmp, and whatever host kinds come).

(``nbdgw disk snapshot`` works on a local disk image: nbdcore.tools.snapshot_cmds.)
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

import nbdgw
from gateway.cli.common import (
    DIRTY_BITMAP_PREFIX,
    CommandError,
    CommandFailed,
    _one_line_errors,
    add_target_arguments,
    command,
    open_client,
    parse_size,
    print_json,
    print_table,
)
from nbdcore.tools import DeprecatedFlag, subgroup

if TYPE_CHECKING:
    from nbdgw.v1 import snapshot_service_pb2 as spb

# --on-full -> the SnapshotOnFull member (by name: the models load with the client, not --help).
_ON_FULL = {"break": "BREAK_SNAPSHOT", "fail-write": "FAIL_WRITE"}


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``snapshot list|create|release`` and ``checkpoint list|delete``."""
    group = subgroup(
        groups,
        "snapshot",
        "snapshots of an export, through a running gateway (of a local image: disk snapshot)",
    )

    p = _one_line_errors(group.add_parser("list", help="list the snapshots of an export"))
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=command(cmd_list))

    p = _one_line_errors(
        group.add_parser(
            "create",
            help="take a snapshot of an export, forking dirty bitmaps",
            description="Take a point-in-time snapshot of EXPORT: it is served as the read-only"
            " export EXPORT@ID, whose dirty bitmaps are the forks (clear them as you store what"
            " you copied); the live bitmaps restart clean. Release it when done: what the forks"
            " still hold merges back.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument(
        "snapshot",
        metavar="SNAPSHOT",
        nargs="?",
        default="",
        help="the snapshot's id (default: one from the time)",
    )
    # Old: 'snapshots create EXPORT --id ID'. Its own dest: a positional '?' left out would
    # overwrite it.
    p.add_argument("--id", default="", action=DeprecatedFlag, new="snapshot create EXPORT SNAPSHOT")
    p.add_argument(
        "--bitmap",
        action="append",
        default=[],
        metavar="NAME",
        help="fork this dirty bitmap (qemu:dirty-bitmap:NAME or NAME; repeatable); default: "
        "every dirty bitmap of the export that records",
    )
    p.add_argument(
        "--no-fork",
        action="store_true",
        help="fork no bitmap (a snapshot of the data only)",
    )
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="EXPORT",
        help="snapshot this export of the same running QEMU at the same instant (a consistency"
        " group, released together; repeatable)",
    )
    p.add_argument(
        "--checkpoint",
        default="",
        metavar="ID",
        help="start checkpoint ID at this instant",
    )
    p.add_argument(
        "--since",
        default="",
        metavar="CHECKPOINT",
        help="also fork what changed since CHECKPOINT, as qemu:dirty-bitmap:since:CHECKPOINT",
    )
    p.add_argument("--cluster-size", type=parse_size, default=0, help="copy-before-write unit")
    p.add_argument("--max-size", type=parse_size, default=0, help="most old data to preserve")
    p.add_argument("--on-full", choices=sorted(_ON_FULL), default="break")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=command(cmd_create))

    p = _one_line_errors(
        group.add_parser("release", help="merge a snapshot's forks back and delete it")
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("snapshot", metavar="SNAPSHOT")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=command(cmd_release))

    # Checkpoints start with a snapshot ('snapshot create --checkpoint ID'): one instant for
    # the snapshot and the checkpoint, whatever the kind of host.
    group = subgroup(
        groups,
        "checkpoint",
        "checkpoints of an export (started by 'snapshot create --checkpoint ID')",
    )
    p = _one_line_errors(group.add_parser("list", help="list the checkpoints of an export"))
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=command(cmd_checkpoints))

    p = _one_line_errors(
        group.add_parser(
            "create",
            help="start a checkpoint now (a snapshot forking nothing, released at once)",
            description="Start checkpoint CHECKPOINT of EXPORT at this instant: every write from"
            " now on is recorded in it, for 'nbdgw backup --since CHECKPOINT' or 'nbdgw snapshot"
            " create --since CHECKPOINT'. It takes a snapshot that forks no bitmap (the instant"
            " of the checkpoint) and releases it at once; 'nbdgw backup --checkpoint' starts one"
            " with its own snapshot instead.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument(
        "--group",
        action="append",
        default=[],
        metavar="EXPORT",
        help="start it on this export of the same running QEMU at the same instant (repeatable)",
    )
    add_target_arguments(p)
    p.set_defaults(func=command(cmd_create_checkpoint))

    p = _one_line_errors(
        group.add_parser(
            "delete", help="delete a checkpoint (its changes merge into the older neighbour)"
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    add_target_arguments(p)
    p.set_defaults(func=command(cmd_delete_checkpoint))


async def cmd_checkpoints(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        checkpoints = await client.list_checkpoints(args.export)
    if args.json:
        from nbdgw.v1 import snapshot_service_pb2 as spb  # loaded by the client already

        print_json(spb.ListCheckpointsResponse(checkpoints=[c.raw for c in checkpoints]))
        return 0
    if not checkpoints:
        print(f"no checkpoints of {args.export}")
        return 0
    rows = [["NAME", "STATE", "DIRTY", "GRANULARITY"]]
    for c in checkpoints:
        state = "recording" if c.recording else "closed"
        rows.append([c.id, state, str(c.dirty_bytes), str(c.granularity)])
    print_table(rows)
    return 0


async def cmd_create_checkpoint(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        snap = await client.create_snapshot(
            args.export, bitmaps=(), group=args.group, checkpoint=args.checkpoint
        )
        try:
            await client.release_snapshot(args.export, snap.id)
        except nbdgw.errors.CallError as exc:
            raise CommandFailed(
                f"checkpoint {args.checkpoint} started, but its snapshot {snap.id} was not"
                f" released ({exc}): release it with 'nbdgw snapshot release {args.export}"
                f" {snap.id}'"
            ) from None
    print(
        f"checkpoint {args.checkpoint} of {args.export} started: writes from now on are"
        f" recorded (read them with 'nbdgw backup --since {args.checkpoint}')"
    )
    return 0


async def cmd_delete_checkpoint(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        into = await client.delete_checkpoint(args.export, args.checkpoint)
    print(f"deleted {args.checkpoint}" + (f"; its changes merged into {into}" if into else ""))
    return 0


GATEWAY_BITMAPS = "nbdgw-"
SNAPSHOT_HEADER = ["NAME", "CREATED", "EXPORT", "STATE", "FORKS (DIRTY BYTES)"]


def _row(s: spb.Snapshot) -> list[str]:
    """A snapshot as 'snapshot list' and 'snapshot create' show it (from its message)."""
    from nbdgw.v1 import snapshot_service_pb2 as spb  # loaded by the client already

    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(s.create_time.seconds))
    state = "broken" if s.state == spb.SNAPSHOT_STATE_BROKEN else "ready"
    forks = " ".join(f"{f.context}({f.dirty_bytes})" for f in s.forks) or "-"
    return [s.name.rsplit("/", 1)[-1], created, s.export, state, forks]


async def cmd_list(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        snapshots = [s.raw for s in await client.list_snapshots(args.export)]
    if args.json:
        from nbdgw.v1 import snapshot_service_pb2 as spb  # loaded by the client already

        print_json(spb.ListSnapshotsResponse(snapshots=snapshots))
    elif not snapshots:
        print(f"no snapshots of {args.export}")
    else:
        print_table([SNAPSHOT_HEADER, *(_row(s) for s in snapshots)])
    return 0


async def cmd_create(args: argparse.Namespace) -> int:
    if args.no_fork and args.bitmap:
        raise CommandError("--no-fork and --bitmap exclude each other")
    forks = args.bitmap
    async with open_client(args) as client:
        if not forks and not args.no_fork and not args.since:
            # As 'nbdgw disk snapshot create' does for a local image: every dirty bitmap that
            # records, so that nothing written before the snapshot is left out of its forks
            # (with --since, the fork is that checkpoint's view). The gateway's own bitmaps
            # (checkpoints of running VMs, named nbdgw-...) are not the user's to fork.
            forks = [
                b.context
                for b in await client.list_bitmaps(args.export)
                if b.kind == nbdgw.BitmapKind.DIRTY_BITMAP
                and b.recording
                and not b.context.removeprefix(DIRTY_BITMAP_PREFIX).startswith(GATEWAY_BITMAPS)
            ]
        snap = await client.create_snapshot(
            args.export,
            snapshot_id=args.snapshot or args.id,
            bitmaps=forks,
            cluster_size=args.cluster_size,
            max_preserved_bytes=args.max_size,
            on_full=nbdgw.SnapshotOnFull[_ON_FULL[args.on_full]],
            group=args.group,
            checkpoint=args.checkpoint,
            since=args.since,
        )
    if args.json:
        print_json(snap.raw)
    else:
        print_table([SNAPSHOT_HEADER, _row(snap.raw)])
    return 0


async def cmd_release(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        release = await client.release_snapshot(args.export, args.snapshot)
    if args.json:
        print_json(release.raw)
    else:
        merged = ", ".join(f"{m.context} {m.dirty_bytes} bytes" for m in release.merged)
        print(f"released {args.snapshot}; merged back: {merged or 'nothing'}")
        named = f"exports/{args.export.removeprefix('exports/')}/snapshots/{args.snapshot}"
        others = [n for n in release.released if n != named]
        if others:
            print(f"released with it (its consistency group): {', '.join(others)}")
    return 0
