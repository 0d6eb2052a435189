"""The command lines of ``nbdgw backup``, ``nbdgw restore`` and ``nbdgw verify``: their
arguments and help, without their engines (:mod:`gateway.cli.backup`, :mod:`gateway.cli.verify`),
which import asyncio, the client library and the integrity checks: ``--help`` (and a mistyped
flag) does not pay for those, only a command that runs does."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli import backup_snapshots
from gateway.cli.common import _one_line_errors, add_target_arguments, command, parse_size
from nbdgw.integrity import DIGESTS

DESCRIPTION = """Copy the dirty data of an export (with --full: all of its allocated data)
through the gateway into OUTPUT, a sparse raw image the size of the export: an incremental
backup. Dirty ranges that read as zeroes become holes. Progress is fsync'd and recorded in
OUTPUT.nbdgw-backup.json, so an interrupted backup continues exactly with --resume. With
--clear, each range is cleared in the bitmap (ClearRange) once it is safely on disk. The dirty
ranges are recorded in OUTPUT.nbdgw-dirty (fsync'd before they are cleared): 'nbdgw restore'
uses it to lay the incremental over a full image, zero ranges included."""

RESTORE_DESCRIPTION = """Apply backups made by 'nbdgw backup' onto BASE, a raw image (a copy of a
full backup, or of the disk at the first backup), in place and in order: for each INCREMENTAL,
every range its map (INCREMENTAL.nbdgw-dirty) records as dirty is copied from INCREMENTAL,
holes and zeroes included (a dirty range that reads as zeroes is zeroed in BASE); the other
ranges of BASE are left as they are. A full backup in the list replaces all of BASE. A missing
BASE is created from the first backup, which must then be a full one. The backups must be of one
export and listed oldest first: a list out of order, or an incremental since a checkpoint that
no backup before it reaches (--since, --checkpoint-id: one is missing), is refused before
anything is written, also across calls on one BASE (BASE.nbdgw-restored.json)."""


VERIFY_DESCRIPTION = """Check backups made by 'nbdgw backup' without copying anything again: each
file against the digest recorded when it was made (--digest), then the image the chain
restores to (BACKUP, a full backup, with each INCREMENTAL's dirty ranges laid over it, as
'nbdgw restore' would) against the export's current content (or a snapshot's: EXPORT@SNAPSHOT),
which the gateway reads and hashes without sending it. Exit code 0 when everything matches,
1 otherwise; a difference is named to the MiB: a --segment that differs is compared again in
smaller pieces."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("export", metavar="EXPORT")
    p.add_argument("output", metavar="OUTPUT", type=Path, help="the backup image to write")
    p.add_argument(
        "--bitmap",
        metavar="NAME",
        help="the dirty bitmap (NAME or qemu:dirty-bitmap:NAME); with --full it is optional "
        "and says what --clear clears",
    )
    p.add_argument(
        "--full", action="store_true", default=None, help="copy all allocated data, not only dirty"
    )
    p.add_argument(
        "--clear",
        action="store_true",
        default=None,
        help="clear each dirty range in the bitmap once it is safely on disk",
    )
    add_progress_argument(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted backup recorded in OUTPUT.nbdgw-backup.json, as it was "
        "started (its bitmap, --full and --clear are recorded there)",
    )
    p.add_argument(
        "--no-recheck",
        dest="recheck",
        action="store_false",
        help="with --clear, do not read the cleared ranges again (only safe when nothing "
        "writes to the disk during the backup)",
    )
    backup_snapshots.add_arguments(p)
    p.add_argument(
        "--save-every",
        dest="checkpoint",  # the name run() reads: the state is saved at each "checkpoint"
        type=parse_size,
        default=32 << 20,
        metavar="SIZE",
        help="fsync and record progress after this much data at most (default 32M); "
        "'--checkpoint SIZE' before 0.2",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=5,
        help="resume an interrupted stream this many times (default 5)",
    )
    p.add_argument(
        "--digest",
        choices=sorted(DIGESTS),
        help="also check a digest of all the data against the gateway's, and record it in "
        "OUTPUT.nbdgw-backup.json for 'nbdgw verify' (every message's CRC32C is checked "
        "anyway)",
    )
    p.add_argument(
        "--compress",
        type=int,
        nargs="?",
        const=1,
        metavar="LEVEL",
        help="ask the gateway for zstd-compressed data (LEVEL 1-19, default 1): worth it when "
        "the link to the gateway is slower than about 2 Gbit/s (docs/concepts.md#integrity)",
    )


def add_progress_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr: bytes done of bytes to do, rate, time left "
        "(default: when stderr is a terminal)",
    )


def add_restore_arguments(p: argparse.ArgumentParser) -> None:
    add_progress_argument(p)
    p.add_argument(
        "base",
        metavar="BASE",
        type=Path,
        help="the raw image to update in place; created (sparse) when missing, from the full "
        "backup that must then come first",
    )
    p.add_argument(
        "incrementals",
        metavar="INCREMENTAL",
        type=Path,
        nargs="+",
        help="backups made by 'nbdgw backup', oldest first (checked)",
    )


# The engines are imported when their command runs (see the module docstring).
async def _backup(args: argparse.Namespace) -> int:
    from gateway.cli import backup

    return await backup.run(args)


async def _restore(args: argparse.Namespace) -> int:
    import asyncio  # loaded already: this coroutine runs in it

    from gateway.cli import backup

    return await asyncio.to_thread(backup.restore, args)


async def _verify(args: argparse.Namespace) -> int:
    from gateway.cli import verify

    return await verify.run(args)


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add backup, restore and verify."""
    p = _one_line_errors(
        sub.add_parser(
            "backup",
            help="copy the dirty (or all) data of an export into a local sparse image",
            description=DESCRIPTION,
        )
    )
    add_arguments(p)
    add_target_arguments(p)
    p.set_defaults(func=command(_backup))

    p = _one_line_errors(
        sub.add_parser(
            "restore",
            help="lay backups made by 'nbdgw backup' over a raw image, in place",
            description=RESTORE_DESCRIPTION,
        )
    )
    add_restore_arguments(p)
    p.set_defaults(func=command(_restore))

    """Add verify."""
    p = _one_line_errors(
        sub.add_parser(
            "verify",
            help="check a backup chain against its digests and against the export",
            description=VERIFY_DESCRIPTION,
        )
    )
    p.add_argument("export", metavar="EXPORT", help="the export (or EXPORT@SNAPSHOT)")
    p.add_argument("backup", metavar="BACKUP", type=Path, help="a full backup")
    p.add_argument(
        "incrementals",
        metavar="INCREMENTAL",
        type=Path,
        nargs="*",
        help="incremental backups taken after it, oldest first",
    )
    p.add_argument(
        "--digest",
        choices=sorted(DIGESTS),
        help="the digest to compare the chain with the export (default: the full backup's, "
        "or blake3)",
    )
    p.add_argument(
        "--segment",
        type=parse_size,
        default=1 << 30,
        metavar="SIZE",
        help="compare the export in segments of this size (default 1G); one that differs is "
        "compared again in smaller pieces, down to 1M",
    )
    add_target_arguments(p)
    p.set_defaults(func=command(_verify))
