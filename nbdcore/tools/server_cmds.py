"""``nbdgw nbd serve``: export a raw disk image and its dirty bitmaps over NBD."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from nbdcore.exceptions import UsageError
from nbdcore.tools import DeprecatedFlag, run, subgroup


def register(sub: argparse._SubParsersAction[Any], groups: dict[str, Any]) -> None:
    """Add ``nbd serve`` to the shared ``nbd`` group."""
    nbd = subgroup(groups, "nbd", "NBD client and server tools")
    p = nbd.add_parser(
        "serve",
        help="serve a disk image and its dirty bitmaps over NBD",
        description=(
            "Serve DISK (a raw image, with bitmaps in DISK.nbdgw/) over NBD. Each bitmap is "
            "exported as the metadata context qemu:dirty-bitmap:NAME beside base:allocation."
        ),
    )
    p.add_argument("disk", metavar="DISK", help="raw disk image")
    p.add_argument("--export", default="", help="export name (default: the empty name)")
    p.add_argument("--description", default="", help="export description")
    p.add_argument(
        "--bitmap",
        action="append",
        metavar="NAME",
        help="export this bitmap (repeatable; default: every bitmap of the image)",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="listen on this unix socket")
    where.add_argument("--listen", metavar="HOST:PORT", help="listen on TCP (port 0: any)")
    p.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default=0o600,
        metavar="MODE",
        help="permissions of the --socket file, whatever the umask (default 600: whoever can "
        "connect can read, write and clear the disk; 660 shares it with the group)",
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes")
    p.add_argument(
        "--no-snapshots",
        dest="snapshots",
        action="store_false",
        help="do not export the disk's snapshots (by default each snapshot SNAP of the disk is"
        " exported read-only as EXPORT@SNAP; see nbdgw disk snapshot)",
    )
    p.add_argument(
        "--allow-snapshots",
        action="store_true",
        help="let NBD clients create, list and release snapshots of the disk "
        "(NBD_OPT_X_NBDGW_SNAPSHOT, docs/extension-snapshot.md; what a gateway in front of "
        "this host needs for point-in-time backups); off by default, since any client that "
        "can connect could then take snapshots",
    )
    # --nbd-tls-*: the NBD side's TLS in every command (here the server's own; --tls-* is a
    # gateway client's). The old --tls-* spellings still work until 0.2.
    for name, dest, helps in (
        ("cert-file", "tls_cert", "server certificate (PEM)"),
        ("key-file", "tls_key", "server private key (PEM)"),
        ("ca-file", "tls_ca", "CA that client certificates must chain to (asks for them)"),
    ):
        p.add_argument(f"--nbd-tls-{name}", dest=dest, metavar="FILE", help=helps)
        old = "--tls-" + name.removesuffix("-file")
        p.add_argument(
            old, dest=dest, default=argparse.SUPPRESS, action=DeprecatedFlag,
            new=f"--nbd-tls-{name}",
        )  # fmt: skip
    p.add_argument(
        "--nbd-tls-required",
        dest="tls_required",
        action="store_true",
        help="refuse clients that do not start TLS",
    )
    p.add_argument(
        "--tls-required", dest="tls_required", nargs=0, default=argparse.SUPPRESS,
        action=DeprecatedFlag, new="--nbd-tls-required",
    )  # fmt: skip
    p.add_argument("--max-connections", type=int, default=64, metavar="N")
    p.add_argument(
        "--no-clear-extension",
        dest="clear_extension",
        action="store_false",
        help="do not offer the NBD clear extension (docs/extension-clear.md), with which "
        "clients clear ranges of the bitmaps",
    )
    p.set_defaults(func=serve)


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"not a permission mode: {text!r}")
    return mode


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen wants HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(args: argparse.Namespace) -> int:
    from nbdcore.aio.server import ExportConfig, NBDServer, ServerLimits
    from nbdcore.storage.image import Image

    tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("--nbd-tls-cert-file and --nbd-tls-key-file go together")
        from nbdcore.tls import server_context

        tls = server_context(
            args.tls_cert, args.tls_key, args.tls_ca, require_client_cert=bool(args.tls_ca)
        )
    elif args.tls_required or args.tls_ca:
        raise UsageError(
            "--nbd-tls-required and --nbd-tls-ca-file need --nbd-tls-cert-file and"
            " --nbd-tls-key-file"
        )
    listen = _parse_listen(args.listen) if args.listen else None

    image = Image.open(args.disk, read_only=args.read_only)
    if image.writer_active and image.bitmaps:
        print(
            f"warning: {args.disk} is open for writing by another process: its bitmaps are"
            " served as they were now and miss that process's later writes (an incremental"
            " backup from this server would miss them); serve it from the writing process",
            file=sys.stderr,
            flush=True,
        )
    try:
        export = ExportConfig(
            name=args.export,
            image=image,
            description=args.description,
            read_only=args.read_only,
            bitmaps=args.bitmap,
        )
        exports = [export]
        if args.snapshots and not args.read_only:
            from nbdcore.tools.snapshot_cmds import snapshot_exports

            exports += snapshot_exports(args.export, image)
        server = NBDServer(
            exports,
            tls=tls,
            tls_required=args.tls_required,
            limits=ServerLimits(max_connections=args.max_connections),
            clear_extension=args.clear_extension,
            snapshot_management=args.allow_snapshots and not args.read_only,
        )
        if listen is not None:
            host, port = await server.start_tcp(*listen)
            where = f"nbd://{host}:{port}/{args.export}"
        else:
            await server.start_unix(args.socket, mode=args.socket_mode)
            where = f"nbd+unix:///{args.export}?socket={args.socket}"
        import asyncio  # here: `nbdgw nbd ...` (copy, --help) need not import these
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        # Only now: a supervisor may stop the server as soon as it reads this line.
        print(f"serving {args.disk} at {where}", flush=True)
        try:
            await stop.wait()
        finally:
            print("stopping", file=sys.stderr, flush=True)
            await server.close()  # removes its socket file
    finally:
        image.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m nbdcore.tools.server_cmds DISK ...``: the same command without the gateway
    (handy where only nbdcore is installed)."""
    parser = argparse.ArgumentParser(prog="nbdgw-nbd")
    groups: dict[str, Any] = {"": parser.add_subparsers(dest="command", metavar="COMMAND")}
    register(groups[""], groups)
    return run(parser, ["nbd", "serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
