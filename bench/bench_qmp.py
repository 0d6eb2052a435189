"""Running-VM benchmarks (issue 12): ``python -m bench.bench_qmp [--quick] [--qemu 7|10]
[--json FILE]``. A guest-less QEMU (TCG) with qcow2 disks, the gateway in-process in front of
it as a ``qmp`` host.

1. snapshot: CreateSnapshot and ReleaseSnapshot of a 64 GiB disk whose bitmap is fragmented
   (every 8th 64 KiB granule dirty: 131072 runs); half of the fork acknowledged (ClearRange of
   every other dirty granule) before the release, so that the precise merge-back has work.
2. backup: ``nbdgw backup --full`` of a 1 GiB disk full of data through a snapshot (the
   default loop: create, copy, release) against ``nbdcopy`` from the same QEMU NBD server (the
   gateway's read-only export of the disk), as a ratio in one run.

Timings are medians of a few rounds; nothing here is a test. Figures for the record are taken
by the lead on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from gateway.config import GatewayConfig
from gateway.server import Gateway
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.qemu_vm import GuestlessVM

MiB = 1 << 20
GiB = 1 << 30
G = 64 << 10


def _fragment(path: Path, size: int, every: int) -> int:
    """Add bitmap ``b`` to the image and dirty every ``every``-th granule (write-zeroes: it
    dirties the bitmap and stores no data); returns the dirty bytes."""
    subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(G), str(path), "b"], check=True)
    script = "".join(f"write -z {off} {G}\n" for off in range(0, size, every * G))
    subprocess.run(
        ["qemu-io", "-f", "qcow2", str(path)],
        input=script.encode(),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return (size // (every * G)) * G


async def _gateway(tmp: Path, vm: GuestlessVM) -> tuple[Gateway, grpc.aio.Channel, str]:
    config = GatewayConfig(data_dir=tmp / "data", listen="127.0.0.1:0")
    config.add_qmp_export("d0", str(vm.qmp_path), "drive0")
    gw = Gateway(config)
    listening = await gw.start()
    target = f"127.0.0.1:{listening.port}"
    return gw, grpc.aio.insecure_channel(target), target


async def bench_snapshot(tmp: Path, version: str, rounds: int, every: int) -> dict[str, Any]:
    vm = GuestlessVM(tmp / "vm64", version, size=64 * GiB)
    vm.create_disks()
    dirty = await asyncio.to_thread(_fragment, vm.disks[0].path, 64 * GiB, every)
    vm.start()
    gw, channel, _ = await _gateway(tmp / "g1", vm)
    stub, snaps = pb_grpc.BitmapServiceStub(channel), spb_grpc.SnapshotServiceStub(channel)
    creates, releases, merged = [], [], []
    # A frozen copy of the bitmap: each round starts from the same fragmented bitmap.
    vm.cmd("block-dirty-bitmap-add", node="drive0", name="orig", disabled=True)
    vm.cmd("block-dirty-bitmap-merge", node="drive0", target="orig", bitmaps=["b"])
    try:
        for r in range(rounds):
            t0 = time.perf_counter()
            snap = await snaps.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="d0", snapshot_id=f"s{r}", bitmaps=["b"])
            )
            creates.append(time.perf_counter() - t0)
            assert snap.forks[0].dirty_bytes == dirty
            # The first half of the disk acknowledged (one call): the release merges back the
            # other half's runs precisely.
            await stub.ClearRange(
                pb.ClearRangeRequest(export=f"d0@s{r}", bitmap="b", offset=0, length=32 * GiB)
            )
            t0 = time.perf_counter()
            done = await snaps.ReleaseSnapshot(
                spb.ReleaseSnapshotRequest(name=f"exports/d0/snapshots/s{r}")
            )
            releases.append(time.perf_counter() - t0)
            merged.append(done.merged[0].dirty_bytes)
            vm.cmd("block-dirty-bitmap-clear", node="drive0", name="b")
            vm.cmd("block-dirty-bitmap-merge", node="drive0", target="b", bitmaps=["orig"])
    finally:
        await channel.close()
        await gw.stop(grace=0)
        vm.stop()
    return {
        "disk": "64 GiB qcow2, granularity 64 KiB",
        "dirty_bytes": dirty,
        "dirty_runs": dirty // G,
        "create_s": statistics.median(creates),
        "release_s": statistics.median(releases),
        "merged_back_bytes": merged[0],
        "merged_back_runs": merged[0] // G,
    }


def _data_disk(vm: GuestlessVM, raw: Path, size: int) -> None:
    vm.folder.mkdir(parents=True, exist_ok=True)
    with raw.open("wb") as f:
        block = bytes(range(256)) * (MiB // 256)
        for i in range(size // MiB):
            f.write(block[i % 256 :] + block[: i % 256])
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vm.disks[0].path)],
        check=True,
    )
    raw.unlink()
    subprocess.run(
        ["qemu-img", "bitmap", "--add", "-g", str(G), str(vm.disks[0].path), "b"], check=True
    )


def _remove(folder: Path, pattern: str) -> None:
    for p in folder.glob(pattern):
        p.unlink()


async def bench_backup(tmp: Path, version: str, rounds: int, size: int) -> dict[str, Any]:
    vm = GuestlessVM(tmp / "vm1", version, size=size)
    await asyncio.to_thread(_data_disk, vm, tmp / "data.raw", size)
    vm.start()
    gw, channel, target = await _gateway(tmp / "g2", vm)
    host = next(iter(gw.hosts.values()))
    uri = f"nbd+unix:///d0?socket={host.nbd_socket}"  # type: ignore[attr-defined]
    ours, theirs = [], []
    try:
        for r in range(rounds):
            out = tmp / f"ours{r}.img"
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "backup", "d0", str(out), "--full",
                "--bitmap", "b", "--target", target,
                stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert await proc.wait() == 0
            ours.append(time.perf_counter() - t0)
            await asyncio.to_thread(_remove, tmp, f"ours{r}.img*")
            copy = tmp / f"nbdcopy{r}.img"
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec("nbdcopy", uri, str(copy))
            assert await proc.wait() == 0
            theirs.append(time.perf_counter() - t0)
            copy.unlink()
    finally:
        await channel.close()
        await gw.stop(grace=0)
        vm.stop()
    o, t = statistics.median(ours), statistics.median(theirs)
    return {
        "disk": f"{size // MiB} MiB qcow2 full of data",
        "ours_s": o,
        "ours_MiB_s": size / MiB / o,
        "nbdcopy_s": t,
        "nbdcopy_MiB_s": size / MiB / t,
        "ratio_ours_over_nbdcopy_time": o / t,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="nbdgw-bench-qmp-"))
    try:
        rounds = 1 if args.quick else 3
        return {
            "qemu": args.qemu,
            "snapshot": await bench_snapshot(tmp, args.qemu, rounds, every=8),
            "backup": await bench_backup(
                tmp, args.qemu, rounds, (256 if args.quick else 1024) * MiB
            ),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, a smaller backup disk")
    p.add_argument("--qemu", choices=("7", "10"), default="10")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    results = asyncio.run(main_async(args))
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
