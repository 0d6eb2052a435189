"""Load and abuse of a token-guarded gateway (issue 6):
``python -m bench.bench_security_load [--streams 100] [--flood 0] [--json FILE]``.

A gateway process (``nbdgw serve --image ... --token-file ...``) serves a 64 MiB disk whose
bitmap is dirty every other 64 KiB granule (512 dirty runs). ``--streams`` StreamExtents calls
start at once, spread over 4 identities: 80 % read the bitmap's extents (16 per message), 20 %
also carry the data of a 4 MiB range. Every stream is checked against the disk. Reports
wall time, streams/s, MB/s of data, extents/s and the p50/p99/max of per-stream latency (start
to last message), and of time to first message. With ``--flood N``, N unauthenticated or
wrong-token calls run during the load (they must all fail UNAUTHENTICATED).

``--slow-readers N`` (issue 15): instead, N data streams over the whole disk that read at most
one message and then stop reading for ``--hold`` seconds, then leave. ``--raw-readers N``: the
same from a raw HTTP/2 client (tests/gateway/raw_h2.py): N streams on one connection whose
receive window is zero, never read. Both report the gateway's resident memory (VmRSS, MiB)
before, at its peak while they are held, and settled: once they are gone (after ``--settle``
seconds), and how many streams got data budget (``streaming``) or waited for it.
``--budget-mib M`` configures the bound (``buffered_data_mib``; a quarter of it per identity,
the 4 identities of the load); without it the gateway's defaults apply (64 MiB, 16 per
identity). Freed stream buffers must go back to the system. ``--raw-readers`` above 60 meets
the embedded host's 64 NBD clients (the excess streams end UNAVAILABLE).

The tests run the same driver (tests/gateway/test_security_load.py) for correctness only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from gateway.sample import sample_pattern
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

MiB = 1024 * 1024
G = 64 * 1024
SIZE = 64 * MiB
DATA_RANGE = (8 * MiB, 4 * MiB)
TOKENS = {f"agent{i}": f"load-token-{i}-0123456789" for i in range(4)}


def make_disk(path: Path) -> Path:
    """Data everywhere; bitmap ``b`` dirty on even granules only."""
    image = Image.create(path, SIZE)
    try:
        step = 4 * MiB
        for off in range(0, SIZE, step):
            image.write(sample_pattern(off, step), off)
        image.add_bitmap("b", granularity=G)
        for off in range(0, SIZE, 2 * G):
            image.write(sample_pattern(off, G), off)
        image.flush()
    finally:
        image.close()
    return path


def write_tokens(path: Path) -> Path:
    path.write_text("".join(f"{name} {token}\n" for name, token in TOKENS.items()))
    return path


@dataclass
class StreamResult:
    latency: float
    first: float
    messages: int
    extents: int
    data_bytes: int


@dataclass
class LoadResult:
    streams: int
    wall: float
    results: list[StreamResult] = field(default_factory=list)
    flood_codes: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        lat = sorted(r.latency for r in self.results)
        first = sorted(r.first for r in self.results)

        def pct(xs: list[float], p: float) -> float:
            return xs[min(len(xs) - 1, int(p * len(xs)))]

        data = sum(r.data_bytes for r in self.results)
        extents = sum(r.extents for r in self.results)
        return {
            "streams": self.streams,
            "completed": len(self.results),
            "wall_s": round(self.wall, 3),
            "streams_per_s": round(len(self.results) / self.wall, 1),
            "data_MB_per_s": round(data / self.wall / 1e6, 1),
            "extents_per_s": round(extents / self.wall),
            "messages": sum(r.messages for r in self.results),
            "latency_p50_ms": round(statistics.median(lat) * 1000, 1),
            "latency_p99_ms": round(pct(lat, 0.99) * 1000, 1),
            "latency_max_ms": round(lat[-1] * 1000, 1),
            "first_message_p50_ms": round(statistics.median(first) * 1000, 1),
            "first_message_p99_ms": round(pct(first, 0.99) * 1000, 1),
            "flood": self.flood_codes,
        }


def expected_runs(offset: int, length: int) -> list[tuple[int, int, int]]:
    """Merged (offset, length, flags) of bitmap ``b`` over the range."""
    out: list[tuple[int, int, int]] = []
    pos, end = offset, offset + length
    while pos < end:
        g_end = min(end, (pos // G + 1) * G)
        flags = 1 if (pos // G) % 2 == 0 else 0
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == pos:
            out[-1] = (out[-1][0], out[-1][1] + g_end - pos, flags)
        else:
            out.append((pos, g_end - pos, flags))
        pos = g_end
    return out


async def one_stream(stub: Any, i: int) -> StreamResult:
    identity = f"agent{i % len(TOKENS)}"
    metadata = (("authorization", f"Bearer {TOKENS[identity]}"),)
    with_data = i % 5 == 0
    fields: dict[str, Any] = {"export": "disk", "context": "b", "max_extents_per_message": 16}
    offset, length = (0, SIZE)
    if with_data:
        offset, length = DATA_RANGE
        fields.update(offset=offset, length=length, include_data=True)
    start = time.monotonic()
    first = 0.0
    rows: list[tuple[int, int, int]] = []
    data = []
    messages = 0
    pos = offset
    async for msg in stub.StreamExtents(pb.StreamExtentsRequest(**fields), metadata=metadata):
        if not messages:
            first = time.monotonic() - start
        messages += 1
        assert msg.offset == pos, "a gap between messages"
        p = msg.offset
        for d, n, f in zip(msg.offset_deltas, msg.lengths, msg.flags, strict=True):
            p += d
            if rows and rows[-1][2] == f and rows[-1][0] + rows[-1][1] == p:
                rows[-1] = (rows[-1][0], rows[-1][1] + n, f)
            else:
                rows.append((p, n, f))
            p += n
        pos = msg.next_offset
        data.append(msg.data)
    latency = time.monotonic() - start
    assert pos == offset + length, f"stream {i} ended at {pos}"
    assert rows == expected_runs(offset, length), f"stream {i}: wrong extents"
    blob = b"".join(data)
    if with_data:
        assert blob == sample_pattern(offset, length), f"stream {i}: wrong data"
    return StreamResult(latency, first, messages, len(rows), len(blob))


async def flood(target: str, n: int) -> dict[str, int]:
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BitmapServiceStub(channel)

        async def bad(i: int) -> None:
            metadata = None if i % 2 else (("authorization", f"Bearer guess-{i:010d}"),)
            try:
                await stub.GetExport(pb.GetExportRequest(name="disk"), metadata=metadata)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(bad(i) for i in range(n)))
    return codes


async def run_load(target: str, streams: int, flood_calls: int = 0) -> LoadResult:
    # Several channels, as several clients would have (one HTTP/2 connection each).
    options = [("grpc.max_receive_message_length", 16 * MiB)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(4)]
    try:
        stubs = [pb_grpc.BitmapServiceStub(ch) for ch in channels]
        start = time.monotonic()
        flooding = asyncio.ensure_future(flood(target, flood_calls)) if flood_calls else None
        results = await asyncio.gather(*(one_stream(stubs[i % 4], i) for i in range(streams)))
        wall = time.monotonic() - start
        codes = await flooding if flooding is not None else {}
        return LoadResult(streams, wall, list(results), codes)
    finally:
        for ch in channels:
            await ch.close()


def rss_mib(pid: int) -> float:
    """VmRSS (resident set now) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


