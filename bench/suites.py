"""The benchmarks: what is compared with what, against which target (targets from the issues).

Every side returns one figure per call; the harness calls each side once per round. Our side
runs in a worker process (``bench.workers``); the references are the real tools, timed by wall
clock. Extent counts are checked (ours by the worker, the tools' once per setup) so a figure can
never come from a short walk.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from pathlib import Path
from typing import TypeVar

from bench import procs
from bench.fixtures import BITMAP, Fixture, Fixtures
from bench.harness import GIB_S, MEXT_S, Benchmark, NotAvailable, Row, Side, Target
from nbdcore.sync.copy import DEFAULT_CONNECTIONS

Sides = dict[str, Side]
T = TypeVar("T")
GiB = 1 << 30
BITMAP_CONTEXT = f"qemu:dirty-bitmap:{BITMAP}"


def gib_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GiB


def mext_s(extents: int, seconds: float) -> float:
    return extents / seconds / 1e6


def optional(stack: ExitStack, cm: AbstractContextManager[T]) -> T | NotAvailable:
    """Enter ``cm`` (a peer of ours) or return why it cannot run: the reference sides are then
    still measured, and the rows needing ours say "not available"."""
    try:
        return stack.enter_context(cm)
    except NotAvailable as exc:
        return exc


# --- sides shared by several benchmarks ----------------------------------------------------------


# nbdcopy's parallelism, spelled out on its command line so that every row says what it ran:
# its defaults are 4 connections but no more than --threads, which defaults to the CPU count
# (`nbdcopy --verbose` prints connections=2 on 2 CPUs), 64 requests in flight per connection
# and 256 KiB requests (libnbd 1.14).
NBDCOPY_CONNECTIONS = DEFAULT_CONNECTIONS  # the same rule as ours: the CPUs, at most 4
NBDCOPY_REQUESTS = 64
NBDCOPY_REQUEST_SIZE = 256 << 10


def nbdcopy_cmd(uri: str, dest: str, *, connections: int = NBDCOPY_CONNECTIONS) -> list[str]:
    return [
        procs.tool("nbdcopy"),
        f"--connections={connections}",
        f"--threads={connections}",
        f"--requests={NBDCOPY_REQUESTS}",
        f"--request-size={NBDCOPY_REQUEST_SIZE}",
        uri,
        dest,
    ]


def nbdcopy_what(connections: int = NBDCOPY_CONNECTIONS) -> str:
    """What nbdcopy_cmd runs, for a row's label."""
    return (
        f"nbdcopy ({connections} connection{'s' if connections > 1 else ''},"
        f" {NBDCOPY_REQUESTS} x {NBDCOPY_REQUEST_SIZE >> 10} KiB in flight each)"
    )


def nbdcopy_side(
    uri: str, size: int, *, connections: int = NBDCOPY_CONNECTIONS
) -> Callable[[], float]:
    cmd = nbdcopy_cmd(uri, "null:", connections=connections)
    return lambda: gib_s(size, procs.timed(cmd))


def nbdinfo_map_side(
    uri: str, context: str, extents: int, *, totals: bool = False
) -> Callable[[], float]:
    cmd = [procs.tool("nbdinfo"), f"--map={context}", uri]
    if totals:
        cmd.insert(2, "--totals")
    return lambda: mext_s(extents, procs.timed(cmd))


def check_map_lines(uri: str, context: str, expected: int) -> None:
    """nbdinfo --map prints one line per extent: the served map must have the fixture's count."""
    out = procs.output([procs.tool("nbdinfo"), f"--map={context}", uri])
    n = len(out.splitlines())
    if n != expected:
        raise RuntimeError(f"nbdinfo --map={context} on {uri}: {n} extents, expected {expected}")


@contextmanager
def our_server(image: Fixture, workdir: Path, name: str = "nbdcore") -> Iterator[str]:
    """``NBDServer`` (nbdcore.aio.server) in a worker process, serving ``image`` read-only."""
    probe = procs.missing("nbdcore.aio.server:NBDServer", "nbdcore.storage:Image")
    if probe:
        raise NotAvailable(probe)
    sock = workdir / f"{name}.sock"
    uri = procs.unix_uri(sock)
    cmd = [sys.executable, "-m", "bench.workers", "serve", "--socket", str(sock)]
    cmd += ["--image", image.path]
    with procs.background(
        cmd, procs.nbd_ready(uri), log=workdir / f"{name}.log", env=procs.worker_env()
    ):
        yield uri


# --- 1. client ------------------------------------------------------------------------------------

