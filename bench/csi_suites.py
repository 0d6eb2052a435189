"""CSI GetMetadataDelta against StreamExtents on the same bitmap (docs/kubernetes-cbt.md).

The fixture is an nbdcore Image with a checkpoint chain c0 -> c1 whose c0 bitmap has N dirty
granules, every other one (N = 1,048,576 ranges in the full set). ``python -m gateway serve``
serves it with ``--csi-socket``; one side drains GetMetadataDelta(disk/c0, disk/c1) over the unix
socket (one BlockMetadata message per range: no packed columns), the other drains StreamExtents
of c0's bitmap (packed columns, every extent clean or dirty). Both figures are the N changed
ranges learnt per second: what the CSI shape costs against the project's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import procs
from bench.fixtures import GRANULE, Fixture, Fixtures
from bench.gateway_suites import free_port, gateway_ready
from bench.harness import MEXT_S, Benchmark, NotAvailable, Row
from bench.suites import Sides, mext_s

BASE, TARGET = "c0", "c1"


def delta_image(fx: Fixtures) -> Fixture:
    """The checkpoint chain: c0 (stopped recording, N dirty granules), c1 (recording, clean)."""
    try:
        from nbdcore.storage import Image, checkpoint  # type: ignore[attr-defined]
    except ImportError as exc:
        raise NotAvailable(f"checkpoints on nbdcore images have not landed ({exc})") from None
    bitmap_name = checkpoint.CHECKPOINT_BITMAP.format
    ranges = 2 * fx.sizes.image_dirty
    name = f"csi-delta-{ranges}"
    if cached := fx._cached(name):
        return cached
    size = 2 * ranges * GRANULE
    fx._log(f"building {name}: {ranges:,} changed ranges over {size >> 30} GiB (nbdcore)")
    start = time.monotonic()
    final, tmp = fx.dir / name, fx.dir / (name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    image = Image.create(tmp / "disk.raw", size)
    try:
        # c0 records the writes (a disabled bitmap marks nothing), then stops as c1 starts.
        c0 = image.add_bitmap(bitmap_name(seq=1, id=BASE), granularity=GRANULE)
        for i in range(ranges):
            c0.mark_dirty(2 * i * GRANULE, GRANULE)
        image.disable_bitmap(c0.name)
        image.add_bitmap(bitmap_name(seq=2, id=TARGET), granularity=GRANULE)
    finally:
        image.close()
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    bitmap = bitmap_name(seq=1, id=BASE)
    fixture = Fixture(
        name, str(final / "disk.raw"), size, ranges, bitmap, round(time.monotonic() - start, 1)
    )
    return fx._store(fixture)


@contextmanager
def csi_gateway(image: str, work: Path) -> Iterator[tuple[str, str]]:
    """The gateway serving ``image`` as ``disk`` with the CSI socket; (HOST:PORT, socket)."""
    target = f"127.0.0.1:{free_port()}"
    sock = str(work / "csi.sock")
    cmd = [sys.executable, "-m", "gateway", "serve", "--listen", target, "--csi-socket", sock]
    cmd += ["--image", f"disk={image}", "--data-dir", str(work / "gateway-data")]
    with procs.background(
        cmd, gateway_ready(target), log=work / "gateway.log", env=procs.worker_env()
    ):
        yield target, sock


def csi_delta(fx: Fixtures) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        image = delta_image(fx)
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            target, sock = stack.enter_context(csi_gateway(image.file, work))

            def csi() -> float:
                argv = [sys.executable, "-m", "bench.csi_suites", sock]
                proc = subprocess.run(
                    [*argv, "--expect", str(image.extents)],
                    capture_output=True, env=procs.worker_env(), timeout=600, check=True,
                    cwd=procs.ROOT,
                )  # fmt: skip
                r = json.loads(proc.stdout.decode().strip().splitlines()[-1])
                return mext_s(r["ranges"], r["seconds"])

            def stream() -> float:
                ctx = f"qemu:dirty-bitmap:{image.bitmap}"
                r = procs.run_worker("stream-extents", target, "--context", ctx)
                return mext_s(image.extents, r["seconds"])  # the same N changed ranges learnt

            yield {"GetMetadataDelta": csi, "StreamExtents": stream}

    n = 2 * fx.sizes.image_dirty
    return Benchmark(
        name="csi-delta",
        title=f"CSI GetMetadataDelta of {n:,} changed ranges vs StreamExtents of the same bitmap",
        metric=MEXT_S,
        setup=setup,
        rows=[
            Row(
                "GetMetadataDelta (unix socket, VARIABLE_LENGTH) / StreamExtents: M ranges/s",
                "GetMetadataDelta",
                "StreamExtents",
            )
        ],
    )


def benchmarks(fx: Fixtures) -> list[Benchmark]:
    return [csi_delta(fx)]


# --- the client side: python -m bench.csi_suites SOCKET --expect N --------------------------------


async def _drain(sock: str, expect: int) -> dict[str, float]:
    import grpc

    from nbdgw.csi.v1 import csi_pb2 as cpb
    from nbdgw.csi.v1 import csi_pb2_grpc as cpb_grpc

    request = cpb.GetMetadataDeltaRequest(
        base_snapshot_id=f"disk/{BASE}", target_snapshot_id=f"disk/{TARGET}"
    )
    start = time.perf_counter()
    ranges = messages = 0
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        async for msg in cpb_grpc.SnapshotMetadataStub(channel).GetMetadataDelta(request):
            messages += 1
            ranges += len(msg.block_metadata)
    seconds = time.perf_counter() - start
    if ranges != expect:
        raise SystemExit(f"GetMetadataDelta gave {ranges} ranges, expected {expect}")
    return {"seconds": seconds, "ranges": ranges, "messages": messages}


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.csi_suites")
    p.add_argument("socket")
    p.add_argument("--expect", type=int, required=True)
    args = p.parse_args()
    print(json.dumps(asyncio.run(_drain(args.socket, args.expect))), flush=True)


if __name__ == "__main__":
    main()
