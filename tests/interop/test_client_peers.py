"""The client against nbdkit (data, memory, sparse-random plugins) and nbd-server.

nbdinfo/nbdcopy (libnbd) are the independent reference for maps and contents.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.aio.client import NBDClient, export_info, list_exports
from nbdcore.constants import NBD_STATE_HOLE, NBD_STATE_ZERO, TransmissionFlag
from nbdcore.exceptions import OptionError, UsageError
from tests.peers import stop_peer, tool, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20
Extent = tuple[int, int, int]


def run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise AssertionError(f"{args[0]} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


def merge(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for off, n, f in extents:
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        else:
            out.append((off, n, f))
    return out


async def walk(client: NBDClient, context: str = "base:allocation") -> list[Extent]:
    offset, end = 0, client.size
    out: list[Extent] = []
    while offset < end:
        lengths, flags = (await client.block_status(offset, end - offset))[context]
        for n, f in zip(lengths, flags, strict=True):
            n = min(n, end - offset)
            out.append((offset, n, f))
            offset += n
            if offset >= end:
                break
    return merge(out)


def nbdinfo_map(uri: str) -> list[Extent]:
    data = json.loads(run(tool("nbdinfo"), "--map", "--json", uri))
    return merge([(e["offset"], e["length"], e["type"]) for e in data])


class Peer:
    """A server process we started; stopped with SIGTERM."""

    def __init__(self, args: list[str], *, sock: str | None = None, port: int | None = None):
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # TCP is probed without connecting: nbd-server -d serves one client only.
        wait_listening(self.proc, sock=sock, port=port, timeout=15)

    def stop(self) -> None:
        stop_peer(self.proc)


@pytest.fixture
def nbdkit(tmp_path: Path) -> Iterator[object]:
    peers: list[Peer] = []

    def start(*plugin_args: str) -> str:
        sock = str(tmp_path / f"nbdkit{len(peers)}.sock")
        peers.append(Peer([tool("nbdkit"), "-f", "-U", sock, *plugin_args], sock=sock))
        return f"nbd+unix:///?socket={sock}"

    yield start
    for p in peers:
        p.stop()


# --- nbdkit --------------------------------------------------------------------------------------

DATA = "( 0x11 * 65536 ) @262144 ( 0x22 * 4096 ) @1048576 ( 0x33 * 512 )"


async def test_nbdkit_data_reads_and_allocation(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("data", DATA, "size=4M")
    async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        assert client.size == 4 * MiB and client.structured_replies
        assert client.meta_contexts.keys() == {"base:allocation"}
        assert await client.pread(0, 65536) == b"\x11" * 65536
        assert await client.pread(262144 - 8, 16) == bytes(8) + b"\x22" * 8
        assert await client.pread(1048576, 1024) == b"\x33" * 512 + bytes(512)
        ours = await walk(client)
        assert ours == nbdinfo_map(uri)
        # The data plugin's content is allocated exactly where bytes were given.
        data = [(o, o + n) for o, n, f in ours if not f & NBD_STATE_HOLE]
        assert any(o <= 0 and e >= 65536 for o, e in data)
        assert any(o <= 1048576 and e >= 1048576 + 512 for o, e in data)


async def test_nbdkit_memory_writes_and_holes(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("memory", "16M")
    async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        assert not client.read_only
        assert await walk(client) == [(0, 16 * MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)]
        payload = bytes(range(256)) * 256  # 64 KiB
        await client.pwrite(payload, 4 * MiB, fua=bool(client.flags & TransmissionFlag.SEND_FUA))
        await client.zero(4 * MiB + 4096, 4096)
        await client.flush()
        expected = bytearray(payload)
        expected[4096:8192] = bytes(4096)
        assert await client.pread(4 * MiB, 65536) == expected
        ours = await walk(client)
        assert ours == nbdinfo_map(uri)
        assert any(f == 0 and o <= 4 * MiB < o + n for o, n, f in ours)
        await client.trim(4 * MiB, 65536)
        assert await walk(client) == [(0, 16 * MiB, NBD_STATE_HOLE | NBD_STATE_ZERO)]
        assert await client.pread(4 * MiB, 16) == bytes(16)


async def test_nbdkit_sparse_random_matches_nbdcopy(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("sparse-random", "32M", "seed=7", "percent=30")
    async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        ours = await walk(client)
        assert ours == nbdinfo_map(uri)
        assert len(ours) > 4  # a fragmented map, or the test proves little
        buf = bytearray(client.size)
        await client.pread_into(buf, 0)
    ref = tmp_path / "ref.raw"
    run(tool("nbdcopy"), uri, str(ref))
    assert bytes(buf) == ref.read_bytes()
    # Holes read as zeroes.
    for off, n, f in ours:
        if f & NBD_STATE_ZERO:
            assert buf[off : off + n].count(0) == n


async def test_nbdkit_without_extended_headers_or_structured(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("data", DATA, "size=4M")
    async with await NBDClient.connect(
        uri, meta_contexts=["base:allocation"], structured_replies=False, extended_headers=False
    ) as client:
        assert not client.structured_replies and client.meta_contexts == {}
        assert await client.pread(262144, 4096) == b"\x22" * 4096
        with pytest.raises(UsageError, match="structured replies"):
            await client.block_status(0, 4096)


async def test_nbdkit_listing(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("memory", "1M")
    info = await export_info(uri)
    assert info.size == MiB and "base:allocation" in info.meta_contexts
    names = [e.name for e in await list_exports(uri)]
    assert names == [""]


# --- nbd-server -----------------------------------------------------------------------------


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    img = tmp_path / "disk.raw"
    img.write_bytes(b"nbd-server!" + bytes(4 * MiB - 11))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp_path / "nbd-server.conf"
    conf.write_text(
        f"[generic]\n    listenaddr = 127.0.0.1\n    port = {port}\n    allowlist = true\n"
        f"[disk]\n    exportname = {img}\n"
    )
    # -d: stay in the foreground so that we stop exactly the process we started.
    peer = Peer([tool("nbd-server"), "-d", "-C", str(conf), "-p", str(tmp_path / "pid")], port=port)
    yield f"nbd://127.0.0.1:{port}/disk", img
    peer.stop()


async def test_nbd_server_reads_writes_no_block_status(nbd_server: tuple[str, Path]) -> None:
    uri, img = nbd_server
    async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        # nbd-server 3.24 has no structured replies: simple replies, no contexts.
        assert not client.structured_replies and not client.extended_headers
        assert client.size == 4 * MiB and client.meta_contexts == {}
        assert await client.pread(0, 11) == b"nbd-server!"
        await client.pwrite(b"written by nbdgw", MiB)
        if client.flags & TransmissionFlag.SEND_FLUSH:
            await client.flush()
        assert await client.pread(MiB - 4, 24) == bytes(4) + b"written by nbdgw" + bytes(4)
        with pytest.raises(UsageError, match="structured replies"):
            await client.block_status(0, 4096)
    assert img.read_bytes()[MiB : MiB + 16] == b"written by nbdgw"


async def test_nbd_server_unknown_export(nbd_server: tuple[str, Path]) -> None:
    uri, _ = nbd_server
    with pytest.raises(OptionError):
        await NBDClient.connect(uri.replace("/disk", "/missing"), timeout=10)
