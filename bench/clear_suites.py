"""ClearRange benchmarks (issue 5): calls per second and p99 latency, durability on.

Three processes: the gateway (``python -m gateway serve``), the NBD host, and this one, whose
grpc.aio client sends ClearRange calls, each for a granule no earlier call cleared, with 1 or 32
in flight. The hosts:

- ledger: qemu-nbd -r (a point-in-time export: CLEAR_MODE_LEDGER_MASK); the gateway's ledger is
  SQLite WAL with ``synchronous=FULL``, so every acknowledged clear was fsync'd (concurrent
  clears share a commit: group commit);
- source: ``nbdgw nbd serve`` (CLEAR_MODE_AT_SOURCE through the NBD clear extension); the bits
  land in the host's shared mapping of its bitmap file before the reply, which survives kill -9
  of the host and of the gateway.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import procs
from bench.fixtures import Fixtures
from bench.gateway_suites import free_port, gateway_ready
from bench.harness import Benchmark, Metric, NotAvailable, Row, Target
from bench.suites import Sides, optional

CALLS_S = Metric("calls/s")
MS = Metric("ms", higher_is_better=False)
G = 1 << 16
SIZE = 4 << 30  # 65,536 granules: room for every call of every round to clear its own
IN_FLIGHT = 32


def _clear_burst(target: str, calls: int, in_flight: int, first: int) -> tuple[float, float]:
    """``calls`` ClearRange calls of granules first, first+1, ...; (calls/s, p99 ms)."""
    import grpc

    from nbdgw.v1 import bitmap_service_pb2 as pb
    from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

    async def run() -> tuple[float, float]:
        latencies: list[float] = []
        todo = iter(range(first, first + calls))
        async with grpc.aio.insecure_channel(target) as channel:
            stub = pb_grpc.BitmapServiceStub(channel)
            # The source's export is writable: its clears are conditional on the clear token
            # of a stream (the ledger's read-only export hands out none and needs none).
            read = pb.StreamExtentsRequest(export="disk", context="b0", length=G)
            messages = [m async for m in stub.StreamExtents(read)]
            token = messages[0].clear_token

            async def worker() -> None:
                for g in todo:
                    # The generation the ledger host is configured with (ignored at the
                    # source); ledger mode refuses a clear without one.
                    request = pb.ClearRangeRequest(
                        export="disk",
                        bitmap="b0",
                        offset=(g % (SIZE // G)) * G,
                        length=G,
                        generation="bench",
                        clear_token=token,
                    )
                    t0 = time.perf_counter()
                    resp = await stub.ClearRange(request, timeout=60)
                    latencies.append(time.perf_counter() - t0)
                    if resp.cleared_bytes != G:
                        raise RuntimeError(f"cleared {resp.cleared_bytes} bytes, not {G}")

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(in_flight)))
            elapsed = time.perf_counter() - t0
        latencies.sort()
        return calls / elapsed, latencies[int(0.99 * (len(latencies) - 1))] * 1000

    return asyncio.run(run())


@contextmanager
def _gateway(args: list[str], work: Path, name: str) -> Iterator[str]:
    why = procs.missing("nbdgw.v1.bitmap_service_pb2_grpc:BitmapServiceStub", "gateway.ledger")
    if why:
        raise NotAvailable(why)
    target = f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "gateway", "serve", "--listen", target, *args]
    cmd += ["--data-dir", str(work / f"{name}-data"), "--max-connections", "32"]
    with procs.background(
        cmd, gateway_ready(target), log=work / f"{name}.log", env=procs.worker_env()
    ):
        yield target


@contextmanager
def _ledger_host(work: Path) -> Iterator[str]:
    """qemu-nbd -r over a qcow2 whose bitmap b0 is dirty everywhere, behind a gateway with a
    generation (ledger mode); yields the gateway's address."""
    qcow = work / "clear.qcow2"
    qemu_img, qemu_io = procs.tool("qemu-img"), procs.tool("qemu-io")
    procs.output([qemu_img, "create", "-q", "-f", "qcow2", str(qcow), str(SIZE)])
    procs.output([qemu_img, "bitmap", "--add", "-g", str(G), str(qcow), "b0"])
    script = work / "dirty.qemu-io"
    # qemu-io takes at most 2 GiB per request: dirty the bitmap 1 GiB at a time.
    script.write_text("".join(f"write -z {o} {1 << 30}\n" for o in range(0, SIZE, 1 << 30)))
    procs.output(["sh", "-c", f"{qemu_io} -f qcow2 {qcow} < {script}"])
    sock = work / "clear-qemu.sock"
    uri = procs.unix_uri(sock)
    cmd = [procs.tool("qemu-nbd"), "-r", "-t", "-e", "64", "-f", "qcow2", "-x", "disk"]
    cmd += ["-B", "b0", "-k", str(sock), str(qcow)]
    with procs.background(cmd, procs.nbd_ready(uri), log=work / "clear-qemu.log"):
        config = work / "ledger.toml"
        config.write_text(
            'ledger_synchronous = "FULL"\n'
            f'[[exports]]\nname = "disk"\nuri = "{uri}"\ngeneration = "bench"\n'
        )
        with _gateway(["--config", str(config)], work, "ledger-gateway") as target:
            yield target


