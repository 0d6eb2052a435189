"""``nbdgw render``: a picture of where a disk is dirty, allocated and zero (SVG or HTML).

Reads the extents straight from the NBD host (no gateway needed) with one pipelined walk over
every chosen metadata context, and downsamples them to the picture's width with exact per-pixel
coverage (see gateway/cli/render.py). Memory stays bounded by the width, whatever the disk's size or
fragmentation.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli import render
from nbdcore.constants import CONTEXT_BASE_ALLOCATION, CONTEXT_QEMU_DIRTY_BITMAP_PREFIX
from nbdcore.exceptions import UsageError
from nbdcore.tools import nbd_tls, nbd_tls_options
from nbdcore.tools.bitmap_cmds import parse_size

if TYPE_CHECKING:
    from nbdcore.uri import NBDURI

DEFAULT_WIDTH = 1024
MAX_WIDTH = 16384


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``nbdgw render``."""
    p = sub.add_parser(
        "render",
        help="draw where a disk is dirty, allocated and zero (SVG or HTML)",
        description=(
            "Read the extent maps of an NBD export (base:allocation and dirty bitmaps) and draw "
            "them side by side, one lane per context, each pixel shaded by the fraction of its "
            "bytes in that state. Without --context/--bitmap: base:allocation and every "
            "qemu:dirty-bitmap:* the export offers."
        ),
    )
    p.add_argument(
        "source",
        metavar="URI_OR_EXPORT",
        help="an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds...), "
        "or an export name on the unix socket given by --socket",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="FILE.svg or FILE.html (written atomically); '-' writes SVG to standard output",
    )
    p.add_argument(
        "--format", choices=("svg", "html"), help="output format (default: from the file name)"
    )
    p.add_argument(
        "-c",
        "--context",
        action="append",
        default=[],
        metavar="CONTEXT",
        help="a metadata context to draw (repeatable), e.g. qemu:dirty-bitmap:backup",
    )
    p.add_argument(
        "-b",
        "--bitmap",
        action="append",
        default=[],
        metavar="NAME",
        help="a dirty bitmap to draw (repeatable): same as --context qemu:dirty-bitmap:NAME",
    )
    p.add_argument(
        "--no-allocation", action="store_true", help="leave out the base:allocation lane"
    )
    p.add_argument(
        "--socket",
        default=default_socket(),
        help="unix socket of the NBD host when URI_OR_EXPORT is an export name (default: "
        "$NBDGW_NBD_SOCKET, else the embedded host of `nbdgw serve`: DATA_DIR/nbd.sock, "
        "DATA_DIR from $NBDGW_DATA_DIR or ./nbdgw-data)",
    )
    p.add_argument(
        "--width",
        type=int,
        default=DEFAULT_WIDTH,
        help=f"pixels across (default {DEFAULT_WIDTH}, at most {MAX_WIDTH})",
    )
    p.add_argument("--offset", type=parse_size, default=0, help="start of the range (default 0)")
    p.add_argument("--length", type=parse_size, help="length of the range (default: to the end)")
    p.add_argument("--title", help="title of the picture (default: the export and host)")
    nbd_tls_options(p)
    p.set_defaults(func=cmd_map)


def default_socket() -> str:
    """Where `nbdgw serve` puts its embedded host's socket (it uses the same variables)."""
    explicit = os.environ.get("NBDGW_NBD_SOCKET")
    if explicit:
        return explicit
    return os.path.join(os.environ.get("NBDGW_DATA_DIR") or "./nbdgw-data", "nbd.sock")


def resolve_source(source: str, socket: str) -> str:
    """The NBD URI for ``source``: a URI as is, an export name on ``socket``."""
    if "://" in source:
        return source
    if not os.path.exists(socket):
        raise UsageError(
            f"{source!r} is not an NBD URI, and there is no NBD socket at {socket}: give a URI "
            "(nbd+unix:///EXPORT?socket=PATH, nbd://HOST/EXPORT) or --socket PATH"
        )
    from urllib.parse import quote

    return f"nbd+unix:///{quote(source)}?socket={quote(socket)}"


def output_format(output: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    if output == "-":
        return "svg"
    suffix = Path(output).suffix.lower()
    if suffix in (".svg", ".html", ".htm"):
        return "svg" if suffix == ".svg" else "html"
    raise UsageError(f"cannot tell the format of {output!r}: name it .svg or .html, or --format")


def wanted_contexts(args: argparse.Namespace) -> list[str] | None:
    """The contexts the options name, in order; None when they name no bitmap (then every
    dirty bitmap the export offers is drawn)."""
    named = [*args.context, *(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + b for b in args.bitmap)]
    if not named:
        return None
    if not args.no_allocation and CONTEXT_BASE_ALLOCATION not in named:
        named.insert(0, CONTEXT_BASE_ALLOCATION)
    return list(dict.fromkeys(named))


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, so a reader
    never sees half a picture and a failure leaves any previous file intact."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


async def cmd_map(args: argparse.Namespace) -> int:
    # Imported here: `nbdgw --help` and the other commands do not need the NBD client.
    from nbdcore.aio.client import NBDClient, list_meta_contexts
    from nbdcore.extents import iter_extents
    from nbdcore.uri import NBDURI

    fmt = output_format(args.output, args.format)
    if not 1 <= args.width <= MAX_WIDTH:
        raise UsageError(f"--width must be between 1 and {MAX_WIDTH}")
    uri = NBDURI.parse(resolve_source(args.source, args.socket))
    tls = nbd_tls(args)

    contexts = wanted_contexts(args)
    if contexts is None:
        offered = await list_meta_contexts(uri, tls=tls)
        bitmaps = sorted(c for c in offered if c.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX))
        contexts = [] if args.no_allocation else [CONTEXT_BASE_ALLOCATION]
        contexts += bitmaps
        if not contexts:
            raise UsageError(f"{uri} offers no dirty bitmap (and --no-allocation was given)")

    async with await NBDClient.connect(uri, meta_contexts=contexts, tls=tls) as client:
        missing = [c for c in contexts if c not in client.meta_contexts]
        if missing:
            raise UsageError(f"{uri} does not offer {', '.join(missing)}")
        size = client.size
        length = size - args.offset if args.length is None else args.length
        if args.offset < 0 or length <= 0 or args.offset + length > size:
            raise UsageError(
                f"range {args.offset}+{length} is empty or outside the export (size {size})"
            )
        tracks = render.tracks_for_all(contexts)
        coverage = render.Coverage(args.offset, length, args.width, tracks)
        async for batch in iter_extents(client, contexts, args.offset, length):
            coverage.add_rows(batch.offset, batch.lengths, batch.flags)
        export = client.export_name
    if coverage.seen != length:  # iter_extents promises exact cover; never draw a partial map
        raise UsageError(f"the extents covered {coverage.seen} of {length} bytes")

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    title = args.title or f"nbdgw render: export {export or '(default)'!r}"
    picture = render.picture_from(
        coverage, contexts, title=title, export_size=size, notes=[_safe_uri(uri), stamp]
    )
    text = render.render_svg(picture) if fmt == "svg" else render.render_html(picture)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        write_atomically(args.output, text)
        print(
            f"nbdgw render: wrote {args.output} ({fmt}, {len(contexts)} contexts)",
            file=sys.stderr,
        )
    return 0


def _safe_uri(uri: NBDURI) -> str:
    """The URI as shown in the picture: without TLS options (they may name key files)."""
    return str(uri.replace(tls_options={}))
