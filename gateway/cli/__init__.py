"""The ``nbdgw`` command: one argparse tree, filled in by the modules that own each command.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers)``, adds its
subcommands and sets ``func`` (a callable taking the parsed namespace and returning an exit
code, or a coroutine function, which is run with asyncio).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from nbdcore.tools import run

# Order is the order of --help.
COMMAND_MODULES = (
    "gateway.cli.serve",  # serve
    "gateway.cli.bitmaps",  # exports, bitmaps, extents, clear, generation, remaining
    "gateway.cli.backup",  # backup, restore
    "gateway.cli.snapshots",  # snapshots list|create|release (gRPC client side)
    "nbdcore.tools.client_cmds",  # nbd list|map|copy
    "nbdcore.tools.server_cmds",  # nbd serve
    "nbdcore.tools.bitmap_cmds",  # bitmap add|remove|list|enable|disable|clear|merge
    "nbdcore.tools.snapshot_cmds",  # snapshot create|list|release
    "gateway.cli.map",  # map (a picture of the dirty/allocated/zero extents)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbdgw",
        description="A gRPC gateway to the change-tracking bitmaps of NBD-exported disks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {"": sub}
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        module.register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
