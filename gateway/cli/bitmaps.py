"""``nbdgw exports``, ``nbdgw bitmaps EXPORT``, ``nbdgw extents EXPORT --bitmap CONTEXT`` (text and
JSON byte-identical to ``nbdinfo --map`` / ``nbdinfo --map --json``, so the two can be diffed),
``nbdgw clear EXPORT --bitmap CONTEXT --offset N --length N``, ``nbdgw generation`` and
``nbdgw remaining``: the BitmapService from the command line (``nbdgw backup`` is in
:mod:`gateway.cli.backup`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from gateway.cli.common import (
    CommandError,
    MapPrinter,
    _one_line_errors,
    add_target_arguments,
    command,
    connect,
    full_context_name,
    parse_size,
    print_json,
    print_table,
    stream_extents,
    warn,
)
from nbdgw.v1 import bitmap_service_pb2 as pb


def _human(size: int) -> str:
    for unit, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f}".rstrip("0").rstrip(".") + unit
    return str(size)


def _enum_name(enum: Any, value: int, prefix: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower().replace("_", "-")


@command
async def cmd_exports(args: argparse.Namespace) -> int:
    async with connect(args) as gw:
        exports: list[pb.Export] = []
        token = ""
        while True:
            resp = await gw.stub.ListExports(
                pb.ListExportsRequest(page_token=token), metadata=gw.metadata, timeout=gw.timeout
            )
            exports.extend(resp.exports)
            token = resp.next_page_token
            if not token:
                break
    if args.json:
        print_json(exports)
        return 0
    rows = [["NAME", "SIZE", "STATE", "HOST", "KIND", "RO", "CLEAR", "DESCRIPTION"]]
    for e in exports:
        # A host that has not answered yet (or is down) told nothing of the export's size or
        # clear mode: '-', not a size of 0 and "unspecified".
        known = e.state == pb.EXPORT_STATE_AVAILABLE or e.size_bytes > 0
        size = str(e.size_bytes) if args.bytes else _human(e.size_bytes)
        clear = _enum_name(pb.ClearMode, e.clear_mode, "CLEAR_MODE_")
        rows.append(
            [
                e.name.removeprefix("exports/"),
                size if known else "-",
                _enum_name(pb.ExportState, e.state, "EXPORT_STATE_"),
                e.host,
                e.host_kind or "-",
                "yes" if e.read_only else "no",
                clear if e.clear_mode != pb.CLEAR_MODE_UNSPECIFIED else "-",
                e.description,
            ]
        )
    print_table(rows)
    return 0


@command
async def cmd_bitmaps(args: argparse.Namespace) -> int:
    async with connect(args) as gw:
        bitmaps: list[pb.Bitmap] = []
        token = ""
        while True:
            resp = await gw.stub.ListBitmaps(
                pb.ListBitmapsRequest(parent=args.export, page_token=token),
                metadata=gw.metadata,
                timeout=gw.timeout,
            )
            bitmaps.extend(resp.bitmaps)
            token = resp.next_page_token
            if not token:
                break
    if args.json:
        print_json(bitmaps)
        return 0
    rows = [["CONTEXT", "KIND", "GRANULARITY", "DIRTY", "RECORDING", "CLEAR"]]
    for b in bitmaps:
        clear = _enum_name(pb.ClearMode, b.clear_mode, "CLEAR_MODE_")
        rows.append(
            [
                b.context,
                _enum_name(pb.BitmapKind, b.kind, "BITMAP_KIND_"),
                str(b.granularity_bytes) if b.granularity_bytes else "-",
                str(b.dirty_bytes) if b.HasField("dirty_bytes") else "-",
                ("yes" if b.recording else "no") if b.HasField("recording") else "-",
                clear,
            ]
        )
    print_table(rows)
    return 0


def _range_request(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.offset is not None:
        fields["offset"] = args.offset
    if args.length is not None:
        if args.length == 0:
            raise CommandError("--length must not be 0")
        fields["length"] = args.length
    return fields


@command
async def cmd_extents(args: argparse.Namespace) -> int:
    context = full_context_name(args.bitmap)
    fields = _range_request(args)
    async with connect(args) as gw:
        printer = MapPrinter(context, sys.stdout, json_output=args.json)
        if args.offset is None and args.length is None:
            # A zero-sized export has no range to stream; nbdinfo prints an empty map.
            export = await gw.stub.GetExport(
                pb.GetExportRequest(name=args.export), metadata=gw.metadata, timeout=gw.timeout
            )
            if export.size_bytes == 0:
                printer.begin()
                printer.end()
                return 0
        request = pb.StreamExtentsRequest(
            export=args.export,
            context=context,
            filter=pb.EXTENT_FILTER_SET if args.dirty else pb.EXTENT_FILTER_ALL,
            **fields,
        )
        stream = stream_extents(gw, request, retries=args.retries, on_retry=warn(args))
        first = True
        token = ""
        async for msg in stream:
            if first:  # print nothing before the gateway accepted the request
                printer.begin()
                first = False
            # The first message's token: a resumed stream's is newer and would not cover
            # what the first attempt printed.
            token = token or msg.clear_token
            printer.add_message(msg)
        if first:
            printer.begin()
        printer.end()
    if args.show_clear_token:
        print(f"clear token: {token or '(none: the export needs none)'}", file=sys.stderr)
    return 0


@command
async def cmd_clear(args: argparse.Namespace) -> int:
    if args.length == 0:
        raise CommandError("--length must not be 0")
    bitmap = full_context_name(args.bitmap)
    async with connect(args) as gw:
        resp = await gw.stub.ClearRange(
            pb.ClearRangeRequest(
                export=args.export,
                bitmap=bitmap,
                offset=args.offset,
                length=args.length,
                generation=args.generation or "",
                clear_token=args.clear_token or "",
                unconditional=args.unconditional,
            ),
            metadata=gw.metadata,
            timeout=gw.timeout,
        )
    if args.json:
        print_json(resp)
        return 0
    mode = _enum_name(pb.ClearMode, resp.clear_mode, "CLEAR_MODE_")
    n = len(resp.cleared_ranges)
    print(
        f"cleared {resp.cleared_bytes} bytes in {n} range{'s' if n != 1 else ''} of {bitmap} "
        f"(granularity {resp.granularity_bytes}, {mode})"
    )
    for r in resp.cleared_ranges:
        print(f"{r.offset:10d}  {r.length:10d}")
    if resp.conditional:
        k = len(resp.kept_ranges)
        print(
            f"kept {resp.kept_bytes} bytes in {k} range{'s' if k != 1 else ''} written since the"
            " token's read (copy them again)"
        )
        for r in resp.kept_ranges:
            print(f"{r.offset:10d}  {r.length:10d}  kept")
    if n == 0 and args.length and not resp.kept_ranges:
        print(
            "nothing cleared: no whole granule lies inside the range",
            file=sys.stderr,
        )
    return 0


@command
async def cmd_generation(args: argparse.Namespace) -> int:
    async with connect(args) as gw:
        resp = await gw.stub.SetExportGeneration(
            pb.SetExportGenerationRequest(export=args.export, generation=args.generation),
            metadata=gw.metadata,
            timeout=gw.timeout,
        )
    if args.json:
        print_json(resp)
        return 0
    export = resp.export.removeprefix("exports/")
    if resp.previous_generation == resp.generation:
        print(f"export {export}: generation {resp.generation!r} (unchanged)")
    else:
        before = repr(resp.previous_generation) if resp.previous_generation else "none"
        print(f"export {export}: generation {before} -> {resp.generation!r}")
    return 0


@command
async def cmd_remaining(args: argparse.Namespace) -> int:
    bitmap = full_context_name(args.bitmap)
    request = pb.StreamRemainingDirtyRequest(
        export=args.export, bitmap=bitmap, **_range_request(args)
    )
    ranges: list[tuple[int, int]] = []
    end = None
    async with connect(args) as gw:
        async for msg in gw.stub.StreamRemainingDirty(request, metadata=gw.metadata):
            pos = msg.offset
            for delta, length in zip(msg.offset_deltas, msg.lengths, strict=True):
                start = pos + delta
                if ranges and ranges[-1][0] + ranges[-1][1] == start:
                    ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
                else:
                    ranges.append((start, length))
                pos = start + length
            end = msg.range_end or msg.next_offset
    total = sum(n for _, n in ranges)
    if args.json:
        # The API's JSON conventions (camelCase, as print_json gives messages).
        print_json(
            {
                "export": args.export,
                "bitmap": bitmap,
                "end": end,
                "dirtyBytes": total,
                "ranges": [{"offset": o, "length": n} for o, n in ranges],
            }
        )
        return 0
    n = len(ranges)
    print(f"{total} bytes still dirty in {n} range{'s' if n != 1 else ''} of {bitmap}")
    for o, length in ranges:
        print(f"{o:10d}  {length:10d}")
    return 0


@command
async def cmd_add_bitmap(args: argparse.Namespace) -> int:
    async with connect(args) as gw:
        bm = await gw.stub.AddBitmap(
            pb.AddBitmapRequest(
                parent=args.export,
                bitmap=args.name,
                granularity_bytes=args.granularity,
                persistent=not args.transient,
            ),
            metadata=gw.metadata,
            timeout=gw.timeout,
        )
    if args.json:
        print_json([bm])
        return 0
    kind = "persistent" if bm.persistent else "transient"
    print(f"added {bm.context} ({kind}, granularity {bm.granularity_bytes}): recording")
    return 0


@command
async def cmd_remove_bitmap(args: argparse.Namespace) -> int:
    export = args.export.removeprefix("exports/")
    async with connect(args) as gw:
        resp = await gw.stub.RemoveBitmap(
            pb.RemoveBitmapRequest(name=f"exports/{export}/bitmaps/{full_context_name(args.name)}"),
            metadata=gw.metadata,
            timeout=gw.timeout,
        )
    print(f"removed {resp.context}")
    return 0


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add exports, bitmaps, extents, clear, generation, remaining, add-bitmap, remove-bitmap."""
    p = _one_line_errors(
        sub.add_parser("exports", help="list the exports of a running gateway (gRPC)")
    )
    add_target_arguments(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--bytes", action="store_true", help="sizes in bytes")
    p.set_defaults(func=cmd_exports)

    p = _one_line_errors(
        sub.add_parser("bitmaps", help="list the metadata contexts (bitmaps) of an export")
    )
    p.add_argument("export", metavar="EXPORT")
    add_target_arguments(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=cmd_bitmaps)

    p = _one_line_errors(
        sub.add_parser(
            "extents",
            help="print the extent map of a context, as nbdinfo --map does",
            description="Print the extents of one metadata context through the gateway, in "
            "the format of 'nbdinfo --map' (text) or 'nbdinfo --map --json' (--json), so the "
            "outputs can be compared byte for byte.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument(
        "--bitmap",
        required=True,
        metavar="CONTEXT",
        help="metadata context (qemu:dirty-bitmap:NAME, base:allocation...; NAME alone "
        "means qemu:dirty-bitmap:NAME)",
    )
    p.add_argument("--dirty", action="store_true", help="only extents whose flags are set")
    p.add_argument("--offset", type=parse_size, default=None, help="start of the range")
    p.add_argument("--length", type=parse_size, default=None, help="length of the range")
    p.add_argument("--json", action="store_true", help="nbdinfo --map --json format")
    p.add_argument(
        "--show-clear-token",
        action="store_true",
        help="print the stream's clear token on stderr, for 'nbdgw clear --clear-token'",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        help="resume an interrupted stream this many times (default 5)",
    )
    add_target_arguments(p)
    p.set_defaults(func=cmd_extents)

    p = _one_line_errors(
        sub.add_parser("clear", help="clear (acknowledge) a range of a dirty bitmap")
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("--bitmap", required=True, metavar="CONTEXT", help="dirty bitmap context")
    p.add_argument("--offset", type=parse_size, required=True, help="start of the range")
    p.add_argument("--length", type=parse_size, required=True, help="length of the range")
    p.add_argument(
        "--generation",
        metavar="NAME",
        help="the generation the range was copied from (required by exports cleared through "
        "the ledger; see 'nbdgw bitmaps --json' and 'nbdgw generation')",
    )
    p.add_argument(
        "--clear-token",
        metavar="TOKEN",
        help="the clear token of the stream the range was read with ('nbdgw extents "
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
        sub.add_parser(
            "generation",
            help="set the generation (point in time) of an export cleared through the ledger",
            description="Set the generation of an export whose bitmaps are cleared through the "
            "gateway's ledger (SetExportGeneration). Set a new generation before a new snapshot "
            "is exported: changing it deletes the clears of every other generation.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("generation", metavar="NAME", help="the new generation")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=cmd_generation)

    p = _one_line_errors(
        sub.add_parser(
            "remaining",
            help="print the ranges of a dirty bitmap still dirty (not cleared)",
            description="Print what is still dirty in a bitmap: the host's dirty extents minus "
            "what was cleared (StreamRemainingDirty), merged into ranges.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("--bitmap", required=True, metavar="CONTEXT", help="dirty bitmap context")
    p.add_argument("--offset", type=parse_size, default=None, help="start of the range")
    p.add_argument("--length", type=parse_size, default=None, help="length of the range")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_target_arguments(p)
    p.set_defaults(func=cmd_remaining)

    p = _one_line_errors(
        sub.add_parser(
            "add-bitmap",
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
    p.set_defaults(func=cmd_add_bitmap)

    p = _one_line_errors(
        sub.add_parser(
            "remove-bitmap", help="remove a dirty bitmap of a running QEMU's disk (RemoveBitmap)"
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("name", metavar="NAME", help="the bitmap (NAME or qemu:dirty-bitmap:NAME)")
    add_target_arguments(p)
    p.set_defaults(func=cmd_remove_bitmap)
