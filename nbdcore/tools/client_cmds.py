"""``nbdgw nbd list|map|copy``: client tools over any NBD server.

``map`` prints exactly what ``nbdinfo --map`` (libnbd 1.14) prints, text and ``--json``, with
or without ``--totals``, so that scripts written for nbdinfo keep working; ``list`` shows what
``nbdinfo --list`` shows, in the same layout.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate, compress
from typing import IO, TYPE_CHECKING, Any

from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    TransmissionFlag,
)
from nbdcore.exceptions import UsageError
from nbdcore.tools import nbd_tls, nbd_tls_options, run, subgroup
from nbdcore.tools.progress import Progress

if TYPE_CHECKING:  # the client is imported by the commands, not at CLI start-up
    from nbdcore.aio.client import ExportInfo, NBDClient


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``nbd list``, ``nbd map`` and ``nbd copy`` to the shared ``nbd`` group."""
    nbd = subgroup(groups, "nbd", "NBD client and server tools")

    p = nbd.add_parser(
        "list",
        help="list the exports of an NBD server (like nbdinfo --list)",
        description="List every export of the server at URI: size, flags, block sizes and "
        "metadata contexts.",
    )
    p.add_argument("uri", metavar="URI", help="nbd://, nbds://, nbd+unix:// or nbds+unix:// URI")
    p.add_argument("--json", action="store_true", help="JSON output")
    nbd_tls_options(p)
    p.set_defaults(func=list_cmd)

    p = nbd.add_parser(
        "map",
        help="print the extents of a metadata context (like nbdinfo --map)",
        description="Print the extents of one metadata context of the export at URI, in the "
        "format of nbdinfo --map.",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument(
        "--context",
        default=CONTEXT_BASE_ALLOCATION,
        metavar="NAME",
        help="metadata context (default: base:allocation), e.g. qemu:dirty-bitmap:NAME",
    )
    p.add_argument("--totals", action="store_true", help="print the total size of each type")
    p.add_argument("--json", action="store_true", help="JSON output")
    nbd_tls_options(p)
    p.set_defaults(func=map_cmd)

    p = nbd.add_parser(
        "copy",
        help="copy a whole export to a file or stdout (sparse-aware)",
        description="Copy the export at URI to FILE (created or truncated; holes and zeroes "
        "are left as holes), to standard output ('-'), or nowhere ('null:', as nbdcopy: "
        "reads everything, keeps nothing). Blocking connections, one thread each.",
    )
    p.add_argument("uri", metavar="URI")
    p.add_argument("file", metavar="FILE|-|null:")
    p.add_argument(
        "--connections",
        type=int,
        default=None,
        metavar="N",
        help="connections (one thread each) when the export allows multi-conn (default: the "
        "number of CPUs, at most 4 as nbdcopy)",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        metavar="N",
        help="reads in flight in all, shared by the connections (default 2, at least one per "
        "connection)",
    )
    p.add_argument(
        "--request-size",
        type=int,
        # 960 KiB, one read in flight per connection: what costs qemu-nbd 7.2 and us the
        # least CPU per byte (nbdcore.sync.copy.DEFAULT_IN_FLIGHT says why).
        default=None,
        metavar="BYTES",
        help="bytes per read (default 960 KiB, capped at the server's maximum)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: when stderr is a terminal)",
    )
    nbd_tls_options(p)
    p.set_defaults(func=copy_cmd)


# --- nbd list ---------------------------------------------------------------------------------

# The transmission flags nbdinfo --list prints, in its order (libnbd 1.14).
_SHOWN_FLAGS: tuple[tuple[str, Callable[[int], bool]], ...] = (
    ("is_rotational", lambda f: bool(f & TransmissionFlag.ROTATIONAL)),
    ("is_read_only", lambda f: bool(f & TransmissionFlag.READ_ONLY)),
    ("can_cache", lambda f: bool(f & TransmissionFlag.SEND_CACHE)),
    ("can_df", lambda f: bool(f & TransmissionFlag.SEND_DF)),
    ("can_fast_zero", lambda f: bool(f & TransmissionFlag.SEND_FAST_ZERO)),
    ("can_flush", lambda f: bool(f & TransmissionFlag.SEND_FLUSH)),
    ("can_fua", lambda f: bool(f & TransmissionFlag.SEND_FUA)),
    ("can_multi_conn", lambda f: bool(f & TransmissionFlag.CAN_MULTI_CONN)),
    ("can_trim", lambda f: bool(f & TransmissionFlag.SEND_TRIM)),
    ("can_zero", lambda f: bool(f & TransmissionFlag.SEND_WRITE_ZEROES)),
)


def human_size(n: int) -> tuple[str, bool]:
    """Like libnbd's human_size: the largest binary unit that divides ``n`` exactly
    (1048576 -> "1M", 1000 -> "1000"); the flag says whether a unit was added."""
    units = ["", "K", "M", "G", "T", "P", "E"]
    i = 0
    if n:
        while n % 1024 == 0 and i < len(units) - 1:
            n //= 1024
            i += 1
    return f"{n}{units[i]}", i > 0


def export_record(info: ExportInfo, uri: str) -> dict[str, Any]:
    """One export as nbdinfo --list --json describes it (same keys, same order)."""
    rec: dict[str, Any] = {"export-name": info.name}
    if info.description:
        rec["description"] = info.description
    rec["uri"] = uri
    if info.meta_contexts:  # nbdinfo leaves the key out when there are none
        rec["contexts"] = list(info.meta_contexts)
    flags = int(info.flags)
    for name, test in _SHOWN_FLAGS:
        rec[name] = test(flags)
    if info.block_size is not None:
        rec["block_size_minimum"] = info.block_size.minimum
        rec["block_size_preferred"] = info.block_size.preferred
        rec["block_size_maximum"] = info.block_size.maximum
    if info.size is not None:
        rec["export-size"] = info.size
        rec["export-size-str"] = human_size(info.size)[0]
    return rec


def format_list_text(records: Iterable[dict[str, Any]]) -> str:
    import json  # json in the functions that use it: `nbd copy` starts ~2 ms sooner

    out = []
    for rec in records:
        out.append(f"export={json.dumps(rec['export-name'])}:")
        if "description" in rec:
            out.append(f"\tdescription: {rec['description']}")
        if "export-size" in rec:
            text, human = human_size(rec["export-size"])
            out.append(f"\texport-size: {rec['export-size']}" + (f" ({text})" if human else ""))
        out.append(f"\turi: {rec['uri']}")
        if "contexts" in rec:
            out.append("\tcontexts:")
            out += [f"\t\t{c}" for c in rec["contexts"]]
        for key, value in rec.items():
            if key.startswith(("is_", "can_")):
                out.append(f"\t{key}: {'true' if value else 'false'}")
            elif key.startswith("block_size_"):
                out.append(f"\t{key}: {value}")
    return "".join(line + "\n" for line in out)


async def list_cmd(args: argparse.Namespace) -> int:
    import json

    from nbdcore.aio.client import list_exports
    from nbdcore.uri import NBDURI

    uri = NBDURI.parse(args.uri)
    exports = await list_exports(uri, tls=nbd_tls(args))
    records = [export_record(e, str(uri.replace(export=e.name))) for e in exports]
    if args.json:
        doc = {"TLS": uri.tls, "exports": records}
        sys.stdout.write(json.dumps(doc, indent="\t") + "\n")
    else:
        sys.stdout.write(format_list_text(records))
    return 0


# --- nbd map ----------------------------------------------------------------------------------


def describe(context: str, value: int) -> str | None:
    """nbdinfo's description of a status value (None: no description column)."""
    if context == CONTEXT_BASE_ALLOCATION:
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(value)
    if context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
        return {0: "clean", 1: "dirty"}.get(value)
    if context == CONTEXT_QEMU_ALLOCATION_DEPTH:
        return {0: "absent", 1: "local"}.get(value, f"backing depth {value}")
    return None


class MapPrinter:
    """Writes rows in nbdinfo --map's text or JSON format, batch by batch."""

    def __init__(self, out: IO[str], context: str, as_json: bool) -> None:
        self.out = out
        self.as_json = as_json
        self.first = True
        self._text: dict[int, str] = {}
        self._context = context
        if as_json:
            out.write("[\n")

    def _suffix(self, value: int) -> str:
        suffix = self._text.get(value)
        if suffix is None:
            descr = describe(self._context, value)
            if self.as_json:
                import json

                suffix = f', "description": {json.dumps(descr)}}}' if descr is not None else "}"
            else:
                suffix = f"  {descr}\n" if descr is not None else "\n"
            self._text[value] = suffix
        return suffix

    def rows(self, offset: int, lengths: Sequence[int], values: Sequence[int]) -> None:
        """Print rows from ``offset``, one write per batch. (An f-string per row measured
        faster here than one ``%`` over a repeated template, or ``str.format`` via map.)"""
        if not lengths:
            return
        for value in set(values):
            self._suffix(value)
        suffix = self._text
        starts = accumulate(lengths, initial=offset)
        rows = zip(starts, lengths, values, strict=False)
        if self.as_json:
            text = ",\n".join(
                f'{{ "offset": {o}, "length": {n}, "type": {t}{suffix[t]}' for o, n, t in rows
            )
            self.out.write(text if self.first else ",\n" + text)
            self.first = False
        else:
            self.out.write("".join(f"{o:10d}  {n:10d}  {t:3d}{suffix[t]}" for o, n, t in rows))

    def close(self) -> None:
        if self.as_json:
            self.out.write("\n]\n")


def format_totals(context: str, totals: dict[int, int], size: int, as_json: bool) -> str:
    """nbdinfo --map --totals: bytes per status value, ascending, with a percentage."""
    if size == 0:
        return "[]\n" if as_json else ""
    import json

    lines = []
    for value in sorted(totals):
        count = totals[value]
        if count == 0:
            continue
        percent = 100.0 * count / size
        descr = describe(context, value)
        if as_json:
            line = f'{{ "size": {count}, "percent": {percent:g}, "type": {value}'
            if descr is not None:
                line += f', "description": {json.dumps(descr)}'
            lines.append(line + " }")
        else:
            line = f"{count:10d} {percent:5.1f}% {value:3d}"
            lines.append(line + (f" {descr}" if descr is not None else ""))
    if as_json:
        return "[\n" + ",\n".join(lines) + "\n]\n"
    return "".join(line + "\n" for line in lines)


async def _connect(args: argparse.Namespace, contexts: list[str], **kwargs: Any) -> NBDClient:
    from nbdcore.aio.client import NBDClient

    return await NBDClient.connect(args.uri, meta_contexts=contexts, tls=nbd_tls(args), **kwargs)


async def map_cmd(args: argparse.Namespace) -> int:
    from nbdcore.extents import iter_extents

    context = args.context
    client = await _connect(args, [context])
    try:
        if context not in client.meta_contexts:
            raise UsageError(f'server does not support metadata context "{context}"')
        out = sys.stdout
        walk = iter_extents(client, [context])
        async with contextlib.aclosing(walk):  # type: ignore[type-var]
            if args.totals:
                totals: dict[int, int] = collections.defaultdict(int)
                async for batch in walk:
                    flags = batch.flags[0]
                    for value in set(flags):  # a few values: one pass in C each
                        totals[value] += sum(compress(batch.lengths, map(value.__eq__, flags)))
                out.write(format_totals(context, totals, client.size, args.json))
            else:
                printer = MapPrinter(out, context, args.json)
                async for batch in walk:
                    printer.rows(batch.offset, batch.lengths, batch.flags[0])
                printer.close()
        out.flush()
    finally:
        await client.close()
    return 0


# --- nbd copy ---------------------------------------------------------------------------------


def copy_cmd(args: argparse.Namespace) -> int:
    """Through :func:`nbdcore.sync.copy.copy_export`: blocking connections in threads."""
    from nbdcore.sync.copy import (
        DEFAULT_CONNECTIONS,
        DEFAULT_REQUEST_SIZE,
        FileSink,
        NullSink,
        Sink,
        copy_export,
    )

    if args.connections is None:
        args.connections = DEFAULT_CONNECTIONS
    if args.request_size is None:
        args.request_size = DEFAULT_REQUEST_SIZE
    requests = 1 if args.requests is None else args.requests
    if requests < 1 or args.request_size < 4096 or args.connections < 1:
        raise UsageError("--requests and --connections must be >= 1 and --request-size >= 4096")
    to_stdout = args.file == "-"
    fd = -1
    sink: Sink
    if args.file == "null:":
        sink = NullSink()
    elif to_stdout:
        sys.stdout.flush()
        sink = FileSink(sys.stdout.buffer.fileno(), sequential=True, sparse=False)
    else:
        # A regular file is truncated to 0 first so that ranges we skip read back as zeroes
        # (holes); a device (or /dev/null) is written in full, zeroes included.
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT, 0o644)
        sparse = stat.S_ISREG(os.fstat(fd).st_mode)
        if sparse:
            os.ftruncate(fd, 0)
        sink = FileSink(fd, sequential=False, sparse=sparse)
    progress = Progress(None, enabled=args.progress)

    def advance(n: int, size: int) -> None:
        progress.total = size  # the export's: copy_export reports every byte, holes included
        progress.advance(n)

    try:
        copy_export(
            args.uri,
            sink,
            connections=args.connections,
            request_size=args.request_size,
            # --requests counts the reads in flight in all; each connection gets its share
            # (by default, copy_export shares its own default over the connections it opens).
            window=None if args.requests is None else max(1, args.requests // args.connections),
            tls=nbd_tls(args),
            progress=advance if progress.enabled else None,
        )
    finally:
        progress.close()
        if fd >= 0:
            os.close(fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nbdcore.tools.client_cmds nbd map URI``: these commands alone, with the
    error handling of the ``nbdgw`` command (one line, exit code 1)."""
    parser = argparse.ArgumentParser(prog="nbdgw")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    register(sub, {"": sub})
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
