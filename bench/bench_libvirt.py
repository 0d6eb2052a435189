"""libvirt-managed VM benchmarks (issue 13): ``python -m bench.bench_libvirt [--quick]
[--json FILE]``. A real libvirtd (started as the tests start it, tests/libvirt_env.py) and a
``type='qemu'`` (TCG) domain running the tiny guest, mostly idle, with one qcow2 disk full of
data; the gateway in-process in front of it as a ``libvirt`` host.

1. snapshot: CreateSnapshot and ReleaseSnapshot (a pull-mode backup job started and ended by
   libvirt), full and incremental since a checkpoint that creates a new one.
2. backup: ``nbdgw backup --full`` through a snapshot (create, copy, release) against
   ``nbdcopy`` reading libvirt's own NBD export of the same disk (a pull backup begun directly
   through libvirt, timed from backupBegin to the end of the copy), as a ratio in one run.

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
from gateway.hosts.libvirt import backup_xml
from gateway.server import Gateway
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.libvirt_env import LibvirtVM, libvirtd

MiB = 1 << 20


def _fill(vm: LibvirtVM, size: int) -> None:
    """vda full of data (not zeroes: nothing to skip)."""
    raw = vm.folder / "data.raw"
    with raw.open("wb") as f:
        block = bytes(range(256)) * (MiB // 256)
        for i in range(size // MiB):
            f.write(block[i % 256 :] + block[: i % 256])
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(vm.image("vda"))],
        check=True,
    )
    raw.unlink()
    vm.image("vda").chmod(0o666)


def _data_dir() -> Path:
    data = Path(tempfile.mkdtemp(prefix="nbdgw-bench-lv-"))
    data.chmod(0o755)  # QEMU (libvirt-qemu) reaches DATA_DIR/libvirt through it
    return data


def _remove(folder: Path, pattern: str) -> None:
    for p in folder.glob(pattern):
        p.unlink()


def _abort(vm: LibvirtVM) -> None:
    vm.dom.abortJob()
    while vm.backup_job():  # libvirt ends the job asynchronously
        time.sleep(0.05)


async def _gateway(uri: str, vm: LibvirtVM, data: Path) -> tuple[Gateway, grpc.aio.Channel, str]:
    config = GatewayConfig(data_dir=data, listen="127.0.0.1:0")
    config.add_libvirt_export("d0", uri, vm.name, "vda")
    gw = Gateway(config)
    listening = await gw.start()
    target = f"127.0.0.1:{listening.port}"
    return gw, grpc.aio.insecure_channel(target), target


async def run(uri: str, rounds: int, size: int) -> dict[str, Any]:
    vm = LibvirtVM("nbdgw-bench", count=1000, pause=5.0, size=size // MiB)
    vm.start()  # defines it with empty disks: fill vda, then restart it
    vm.dom.destroy()
    await asyncio.to_thread(_fill, vm, size)
    vm.dom.create()
    data = await asyncio.to_thread(_data_dir)
    gw, channel, target = await _gateway(uri, vm, data)
    snaps = spb_grpc.SnapshotServiceStub(channel)
    creates: dict[str, list[float]] = {"full": [], "incremental": []}
    releases: dict[str, list[float]] = {"full": [], "incremental": []}
    ours, theirs = [], []
    try:
        for r in range(rounds):
            for kind in ("full", "incremental"):
                since = f"c{r}" if kind == "incremental" else ""
                new = f"c{r + 1}" if kind == "incremental" else f"c{r}"
                t0 = time.perf_counter()
                await snaps.CreateSnapshot(
                    spb.CreateSnapshotRequest(
                        parent="d0", snapshot_id=f"{kind}{r}", since_checkpoint=since,
                        checkpoint_id=new if kind == "incremental" or r == 0 else "",
                    )
                )  # fmt: skip
                creates[kind].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await snaps.ReleaseSnapshot(
                    spb.ReleaseSnapshotRequest(name=f"exports/d0/snapshots/{kind}{r}")
                )
                releases[kind].append(time.perf_counter() - t0)
        for r in range(rounds):
            out = data / f"ours{r}.img"
            t0 = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "backup", "d0", str(out), "--full",
                "--target", target, stdout=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            assert await proc.wait() == 0
            ours.append(time.perf_counter() - t0)
            await asyncio.to_thread(_remove, data, f"ours{r}.img*")
            # libvirt's own export: a pull backup begun directly, read by nbdcopy.
            sock = vm.folder / "direct.sock"
            scratch = vm.folder / "direct.scratch"
            xml = backup_xml(sock, {"vda": ("vda", "", scratch)}, ["vda"], "")
            copy = data / f"nbdcopy{r}.img"
            t0 = time.perf_counter()
            await asyncio.to_thread(vm.dom.backupBegin, xml, None, 0)
            proc = await asyncio.create_subprocess_exec(
                "nbdcopy", f"nbd+unix:///vda?socket={sock}", str(copy)
            )
            assert await proc.wait() == 0
            theirs.append(time.perf_counter() - t0)
            await asyncio.to_thread(_abort, vm)
            copy.unlink()
    finally:
        await channel.close()
        await gw.stop(grace=0)
        vm.stop()
        shutil.rmtree(data, ignore_errors=True)
    o, t = statistics.median(ours), statistics.median(theirs)
    return {
        "snapshot": {
            kind: {
                "create_s": statistics.median(creates[kind]),
                "release_s": statistics.median(releases[kind]),
            }
            for kind in creates
        },
        "backup": {
            "disk": f"{size // MiB} MiB qcow2 full of data",
            "ours_s": o,
            "ours_MiB_s": size / MiB / o,
            "nbdcopy_s": t,
            "nbdcopy_MiB_s": size / MiB / t,
            "ratio_ours_over_nbdcopy_time": o / t,
            "ratio_ours_over_nbdcopy_throughput": t / o,  # as docs/benchmarks.md shows it
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, a smaller disk")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    daemons = libvirtd()
    uri = next(daemons)
    try:
        results = asyncio.run(run(uri, 1 if args.quick else 3, (256 if args.quick else 1024) * MiB))
    finally:
        daemons.close()  # stops the daemons it started
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
