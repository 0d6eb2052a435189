"""Real NBD clients against ``nbdgw nbd serve``: nbdinfo, nbdcopy, qemu-img, qemu-io (7.2, 10).

The server runs as a subprocess (the CLI as a user runs it); the image is made with
nbdcore.storage so the expected bitmaps are known exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.storage.image import Image
from tests.peers import LIBNBD_PYTHONPATH, ROOT, qemu10, tool, wait_listening

pytestmark = pytest.mark.interop

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
B0_DIRTY = [(64 * KiB, 64 * KiB), (MiB, 192 * KiB), (4 * MiB, 64 * KiB)]


def run(*cmd: str, input: bytes | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, input=input, timeout=60)
    assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    return proc.stdout.decode()


class Served:
    def __init__(self, tmp: Path, disk: Path, *extra: str, export: str = "disk") -> None:
        self.sock = str(tmp / "nbd.sock")
        self.uri = f"nbd+unix:///{export}?socket={self.sock}"
        self.disk = disk
        cmd = [sys.executable, "-m", "nbdcore.tools.server_cmds", str(disk), "--socket", self.sock]
        cmd += ["--export", export, *extra]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy()
        )
        wait_listening(self.proc, sock=self.sock)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=20)
        return err.decode()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """b0 (64 KiB granules) dirty at [64K, 128K), [1M, 1M+192K) and [4M, 4M+64K); b1 (1 MiB
    granules) dirty at [4M, 5M); ``fresh`` clean; data at 64K, 1M and 4M, the rest a hole."""
    path = tmp_path / "disk.raw"
    img = Image.create(path, SIZE)
    try:
        img.add_bitmap("b0", granularity=64 * KiB)
        img.write(b"\x11" * 1000, 70 * KiB)
        img.write(b"\x22" * (130 * KiB), MiB + 60 * KiB)
        img.add_bitmap("b1", granularity=MiB)
        img.write(b"\x33" * 10, 4 * MiB + 5)
        img.add_bitmap("fresh")
    finally:
        img.close()
    return path


@pytest.fixture
def served(tmp_path: Path, image: Path) -> Iterator[Served]:
    srv = Served(tmp_path, image)
    yield srv
    srv.stop()


def nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    out = run(tool("nbdinfo"), "--json", f"--map={context}", uri)
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]


def dirty_runs(uri: str, bitmap: str) -> list[tuple[int, int]]:
    return [(o, n) for o, n, t in nbdinfo_map(uri, f"qemu:dirty-bitmap:{bitmap}") if t & 1]


def test_nbdinfo_list_shows_every_bitmap(served: Served) -> None:
    out = json.loads(run(tool("nbdinfo"), "--json", "--list", served.uri))
    (export,) = out["exports"]
    assert export["export-name"] == "disk"
    assert export["export-size"] == SIZE
    assert sorted(export["contexts"]) == [
        "base:allocation",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:b1",
        "qemu:dirty-bitmap:fresh",
    ]
    assert export["can_multi_conn"] is True and export["is_read_only"] is False


def test_nbdinfo_map_each_bitmap(served: Served) -> None:
    assert dirty_runs(served.uri, "b0") == B0_DIRTY
    assert dirty_runs(served.uri, "b1") == [(4 * MiB, MiB)]
    assert dirty_runs(served.uri, "fresh") == []
    # The map covers the export exactly, without gaps.
    m = nbdinfo_map(served.uri, "qemu:dirty-bitmap:b0")
    assert m[0][0] == 0 and sum(n for _, n, _ in m) == SIZE
    alloc = nbdinfo_map(served.uri, "base:allocation")
    assert sum(n for _, n, _ in alloc) == SIZE
    data = [(o, n) for o, n, t in alloc if t == 0]
    assert any(o <= 70 * KiB < o + n for o, n in data)
    assert all(t == 3 for o, n, t in alloc if o >= 8 * MiB)


def test_qemu_io_writes_dirty_exactly_their_granules(served: Served) -> None:
    script = "write -P 0x44 0 1k\nwrite -P 0x55 200k 70k\nwrite -z 2M 64k\nread -P 0x55 200k 70k\n"
    out = run(tool("qemu-io"), "-f", "raw", served.uri, input=script.encode())
    assert "read 71680/71680" in out
    assert dirty_runs(served.uri, "fresh") == [
        (0, 64 * KiB),
        (192 * KiB, 128 * KiB),
        (2 * MiB, 64 * KiB),
    ]


def test_nbdcopy_both_directions(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    run(tool("nbdcopy"), served.uri, str(out))
    assert out.read_bytes() == served.disk.read_bytes()
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4))
    run(tool("nbdcopy"), str(src), served.uri)
    back = tmp_path / "back.raw"
    run(tool("nbdcopy"), served.uri, str(back))
    assert back.read_bytes() == src.read_bytes()
    # Every byte was written, so every granule of ``fresh`` is dirty.
    assert dirty_runs(served.uri, "fresh") == [(0, SIZE)]


def test_qemu_img_map_compare_convert(served: Served, tmp_path: Path) -> None:
    qimg = tool("qemu-img")

    def segments(target: str) -> list[tuple[int, int, bool, bool]]:
        out = json.loads(run(qimg, "map", "-f", "raw", "--output=json", target))
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in out]

    assert segments(served.uri) == segments(str(served.disk))
    out = run(qimg, "compare", "-f", "raw", "-F", "raw", served.uri, str(served.disk))
    assert "identical" in out
    conv = tmp_path / "conv.qcow2"
    run(qimg, "convert", "-f", "raw", "-O", "qcow2", served.uri, str(conv))
    run(qimg, "compare", "-f", "qcow2", "-F", "raw", str(conv), str(served.disk))
    # compare notices a difference too (the assertion above could not pass vacuously).
    proc = subprocess.run(
        [qimg, "compare", "-f", "raw", "-F", "raw", served.uri, str(tmp_path / "other.raw")],
        capture_output=True,
    )
    assert proc.returncode != 0


def test_qemu_img_map_of_dirty_bitmap(served: Served) -> None:
    """qemu's x-dirty-bitmap trick: the bitmap shows up as 'data: false' where dirty."""
    opts = f"driver=nbd,server.type=unix,server.path={served.sock},export=disk"
    out = run(
        tool("qemu-img"),
        "map",
        "--output=json",
        "--image-opts",
        opts + ",x-dirty-bitmap=qemu:dirty-bitmap:b1",
    )
    dirty = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    assert dirty == [(4 * MiB, MiB)]


