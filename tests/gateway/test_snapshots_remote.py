"""Snapshots of exports of a separate nbdcore host (``nbdgw nbd serve`` in its own process),
taken through NBD_OPT_X_NBDGW_SNAPSHOT; a qemu-nbd host has none (SNAPSHOTS_NOT_SUPPORTED) and
``nbdgw backup`` reads it live, as before. The backup loop survives kill -9 of the host."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from nbdcore.storage import Image
from nbdcore.storage.snapshot import MAX_SNAPSHOTS, default_max_bytes
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.cli_support import ENV, QemuNBD, cli, hold_mid_backup, make_qemu_disk
from tests.gateway.test_snapshot_crash import WRITER, apply
from tests.peers import wait_listening

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
G = 64 * 1024
SIZE = 16 * MiB


class Host:
    """``nbdgw nbd serve DISK --export disk`` on a unix socket, in its own process."""

    def __init__(
        self, disk: Path, sock: Path, extra: tuple[str, ...] = ("--allow-snapshots",)
    ) -> None:
        self.disk, self.sock, self.extra = disk, sock, extra
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Host:
        # After kill -9 the socket file is left behind: nbd serve replaces it itself.
        cmd = [sys.executable, "-m", "nbdcore.tools.server_cmds", str(self.disk)]
        self.proc = subprocess.Popen(
            [*cmd, "--socket", str(self.sock), "--export", "disk", *self.extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        wait_listening(self.proc, sock=self.sock)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.communicate(timeout=20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=20)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///disk?socket={self.sock}"


def make_disk(path: Path) -> bytes:
    rng = random.Random(3)
    with Image.create(path, SIZE) as image:
        image.write(rng.randbytes(SIZE).replace(b"\0", b"\1"), 0)
        image.add_bitmap("b", granularity=G)
        image.write(b"\2" * 3 * G, 5 * G)
        return image.read(0, SIZE)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    make_disk(tmp_path / "disk.img")
    h = Host(tmp_path / "disk.img", tmp_path / "host.sock").start()
    try:
        yield h
    finally:
        h.stop()


def dirty(image: Image) -> set[int]:
    b = image.bitmaps["b"]
    return {g for o, n, f in b.extents(0, SIZE) if f for g in range(o // G, -(-(o + n) // G))}


async def test_remote_nbdcore_host_takes_snapshots(
    start_gateway: Any, tmp_path: Path, host: Host
) -> None:
    qemu = QemuNBD(make_qemu_disk(tmp_path), tmp_path / "qemu.sock").start()
    try:
        config = GatewayConfig(data_dir=tmp_path / "data")
        config.add_uri_export("disk", host.uri)
        config.add_uri_export("vm", qemu.uri)
        run = await start_gateway(config)
        stub = spb_grpc.SnapshotServiceStub(run.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="vm", bitmaps=["b0"]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not take snapshots" in (info.value.details() or "")

        snap = await stub.CreateSnapshot(
            spb.CreateSnapshotRequest(parent="disk", snapshot_id="r1", bitmaps=["b"])
        )
        assert snap.export == "exports/disk@r1"
        assert [(f.context, f.dirty_bytes) for f in snap.forks] == [("qemu:dirty-bitmap:b", 3 * G)]
        bitmaps = await run.stub.ListBitmaps(pb.ListBitmapsRequest(parent="disk@r1"))
        fork = {b.context: b for b in bitmaps.bitmaps}["qemu:dirty-bitmap:b"]
        assert fork.clear_mode == pb.CLEAR_MODE_AT_SOURCE  # through the NBD clear extension
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="r1"))
        assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS

        # qemu-nbd: backup reads it live, silently; the nbdcore host: from a snapshot.
        proc = await asyncio.to_thread(
            cli, "backup", "vm", str(tmp_path / "vm.bak"), "--bitmap", "b0", "--target", run.target
        )
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert "snapshot" not in proc.stdout
        out = tmp_path / "disk.bak"
        proc = await asyncio.to_thread(
            cli, "backup", "disk", str(out), "--bitmap", "b", "--clear", "--snapshot", "r1",
            "--target", run.target,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert out.read_bytes()[5 * G : 8 * G] == b"\2" * 3 * G
        listed = await stub.ListSnapshots(spb.ListSnapshotsRequest(parent="disk"))
        assert list(listed.snapshots) == []  # the backup released it
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/r1"))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        proc = await asyncio.to_thread(
            cli, "backup", "disk", str(tmp_path / "auto.bak"), "--bitmap", "b",
            "--target", run.target,
        )  # fmt: skip
        assert proc.returncode == 0 and "(snapshot backup-" in proc.stdout, proc.stderr
    finally:
        qemu.stop()
    host.stop()
    with Image.open(host.disk, read_only=True) as image:
        assert not image.snapshots and dirty(image) == set()


async def test_kill9_of_the_host_in_the_backup_loop(
    start_gateway: Any, tmp_path: Path, host: Host
) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_uri_export("disk", host.uri)
    run = await start_gateway(config)
    with Image.open(host.disk, read_only=True) as image:
        restored = bytearray(image.read(0, SIZE))  # the full backup
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, host.uri, "5", env=ENV
    )
    rng = random.Random(8)
    midway = 0
    try:
        for round_ in range(3):
            out = tmp_path / f"inc{round_}.img"
            spath = out.with_name(out.name + ".nbdgw-backup.json")
            args = ["backup", "disk", str(out), "--bitmap", "b", "--clear", "--retries", "1"]
            args += ["--save-every", "128k", "--target", run.target]
            await asyncio.sleep(1.0)  # dirty granules all over the disk: the backup has work
            backup = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", *args, env=ENV,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            # Held (SIGSTOP) at a checkpoint past a random offset, its snapshot recorded and
            # work left: the kill of the host lands mid-backup by construction.
            state = await asyncio.to_thread(
                hold_mid_backup, backup.pid, spath, rng.randrange(1, SIZE // 3)
            )
            assert state["snapshot"].startswith("backup-") and not state["complete"]
            midway += 1
            host.kill()
            os.kill(backup.pid, signal.SIGCONT)
            await backup.wait()  # fails, or completes after its retries
            host.start()
            for _ in range(50):  # the gateway notices the host is back
                resumed = await asyncio.to_thread(
                    cli, *args, *(["--resume"] if spath.exists() else [])
                )
                if resumed.returncode == 0:
                    break
                assert "UNAVAILABLE" in resumed.stderr, resumed.stderr
                await asyncio.sleep(0.2)
            assert resumed.returncode == 0, resumed.stderr
            apply(restored, out)  # from its dirty map: the writer zeroes ranges too
    finally:
        writer.kill()
        await writer.wait()
    host.stop()
    with Image.open(host.disk, read_only=True) as image:
        assert not image.snapshots
        live = image.read(0, SIZE)
        marked = dirty(image)
    assert midway == 3  # every kill hit a backup in progress
    differ = {
        g for g in range(SIZE // G) if restored[g * G : (g + 1) * G] != live[g * G : (g + 1) * G]
    }
    assert differ <= marked, (
        f"{len(differ - marked)} granules lost, e.g. {sorted(differ - marked)[:5]}"
    )


async def test_snapshot_management_is_opt_in_and_limited(
    start_gateway: Any, tmp_path: Path
) -> None:
    """``nbd serve`` without --allow-snapshots answers no NBD client's snapshot request (the
    gateway says SNAPSHOTS_NOT_SUPPORTED and backs up live); with it, a snapshot gets the default
    size limit, and an export holds at most MAX_SNAPSHOTS (RESOURCE_EXHAUSTED)."""
    make_disk(tmp_path / "disk.img")
    closed = Host(tmp_path / "disk.img", tmp_path / "closed.sock", extra=()).start()
    try:
        config = GatewayConfig(data_dir=tmp_path / "data")
        config.add_uri_export("disk", closed.uri)
        run = await start_gateway(config)
        stub = spb_grpc.SnapshotServiceStub(run.channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", bitmaps=["b"]))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not take snapshots" in (info.value.details() or "")
        proc = await asyncio.to_thread(
            cli, "backup", "disk", str(tmp_path / "live.bak"), "--bitmap", "b",
            "--target", run.target,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "(snapshot " not in proc.stdout
    finally:
        closed.stop()
    with Image.open(tmp_path / "disk.img", read_only=True) as image:
        assert not image.snapshots

    opened = Host(tmp_path / "disk.img", tmp_path / "open.sock").start()
    try:
        config = GatewayConfig(data_dir=tmp_path / "data2")
        config.add_uri_export("disk", opened.uri)
        run = await start_gateway(config)
        stub = spb_grpc.SnapshotServiceStub(run.channel)
        for i in range(MAX_SNAPSHOTS):
            snap = await stub.CreateSnapshot(
                spb.CreateSnapshotRequest(parent="disk", snapshot_id=f"s{i}")
            )
            assert snap.max_preserved_bytes == default_max_bytes(SIZE)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="x"))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "release one" in (info.value.details() or "")
        await stub.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/disk/snapshots/s0"))
        await stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="x"))
    finally:
        opened.stop()