ALL_DATA = pb.StreamExtentsRequest(
    export="disk", context="base:allocation", filter=pb.EXTENT_FILTER_ALL, include_data=True
)


async def _held(pid: int, hold: float, peak: float) -> float:
    """The gateway's peak RSS over ``hold`` seconds."""
    end = time.monotonic() + hold
    while time.monotonic() < end:
        peak = max(peak, rss_mib(pid))
        await asyncio.sleep(0.1)
    return peak


async def slow_readers(target: str, pid: int, n: int, hold: float, settle: float) -> dict[str, Any]:
    """N data streams that stop reading after one message (those that get data budget; the
    others wait for it); the gateway's RSS around them."""
    before = rss_mib(pid)
    options = [("grpc.max_receive_message_length", 16 * MiB)]
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(4)]
    try:
        calls = []
        for i in range(n):
            stub = pb_grpc.BitmapServiceStub(channels[i % 4])
            token = TOKENS[f"agent{i % len(TOKENS)}"]
            calls.append(
                stub.StreamExtents(ALL_DATA, metadata=(("authorization", f"Bearer {token}"),))
            )
        firsts = [asyncio.ensure_future(c.read()) for c in calls]
        peak = await _held(pid, hold, before)
        streaming = sum(1 for f in firsts if f.done() and not f.exception())
        for c in calls:
            c.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
    finally:
        for ch in channels:
            await ch.close()
    await asyncio.sleep(settle)
    return {
        "slow_readers": n,
        "streaming": streaming,
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_settled_mib": round(rss_mib(pid), 1),
    }