@pytest.mark.parametrize("which", ["qemu-io", "qemu-img"])
def test_qemu10_extended_headers(served: Served, which: str) -> None:
    if which == "qemu-io":
        script = "write -P 0x66 5M 4k\nread -P 0x66 5M 4k\nread -P 0 9M 64k\n"
        out = run(qemu10("qemu-io"), "-f", "raw", served.uri, input=script.encode())
        assert "read 65536/65536" in out and "failed" not in out
        assert (5 * MiB, 64 * KiB) in dirty_runs(served.uri, "fresh")
    else:
        opts = f"driver=nbd,server.type=unix,server.path={served.sock},export=disk"
        out = run(
            qemu10("qemu-img"),
            "map",
            "--output=json",
            "--image-opts",
            opts + ",x-dirty-bitmap=qemu:dirty-bitmap:b0",
        )
        dirty = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
        assert dirty == B0_DIRTY
        out = run(
            qemu10("qemu-img"), "compare", "-f", "raw", "-F", "raw", served.uri, str(served.disk)
        )
        assert "identical" in out


def test_read_only_export(tmp_path: Path, image: Path) -> None:
    srv = Served(tmp_path, image, "--read-only", "--bitmap", "b1")
    try:
        out = json.loads(run(tool("nbdinfo"), "--json", srv.uri))
        (export,) = out["exports"]
        assert export["is_read_only"] is True
        assert sorted(export["contexts"]) == ["base:allocation", "qemu:dirty-bitmap:b1"]
        proc = subprocess.run(
            [tool("qemu-io"), "-f", "raw", srv.uri, "-c", "write 0 4k"],
            capture_output=True,
        )
        assert b"write failed" in proc.stdout + proc.stderr or proc.returncode != 0
    finally:
        srv.stop()


def test_libnbd_commands(served: Served) -> None:
    """nbdsh (python3-libnbd) drives every command, with the flags libnbd checks itself."""
    script = "\n".join(
        [
            "import nbd",
            "assert h.can_cache() and h.can_fast_zero() and h.can_multi_conn() and h.can_df()",
            "h.cache(65536, 0)",
            "h.pwrite(b'\\x99' * 8192, 6 * 1024 * 1024, nbd.CMD_FLAG_FUA)",
            "assert h.pread(8192, 6 * 1024 * 1024) == b'\\x99' * 8192",
            "h.zero(65536, 7 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO)",
            "try:",
            "    h.zero(65536, 7 * 1024 * 1024, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)",
            "    raise SystemExit('fast zero without holes should fail')",
            "except nbd.Error as e:",
            "    assert e.errno == 'ENOTSUP', e",
            "h.trim(4096, 6 * 1024 * 1024)",
            "h.flush()",
            "assert h.pread(65536, 7 * 1024 * 1024) == bytes(65536)",
            "try:",
            "    h.pread(2, h.get_size() - 1)",
            "    raise SystemExit('read past the end should fail')",
            "except nbd.Error as e:",
            "    assert e.errno == 'EINVAL', e",
            "print('ok')",
        ]
    )
    env = dict(os.environ, PYTHONPATH=LIBNBD_PYTHONPATH)
    proc = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import nbd, sys; h = nbd.NBD(); "
            f"h.connect_uri({served.uri!r}); exec(sys.stdin.read())",
        ],
        input=script.encode(),
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == b"ok", proc.stderr
    assert (6 * MiB, 64 * KiB) in dirty_runs(served.uri, "fresh")
    assert (7 * MiB, 64 * KiB) in dirty_runs(served.uri, "fresh")


@pytest.mark.parametrize("qemu", ["7.2", "10"])
def test_qemu_img_convert_into_the_server(served: Served, tmp_path: Path, qemu: str) -> None:
    """qemu-img writes through the server (pre-zeroing with FAST_ZERO, skipping zero areas);
    the export then equals the source."""
    qimg = qemu10("qemu-img") if qemu == "10" else tool("qemu-img")
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(MiB) + os.urandom(3 * MiB) + bytes(SIZE - 4 * MiB))
    run(qimg, "convert", "-n", "-f", "raw", "-O", "raw", str(src), served.uri)
    out = run(qimg, "compare", "-f", "raw", "-F", "raw", served.uri, str(src))
    assert "identical" in out
    # The random data went through the server, so its granules are dirty.
    assert any(o <= MiB and o + n >= 4 * MiB for o, n in dirty_runs(served.uri, "fresh"))