@contextmanager
def _source_host(work: Path) -> Iterator[str]:
    """``nbdgw nbd serve`` over a raw image whose bitmap b0 is dirty everywhere."""
    why = procs.missing("nbdcore.clear_ext", "nbdcore.storage:Image")
    if why:
        raise NotAvailable(why)
    from nbdcore.storage import Image

    raw = work / "clear.raw"
    image = Image.create(raw, SIZE)
    try:
        image.add_bitmap("b0", granularity=G).mark_all()
    finally:
        image.close()
    sock = work / "clear-nbdcore.sock"
    uri = procs.unix_uri(sock)
    cmd = [sys.executable, "-m", "gateway", "nbd", "serve", str(raw), "--socket", str(sock)]
    cmd += ["--export", "disk"]
    with (
        procs.background(
            cmd, procs.nbd_ready(uri), log=work / "clear-nbdcore.log", env=procs.worker_env()
        ),
        _gateway(["--export", f"disk={uri}"], work, "source-gateway") as target,
    ):
        yield target


def _sides(fx: Fixtures, figure: int) -> Callable[[], Iterator[Sides]]:
    calls = 300 if fx.mode == "quick" else 2000
    counter = iter(range(0, 1 << 40, calls))

    def side(target: str, in_flight: int) -> Callable[[], float]:
        return lambda: _clear_burst(target, calls, in_flight, next(counter))[figure]

    @contextmanager
    def setup() -> Iterator[Sides]:
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            ledger = optional(stack, _ledger_host(work))
            source = optional(stack, _source_host(work))
            sides: Sides = {}
            for name, target in (("ledger", ledger), ("source", source)):
                for n in (1, IN_FLIGHT):
                    key = f"{name} x{n}"
                    sides[key] = target if isinstance(target, NotAvailable) else side(target, n)
            yield sides

    return setup


def clear_rate(fx: Fixtures) -> Benchmark:
    return Benchmark(
        name="clear-rate",
        title="ClearRange calls/s, durability on (ledger: SQLite FULL; source: nbd serve)",
        metric=CALLS_S,
        setup=_sides(fx, 0),
        rows=[
            Row(
                f"ledger, {IN_FLIGHT} in flight / 1 (group commit)",
                f"ledger x{IN_FLIGHT}",
                "ledger x1",
                Target(">=", 1.5),
            ),
            Row(
                f"ledger, {IN_FLIGHT} in flight",
                f"ledger x{IN_FLIGHT}",
                target=Target(">=", 300, on="value"),
            ),
            Row("ledger, 1 in flight", "ledger x1"),
            Row(
                f"at the source, {IN_FLIGHT} in flight",
                f"source x{IN_FLIGHT}",
                target=Target(">=", 300, on="value"),
            ),
            Row("at the source, 1 in flight", "source x1"),
        ],
    )


def clear_latency(fx: Fixtures) -> Benchmark:
    return Benchmark(
        name="clear-p99",
        title="ClearRange p99 latency, durability on",
        metric=MS,
        setup=_sides(fx, 1),
        rows=[
            Row("ledger, 1 in flight", "ledger x1", target=Target("<", 50, on="value")),
            Row(
                f"ledger, {IN_FLIGHT} in flight",
                f"ledger x{IN_FLIGHT}",
                target=Target("<", 250, on="value"),
            ),
            Row("at the source, 1 in flight", "source x1", target=Target("<", 50, on="value")),
            Row(
                f"at the source, {IN_FLIGHT} in flight",
                f"source x{IN_FLIGHT}",
                target=Target("<", 250, on="value"),
            ),
        ],
    )


def benchmarks(fx: Fixtures) -> list[Benchmark]:
    return [clear_rate(fx), clear_latency(fx)]