# Reads of 512 KiB, everywhere: qemu-nbd 7.2 allocates each READ's buffer with glibc, and from
# 1 MiB up (above its mmap threshold, which its 1 MiB BLOCK_STATUS answer array raises to just
# about 1 MiB) every READ is a fresh mmap that it page-faults in: 2 GiB of 1 MiB reads cost it
# 380-530K minor faults, 512 KiB reads none (measured 2026-11-27, docs/benchmarks.md).
READ_SIZE = 512 << 10
COPY_CONNECTIONS = DEFAULT_CONNECTIONS  # the library's default: the CPUs, at most 4
COPY_WINDOW = 2  # per connection
MULTICONN_CONNECTIONS = NBDCOPY_CONNECTIONS  # compared with nbdcopy's connections, like for like
MULTICONN_IN_FLIGHT = 4 * MULTICONN_CONNECTIONS


def client_read(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        data = fx.data_raw()
        with procs.tempdir() as work, procs.qemu_nbd(data.file, "raw", work) as uri:

            def side(*args: str, connections: int = 1) -> Callable[[], float]:
                def run() -> float:
                    r = procs.run_worker(*args)
                    if r["connections"] != connections:
                        raise RuntimeError(f"{args[0]} used {r['connections']} connections")
                    return gib_s(r["bytes"], r["seconds"])

                return run

            size = ["--request-size", str(opts["request_size"])]
            yield {
                "copy_export": side(
                    "client-copy", uri, "--connections", str(COPY_CONNECTIONS),
                    "--request-size", str(READ_SIZE), "--window", str(COPY_WINDOW),
                    connections=COPY_CONNECTIONS,
                ),
                "sync NBDClient": side(
                    "client-read-sync", uri, *size, "--in-flight", str(opts["in_flight"]),
                    "--block-status",
                ),
                "asyncio NBDClient": side(
                    "client-read", uri, *size, "--in-flight", str(opts["in_flight"]),
                    "--block-status",
                ),
                "MultiConnClient": side(
                    "client-read", uri, "--connections", str(MULTICONN_CONNECTIONS),
                    "--request-size", str(READ_SIZE), "--block-status",
                    "--in-flight", str(MULTICONN_IN_FLIGHT),
                    connections=MULTICONN_CONNECTIONS,
                ),
                "nbdcopy": nbdcopy_side(uri, data.size),
                # One connection, as the single-connection rows use.
                "nbdcopy --connections=1": nbdcopy_side(uri, data.size, connections=1),
            }  # fmt: skip

    one = f"{opts['in_flight']} x {opts['request_size'] >> 10} KiB in flight, BLOCK_STATUS first"
    return Benchmark(
        name="client-read",
        title=f"read a {_size(fx.sizes.data_bytes)} raw image from qemu-nbd 7.2 (unix socket)",
        metric=GIB_S,
        setup=setup,
        rows=[
            Row(
                f"nbdcore.sync.copy.copy_export to a NullSink ({COPY_CONNECTIONS} connections,"
                f" {COPY_WINDOW} x {READ_SIZE >> 10} KiB in flight each) / {nbdcopy_what()}"
                " URI null: (both: connect to close, process start not counted for ours)",
                "copy_export",
                "nbdcopy",
                Target(">=", 1.2),
            ),
            Row(
                f"sync NBDClient.iter_reads, one connection, {one} / {nbdcopy_what(1)}",
                "sync NBDClient",
                "nbdcopy --connections=1",
            ),
            Row(
                f"asyncio NBDClient.pread_into, one connection, {one} / {nbdcopy_what(1)}",
                "asyncio NBDClient",
                "nbdcopy --connections=1",
            ),
            Row(
                f"MultiConnClient (asyncio), {MULTICONN_CONNECTIONS} connections,"
                f" {MULTICONN_IN_FLIGHT} x {READ_SIZE >> 10} KiB in flight in all"
                f" / {nbdcopy_what()}",
                "MultiConnClient",
                "nbdcopy",
            ),
            Row(
                "asyncio NBDClient / sync NBDClient (one connection each)",
                "asyncio NBDClient",
                "sync NBDClient",
            ),
        ],
    )


def client_extents(fx: Fixtures) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        qcow = fx.bitmap_qcow2()
        with (
            procs.tempdir() as work,
            procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=[BITMAP]) as uri,
        ):
            check_map_lines(uri, BITMAP_CONTEXT, qcow.extents)
            args = ["extents", uri, "--context", BITMAP_CONTEXT, "--expect", str(qcow.extents)]

            def ours() -> float:
                r = procs.run_worker(*args)
                return mext_s(r["extents"], r["seconds"])

            yield {
                "ours": ours,
                "nbdinfo --map": nbdinfo_map_side(uri, BITMAP_CONTEXT, qcow.extents),
                "nbdinfo --map --totals": nbdinfo_map_side(
                    uri, BITMAP_CONTEXT, qcow.extents, totals=True
                ),
            }

    n = 2 * fx.sizes.qcow2_dirty
    return Benchmark(
        name="client-extents",
        title=f"walk a qemu dirty bitmap of {n:,} extents served by qemu-nbd 7.2",
        metric=MEXT_S,
        setup=setup,
        rows=[
            Row("iter_extents / nbdinfo --map=BITMAP", "ours", "nbdinfo --map", Target(">=", 2.0)),
            Row("iter_extents / nbdinfo --map=BITMAP --totals", "ours", "nbdinfo --map --totals"),
        ],
    )


