"""``nbdgw backup`` while things go wrong around it: the gateway restarts mid-backup, and a
writer races the backup's ClearRange calls. Real gateway processes over the embedded host."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli.backup import BackupState, state_path
from nbdcore.aio.client import NBDClient
from nbdcore.storage import Image
from tests.gateway.cli_support import (
    ENV,
    GRANULARITY,
    GatewayProcess,
    MiB,
    assert_one_line_error,
    check_incremental,
    cli,
    dirty_map,
    granules,
    make_embedded_disk,
)

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("retries", [8, 0])
def test_backup_across_a_gateway_restart(tmp_path: Path, retries: int) -> None:
    """The gateway stops (SIGTERM) mid-backup and comes back on the same address. With
    retries, the backup resumes its stream from the resume token, with no gap and no repeat;
    without, it fails with one line that says how to continue, and --resume does."""
    # 128 MiB dirty after the first 9 MiB: the backup is still streaming when the gateway
    # stops (its checkpoints do not hold the stream up).
    disk = make_embedded_disk(tmp_path / "disk.img", size=192 * MiB)
    image = Image.open(disk.path)
    try:
        block = random.Random(3).randbytes(MiB)
        for offset in range(48 * MiB, 176 * MiB, MiB):
            data = offset.to_bytes(8, "little") + block[8:]
            image.write(data, offset)
            disk.content[offset : offset + MiB] = data
        disk.dirty.append((48 * MiB, 128 * MiB))
        image.flush()
    finally:
        image.close()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = ["--image", f"disk={disk.path}", "--grace-period", "1"]
    first = GatewayProcess(*args, data_dir=tmp_path / "data")
    first.args[2] = f"127.0.0.1:{port}"  # --listen: the same address both times
    first.start()
    out = tmp_path / "inc.img"
    spath = state_path(out)
    cmd = ["backup", "disk", "--bitmap", "backup", str(out), "--target", first.target]
    cmd += ["--save-every", "64k", "--retries", str(retries)]
    backup = subprocess.Popen(
        [sys.executable, "-m", "gateway", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    second = GatewayProcess(*args, data_dir=tmp_path / "data")
    second.args[2] = first.args[2]
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert backup.poll() is None, backup.communicate()
            try:
                if json.loads(spath.read_text())["next_offset"] >= 9 * MiB:
                    break
            except (FileNotFoundError, ValueError):
                pass
            time.sleep(0.002)
        first.stop()  # SIGTERM: open streams end with their resume position
        if retries:
            assert backup.poll() is None, "the backup ended with the gateway"
            second.start()
            stdout, stderr = backup.communicate(timeout=60)
            assert backup.returncode == 0, stderr
            # The stream really was cut, and resumed where it stopped.
            assert "stream interrupted at " in stderr and "UNAVAILABLE" in stderr, stderr
        else:
            stdout, stderr = backup.communicate(timeout=60)
            failed = subprocess.CompletedProcess(cmd, backup.returncode, stdout, stderr)
            line = assert_one_line_error(failed, 1)
            assert "UNAVAILABLE" in line and "--resume" in line
            second.start()
            resumed = cli(*cmd, "--resume")
            assert resumed.returncode == 0, resumed.stderr
            stdout = resumed.stdout
    finally:
        if backup.poll() is None:
            backup.kill()
            backup.communicate()
        first.stop()
        second.stop()
    assert "complete" in stdout
    check_incremental(out, bytes(disk.content), granules(disk.dirty, disk.size))


@pytest.mark.parametrize("source", ["live", "snapshot"])
def test_writes_racing_a_clearing_backup_are_never_lost(tmp_path: Path, source: str) -> None:
    """A writer hammers the export while ``backup --clear`` runs. Afterwards every granule that
    was dirty or written is either dirty again in the bitmap or holds its current bytes in the
    backup. Reading the live export, a write that lands between the copy and the clear is kept
    by the conditional clear (and copied again); reading a snapshot, by the snapshot's own
    bitmap."""
    disk = make_embedded_disk(tmp_path / "disk.img")
    dirty_before = granules(disk.dirty, disk.size)
    written: set[int] = set()
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw:
        out = tmp_path / "inc.img"
        cmd = ["backup", "disk", "--bitmap", "backup", str(out), "--clear", "--target", gw.target]
        backup = subprocess.Popen(
            [sys.executable, "-m", "gateway", *cmd, "--save-every", "256k"]
            + (["--no-snapshot"] if source == "live" else []),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )

        async def writer() -> None:
            rng = random.Random(5)
            targets = [g for o, n in dirty_before for g in range(o, o + n, GRANULARITY)]
            async with await NBDClient.connect(gw.nbd_uri("disk")) as client:
                while backup.poll() is None:
                    granule = rng.choice(targets)
                    offset = granule + rng.randrange(0, GRANULARITY, 4096)
                    await client.pwrite(rng.randbytes(4096), offset)
                    written.add(granule)
                    await asyncio.sleep(0.001)

        asyncio.run(writer())
        _, stderr = backup.communicate(timeout=60)
        assert backup.returncode == 0, stderr
        still_dirty = dirty_map(gw.target, "disk", "backup")
        state = BackupState.load(state_path(out))
    assert written and state.complete
    assert state.bytes_rechecked == 0  # conditional clears, or a snapshot: no recheck pass
    # Live: writes landed between copies and clears, and the clears kept them (copied again).
    assert (state.bytes_kept > 0) == (source == "live")
    current = disk.path.read_bytes()
    backed_up = out.read_bytes()
    dirty_now = {g for o, n in still_dirty for g in range(o, o + n, GRANULARITY)}
    changed = {g for o, n in dirty_before for g in range(o, o + n, GRANULARITY)} | written
    for g in sorted(changed - dirty_now):
        end = g + GRANULARITY
        assert backed_up[g:end] == current[g:end], f"granule at {g} lost a write"
