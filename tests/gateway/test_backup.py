"""``nbdgw backup`` through real gateway processes: incremental and full backups equal the source,
a backup killed at a random point resumes exactly, and with --clear the bitmap ends clean."""

from __future__ import annotations

import contextlib
import io
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.backup import BackupError, BackupState, DirtyMap, map_path, state_path
from nbdcore.storage import Image
from nbdcore.tools.progress import Progress, human_bytes
from tests.gateway.cli_support import (
    ENV,
    GRANULARITY,
    EmbeddedDisk,
    GatewayProcess,
    MiB,
    QemuDisk,
    QemuNBD,
    assert_one_line_error,
    check_incremental,
    cli,
    dirty_map,
    granules,
    is_hole,
    make_embedded_disk,
    make_qemu_disk,
    run,
    run_and_kill,
)
from tests.peers import tool

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def qemu_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, QemuDisk]]:
    tmp = tmp_path_factory.mktemp("backup-qemu")
    host = QemuNBD(make_qemu_disk(tmp), tmp / "qemu.sock").start()
    gw = GatewayProcess("--export", f"vm={host.uri}", data_dir=tmp / "data")
    try:
        yield gw.start(), host.disk
    finally:
        gw.stop()
        host.stop()


@pytest.fixture
def embedded_gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    disk = make_embedded_disk(tmp_path / "disk.img")
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw:
        yield gw, disk


