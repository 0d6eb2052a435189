"""``nbdgw disk snapshot create|list|release``: point-in-time snapshots of a raw disk, with forked
bitmaps (see ``nbdcore.storage.snapshot``), and how a server exports them.

Like ``nbdgw disk bitmap``, ``create`` and ``release`` need the image to themselves (an image a
server has open fails with EBUSY: take snapshots of a served disk through the gateway's
SnapshotService, whose embedded host owns the image); ``list`` opens it read-only.

A server exports snapshot ``SNAP`` of export ``EXPORT`` read-only as ``EXPORT@SNAP``, with
``base:allocation`` and its forks as ``qemu:dirty-bitmap:NAME`` (see :func:`snapshot_exports`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Final

from nbdcore.storage import Image
from nbdcore.tools import subgroup
from nbdcore.tools.bitmap_cmds import DISK_HELP, parse_size

if TYPE_CHECKING:
    from nbdcore.aio.server import ExportConfig
    from nbdcore.storage.snapshot import Snapshot

SEPARATOR: Final = "@"


def snapshot_export_name(export: str, snapshot: str) -> str:
    """The NBD export name of a snapshot of ``export``: ``EXPORT@SNAP``."""
    return f"{export}{SEPARATOR}{snapshot}"


def snapshot_export(export: str, snapshot: Snapshot, description: str = "") -> ExportConfig:
    """The read-only export of one snapshot (its forks are its bitmaps)."""
    from nbdcore.aio.server import ExportConfig

    return ExportConfig(
        name=snapshot_export_name(export, snapshot.name),
        image=snapshot,
        description=description or f"snapshot {snapshot.name} of {export or 'the default export'}",
        read_only=True,
    )


def snapshot_exports(export: str, image: Image) -> list[ExportConfig]:
    """The exports of every snapshot of ``image``, served beside ``export``."""
    return [snapshot_export(export, snap) for snap in image.snapshots.values()]


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``disk snapshot create|list|release``."""
    subgroup(groups, "disk", DISK_HELP)
    group = subgroup(
        groups,
        "disk snapshot",
        "snapshots of a raw disk image (of an export, through a gateway: nbdgw snapshot)",
    )

    p = group.add_parser(
        "create",
        help="freeze the disk and fork its bitmaps",
        description="Take a point-in-time snapshot of DISK: copy-before-write keeps its data as"
        " it is now while the disk goes on changing. Each forked bitmap's bits move to the"
        " snapshot (clears act there) and the live bitmap restarts clean; releasing the"
        " snapshot merges what the fork still holds back into the live bitmap.",
    )
    p.add_argument("disk", metavar="DISK", help="raw disk image")
    p.add_argument("name", metavar="NAME", help="snapshot name (letters, digits, . _ -)")
    forks = p.add_mutually_exclusive_group()
    forks.add_argument(
        "--bitmap",
        action="append",
        metavar="BITMAP",
        help="fork this bitmap (repeatable; default: every bitmap of the disk)",
    )
    forks.add_argument("--no-bitmaps", action="store_true", help="fork no bitmap (data only)")
    p.add_argument(
        "--cluster-size",
        type=parse_size,
        default=65536,
        help="copy-before-write unit, a power of two from 4K (default 64K)",
    )
    p.add_argument(
        "--max-size",
        type=parse_size,
        metavar="SIZE",
        help="most data the snapshot may preserve (default: a tenth of the disk, at least 256M)",
    )
    p.add_argument(
        "--on-full",
        choices=("break", "fail-write"),
        default="break",
        help="when the limit is hit: break the snapshot (default) or fail the disk's write",
    )
    p.add_argument("--json", action="store_true", help="print the new snapshot as JSON")
    p.set_defaults(func=cmd_create)

    p = group.add_parser("list", help="list the snapshots of a disk")
    p.add_argument("disk", metavar="DISK")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = group.add_parser(
        "release",
        help="merge a snapshot's forks back into the live bitmaps and delete it",
    )
    p.add_argument("disk", metavar="DISK")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=cmd_release)


def cmd_create(args: argparse.Namespace) -> int:
    with Image.open(args.disk) as image:
        if args.no_bitmaps:
            bitmaps: list[str] = []
        elif args.bitmap:
            bitmaps = args.bitmap
        else:
            bitmaps = sorted(image.bitmaps)
        snap = image.create_snapshot(
            args.name,
            bitmaps=bitmaps,
            cluster_size=args.cluster_size,
            max_bytes=args.max_size,
            on_full=args.on_full,
        )
        info = snap.info()
    if args.json:
        json.dump(info, sys.stdout, indent=2, ensure_ascii=False)
        print()
    else:
        forked = ", ".join(info["forks"]) or "no bitmaps"
        print(f"snapshot {info['name']} of {args.disk} (forked {forked})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with Image.open(args.disk, read_only=True) as image:
        rows = [image.snapshots[name].info() for name in sorted(image.snapshots)]
    if args.json:
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    if not rows:
        print(f"no snapshots of {args.disk}")
        return 0
    width = max(4, *(len(r["name"]) for r in rows))
    print(f"{'NAME':<{width}}  {'CREATED':<20}  {'PRESERVED':>12}  {'STATE':<6}  FORKS")
    for r in rows:
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r["created"]))
        state = "broken" if r["broken"] else "ok"
        forks = " ".join(f"{n}({f['dirty_bytes']})" for n, f in r["forks"].items()) or "-"
        print(f"{r['name']:<{width}}  {created:<20}  {r['used_bytes']:>12}  {state:<6}  {forks}")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    with Image.open(args.disk) as image:
        image.release_snapshot(args.name)
    return 0
