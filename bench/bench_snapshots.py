"""Snapshot benchmarks (issue 8): ``python -m bench.bench_snapshots [--quick] [--json FILE]``.

1. create: time to snapshot a 64 GiB sparse disk with a 64 KiB-granularity bitmap (1M bits,
   a tenth dirty), and to release it.
2. write cost of copy-before-write, on a 1 GiB disk full of data (storage level, Image.write,
   no NBD): 4 KiB random writes and 1 MiB sequential writes, without a snapshot, with a fresh
   snapshot (every write preserves a 64 KiB cluster first) and with a snapshot whose clusters
   are already preserved; then 1 MiB sequential writes over NBD (our client to our server).
3. incremental cycle on a 1 GiB disk with 128 MiB of scattered dirty 64 KiB granules: ours
   (create snapshot, export it, copy its dirty extents with data over NBD, clear the fork,
   release) against qemu-nbd plus manual steps on a qcow2 with the same bitmap (the writer
   must stop: qemu-nbd -r -B BITMAP, the same copier over NBD, qemu-img bitmap --clear; qemu
   can fleece a live disk only through its monitor).

Timings are medians of a few rounds; nothing here is a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.extents import iter_extents
from nbdcore.storage import Image
from nbdcore.tools.snapshot_cmds import snapshot_export

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
G = 64 * KiB


def median_time(func: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --- 1. create -------------------------------------------------------------------------------


def bench_create(tmp: Path, rounds: int) -> dict[str, Any]:
    size = 64 * GiB
    image = Image.create(tmp / "huge.raw", size)
    try:
        bitmap = image.add_bitmap("b", granularity=G)
        rng = random.Random(1)
        for _ in range(size // G // 10):
            bitmap.mark_dirty(rng.randrange(size // G) * G, G)
        dirty = bitmap.dirty_bytes()
        creates, releases = [], []
        for i in range(rounds):
            t0 = time.perf_counter()
            image.create_snapshot(f"s{i}", bitmaps=["b"])
            t1 = time.perf_counter()
            image.release_snapshot(f"s{i}")
            t2 = time.perf_counter()
            creates.append(t1 - t0)
            releases.append(t2 - t1)
        return {
            "disk_bytes": size,
            "bitmap_dirty_bytes": dirty,
            "create_ms": round(statistics.median(creates) * 1000, 2),
            "release_ms": round(statistics.median(releases) * 1000, 2),
        }
    finally:
        image.close()


# --- 2. write cost ---------------------------------------------------------------------------


def _filled(tmp: Path, size: int) -> Image:
    path = tmp / "full.raw"
    if path.exists():
        path.unlink()
        shutil.rmtree(tmp / "full.raw.nbdgw", ignore_errors=True)
    image = Image.create(path, size)
    chunk = os.urandom(4 * MiB)
    for off in range(0, size, len(chunk)):
        image.write(chunk, off)
    image.add_bitmap("b")
    image.flush()
    return image


def bench_writes(tmp: Path, size: int, count4k: int) -> dict[str, Any]:
    rng = random.Random(2)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count4k)]
    block4k = os.urandom(4096)
    block1m = os.urandom(MiB)

    def random4k(image: Image) -> float:
        t0 = time.perf_counter()
        for off in offsets:
            image.write(block4k, off)
        return count4k / (time.perf_counter() - t0)

    def seq1m(image: Image) -> float:
        t0 = time.perf_counter()
        for off in range(0, size, MiB):
            image.write(block1m, off)
        return size / MiB / (time.perf_counter() - t0)

    out: dict[str, Any] = {"disk_bytes": size, "random_4k_writes": count4k}
    for name, func, unit in (("random_4k", random4k, "iops"), ("seq_1m", seq1m, "MiB_s")):
        image = _filled(tmp, size)
        try:
            func(image)  # warm-up: every pass below overwrites data already in the cache
            out[f"{name}_{unit}_no_snapshot"] = round(func(image))
            snap = image.create_snapshot("s", bitmaps=["b"])
            out[f"{name}_{unit}_fresh_snapshot"] = round(func(image))
            out[f"{name}_preserved_MiB"] = round(snap.used_bytes / MiB)
            out[f"{name}_{unit}_preserved_snapshot"] = round(func(image))
        finally:
            image.close()
    return out


async def bench_nbd_writes(tmp: Path, size: int) -> dict[str, Any]:
    block = os.urandom(MiB)
    out: dict[str, Any] = {}
    for with_snapshot in (False, True):
        image = _filled(tmp, size)
        sock = str(tmp / "w.sock")
        server = NBDServer([ExportConfig("disk", image)])
        await server.start_unix(sock)
        try:
            if with_snapshot:
                snap = await asyncio.to_thread(image.create_snapshot, "s", bitmaps=["b"])
                server.add_export(snapshot_export("disk", snap))
            client = await NBDClient.connect(f"nbd+unix:///disk?socket={sock}")
            try:
                t0 = time.perf_counter()
                sem = asyncio.Semaphore(8)
                offsets = range(0, size, MiB)
                await asyncio.gather(*(_pwrite(client, sem, block, off) for off in offsets))
                await client.flush()
                rate = size / MiB / (time.perf_counter() - t0)
            finally:
                await client.close()
        finally:
            await server.close()
            image.close()
        key = "with_fresh_snapshot" if with_snapshot else "no_snapshot"
        out[f"nbd_seq_1m_MiB_s_{key}"] = round(rate)
    return out


async def _pwrite(client: NBDClient, sem: asyncio.Semaphore, data: bytes, offset: int) -> None:
    async with sem:
        await client.pwrite(data, offset)


# --- 3. incremental cycle --------------------------------------------------------------------


async def copy_dirty(uri: str, bitmap: str, target: Path) -> int:
    """Copy the dirty extents of ``bitmap`` from ``uri`` into ``target``; returns bytes."""
    context = f"qemu:dirty-bitmap:{bitmap}"
    client = await NBDClient.connect(uri, meta_contexts=[context])
    copied = 0
    fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        async for batch in iter_extents(client, [context]):
            pos = batch.offset
            for length, flags in zip(batch.lengths, batch.flags[0], strict=True):
                if flags & 1:
                    end = pos + length
                    step = pos
                    while step < end:
                        n = min(4 * MiB, end - step)
                        os.pwrite(fd, await client.pread(step, n), step)
                        step += n
                    copied += length
                pos += length
    finally:
        os.close(fd)
        await client.close()
    return copied


def _dirty_writes(size: int, dirty: int) -> list[int]:
    rng = random.Random(3)
    return sorted(rng.sample(range(size // G), dirty // G))


async def cycle_ours(tmp: Path, size: int, dirty: int) -> dict[str, float]:
    image = Image.create(tmp / "ours.raw", size)
    image.add_bitmap("b", granularity=G)
    payload = os.urandom(G)
    for g in _dirty_writes(size, dirty):
        image.write(payload, g * G)
    sock = str(tmp / "ours.sock")
    server = NBDServer([ExportConfig("disk", image)])
    await server.start_unix(sock)
    try:
        t0 = time.perf_counter()
        snap = await asyncio.to_thread(image.create_snapshot, "backup", bitmaps=["b"])
        server.add_export(snapshot_export("disk", snap))
        t1 = time.perf_counter()
        copied = await copy_dirty(f"nbd+unix:///disk@backup?socket={sock}", "b", tmp / "o.bak")
        t2 = time.perf_counter()
        await asyncio.to_thread(snap.clear_bitmap_range, "b", 0, size)
        server.remove_export("disk@backup")
        await asyncio.to_thread(image.release_snapshot, "backup")
        t3 = time.perf_counter()
    finally:
        await server.close()
        image.close()
    assert copied == dirty, (copied, dirty)
    return {"prepare_s": t1 - t0, "copy_s": t2 - t1, "finish_s": t3 - t2, "total_s": t3 - t0}


def cycle_qemu(tmp: Path, size: int, dirty: int) -> dict[str, float]:
    qcow = tmp / "qemu.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), str(size)], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(G), str(qcow), "b"], check=True)
    script = "".join(f"write -P 0x5a {g * G} 64k\n" for g in _dirty_writes(size, dirty))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", str(qcow)],
        input=script.encode(),
        check=True,
        capture_output=True,
    )
    sock = str(tmp / "qemu.sock")
    t0 = time.perf_counter()
    # The writer (qemu-io here) has stopped: qemu-nbd cannot fleece a disk in use.
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-f", "qcow2", "-B", "b", "-k", sock, "-x", "disk", "-t", str(qcow)]
    )
    try:
        while not os.path.exists(sock):
            time.sleep(0.005)
        t1 = time.perf_counter()
        copied = asyncio.run(copy_dirty(f"nbd+unix:///disk?socket={sock}", "b", tmp / "q.bak"))
        t2 = time.perf_counter()
    finally:
        proc.terminate()
        proc.wait()
    subprocess.run(["qemu-img", "bitmap", "--clear", str(qcow), "b"], check=True)
    t3 = time.perf_counter()
    assert copied == dirty, (copied, dirty)
    return {"prepare_s": t1 - t0, "copy_s": t2 - t1, "finish_s": t3 - t2, "total_s": t3 - t0}


def bench_cycle(tmp: Path, size: int, dirty: int, rounds: int) -> dict[str, Any]:
    results: dict[str, list[dict[str, float]]] = {"ours": [], "qemu": []}
    for i in range(rounds):
        for name in results:
            work = tmp / f"cycle{i}-{name}"
            work.mkdir()
            if name == "ours":
                results[name].append(asyncio.run(cycle_ours(work, size, dirty)))
            else:
                results[name].append(cycle_qemu(work, size, dirty))
            shutil.rmtree(work)
    out: dict[str, Any] = {"disk_bytes": size, "dirty_bytes": dirty}
    for name, rows in results.items():
        for key in rows[0]:
            out[f"{name}_{key}"] = round(statistics.median(r[key] for r in rows), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller disks, fewer rounds")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument(
        "--only", choices=("create", "writes", "nbd_writes", "cycle"), help="one part only"
    )
    args = parser.parse_args()
    size = 256 * MiB if args.quick else GiB
    rounds = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="nbdgw-bench-snap-", dir=os.environ.get("TMPDIR")))
    try:
        parts: dict[str, Callable[[], dict[str, Any]]] = {
            "create": lambda: bench_create(tmp, 3 if args.quick else 7),
            "writes": lambda: bench_writes(tmp, size, 5000 if args.quick else 20000),
            "nbd_writes": lambda: asyncio.run(bench_nbd_writes(tmp, size)),
            "cycle": lambda: bench_cycle(tmp, size, size // 8, rounds),
        }
        figures = {name: part() for name, part in parts.items() if args.only in (None, name)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
