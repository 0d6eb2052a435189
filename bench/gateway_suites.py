"""Gateway benchmarks: StreamExtents end to end, a gateway process in front of qemu-nbd.

The gateway runs as ``python -m gateway serve`` (its own process, so its peak RSS is its own);
the client draining the stream is a grpc.aio worker process.
"""

from __future__ import annotations

import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import procs
from bench.fixtures import Fixtures
from bench.harness import GIB_S, MEXT_S, MIB, Benchmark, NotAvailable, Row, Side, Target
from bench.suites import (
    BITMAP_CONTEXT,
    Sides,
    _size,
    check_map_lines,
    gib_s,
    mext_s,
    nbdcopy_side,
    nbdcopy_what,
    nbdinfo_map_side,
    optional,
)

# StreamExtents carries at most 1 MiB of data per message (bitmap_service.proto).
DATA_MESSAGE = 1 << 20


def free_port() -> int:
    # Port 0 through the gateway's flag would need its log parsed; a port just freed is simpler
    # and the window for another process to take it is tiny on a loopback-only machine.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _has_serve_command() -> bool:
    import argparse

    from gateway.cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return "serve" in action.choices
    return False


def gateway_ready(target: str, export: str = "disk") -> Callable[[], bool]:
    import grpc

    from nbdgw.v1 import bitmap_service_pb2 as pb
    from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

    def ready() -> bool:
        with grpc.insecure_channel(target) as channel:
            try:
                exp = pb_grpc.BitmapServiceStub(channel).GetExport(
                    pb.GetExportRequest(name=f"exports/{export}"), timeout=5
                )
            except grpc.RpcError:
                return False
            return bool(exp.state == pb.EXPORT_STATE_AVAILABLE)

    return ready


@contextmanager
def gateway(
    nbd_uri: str, work: Path, *, image: Path | None = None
) -> Iterator[tuple[str, procs.Background]]:
    """The gateway serving ``nbd_uri`` as ``exports/disk`` (or, with ``image``, that raw image
    through its embedded nbdcore host); yields (HOST:PORT, process)."""
    why = procs.missing("nbdgw.v1.bitmap_service_pb2_grpc", "gateway.cli:build_parser")
    if why:
        raise NotAvailable(why)
    if not _has_serve_command():
        raise NotAvailable("the gateway's `nbdgw serve` command has not landed")
    target = f"127.0.0.1:{free_port()}"
    name = "gateway" if image is None else "gateway-embedded"
    cmd = [sys.executable, "-m", "gateway", "serve", "--listen", target]
    cmd += ["--export", f"disk={nbd_uri}"] if image is None else ["--image", f"disk={image}"]
    cmd += ["--data-dir", str(work / f"{name}-data")]
    with procs.background(
        cmd, gateway_ready(target), log=work / f"{name}.log", env=procs.worker_env()
    ) as proc:
        yield target, proc


def stream_side(
    target: str, context: str, *, expect: int, figure: str, extra: list[str]
) -> Callable[[], float]:
    args = ["stream-extents", target, "--context", context, "--expect", str(expect), *extra]

    def side() -> float:
        r = procs.run_worker(*args)
        if figure == "bytes":
            if r["bytes"] != r["size"]:
                raise RuntimeError(f"stream carried {r['bytes']} bytes of {r['size']}")
            return gib_s(r["bytes"], r["seconds"])
        return mext_s(expect, r["seconds"])

    return side


def gateway_extents(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        qcow = fx.bitmap_qcow2()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            uri = stack.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=["b0"]))
            check_map_lines(uri, BITMAP_CONTEXT, qcow.extents)
            gw = optional(stack, gateway(uri, work))
            extra = ["--max-extents", str(opts.get("max_extents", 0))]
            yield {
                "StreamExtents": gw
                if isinstance(gw, NotAvailable)
                else stream_side(
                    gw[0], BITMAP_CONTEXT, expect=qcow.extents, figure="extents", extra=extra
                ),
                "nbdinfo --map": nbdinfo_map_side(uri, BITMAP_CONTEXT, qcow.extents),
                "nbdinfo --map --totals": nbdinfo_map_side(
                    uri, BITMAP_CONTEXT, qcow.extents, totals=True
                ),
            }

    n = 2 * fx.sizes.qcow2_dirty
    return Benchmark(
        name="gateway-extents",
        title=f"StreamExtents of a {n:,}-extent bitmap, gateway in front of qemu-nbd 7.2",
        metric=MEXT_S,
        setup=setup,
        rows=[
            Row(
                "StreamExtents drained by a grpc.aio client (gRPC channel open to stream end,"
                " process start not counted) / nbdinfo --map on the host (whole process,"
                " printing one line per extent to /dev/null)",
                "StreamExtents",
                "nbdinfo --map",
                Target(">=", 1.0),
            ),
            # nbdinfo's protocol work without its printing: what a skeptic compares with.
            Row(
                "same / nbdinfo --map --totals (whole process, the same BLOCK_STATUS walk,"
                " prints a few totals)",
                "StreamExtents",
                "nbdinfo --map --totals",
            ),
        ],
    )


