"""``nbdgw nbd serve`` as a user runs it (TCP, errors), and nbdcore's own client against the
server (the BLOCK_STATUS filter payload, which no qemu tool sends)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.storage.image import Image
from tests.peers import ROOT, qemu10, tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
SERVE = [sys.executable, "-m", "nbdcore.tools.server_cmds"]


def test_serve_tcp_port_zero(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    img = Image.create(disk, 4 * MiB)
    img.add_bitmap("b0")
    img.write(b"z" * 10, 0)
    img.close()
    proc = subprocess.Popen(
        [*SERVE, str(disk), "--listen", "127.0.0.1:0", "--export", "x", "--read-only"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"nbd://127\.0\.0\.1:(\d+)/x", line)
        assert match, line
        out = subprocess.run(
            [tool("nbdinfo"), "--map=qemu:dirty-bitmap:b0", match.group(0)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[:4] == ["0", "65536", "1", "dirty"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_serve_read_only_warns_when_another_process_writes(tmp_path: Path) -> None:
    """A read-only server copies the bitmaps when it opens: writes by the process that has the
    image open for writing are not in them. An incremental backup from it would miss them, so
    it says so; without a writer (the common case) it says nothing."""
    disk = tmp_path / "d.raw"
    Image.create(disk, 4 * MiB).close()
    writer = Image.open(disk)
    writer.add_bitmap("b0")

    def serve() -> str:
        proc = subprocess.Popen(
            [*SERVE, str(disk), "--listen", "127.0.0.1:0", "--export", "x", "--read-only"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert "nbd://" in proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        return err

    try:
        assert "open for writing by another process" in serve()
    finally:
        writer.close()
    assert "open for writing" not in serve()
    # A read-only open never blocks the writer that comes next.
    reader = Image.open(disk, read_only=True)
    try:
        assert not reader.writer_active
        Image.open(disk).close()
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.raw", "--socket", "s"], "No such file"),
        (["d.raw", "--listen", "nonsense"], "HOST:PORT"),
        (["d.raw", "--socket", "s", "--nbd-tls-required"], "--nbd-tls-cert-file"),
        (["d.raw", "--socket", "s", "--bitmap", "nope"], "nope"),
    ],
)
def test_serve_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    Image.create(tmp_path / "d.raw", MiB).close()
    proc = subprocess.run([*SERVE, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("extended", [True, False])
async def test_nbdcore_client_filter_and_commands(tmp_path: Path, extended: bool) -> None:
    img = Image.memory(8 * MiB)
    img.add_bitmap("b0")
    img.add_bitmap("b1", granularity=MiB)
    img.write(b"x" * 100_000, MiB)
    path = str(tmp_path / "s")
    async with NBDServer([ExportConfig("disk", img)]) as srv:
        await srv.start_unix(path)
        contexts = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
        client = await NBDClient.connect(
            f"nbd+unix:///disk?socket={path}", meta_contexts=contexts, extended_headers=extended
        )
        try:
            assert client.extended_headers is extended
            assert set(client.meta_contexts) == set(contexts)
            only = await client.block_status(0, 8 * MiB, contexts=["qemu:dirty-bitmap:b1"])
            assert list(only) == ["qemu:dirty-bitmap:b1"]
            lengths, flags = only["qemu:dirty-bitmap:b1"]
            assert list(lengths) == [MiB, MiB, 6 * MiB] and list(flags) == [0, 1, 0]
            await client.pwrite(b"y" * 70_000, 3 * MiB, fua=True)
            assert await client.pread(3 * MiB, 70_000) == b"y" * 70_000
            assert await client.pread(0, 4096, df=True) == bytes(4096)
            await client.zero(5 * MiB, MiB)
            await client.trim(6 * MiB, 4096)
            await client.flush()
            await client.cache(0, 4096)
            got = await client.block_status(0, 8 * MiB, contexts=["qemu:dirty-bitmap:b0"])
            lengths, flags = got["qemu:dirty-bitmap:b0"]
            dirty = []
            pos = 0
            for n, f in zip(lengths, flags, strict=True):
                if f:
                    dirty.append((pos, n))
                pos += n
            assert dirty == [(MiB, 128 * 1024), (3 * MiB, 128 * 1024), (5 * MiB, MiB + 65536)]
        finally:
            await client.close()


@pytest.mark.parametrize("qemu", ["7.2", "10"])
async def test_qemu_negotiates_what_it_can(
    tmp_path: Path, qemu: str, caplog: pytest.LogCaptureFixture
) -> None:
    """qemu 10 gets extended headers from us, qemu 7.2 structured replies; both map the
    bitmap the same way."""

    img = Image.memory(4 * MiB)
    img.add_bitmap("b0")
    img.write(b"q" * 10, 2 * MiB)
    path = str(tmp_path / "s")
    qemu_img = qemu10("qemu-img") if qemu == "10" else tool("qemu-img")
    caplog.set_level("INFO", logger="nbdcore.server")
    async with NBDServer([ExportConfig("disk", img)]) as srv:
        await srv.start_unix(path)
        proc = await asyncio.create_subprocess_exec(
            qemu_img,
            "map",
            "--output=json",
            "--image-opts",
            f"driver=nbd,server.type=unix,server.path={path},export=disk,"
            "x-dirty-bitmap=qemu:dirty-bitmap:b0",
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
    assert proc.returncode == 0
    dirty = [(e["start"], e["length"]) for e in json.loads(out) if not e["data"]]
    assert dirty == [(2 * MiB, 65536)]
    expected = "extended headers" if qemu == "10" else "structured replies"
    assert any(
        expected in r.getMessage() and "qemu:dirty-bitmap:b0" in r.getMessage()
        for r in caplog.records
    )
