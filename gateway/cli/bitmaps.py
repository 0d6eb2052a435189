"""``nbdgw bitmap list|map|clear|remaining|add|remove``: the metadata contexts of an export,
through a running gateway. ``bitmap map`` prints the extents of any context in the format of
``nbdinfo --map`` / ``nbdinfo --map --json`` (byte-identical, so the two can be diffed).

Flags mean one thing everywhere: ``--context`` is any metadata context (``base:allocation``,
``qemu:dirty-bitmap:NAME``...), ``--bitmap`` a dirty bitmap (``NAME`` or
``qemu:dirty-bitmap:NAME``). ``nbdgw disk bitmap ...`` works on a local image instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

import nbdgw
from gateway.cli.common import (
    CommandError,
    MapPrinter,
    _one_line_errors,
    add_target_arguments,
    command,
    full_context_name,
    open_client,
    parse_size,
    print_json,
    print_table,
)
from gateway.cli.exports import enum_word
from nbdcore.tools import subgroup

if TYPE_CHECKING:
    from nbdgw import ByteRange


def _check_length(args: argparse.Namespace) -> None:
    if args.length == 0:
        raise CommandError("--length must not be 0")


@command
async def cmd_list(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        bitmaps = await client.list_bitmaps(args.export)
    if args.json:
        print_json([b.raw for b in bitmaps])
        return 0
    rows = [["CONTEXT", "KIND", "GRANULARITY", "DIRTY", "RECORDING", "CLEAR"]]
    for b in bitmaps:
        rows.append(
            [
                b.context,
                enum_word(b.kind),
                str(b.granularity) if b.granularity else "-",
                str(b.dirty_bytes) if b.dirty_bytes is not None else "-",
                "-" if b.recording is None else ("yes" if b.recording else "no"),
                enum_word(b.clear_mode),
            ]
        )
    print_table(rows)
    return 0


def map_context(args: argparse.Namespace) -> str:
    """``--context CONTEXT`` or ``--bitmap NAME`` (one of them, required)."""
    if (args.context is None) == (args.bitmap is None):
        raise CommandError("give --context CONTEXT (any metadata context) or --bitmap NAME")
    return full_context_name(args.context if args.context is not None else args.bitmap)


@command
async def cmd_map(args: argparse.Namespace) -> int:
    context = map_context(args)
    _check_length(args)
    printer = MapPrinter(context, sys.stdout, json_output=args.json)
    # A zero-sized export has no range to stream; nbdinfo prints an empty map. Asked without
    # retries: a gateway that is not there says so at once.
    if args.offset is None and args.length is None:
        async with open_client(args) as client:
            size = (await client.get_export(args.export)).size
        if size == 0:
            printer.begin()
            printer.end()
            return 0
    async with open_client(args, retries=args.retries) as client:
        batches = client.iter_batches(
            args.export,
            context,
            offset=args.offset or 0,
            length=args.length,
            filter=nbdgw.ExtentFilter.SET if args.dirty else nbdgw.ExtentFilter.ALL,
        )
        first = True
        token = ""
        async for batch in batches:
            if first:  # print nothing before the gateway accepted the request
                printer.begin()
                first = False
            # The first batch's token: a resumed stream's is newer and would not cover what
            # the first attempt printed.
            token = token or batch.clear_token
            printer.add_message(batch.raw)
        if first:
            printer.begin()
        printer.end()
    if args.show_clear_token:
        print(f"clear token: {token or '(none: the export needs none)'}", file=sys.stderr)
    return 0


@command
async def cmd_clear(args: argparse.Namespace) -> int:
    _check_length(args)
    bitmap = full_context_name(args.bitmap)
    async with open_client(args) as client:
        result = await client.clear_range(
            args.export,
            bitmap,
            args.offset,
            args.length,
            generation=args.generation or "",
            clear_token=args.clear_token or "",
            unconditional=args.unconditional,
        )
    if args.json:
        print_json(result.raw)
        return 0
    mode = enum_word(result.clear_mode) if result.clear_mode != nbdgw.ClearMode.UNSPECIFIED else "-"
    n = len(result.cleared)
    print(
        f"cleared {result.cleared_bytes} bytes in {n} range{'s' if n != 1 else ''} of {bitmap} "
        f"(granularity {result.granularity}, {mode})"
    )
    for r in result.cleared:
        print(f"{r.offset:10d}  {r.length:10d}")
    if result.conditional:
        k = len(result.kept)
        print(
            f"kept {result.kept_bytes} bytes in {k} range{'s' if k != 1 else ''} written since"
            " the token's read (copy them again)"
        )
        for r in result.kept:
            print(f"{r.offset:10d}  {r.length:10d}  kept")
    if n == 0 and args.length and not result.kept:
        print("nothing cleared: no whole granule lies inside the range", file=sys.stderr)
    return 0


@command
async def cmd_remaining(args: argparse.Namespace) -> int:
    _check_length(args)
    bitmap = full_context_name(args.bitmap)
    offset = args.offset or 0
    ranges: list[ByteRange] = []
    async with open_client(args) as client:
        if args.length is None:
            end = (await client.get_export(args.export)).size
        else:
            end = offset + args.length
        remaining = client.iter_remaining_dirty(
            args.export, bitmap, offset=offset, length=args.length
        )
        async for r in remaining:
            if ranges and ranges[-1].end == r.offset:
                ranges[-1] = nbdgw.ByteRange(ranges[-1].offset, ranges[-1].length + r.length)
            else:
                ranges.append(r)
    total = sum(r.length for r in ranges)
    if args.json:
        # The API's JSON conventions (camelCase, as print_json gives messages).
        print_json(
            {
                "export": args.export,
                "bitmap": bitmap,
                "end": end,
                "dirtyBytes": total,
                "ranges": [{"offset": r.offset, "length": r.length} for r in ranges],
            }
        )
        return 0
    n = len(ranges)
    print(f"{total} bytes still dirty in {n} range{'s' if n != 1 else ''} of {bitmap}")
    for r in ranges:
        print(f"{r.offset:10d}  {r.length:10d}")
    return 0


@command
async def cmd_add(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        bitmap = await client.add_bitmap(
            args.export, args.name, granularity=args.granularity, persistent=not args.transient
        )
    if args.json:
        print_json([bitmap.raw])
        return 0
    kind = "persistent" if bitmap.raw.persistent else "transient"
    print(f"added {bitmap.context} ({kind}, granularity {bitmap.granularity}): recording")
    return 0


@command
async def cmd_remove(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        context = await client.remove_bitmap(args.export, args.name)
    print(f"removed {context}")
    return 0


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``bitmap list|map|clear|remaining|add|remove``."""
    group = subgroup(
        groups, "bitmap", "the bitmaps (metadata contexts) of an export, through a gateway"
    )
    p = _one_line_errors(
        group.add_parser("list", help="list the metadata contexts (bitmaps) of an export")
    )
    p.add_argument("export", metavar="EXPORT")
    add_target_arguments(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_list)

    p = _one_line_errors(
        group.add_parser(
            "map",
            help="print the extent map of a context, as nbdinfo --map does",
            description="Print the extents of one metadata context through the gateway, in "
            "the format of 'nbdinfo --map' (text) or 'nbdinfo --map --json' (--json), so the "
            "outputs can be compared byte for byte.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--context",
        metavar="CONTEXT",
        help="metadata context (base:allocation, qemu:dirty-bitmap:NAME, qemu:allocation-depth"
        "...); NAME alone means qemu:dirty-bitmap:NAME",
    )
    which.add_argument(
        "--bitmap", metavar="NAME", help="dirty bitmap: same as --context qemu:dirty-bitmap:NAME"
    )
    p.add_argument("--dirty", action="store_true", help="only extents whose flags are set")
    p.add_argument("--offset", type=parse_size, default=None, help="start of the range")
    p.add_argument("--length", type=parse_size, default=None, help="length of the range")
    p.add_argument("--json", action="store_true", help="nbdinfo --map --json format")
    p.add_argument(
        "--show-clear-token",
        action="store_true",
        help="print the stream's clear token on stderr, for 'nbdgw bitmap clear --clear-token'",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        help="resume an interrupted stream this many times (default 5)",
    )
    add_target_arguments(p)
    p.set_defaults(func=cmd_map)

    p = _one_line_errors(
        group.add_parser("clear", help="clear (acknowledge) a range of a dirty bitmap")
    )
    p.add_argument("export", metavar="EXPORT")
    _bitmap_argument(p)
    p.add_argument("--offset", type=parse_size, required=True, help="start of the range")
    p.add_argument("--length", type=parse_size, required=True, help="length of the range")
    p.add_argument(
        "--generation",
        metavar="NAME",
        help="the generation the range was copied from (required by exports cleared through "
        "the ledger; see 'nbdgw bitmap list --json' and 'nbdgw export generation')",
    )
    p.add_argument(
        "--clear-token",
        metavar="TOKEN",
        help="the clear token of the stream the range was read with ('nbdgw bitmap map "
        "--show-clear-token'): clear only what was not written since (required on a writable "
        "export)",
    )
    p.add_argument(
        "--unconditional",
        action="store_true",
        help="clear a writable export without a token: only when nothing writes it (a write "
        "after your read would be cleared with it)",
    )
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=cmd_clear)

    p = _one_line_errors(
        group.add_parser(
            "remaining",
            help="print the ranges of a dirty bitmap still dirty (not cleared)",
            description="Print what is still dirty in a bitmap: the host's dirty extents minus "
            "what was cleared (StreamRemainingDirty), merged into ranges.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    _bitmap_argument(p)
    p.add_argument("--offset", type=parse_size, default=None, help="start of the range")
    p.add_argument("--length", type=parse_size, default=None, help="length of the range")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_target_arguments(p)
    p.set_defaults(func=cmd_remaining)

    p = _one_line_errors(
        group.add_parser(
            "add",
            help="turn change tracking on: add a dirty bitmap to a running QEMU's disk",
            description="Add a dirty bitmap to an export of a running QEMU (a qmp host,"
            " AddBitmap): it records every write from now on. Persistent by default (stored in"
            " the qcow2 image across QEMU restarts).",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("name", metavar="NAME", help="the bitmap's name")
    p.add_argument(
        "--granularity", type=parse_size, default=0, help="bytes per bit (default: QEMU's)"
    )
    p.add_argument("--transient", action="store_true", help="not stored in the image")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=cmd_add)

    p = _one_line_errors(
        group.add_parser("remove", help="remove a dirty bitmap of a running QEMU's disk")
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("name", metavar="NAME", help="the bitmap (NAME or qemu:dirty-bitmap:NAME)")
    add_target_arguments(p)
    p.set_defaults(func=cmd_remove)


def _bitmap_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bitmap",
        required=True,
        metavar="NAME",
        help="the dirty bitmap (NAME or qemu:dirty-bitmap:NAME)",
    )