def gateway_data(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        data = fx.data_raw()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            uri = stack.enter_context(procs.qemu_nbd(data.file, "raw", work))
            gw = optional(stack, gateway(uri, work))
            # The embedded host takes its image for writing (and locks it): a copy of the file.
            copy = work / "embedded.raw"
            shutil.copyfile(data.file, copy)
            embedded = optional(stack, gateway(uri, work, image=copy))
            bare, _ = stack.enter_context(bare_grpc_server(["--file", data.file], work))
            relay, _ = stack.enter_context(
                bare_grpc_server(["--nbd", uri, "--keep-freed-memory"], work, name="relay")
            )
            relay_sync, _ = stack.enter_context(
                bare_grpc_server(
                    ["--nbd", uri, "--keep-freed-memory", "--sync"], work, name="relay-sync"
                )
            )

            def bare_side(*extra: str, target: str = bare) -> Callable[[], float]:
                def side() -> float:
                    r = procs.run_worker(
                        "bare-grpc-drain", target, "--message-size", str(DATA_MESSAGE), *extra
                    )
                    if r["bytes"] != data.size:
                        raise RuntimeError(f"bare stream carried {r['bytes']} of {data.size} B")
                    return gib_s(r["bytes"], r["seconds"])

                return side

            def ours(*extra: str, via: tuple[str, Any] | NotAvailable = gw) -> Side:
                if isinstance(via, NotAvailable):
                    return via
                return stream_side(
                    via[0], "base:allocation", expect=1, figure="bytes", extra=[*extra]
                )

            tuned = "--keep-freed-memory"
            # The Python client library's receive path: nbdgw.AsyncClient.stream_extents (the
            # data left in the bytes received, each CRC32C checked before it is yielded).
            lib = ("--include-data", "--library")
            yield {
                "StreamExtents": ours(*lib),
                "StreamExtents of the embedded host": ours(*lib, via=embedded),
                "StreamExtents + blake3 digest": ours(*lib, "--digest", "blake3"),
                "StreamExtents, generated class": ours("--include-data", "--verify"),
                "bare grpcio stream": bare_side(),
                "bare grpcio relay": bare_side(target=relay),
                "bare grpcio relay, blocking client": bare_side(target=relay_sync),
                "StreamExtents, tuned client": ours(*lib, tuned),
                "bare grpcio stream, tuned client": bare_side(tuned),
                "nbdcopy from the host": nbdcopy_side(uri, data.size),
            }

    both = (
        "messages of up to 1 MiB (960 KiB, one NBD READ, from qemu-nbd), one stream, each"
        " drained by a Python grpc.aio client in its own process"
        " (channel open to stream end, process start not counted)"
    )
    return Benchmark(
        name="gateway-data",
        title=f"data of a {_size(fx.sizes.data_bytes)} all-data raw image through StreamExtents"
        " (include_data, messages of up to 1 MiB)",
        metric=GIB_S,
        setup=setup,
        rows=[
            # The baseline: a bare grpcio server streaming the same bytes of the same
            # file (bench.workers bare-grpc-server --file), raw bytes, no protobuf, no NBD,
            # drained by a raw client that only counts them. The gateway reads them from
            # qemu-nbd 7.2 (one connection, 512 KiB READs, one message read ahead); its client
            # is the Python client library, which checks every CRC32C.
            Row(
                "StreamExtents include_data from qemu-nbd, received by nbdgw.AsyncClient (data"
                " left in the bytes received, each CRC32C checked) / bare grpcio server"
                f" streaming the file, a raw client counting the bytes; {both}",
                "StreamExtents",
                "bare grpcio stream",
                Target(">=", 0.9),
            ),
            # The same file served by the gateway's embedded nbdcore host: the data read
            # straight from the image into the message (NBDServer.pread_into), as the bare
            # server reads the file; extents over NBD on the gateway's own socket.
            Row(
                "StreamExtents include_data of an export of the gateway's embedded host (the"
                " same file, read straight from the image), received by nbdgw.AsyncClient /"
                " bare grpcio server streaming the file; same clients",
                "StreamExtents of the embedded host",
                "bare grpcio stream",
                Target(">=", 0.9),
            ),
            Row(
                "same as the first row, with a blake3 digest of the stream / bare grpcio stream"
                " of the file",
                "StreamExtents + blake3 digest",
                "bare grpcio stream",
                Target(">=", 0.9),
            ),
            Row(
                "same as the first row, a client with the generated protobuf class (the data"
                " copied out of each message, then its CRC32C checked) / bare grpcio stream of"
                " the file",
                "StreamExtents, generated class",
                "bare grpcio stream",
            ),
            Row(
                "StreamExtents include_data / bare grpcio relay of the same bytes from the"
                " same qemu-nbd (bench.workers bare-grpc-server --nbd: what NBD costs)",
                "StreamExtents",
                "bare grpcio relay",
            ),
            # An idea of issue 17, measured before it is built: the blocking NBD client in a
            # thread on the data path, against the asyncio client the gateway uses.
            Row(
                "bare grpcio relay reading through the blocking NBD client in a thread (512 KiB"
                " READs, 4 in flight) / the same relay through the asyncio client",
                "bare grpcio relay, blocking client",
                "bare grpcio relay",
            ),
            Row(
                "same as the first row, both clients with glibc keep_freed_memory (mallopt)",
                "StreamExtents, tuned client",
                "bare grpcio stream, tuned client",
            ),
            Row(
                f"StreamExtents include_data / {nbdcopy_what()} URI null: from the host"
                " (whole process)",
                "StreamExtents",
                "nbdcopy from the host",
            ),
        ],
    )


@contextmanager
def bare_grpc_server(
    source: list[str], work: Path, name: str = "bare"
) -> Iterator[tuple[str, procs.Background]]:
    """A bare grpcio server (bench.workers bare-grpc-server); yields (HOST:PORT, process)."""
    port_file = work / f"{name}.port"
    cmd = [sys.executable, "-m", "bench.workers", "bare-grpc-server", *map(str, source)]
    cmd += ["--message-size", str(DATA_MESSAGE), "--port-file", str(port_file)]
    with procs.background(
        cmd, port_file.exists, log=work / f"{name}-grpc.log", env=procs.worker_env()
    ) as proc:
        yield f"127.0.0.1:{port_file.read_text().strip()}", proc


def gateway_rss(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        qcow = fx.bitmap_qcow2(big=True)
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            uri = stack.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=["b0"]))
            target, proc = stack.enter_context(gateway(uri, work))
            stream = stream_side(
                target, BITMAP_CONTEXT, expect=qcow.extents, figure="extents", extra=[]
            )

            def peak() -> float:
                stream()
                return procs.peak_rss_mib(proc.pid)

            def at_start() -> float:
                # A fresh gateway each round, so each sample is a measurement of its own.
                (work / "fresh").mkdir(exist_ok=True)
                with gateway(uri, work / "fresh") as (_, fresh):
                    time.sleep(0.5)
                    return procs.peak_rss_mib(fresh.pid)

            yield {"peak": peak, "at start": at_start}

    n = 2 * fx.sizes.big_dirty
    return Benchmark(
        name="gateway-rss",
        title=f"gateway peak RSS (VmHWM) while streaming {n:,} extents",
        metric=MIB,
        setup=setup,
        rows=[
            Row("VmHWM after each full stream", "peak", target=Target("<", 150, on="value")),
            Row("VmHWM once ready, before any stream", "at start"),
        ],
        warmup=False,
    )


def benchmarks(fx: Fixtures, opts: dict[str, int]) -> list[Benchmark]:
    return [gateway_extents(fx, opts), gateway_data(fx, opts), gateway_rss(fx, opts)]
