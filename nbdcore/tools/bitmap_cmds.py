"""``nbdgw disk create`` and ``nbdgw disk bitmap ...``: the persistent dirty bitmaps of a raw
disk (``DISK.nbdgw/``), managed like ``qemu-img bitmap`` manages those of a qcow2 image, no
gateway involved (``nbdgw bitmap ...`` works on an export, through a gateway).

Commands that only look (``list``, ``map``) open the image read-only and work while a server
has it; the others need the image to themselves (an image in use fails with EBUSY).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from nbdcore.storage import Image
from nbdcore.tools import subgroup

_SIZE = re.compile(r"(?i)^\s*(\d+)\s*(?:([kmgtpe])(?:i?b)?|b)?\s*$")
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str) -> int:
    """Bytes from ``512``, ``64K``, ``64KiB``, ``1M``, ``10G``... (binary units, like qemu-img)."""
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 1M, 10G)")
    number, unit = match.groups()
    return int(number) * (_UNITS[unit.lower()] if unit else 1)


DISK_HELP = "local raw disk images, their bitmaps and snapshots (no gateway)"


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``disk create`` and ``disk bitmap add|remove|list|map|enable|disable|clear|merge``."""
    disk = subgroup(groups, "disk", DISK_HELP)
    p = disk.add_parser("create", help="create a sparse raw disk image")
    p.add_argument("disk", metavar="DISK")
    p.add_argument("size", metavar="SIZE", type=parse_size, help="size, e.g. 1G")
    p.set_defaults(func=cmd_disk_create)

    bitmap = subgroup(groups, "disk bitmap", "the persistent dirty bitmaps of a raw disk image")

    p = bitmap.add_parser("add", help="add a bitmap (clean, enabled unless --disable)")
    p.add_argument(
        "-g",
        "--granularity",
        type=parse_size,
        default=65536,
        help="bytes per bit, a power of two from 512 (default 64K)",
    )
    p.add_argument("--disable", action="store_true", help="create it disabled")
    _disk_name(p)
    p.set_defaults(func=cmd_add)

    p = bitmap.add_parser("remove", help="remove a bitmap")
    _disk_name(p)
    p.set_defaults(func=cmd_remove)

    p = bitmap.add_parser("list", help="list the bitmaps with their dirty bytes")
    p.add_argument("disk", metavar="DISK")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_list)

    p = bitmap.add_parser("map", help="print the dirty and clean extents of a bitmap")
    _disk_name(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_map)

    p = bitmap.add_parser("enable", help="start recording writes")
    _disk_name(p)
    p.set_defaults(func=lambda args: _set_enabled(args, True))

    p = bitmap.add_parser("disable", help="stop recording writes")
    _disk_name(p)
    p.set_defaults(func=lambda args: _set_enabled(args, False))

    p = bitmap.add_parser(
        "clear",
        help="clear the granules lying wholly inside a range (default: all)",
        description="Clear the granules lying wholly inside [OFFSET, OFFSET+LENGTH) and print"
        " the byte ranges cleared, one 'OFFSET LENGTH' line each.",
    )
    _disk_name(p)
    p.add_argument("--offset", type=parse_size, default=0, help="start of the range (default 0)")
    p.add_argument("--length", type=parse_size, help="length (default: to the end of the disk)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_clear)

    p = bitmap.add_parser("merge", help="mark in DST every granule dirty in SRC")
    p.add_argument("disk", metavar="DISK")
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="DST")
    p.set_defaults(func=cmd_merge)


def _disk_name(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("disk", metavar="DISK", help="raw disk image")
    parser.add_argument("name", metavar="NAME", help="bitmap name")


def cmd_add(args: argparse.Namespace) -> int:
    with Image.open(args.disk) as image:
        image.add_bitmap(args.name, granularity=args.granularity, enabled=not args.disable)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with Image.open(args.disk) as image:
        image.remove_bitmap(args.name)
    return 0


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    with Image.open(args.disk) as image:
        image.set_bitmap_enabled(args.name, enabled)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    with Image.open(args.disk) as image:
        image.merge_bitmap(args.source, args.target)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with Image.open(args.disk, read_only=True) as image:
        rows: list[dict[str, Any]] = [
            {
                "name": b.name,
                "granularity": b.granularity,
                "enabled": b.enabled,
                "dirty_bytes": b.dirty_bytes(),
                "size": b.size,
            }
            for b in sorted(image.bitmaps.values(), key=lambda b: b.name)
        ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2, ensure_ascii=False)
        print()
        return 0
    if not rows:
        print(f"no bitmaps on {args.disk}")
        return 0
    width = max(4, *(len(r["name"]) for r in rows))
    print(f"{'NAME':<{width}}  {'GRANULARITY':>11}  {'ENABLED':<7}  {'DIRTY':>15}")
    for r in rows:
        enabled = "yes" if r["enabled"] else "no"
        print(f"{r['name']:<{width}}  {r['granularity']:>11}  {enabled:<7}  {r['dirty_bytes']:>15}")
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    with Image.open(args.disk, read_only=True) as image:
        bitmap = image.bitmap(args.name)
        extents = bitmap.extents(0, bitmap.size)
        if args.json:
            rows = [{"offset": o, "length": n, "dirty": bool(f)} for o, n, f in extents]
            json.dump(rows, sys.stdout, indent=2)
            print()
        else:
            for offset, length, flags in extents:
                print(f"{offset} {length} {'dirty' if flags else 'clean'}")
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    with Image.open(args.disk) as image:
        offset = args.offset
        length = image.size - offset if args.length is None else args.length
        cleared = image.clear_bitmap_range(args.name, offset, length)
    if args.json:
        json.dump([{"offset": o, "length": n} for o, n in cleared], sys.stdout)
        print()
    elif not cleared:
        print(
            f"nothing cleared: no whole granule inside [{offset}, {offset + length})",
            file=sys.stderr,
        )
    else:
        for o, n in cleared:
            print(f"{o} {n}")
    return 0


def cmd_disk_create(args: argparse.Namespace) -> int:
    Image.create(args.disk, args.size).close()
    return 0
