"""The ``nbdgw`` command: one argparse tree, filled in by the modules that own each command.

Each module listed in ``COMMAND_MODULES`` exposes ``register(subparsers, groups)``, adds its
subcommands and sets ``func`` (a callable taking the parsed namespace and returning an exit
code, or a coroutine function, which is run with asyncio).

Start-up is lazy: ``main`` imports only the modules that register the command named on the
command line (grpc and the gateway are never imported by ``nbdgw nbd copy``), and
``--version`` imports none. ``COMMAND_MODULES`` says which top-level commands each module adds;
tests/unit/test_cli_startup.py checks it against what the modules register.

The grammar is nouns with verbs (``nbdgw bitmap clear EXPORT``); the old spellings still work
for a release, rewritten by :mod:`gateway.cli.aliases` with a notice on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from gateway import __version__

# Module -> the top-level commands it registers. Order is the order of --help.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "gateway.cli.serve": ("serve",),
    "gateway.cli.exports": ("export",),  # export list|generation
    "gateway.cli.bitmaps": ("bitmap",),  # bitmap list|map|clear|remaining|add|remove
    "gateway.cli.snapshots": ("snapshot", "checkpoint"),  # through the SnapshotService
    "gateway.cli.backup_args": ("backup", "restore", "verify"),  # engines: backup, verify
    "gateway.cli.map": ("render",),  # SVG/HTML, straight from an NBD host
    "nbdcore.tools.bitmap_cmds": ("disk",),  # disk create, disk bitmap ... (local images)
    "nbdcore.tools.snapshot_cmds": ("disk",),  # disk snapshot ...
    "nbdcore.tools.client_cmds": ("nbd",),  # nbd list|map|copy
    "nbdcore.tools.server_cmds": ("nbd",),  # nbd serve
}


def commands() -> list[str]:
    """Every top-level command, in --help order."""
    return list(dict.fromkeys(c for names in COMMAND_MODULES.values() for c in names))


class _VersionAction(argparse.Action):
    """``--version``, without computing the version unless it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {__version__}")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command, or with only those of the modules that add ``command``."""
    from nbdcore.tools import REMOVED_IN, OneLineParser

    parser = OneLineParser(
        prog="nbdgw",
        description="A gRPC gateway to the change-tracking bitmaps of NBD-exported disks.",
        epilog="Commands are nouns with verbs ('nbdgw bitmap map EXPORT --context CONTEXT'):"
        " export, bitmap, snapshot and checkpoint through a gateway (--target), disk for local"
        " images, nbd for NBD servers. The old spellings (exports, extents, snapshots ...)"
        f" still work until {REMOVED_IN}, with a notice.",
    )
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, Any] = {"": sub}
    for name, names in COMMAND_MODULES.items():
        if command is None or command in names:
            importlib.import_module(name).register(sub, groups)
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The top-level command ``argv`` names: its first word that is not an option."""
    for word in argv:
        if not word.startswith("-"):
            return word
        if word == "--":
            break
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        print(f"nbdgw {__version__}")
        return 0
    from gateway.cli.aliases import rewrite

    args = rewrite(args)
    command = _command_of(args)
    if command is not None and command not in commands():
        import difflib

        close = difflib.get_close_matches(command, commands(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        print(
            f"nbdgw: unknown command {command!r}; {hint}'nbdgw --help' lists them", file=sys.stderr
        )
        return 2
    from nbdcore.tools import run

    return run(build_parser(command), args)


if __name__ == "__main__":
    sys.exit(main())