def test_incremental_backup_from_qemu_nbd(
    qemu_gateway: tuple[GatewayProcess, QemuDisk], tmp_path: Path
) -> None:
    gw, disk = qemu_gateway
    dirty = dirty_map(gw.target, "vm", "b0")
    assert dirty == granules(disk.b0_writes, disk.size)
    out = tmp_path / "inc.img"
    proc = cli("backup", "vm", "--bitmap", "b0", str(out), "--target", gw.target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar when stderr is not a terminal
    assert "complete" in proc.stdout
    check_incremental(out, disk.raw.read_bytes(), dirty)
    # qemu-io's write -z made dirty ranges that read as zeroes: holes, no bytes moved.
    assert is_hole(out, 8 * MiB, 512 * 1024)
    assert is_hole(out, 12 * MiB, 64 * 1024)
    state = BackupState.load(state_path(out))
    assert state.complete and state.next_offset == disk.size and not state.clear
    data_bytes = sum(n for o, n in dirty if not is_hole(disk.raw, o, n))
    assert state.bytes_written == data_bytes


def test_full_backup_from_qemu_nbd(
    qemu_gateway: tuple[GatewayProcess, QemuDisk], tmp_path: Path
) -> None:
    gw, disk = qemu_gateway
    out = tmp_path / "full.img"
    proc = cli("backup", "vm", "--full", str(out), "--target", gw.target)
    assert proc.returncode == 0, proc.stderr
    compare = subprocess.run(
        [tool("qemu-img"), "compare", "-q", "-f", "raw", "-F", "raw", str(out), str(disk.raw)]
    )
    assert compare.returncode == 0
    assert out.stat().st_blocks * 512 < disk.size // 2  # sparse: holes stay holes


@pytest.mark.parametrize("seed", [11, 12])
def test_killed_backup_with_clear_resumes_and_leaves_bitmap_clean(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path, seed: int
) -> None:
    gw, disk = embedded_gateway
    dirty = dirty_map(gw.target, "disk", "backup")
    assert dirty == granules(disk.dirty, disk.size)
    out = tmp_path / "inc.img"
    args = ["backup", "disk", "--bitmap", "backup", str(out), "--clear", "--target", gw.target]
    # The live export, whose bitmap clears as the backup goes (test_snapshot*.py: snapshots).
    args += ["--no-snapshot"]
    # Checkpoints every 64 KiB: many points at which to die.
    args += ["--save-every", "64k"]
    rng = random.Random(seed)
    threshold = rng.randrange(dirty[1][0], dirty[-2][0])
    killed = run_and_kill(args, state_path(out), threshold, disk.size)
    killed_at = killed["next_offset"]
    assert killed_at >= threshold

    # Some of the bitmap is clear now, but only what is behind the recorded progress: what is
    # still dirty lies ahead of it, or is recorded as still to clear.
    left = dirty_map(gw.target, "disk", "backup")
    assert left and left != dirty
    pending = [(o, o + n) for o, n in killed["pending_clear"]]
    for off, n in left:
        if off + n <= killed_at:
            assert any(lo <= off and off + n <= hi for lo, hi in pending), (off, n, pending)

    again = cli("backup", "disk", "--bitmap", "backup", str(out), "--target", gw.target)
    assert_one_line_error(again, 1)  # exists: a fresh backup must not overwrite it
    # --resume alone: the state file says which bitmap, and that the backup clears.
    resumed = cli("backup", "disk", str(out), "--resume", "--target", gw.target)
    assert resumed.returncode == 0, resumed.stderr
    check_incremental(out, bytes(disk.content), dirty)
    assert is_hole(out, 4 * MiB + 128 * 1024, 256 * 1024)  # dirty but zero
    assert dirty_map(gw.target, "disk", "backup") == []
    state = BackupState.load(state_path(out))
    assert state.complete and state.clear and state.pending_clear == []
    assert state.bytes_cleared >= sum(n for o, n in dirty if o >= killed_at)
    # The live export hands out clear tokens: the clears were conditional, so nothing had to
    # be read again after them, and nothing wrote meanwhile, so nothing was kept.
    assert state.bytes_rechecked == 0 and state.bytes_kept == 0
    # Resuming a complete backup is a no-op.
    done = cli(*args, "--resume")
    assert done.returncode == 0 and "already complete" in done.stderr

    # The bitmap is clean now: only the map says what changed. Laid over an older image (here
    # 0xAA everywhere), it gives the disk in every dirty range, zeroed ranges included, and
    # leaves the rest alone.
    base = tmp_path / "base.img"
    base.write_bytes(b"\xaa" * disk.size)
    restored = cli("restore", str(base), str(out))
    assert restored.returncode == 0, restored.stderr
    got, want = base.read_bytes(), bytes(disk.content)
    pos = 0
    for off, n in dirty:
        assert got[pos:off] == b"\xaa" * (off - pos), pos
        assert got[off : off + n] == want[off : off + n], off
        pos = off + n
    assert got[pos:] == b"\xaa" * (disk.size - pos)
    assert want[4 * MiB + 128 * 1024 : 4 * MiB + 384 * 1024] == bytes(256 * 1024)


def test_killed_full_backup_resumes_equal_to_source(
    qemu_gateway: tuple[GatewayProcess, QemuDisk], tmp_path: Path
) -> None:
    gw, disk = qemu_gateway
    out = tmp_path / "full.img"
    args = ["backup", "vm", "--full", str(out), "--target", gw.target, "--save-every", "64k"]
    threshold = random.Random(7).randrange(1 * MiB, 4 * MiB)
    run_and_kill(args, state_path(out), threshold, disk.size)
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    run(tool("qemu-img"), "compare", "-q", "-f", "raw", "-F", "raw", str(out), str(disk.raw))


def test_backup_refusals_are_one_line_and_touch_nothing(
    qemu_gateway: tuple[GatewayProcess, QemuDisk], tmp_path: Path
) -> None:
    gw, _ = qemu_gateway
    t = ["--target", gw.target]
    out = tmp_path / "b.img"
    line = assert_one_line_error(cli("backup", "vm", "--bitmap", "b0", str(out), "--clear", *t), 1)
    assert "cannot be cleared" in line
    line = assert_one_line_error(cli("backup", "vm", "--bitmap", "nosuch", str(out), *t), 1)
    assert "no context 'qemu:dirty-bitmap:nosuch'" in line
    line = assert_one_line_error(cli("backup", "nosuch", "--bitmap", "b0", str(out), *t), 1)
    assert "[EXPORT_NOT_FOUND]" in line
    line = assert_one_line_error(cli("backup", "vm", "--bitmap", "b0", str(out), "--resume", *t), 1)
    assert "nothing to resume" in line
    assert list(tmp_path.iterdir()) == []  # nothing written by any refusal

    assert cli("backup", "vm", "--bitmap", "b1", str(out), *t).returncode == 0
    # Interrupted midway (by hand), and its map lost: resuming would leave a map without the
    # ranges already copied.
    saved = state_path(out).read_text()
    partial = json.loads(saved) | {"complete": False, "next_offset": 1 << 20}
    state_path(out).write_text(json.dumps(partial))
    map_path(out).rename(tmp_path / "map.bak")
    line = assert_one_line_error(cli("backup", "vm", "--bitmap", "b1", str(out), "--resume", *t), 1)
    assert "nbdgw-dirty is missing" in line and not map_path(out).exists()
    state_path(out).write_text(saved)
    line = assert_one_line_error(cli("backup", "vm", "--bitmap", "b0", str(out), "--resume", *t), 1)
    assert "different settings" in line
    line = assert_one_line_error(
        cli("backup", "vm", "--bitmap", "b1", str(out), "--full", "--resume", *t), 1
    )
    assert "different settings" in line
    state_path(out).write_text('{"version": 1, "size": "x"}')
    line = assert_one_line_error(cli("backup", "vm", "--bitmap", "b1", str(out), "--resume", *t), 1)
    assert "not a usable backup state file" in line


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Terminal(), io.StringIO()
    for stream in (tty, pipe):
        progress = Progress(4 * MiB, stream=stream)
        progress.update(2 * MiB, force=True)
        progress.close()
    assert pipe.getvalue() == ""
    assert "2.0 MiB of 4.0 MiB copied   50.0%" in tty.getvalue()
    assert "ETA" in tty.getvalue() and tty.getvalue().endswith("\n")
    forced = io.StringIO()
    Progress(None, stream=forced, enabled=True).close()
    assert forced.getvalue().startswith("\r0 B copied")


def test_clear_of_a_fragmented_bitmap(tmp_path: Path) -> None:
    """4650 dirty runs (more than one checkpoint holds): 4500 a granule apart, cleared in few
    calls (the clean gaps between them are cleared too, conditionally: a write that lands
    there is kept, so the gaps need no copy), and 150 far apart, one call each, beyond the
    gateway's ClearRange rate limit (its RESOURCE_EXHAUSTED and RetryInfo are honoured)."""
    config = tmp_path / "gateway.toml"
    config.write_text("[limits]\nclear_rate = 100\nclear_burst = 20\n")
    path = tmp_path / "frag.img"
    image = Image.create(path, 1 << 30)
    near = [i * 2 * GRANULARITY for i in range(4500)]
    far = [600 * MiB + i * 4 * GRANULARITY for i in range(150)]
    gap_data = b"clean data between two dirty granules\n" * 100
    try:
        image.write(gap_data, 3 * GRANULARITY)  # before the bitmap: clean
        bitmap = image.add_bitmap("backup", granularity=GRANULARITY)
        for offset in near + far:  # dirty granules without data: no bytes to move, only runs
            bitmap.mark_dirty(offset, 4096)
        image.flush()
    finally:
        image.close()
    args = ["--image", f"frag={path}", "--config", str(config)]
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        assert len(dirty_map(gw.target, "frag", "backup")) == 4650
        out = tmp_path / "frag.bak"
        args = ["backup", "frag", "--bitmap", "backup", str(out), "--clear", "--target", gw.target]
        done = cli(*args, "--save-every", "1G", "--no-snapshot")  # the live export's gaps
        assert done.returncode == 0, done.stderr
        assert dirty_map(gw.target, "frag", "backup") == []
    state = BackupState.load(state_path(out))
    assert state.complete and state.pending_clear == []
    assert state.bytes_written == 0 and state.bytes_rewritten == 0
    assert state.bytes_gap_copied == 0 and state.bytes_kept == 0
    # The clean gap's data is not part of the incremental: nothing changed there.
    assert is_hole(out, 0, 1 << 29)
    # ... and the map names exactly the dirty runs, not the gaps between them.
    _, runs = DirtyMap.load(map_path(out))
    assert not any(o <= 3 * GRANULARITY < o + n for o, n in runs)
    assert sum(n for _, n in runs) == (4500 + 150) * GRANULARITY
    assert not any(o < 600 * MiB + 4 * GRANULARITY <= o + n for o, n in runs if o > 300 * MiB)


def test_dirty_map_file(tmp_path: Path) -> None:
    """Appends survive reopening; a partial last line (a crash mid-append, never fsync'd) is
    cut off; another backup's map and a damaged one are refused, naming the file."""
    path = tmp_path / "out.img.nbdgw-dirty"
    header = {"format": "nbdgw-dirty-map", "version": 1, "export": "e", "context": "c"}
    header |= {"size": 1 << 20, "full": False}
    m = DirtyMap(path, header)
    m.add([[0, 4096], [8192, 4096]])
    m.sync()
    m.close()
    with path.open("ab") as f:
        f.write(b"65536 40")  # torn append
    m = DirtyMap(path, header)
    m.add([[4096, 4096], [65536, 4096]])
    m.sync()
    m.close()
    assert DirtyMap.load(path) == (header, [(0, 12288), (65536, 4096)])
    with pytest.raises(BackupError, match="records size"):
        DirtyMap(path, header | {"size": 2 << 20})
    other = tmp_path / "other.nbdgw-dirty"
    other.write_text('{"format": "nbdgw-dirty-map", "version": 1, "size": 1048576}\n')
    with pytest.raises(BackupError, match="records export None"):
        DirtyMap(other, header)
    path.write_text(path.read_text() + "1048576 1\n")
    with pytest.raises(BackupError, match="line 6: bad range"):
        DirtyMap.load(path)
    with pytest.raises(BackupError, match="is missing"):
        DirtyMap.load(tmp_path / "nosuch")
    full = DirtyMap(tmp_path / "full", header | {"full": True})
    full.close()
    assert DirtyMap.load(tmp_path / "full")[1] == [(0, 1 << 20)]


def test_full_backup_from_nbdkit(tmp_path: Path) -> None:
    """nbdkit offers only base:allocation: a full backup copies its data, keeps its holes, and
    equals what nbdcopy copies from the same host."""
    sock = tmp_path / "nbdkit.sock"
    layout = "( 0x11 * 65536 ) @1048576 ( 0x22 0x33 * 2048 ) @4194304 ( 0x44 * 131072 )"
    host = subprocess.Popen(
        [tool("nbdkit"), "--foreground", "-U", str(sock), "data", layout, "size=8M"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"nbd+unix:///?socket={sock}"
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([tool("nbdinfo"), "--size", uri], capture_output=True).returncode:
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        reference = tmp_path / "nbdcopy.img"
        run(tool("nbdcopy"), uri, str(reference))
        with GatewayProcess("--export", f"kit={uri}", data_dir=tmp_path / "data") as gw:
            out = tmp_path / "full.img"
            proc = cli("backup", "kit", "--full", str(out), "--target", gw.target)
            assert proc.returncode == 0, proc.stderr
            incremental = cli("backup", "kit", "--bitmap", "x", str(tmp_path / "i.img"),
                              "--target", gw.target)  # fmt: skip
            assert "no context 'qemu:dirty-bitmap:x'" in assert_one_line_error(incremental, 1)
    finally:
        host.terminate()
        host.wait(10)
    assert out.read_bytes() == reference.read_bytes()
    # nbdkit's data plugin allocates in 32 KiB pages: the 4 KiB in the middle is a 32 KiB extent.
    assert BackupState.load(state_path(out)).bytes_written == 65536 + 32768 + 131072
    assert is_hole(out, 65536, (1 << 20) - 65536) and is_hole(out, 5 << 20, 3 << 20)


def test_restore_refusals_are_one_line_and_touch_nothing(
    qemu_gateway: tuple[GatewayProcess, QemuDisk], tmp_path: Path
) -> None:
    gw, disk = qemu_gateway
    out = tmp_path / "inc.img"
    assert cli("backup", "vm", "--bitmap", "b0", str(out), "--target", gw.target).returncode == 0
    base = tmp_path / "base.img"
    base.write_bytes(b"\x55" * disk.size)
    small = tmp_path / "small.img"
    small.write_bytes(b"\x55" * 4096)

    line = assert_one_line_error(cli("restore", str(small), str(out)), 1)
    assert "-byte disk" in line
    line = assert_one_line_error(cli("restore", str(base), str(tmp_path / "nosuch.img")), 1)
    assert "is no nbdgw backup" in line
    state = json.loads(state_path(out).read_text())
    state_path(out).write_text(json.dumps(state | {"complete": False}))
    # The good one first: nothing is applied unless every backup named is usable.
    line = assert_one_line_error(cli("restore", str(base), str(out), str(out)), 1)
    assert "is incomplete" in line
    state_path(out).write_text(json.dumps(state))
    map_path(out).rename(tmp_path / "map")
    line = assert_one_line_error(cli("restore", str(base), str(out)), 1)
    assert "nbdgw-dirty is missing" in line
    assert base.read_bytes() == b"\x55" * disk.size and small.read_bytes() == b"\x55" * 4096
    (tmp_path / "map").rename(map_path(out))
    done = cli("restore", str(base), str(out))
    assert done.returncode == 0, done.stderr
    assert base.read_bytes() != b"\x55" * disk.size


def test_restore_creates_a_new_disk_and_checks_the_chain(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    """A full backup and an incremental laid into a disk that did not exist: the disk as it
    was; the same backups out of order, or starting with the incremental, are refused before
    anything is written."""
    gw, disk = embedded_gateway
    t = ["--target", gw.target]
    full, inc = tmp_path / "full.img", tmp_path / "inc.img"
    assert cli("backup", "disk", "--full", str(full), "--no-snapshot", *t).returncode == 0
    assert (
        cli("backup", "disk", "--bitmap", "backup", str(inc), "--no-snapshot", *t).returncode == 0
    )

    new = tmp_path / "new.img"
    line = assert_one_line_error(cli("restore", str(new), str(inc), str(full)), 1)
    assert "a new disk starts from a full backup" in line and not new.exists()
    base = tmp_path / "base.img"
    base.write_bytes(b"\x55" * disk.size)
    line = assert_one_line_error(cli("restore", str(base), str(inc), str(full)), 1)
    assert f"{full} was taken" in line and "list the backups oldest first" in line
    assert base.read_bytes() == b"\x55" * disk.size

    restored = cli("restore", str(new), str(full), str(inc))
    assert restored.returncode == 0, restored.stderr
    assert new.read_bytes() == bytes(disk.content)


def test_progress_counts_the_data_to_copy(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    """--progress on a pipe: an incremental counts up to the bitmap's dirty bytes (not the
    disk's size), a restore up to what it lays; --no-progress draws nothing."""
    gw, disk = embedded_gateway
    t = ["--target", gw.target]
    dirty = sum(n for _, n in granules(disk.dirty, disk.size))
    out = tmp_path / "inc.img"
    done = cli("backup", "disk", "--bitmap", "backup", str(out), "--progress", *t)
    assert done.returncode == 0, done.stderr
    last = done.stderr.split("\r")[-1].splitlines()[0]
    assert last.startswith(f"{human_bytes(dirty)} of {human_bytes(dirty)} copied  100.0%"), last
    quiet = cli(
        "backup", "disk", "--bitmap", "backup", str(tmp_path / "q.img"), "--no-progress", *t
    )
    assert quiet.returncode == 0 and "\r" not in quiet.stderr

    full = tmp_path / "full.img"
    assert cli("backup", "disk", "--full", str(full), *t).returncode == 0
    laid = cli("restore", str(tmp_path / "new.img"), str(full), "--progress")
    assert laid.returncode == 0, laid.stderr
    assert f"of {human_bytes(disk.size)} laid  100.0%" in laid.stderr


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    """SIGINT in the middle of a backup: exit 130, one line saying what is saved and how to
    go on; the same command with --resume then completes it. The gateway is frozen (SIGSTOP)
    once 8 MiB are written, so the backup is surely mid-stream when the signal comes: waiting
    for the first progress in the state file instead, which follows the fsyncs, the 256 MiB had
    all been streamed by then in a CI run of 2026-12-08 (exit 0)."""
    size = 256 * MiB
    disk = tmp_path / "disk.img"
    image = Image.create(disk, size)
    try:
        block = random.Random(7).randbytes(MiB)
        for offset in range(0, size, MiB):
            image.write(offset.to_bytes(8, "little") + block[8:], offset)  # each MiB its own
        image.flush()
    finally:
        image.close()
    out = tmp_path / "full.img"
    with GatewayProcess("--image", f"disk={disk}", data_dir=tmp_path / "data") as gw:
        args = ["backup", "disk", "--full", str(out), "--target", gw.target]
        args += ["--no-snapshot", "--save-every", "1M"]
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        try:
            # Under way: 8 MiB written (the progress in the state file comes later: it waits
            # for the fsyncs, which can take longer than the whole stream).
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(FileNotFoundError):
                    if out.stat().st_blocks * 512 >= 8 * MiB:
                        break
                time.sleep(0.002)
            assert gw.proc is not None
            gw.proc.send_signal(signal.SIGSTOP)  # the rest of the stream waits for it
            try:
                assert proc.poll() is None, "the backup ended before it was interrupted"
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=60)
            finally:
                gw.proc.send_signal(signal.SIGCONT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err
        assert "nbdgw backup: interrupted; the progress up to" in err
        assert "run the same command with --resume to continue" in err
        assert "Traceback" not in err
        resumed = cli("backup", "disk", str(out), "--resume", "--target", gw.target)
        assert resumed.returncode == 0, resumed.stderr
    with out.open("rb") as f:
        for offset in range(0, size, MiB):
            assert f.read(MiB) == offset.to_bytes(8, "little") + block[8:], offset
