"""kill -9 in the backup loop: a gateway process (with its embedded host: one process) serves a
disk that a writer keeps writing over NBD; ``nbdgw backup --clear`` runs from a snapshot; the
gateway, and sometimes the backup too, is killed with SIGKILL while the backup is held at a
checkpoint past a random offset (so that every kill lands mid-backup, which the test asserts),
restarted, and the backup finished with ``--resume``. The chain of backups restored, and the
disk, may differ only where the live bitmap is dirty, and a last backup makes them equal: no
dirty block is ever lost."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli.backup import DirtyMap, OutputImage, apply_incremental, map_path
from nbdcore.storage import Image
from tests.gateway.cli_support import ENV, GatewayProcess, hold_mid_backup

pytestmark = pytest.mark.interop

MiB = 1024 * 1024
G = 64 * 1024
SIZE = 24 * MiB

# Writes random non-zero data, and now and then zeroes a range (which may punch a hole: a dirty
# range a backup holds as a hole, which only its dirty map tells from an unchanged one), until
# killed; reconnects whenever the gateway goes away.
WRITER = r"""
import asyncio, random, sys
from nbdcore.aio.client import NBDClient

async def main(uri, seed):
    rng = random.Random(seed)
    while True:
        try:
            client = await NBDClient.connect(uri)
        except Exception:
            await asyncio.sleep(0.05)
            continue
        try:
            while True:
                length = rng.choice((4096, 65536, rng.randrange(1, 200_000)))
                offset = rng.randrange(client.size - length)
                if rng.random() < 0.2:
                    await client.zero(offset, length)
                else:
                    await client.pwrite(bytes([rng.randrange(1, 256)]) * length, offset)
                await asyncio.sleep(0.002)
        except Exception:
            pass
        finally:
            try:
                await client.close()
            except Exception:
                pass

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def backup_cmd(target: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "gateway", "backup", "disk", str(out), "--bitmap", "b", "--clear",
        "--save-every", "256k", "--retries", "2", "--target", target, *extra,
    ]  # fmt: skip


def apply(restored: bytearray, out: Path) -> None:
    """Lay an incremental backup over the restored disk as ``nbdgw restore`` does: the ranges
    its dirty map records, holes as zeroes (laying only its data ranges would keep old bytes
    where the writer zeroed)."""
    base = out.with_name("restored.img")
    base.write_bytes(restored)
    _, runs = DirtyMap.load(map_path(out))
    image = OutputImage(base, len(restored), create=False)
    try:
        apply_incremental(image, out, runs)
    finally:
        image.close()
    restored[:] = base.read_bytes()


def dirty_granules(image: Image) -> set[int]:
    return {
        g
        for o, n, f in image.bitmaps["b"].extents(0, SIZE)
        if f
        for g in range(o // G, -(-(o + n) // G))
    }


def differing(restored: bytearray, live: bytes) -> set[int]:
    return {
        g for g in range(SIZE // G) if restored[g * G : (g + 1) * G] != live[g * G : (g + 1) * G]
    }


def restart(disk: Path, data_dir: Path) -> GatewayProcess:
    """A new gateway on the disk; once more if the first attempt did not come up (a loaded
    machine), so that the test is about what the gateway finds, not how fast it starts."""
    try:
        return GatewayProcess("--image", f"disk={disk}", data_dir=data_dir).start()
    except AssertionError:
        time.sleep(1)
        return GatewayProcess("--image", f"disk={disk}", data_dir=data_dir).start()


def test_kill9_in_the_backup_loop_loses_no_dirty_block(tmp_path: Path) -> None:
    rng = random.Random(77)
    disk = tmp_path / "disk.img"
    with Image.create(disk, SIZE) as image:
        image.write(rng.randbytes(SIZE).replace(b"\0", b"\1"), 0)
        image.add_bitmap("b", granularity=G)
        restored = bytearray(image.read(0, SIZE))  # the full backup: the bitmap is clean
    gw = GatewayProcess("--image", f"disk={disk}", data_dir=tmp_path / "data").start()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, gw.nbd_uri("disk"), "1"], env=ENV, cwd=Path.cwd()
    )
    kills = midway = 0
    try:
        for round_ in range(3):
            out = tmp_path / f"inc{round_}.img"
            time.sleep(1.0)  # dirty granules all over the disk, so the backup has work
            backup = subprocess.Popen(
                backup_cmd(gw.target, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            # Kill while the backup runs, by construction: the backup is held (SIGSTOP) at a
            # checkpoint past a random offset, with its snapshot recorded and work left.
            spath = out.with_name(out.name + ".nbdgw-backup.json")
            state = hold_mid_backup(backup.pid, spath, rng.randrange(1, SIZE // 3))
            assert state["snapshot"].startswith("backup-") and not state["complete"]
            midway += 1
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGKILL)
            gw.proc.wait()
            kills += 1
            if rng.random() < 0.5:
                backup.kill()  # the consumer dies too
            os.kill(backup.pid, signal.SIGCONT)  # a no-op on a killed one
            backup.communicate(timeout=60)
            gw.stop()
            gw = restart(disk, tmp_path / "data")
            args = ["--resume"] if spath.exists() else []
            proc = subprocess.run(
                backup_cmd(gw.target, out, *args), env=ENV, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            assert "(snapshot backup-" in proc.stdout or "already complete" in proc.stderr
            apply(restored, out)
    finally:
        writer.kill()
        writer.wait()
    # A write the writer sent just before it died may still land: a stopped gateway has
    # applied all it will. It comes back for the last backup.
    gw.stop()
    gw = restart(disk, tmp_path / "data")
    # At rest: the chain differs from the disk only where the live bitmap is dirty.
    with Image.open(disk, read_only=True) as image:
        assert list(image.snapshots) == []
        live = image.read(0, SIZE)
        dirty = dirty_granules(image)
    differ = differing(restored, live)
    assert differ <= dirty, (
        f"{len(differ - dirty)} granules lost, e.g. {sorted(differ - dirty)[:5]}"
    )
    # One last backup with the disk at rest: the chain then equals the disk.
    out = tmp_path / "last.img"
    proc = subprocess.run(
        backup_cmd(gw.target, out), env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    gw.stop()
    with Image.open(disk, read_only=True) as image:
        assert not image.snapshots  # every backup released its snapshot
        assert image.read(0, SIZE) == live  # nothing wrote since
        assert dirty_granules(image) == set()  # the last backup cleared what it copied
    apply(restored, out)
    assert differing(restored, live) == set()
    assert kills == midway == 3  # every kill hit a backup in progress
