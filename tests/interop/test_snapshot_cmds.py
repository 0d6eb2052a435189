"""``nbdgw disk snapshot create|list|release`` as a user runs them (through gateway.cli.main)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from nbdcore.storage import Image
from tests.peers import tool, wait_listening


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with Image.create(path, 4 * 1024 * 1024) as image:
        image.add_bitmap("b")
        image.add_bitmap("c", granularity=4096)
        image.write(b"x" * 70000, 0)
    return path


def test_create_list_release(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "snapshot", "create", str(disk), "s1", "--bitmap", "b", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["name"] == "s1" and list(created["forks"]) == ["b"]
    assert created["forks"]["b"]["dirty_bytes"] == 131072
    assert main(["disk", "snapshot", "create", str(disk), "s2", "--max-size", "1M"]) == 0
    assert "forked b, c" in capsys.readouterr().out

    with Image.open(disk) as image:  # the live bitmaps restarted clean; a write preserves
        assert image.bitmaps["b"].dirty_bytes() == 0
        image.write(b"y" * 10, 5)

    assert main(["disk", "snapshot", "list", str(disk), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["s1", "s2"]
    assert [r["used_bytes"] for r in rows] == [65536, 65536]
    assert rows[1]["max_bytes"] == 1024 * 1024
    assert main(["disk", "snapshot", "list", str(disk)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["NAME", "CREATED"]
    assert "b(131072)" in table

    assert main(["disk", "snapshot", "release", str(disk), "s1"]) == 0
    assert main(["disk", "snapshot", "release", str(disk), "s1"]) == 1
    err = capsys.readouterr().err
    assert (
        err.strip() == "nbdgw disk snapshot release: no snapshot named 's1'"
        " (never created, or released already)"
    )
    with Image.open(disk, read_only=True) as image:
        assert sorted(image.snapshots) == ["s2"]
        # s1's fork (the first 128 KiB) merged back, plus the write since.
        assert image.bitmaps["b"].dirty_bytes() == 131072


def test_errors_are_one_line(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["disk", "snapshot", "create", str(disk), "s", "--bitmap", "nope"]) == 1
    assert capsys.readouterr().err == "nbdgw disk snapshot create: no bitmap named 'nope'\n"
    assert main(["disk", "snapshot", "create", str(disk), "bad/name"]) == 1
    assert "snapshot name" in capsys.readouterr().err
    assert main(["disk", "snapshot", "list", str(disk)]) == 0
    assert "no snapshots" in capsys.readouterr().out
    with Image.open(disk):  # a server holds the image: the command says so
        assert main(["disk", "snapshot", "create", str(disk), "s"]) == 1
        assert "in use" in capsys.readouterr().err


def test_nbd_serve_exports_snapshots_while_qemu_io_writes(disk: Path, tmp_path: Path) -> None:
    """``nbdgw disk snapshot create`` then ``nbdgw nbd serve``: the snapshot is the read-only export
    ``disk@s1``, which qemu-img copies as it was while qemu-io rewrites the live export."""
    with Image.open(disk) as image:
        frozen = image.read(0, image.size)
    assert main(["disk", "snapshot", "create", str(disk), "s1"]) == 0
    sock = tmp_path / "nbd.sock"
    cmd = [sys.executable, "-m", "nbdcore.tools.server_cmds", str(disk), "--socket", str(sock)]
    server = subprocess.Popen(
        [*cmd, "--export", "disk"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_listening(server, sock=sock)
        uri = f"nbd+unix:///disk?socket={sock}"
        listed = json.loads(
            subprocess.run(
                [tool("nbdinfo"), "--list", "--json", uri], capture_output=True, check=True
            ).stdout
        )
        assert sorted(e["export-name"] for e in listed["exports"]) == ["disk", "disk@s1"]
        script = "".join(f"write -P 0x{i + 1:02x} {i * 256 * 1024} 256k\n" for i in range(16))
        writer = subprocess.Popen(
            [tool("qemu-io"), "-f", "raw", uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(script.encode())  # qemu-io writes while qemu-img reads
        writer.stdin.close()
        copy = tmp_path / "copy.raw"
        snap_uri = f"nbd+unix:///disk@s1?socket={sock}"
        subprocess.run(
            [tool("qemu-img"), "convert", "-f", "raw", "-O", "raw", snap_uri, str(copy)],
            check=True,
        )
        out = writer.stdout.read()
        assert writer.wait(60) == 0 and out.count(b"wrote 262144/262144") == 16
        assert copy.read_bytes() == frozen
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=20)
    with Image.open(disk, read_only=True) as image:
        assert image.read(0, 256 * 1024) == b"\x01" * 256 * 1024
        assert image.snapshot("s1").read(0, len(frozen)) == frozen
        assert image.bitmaps["b"].dirty_bytes() == 4 * 1024 * 1024  # exactly qemu-io's writes