def client_extents_ext(fx: Fixtures) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        qcow = fx.bitmap_qcow2()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            uri = stack.enter_context(
                procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=[BITMAP], qemu10=True)
            )
            check_map_lines(uri, BITMAP_CONTEXT, qcow.extents)
            args = ["extents", uri, "--context", BITMAP_CONTEXT, "--expect", str(qcow.extents)]

            def worker(*extra: str) -> Callable[[], float]:
                def side() -> float:
                    r = procs.run_worker(*args, *extra)
                    return mext_s(r["extents"], r["seconds"])

                return side

            yield {
                "ours, extended headers": worker(),
                "ours, compact headers": worker("--compact"),
                "nbdinfo --map": nbdinfo_map_side(uri, BITMAP_CONTEXT, qcow.extents),
            }

    n = 2 * fx.sizes.qcow2_dirty
    return Benchmark(
        name="client-extents-qemu10",
        title=f"the same {n:,}-extent bitmap served by qemu-nbd 10 (extended headers)",
        metric=MEXT_S,
        setup=setup,
        rows=[
            Row(
                "iter_extents, extended headers / nbdinfo --map (libnbd 1.14: compact)",
                "ours, extended headers",
                "nbdinfo --map",
            ),
            Row(
                "iter_extents, extended / compact headers",
                "ours, extended headers",
                "ours, compact headers",
            ),
        ],
    )


# --- 3. server ------------------------------------------------------------------------------------


def server_read(fx: Fixtures) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        data = fx.data_raw()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            ours = optional(stack, our_server(data, work))
            qemu = stack.enter_context(procs.qemu_nbd(data.file, "raw", work))
            yield {
                "nbdcopy from NBDServer": ours
                if isinstance(ours, NotAvailable)
                else nbdcopy_side(ours, data.size),
                "nbdcopy from qemu-nbd": nbdcopy_side(qemu, data.size),
            }

    return Benchmark(
        name="server-read",
        title=f"nbdcopy URI null: of a {_size(fx.sizes.data_bytes)} raw image, unix socket",
        metric=GIB_S,
        setup=setup,
        rows=[
            Row(
                "NBDServer / qemu-nbd 7.2",
                "nbdcopy from NBDServer",
                "nbdcopy from qemu-nbd",
                Target(">=", 0.8),
            )
        ],
    )


def server_extents(fx: Fixtures) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        qcow = fx.bitmap_qcow2()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            ours_side: Side
            try:
                image = fx.bitmap_image()
                ours = stack.enter_context(our_server(image, work))
            except NotAvailable as exc:
                ours_side = exc
            else:
                if image.extents != qcow.extents:
                    raise RuntimeError(f"fixtures differ: {image.extents} vs {qcow.extents}")
                check_map_lines(ours, BITMAP_CONTEXT, image.extents)
                ours_side = nbdinfo_map_side(ours, BITMAP_CONTEXT, image.extents)
            qemu = stack.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=[BITMAP]))
            check_map_lines(qemu, BITMAP_CONTEXT, qcow.extents)
            yield {
                "nbdinfo --map from NBDServer": ours_side,
                "nbdinfo --map from qemu-nbd": nbdinfo_map_side(qemu, BITMAP_CONTEXT, qcow.extents),
            }

    n = 2 * fx.sizes.image_dirty
    return Benchmark(
        name="server-extents",
        title=f"nbdinfo --map of a bitmap of {n:,} extents: nbdcore Image vs qemu qcow2",
        metric=MEXT_S,
        setup=setup,
        rows=[
            Row(
                "NBDServer / qemu-nbd 7.2",
                "nbdinfo --map from NBDServer",
                "nbdinfo --map from qemu-nbd",
                Target(">=", 0.5),
            )
        ],
    )


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= GiB else f"{n >> 20} MiB"


def all_benchmarks(fx: Fixtures, opts: dict[str, int]) -> list[Benchmark]:
    from bench import clear_suites, command_suites, csi_suites, gateway_suites

    return [
        client_read(fx, opts),
        client_extents(fx),
        client_extents_ext(fx),
        server_read(fx),
        server_extents(fx),
        *gateway_suites.benchmarks(fx, opts),
        *clear_suites.benchmarks(fx),
        *command_suites.benchmarks(fx, opts),
        *csi_suites.benchmarks(fx),
    ]
