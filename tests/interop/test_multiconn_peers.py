"""MultiConnClient and ``nbdgw nbd copy --connections`` against real servers: qemu-nbd 7.2 with
``-e 4`` (CAN_MULTI_CONN on a read-only export) and ``-e 1`` (without), nbdkit's memory plugin
(multi-conn, writable) and nbdkit's multi-conn filter in ``disable`` mode (without).
nbdinfo is the independent judge of what each server advertises."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.aio.multiconn import MultiConnClient
from nbdcore.exceptions import ConnectionLostError
from tests.interop.test_client_qemu import Server, run
from tests.peers import ROOT, tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 24 * MiB


def uri_of(sock: Path) -> str:
    return f"nbd+unix:///?socket={sock}"


def can_multi_conn(uri: str) -> bool:
    """What nbdinfo (libnbd) says about the export."""
    out = run(tool("nbdinfo"), uri)
    lines = [ln.strip() for ln in out.splitlines() if "can_multi_conn" in ln]
    assert len(lines) == 1, out
    return lines[0].endswith("true")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random data, then a hole, then more data."""
    path = tmp_path_factory.mktemp("mc") / "d.raw"
    with path.open("wb") as f:
        f.write(os.urandom(10 * MiB))
        f.seek(16 * MiB)
        f.write(os.urandom(SIZE - 16 * MiB))
    return path


@pytest.fixture(scope="module")
def source(image: Path) -> bytes:
    return image.read_bytes()


def qemu_nbd(image: Path, sock: Path, *extra: str) -> Server:
    return Server(
        [tool("qemu-nbd"), "-r", "-f", "raw", "-t", "-k", str(sock), *extra, str(image)],
        sock=str(sock),
    )


@pytest.fixture
def qemu_e4(image: Path, tmp_path: Path) -> Iterator[str]:
    sock = tmp_path / "q4.sock"
    srv = qemu_nbd(image, sock, "-e", "4")
    try:
        yield uri_of(sock)
    finally:
        srv.stop()


def nbdkit(sock: Path, *args: str) -> Server:
    return Server([tool("nbdkit"), "-f", "-U", str(sock), *args], sock=str(sock))


async def test_qemu_e4_four_connections_read_equals_source(qemu_e4: str, source: bytes) -> None:
    assert can_multi_conn(qemu_e4)
    async with await MultiConnClient.connect(
        qemu_e4, connections=4, meta_contexts=["base:allocation"]
    ) as mc:
        assert mc.connections == 4
        assert mc.can_multi_conn and mc.read_only
        assert mc.size == SIZE
        buf = bytearray(mc.size)
        await mc.read_range(buf, 0, request_size=512 * 1024)
        assert buf == source
        # An unaligned tail, and a read split over several connections.
        assert await mc.pread(SIZE - 5000, 5000) == source[-5000:]
        assert await mc.pread(MiB + 1, 9 * MiB) == source[MiB + 1 : 10 * MiB + 1]
        got = await mc.block_status(0, SIZE)
        assert sum(got["base:allocation"][0]) >= 1


async def test_qemu_e1_one_connection(image: Path, source: bytes, tmp_path: Path) -> None:
    sock = tmp_path / "q1.sock"
    srv = qemu_nbd(image, sock, "-e", "1")
    try:
        uri = uri_of(sock)
        # nbdinfo's own connection must be gone before ours (qemu-nbd -e 1 serves one).
        assert not can_multi_conn(uri)
        async with await MultiConnClient.connect(uri, connections=4) as mc:
            assert mc.connections == 1
            buf = bytearray(mc.size)
            await mc.read_range(buf, 0)
            assert buf == source
    finally:
        srv.stop()


