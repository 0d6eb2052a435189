"""``nbdgw export list`` and ``nbdgw export generation``: the exports of a running gateway."""

from __future__ import annotations

import argparse
from typing import Any

import nbdgw
from gateway.cli.common import (
    _one_line_errors,
    add_target_arguments,
    command,
    open_client,
    print_json,
    print_table,
)
from nbdcore.tools import subgroup


def human_size(size: int) -> str:
    for unit, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f}".rstrip("0").rstrip(".") + unit
    return str(size)


def enum_word(value: Any) -> str:
    """An enum member as the tables show it: ``LEDGER_MASK`` -> ``ledger-mask``."""
    return str(value.name).lower().replace("_", "-")


@command
async def cmd_list(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        exports = await client.list_exports()
    if args.json:
        print_json([e.raw for e in exports])
        return 0
    rows = [["NAME", "SIZE", "STATE", "HOST", "KIND", "RO", "CLEAR", "DESCRIPTION"]]
    for e in exports:
        # A host that has not answered yet (or is down) told nothing of the export's size or
        # clear mode: '-', not a size of 0 and "unspecified".
        known = e.state == nbdgw.ExportState.AVAILABLE or e.size > 0
        size = str(e.size) if args.bytes else human_size(e.size)
        rows.append(
            [
                e.id,
                size if known else "-",
                enum_word(e.state),
                e.host,
                e.raw.host_kind or "-",
                "yes" if e.read_only else "no",
                enum_word(e.clear_mode) if e.clear_mode != nbdgw.ClearMode.UNSPECIFIED else "-",
                e.description,
            ]
        )
    print_table(rows)
    return 0


@command
async def cmd_generation(args: argparse.Namespace) -> int:
    async with open_client(args) as client:
        change = await client.set_generation(args.export, args.generation)
    if args.json:
        print_json(change.raw)
        return 0
    if change.previous_generation == change.generation:
        print(f"export {change.export}: generation {change.generation!r} (unchanged)")
    else:
        before = repr(change.previous_generation) if change.previous_generation else "none"
        print(f"export {change.export}: generation {before} -> {change.generation!r}")
    return 0


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``export list|generation``."""
    group = subgroup(groups, "export", "the exports of a running gateway (--target)")

    p = _one_line_errors(group.add_parser("list", help="list the exports of a running gateway"))
    add_target_arguments(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--bytes", action="store_true", help="sizes in bytes")
    p.set_defaults(func=cmd_list)

    p = _one_line_errors(
        group.add_parser(
            "generation",
            help="set the generation (point in time) of an export cleared through the ledger",
            description="Set the generation of an export whose bitmaps are cleared through the "
            "gateway's ledger. Set a new generation before a new snapshot is exported: "
            "changing it deletes the clears of every other generation.",
        )
    )
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("generation", metavar="NAME", help="the new generation")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    add_target_arguments(p)
    p.set_defaults(func=cmd_generation)