async def raw_readers(target: str, pid: int, n: int, hold: float, settle: float) -> dict[str, Any]:
    """N data streams on one raw HTTP/2 connection with a zero receive window (the server can
    send them nothing), never read; the gateway's RSS around them."""
    from tests.gateway.raw_h2 import RawH2

    before = rss_mib(pid)
    conn = await RawH2.connect(target, window=0)
    try:
        for i in range(n):
            token = TOKENS[f"agent{i % len(TOKENS)}"]
            conn.call(
                "/nbdgw.v1.BitmapService/StreamExtents",
                {"authorization": f"Bearer {token}"},
                ALL_DATA.SerializeToString(),
            )
        peak = await _held(pid, hold, before)
        refused = dict(conn.statuses())
    finally:
        await conn.close()
    await asyncio.sleep(settle)
    return {
        "raw_readers": n,
        "ended_by_status": refused,  # grpc-status -> calls (8: a per-connection cap)
        "rss_before_mib": round(before, 1),
        "rss_peak_mib": round(peak, 1),
        "rss_settled_mib": round(rss_mib(pid), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--slow-readers", type=int, default=0, metavar="N")
    parser.add_argument("--raw-readers", type=int, default=0, metavar="N")
    parser.add_argument("--budget-mib", type=int, default=0, metavar="M")
    parser.add_argument("--hold", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--settle", type=float, default=5.0, metavar="SECONDS")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    from tests.gateway.cli_support import GatewayProcess

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        disk = make_disk(d / "disk.img")
        tokens = write_tokens(d / "tokens")
        # Slow readers hold their NBD connection: one each, or the rest would queue for one.
        readers = max(args.slow_readers, args.raw_readers)
        extra = ["--max-connections", str(readers + 4)] if readers else []
        if args.budget_mib:
            extra += ["--limit", f"buffered_data_mib={args.budget_mib}"]
            extra += ["--limit", f"buffered_data_per_identity_mib={max(1, args.budget_mib // 4)}"]
        gw = GatewayProcess(
            "--image", f"disk={disk}", "--token-file", str(tokens), *extra, data_dir=d / "gw"
        ).start()
        try:
            out = []
            for _ in range(args.rounds):
                if readers:
                    assert gw.proc is not None
                    run = raw_readers if args.raw_readers else slow_readers
                    summary = asyncio.run(
                        run(gw.target, gw.proc.pid, readers, args.hold, args.settle)
                    )
                    summary["budget_mib"] = args.budget_mib or "default"
                else:
                    summary = asyncio.run(run_load(gw.target, args.streams, args.flood)).summary()
                print(json.dumps(summary))
                out.append(summary)
        finally:
            gw.stop()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()


__all__ = [
    "LoadResult",
    "StreamResult",
    "asdict",
    "make_disk",
    "raw_readers",
    "rss_mib",
    "run_load",
    "slow_readers",
    "write_tokens",
]