async def test_qemu_e2_fewer_connections_than_asked(
    image: Path, source: bytes, tmp_path: Path
) -> None:
    """qemu-nbd -e 2 leaves the 3rd and 4th connections without a greeting: they are given up
    after extra_timeout, and the two that opened do the work."""
    sock = tmp_path / "q2.sock"
    srv = qemu_nbd(image, sock, "-e", "2")
    try:
        uri = uri_of(sock)
        assert can_multi_conn(uri)
        mc = await MultiConnClient.connect(uri, connections=4, extra_timeout=1.0)
        async with mc:
            assert mc.connections == 2
            assert len(mc.connect_errors) == 2
            assert all(isinstance(e, TimeoutError) for e in mc.connect_errors)
            buf = bytearray(mc.size)
            await mc.read_range(buf, 0)
            assert buf == source
    finally:
        srv.stop()


async def test_nbdkit_without_multi_conn_one_connection(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    srv = nbdkit(sock, "--filter=multi-conn", "memory", "16M", "multi-conn-mode=disable")
    try:
        uri = uri_of(sock)
        assert not can_multi_conn(uri)
        async with await MultiConnClient.connect(uri, connections=4) as mc:
            assert mc.connections == 1
            data = os.urandom(MiB)
            await mc.pwrite(data, 3 * MiB)
            await mc.flush()
            assert await mc.pread(3 * MiB, MiB) == data
    finally:
        srv.stop()


async def test_nbdkit_write_flush_read_from_other_connections(tmp_path: Path) -> None:
    sock = tmp_path / "k.sock"
    srv = nbdkit(sock, "memory", "32M")
    try:
        uri = uri_of(sock)
        assert can_multi_conn(uri)
        data = os.urandom(9 * MiB + 4096)
        async with await MultiConnClient.connect(uri, connections=4) as mc:
            assert mc.connections == 4 and not mc.read_only
            await asyncio.gather(
                mc.pwrite(data, 1 * MiB), mc.zero(20 * MiB, MiB), mc.trim(22 * MiB, MiB)
            )
            await mc.flush()
            for c in mc.clients:  # each connection sees what the others wrote
                assert await c.pread(1 * MiB, len(data)) == data
                assert await c.pread(20 * MiB, MiB) == bytes(MiB)
        # And so does an independent client (libnbd).
        out = tmp_path / "out.raw"
        run(tool("nbdcopy"), uri, str(out))
        assert out.read_bytes()[1 * MiB : 1 * MiB + len(data)] == data
    finally:
        srv.stop()


async def test_server_killed_mid_read_fails_clearly(
    image: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = tmp_path / "q.sock"
    srv = qemu_nbd(image, sock, "-e", "4")
    try:
        mc = await MultiConnClient.connect(uri_of(sock), connections=4)
        hit = asyncio.Event()
        orig = mc.clients[2].pread_into

        async def spy(buf: memoryview | bytearray, off: int) -> None:
            hit.set()
            await orig(buf, off)

        monkeypatch.setattr(mc.clients[2], "pread_into", spy)
        reads = [
            asyncio.ensure_future(mc.read_range(bytearray(SIZE), 0, request_size=64 * 1024))
            for _ in range(3)
        ]
        await hit.wait()
        srv.proc.kill()
        results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 30)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors, "every read finished although the server was killed"
        for e in errors:
            assert isinstance(e, ConnectionLostError), repr(e)
            assert "connection" in str(e)
        await asyncio.wait_for(mc.close(), 30)
    finally:
        srv.stop()


COPY = [sys.executable, "-m", "nbdcore.tools.client_cmds", "nbd", "copy"]


def _copy(uri: str, dest: str, *extra: str) -> None:
    subprocess.run(
        [*COPY, uri, dest, *extra],
        check=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("connections", ["1", "4"])
def test_nbd_copy_connections(qemu_e4: str, image: Path, tmp_path: Path, connections: str) -> None:
    out = tmp_path / "out.raw"
    _copy(qemu_e4, str(out), "--connections", connections, "--request-size", str(MiB))
    assert out.read_bytes() == image.read_bytes()


def test_nbd_copy_bad_connections(qemu_e4: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [*COPY, qemu_e4, "-", "--connections", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "--connections" in proc.stderr and "Traceback" not in proc.stderr
