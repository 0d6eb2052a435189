"""The client against real qemu-nbd: 7.2 (structured replies) and 10 (extended headers), TLS.

Images are built by qemu-img/qemu-io with dirty bitmaps at known ranges; nbdinfo (libnbd) is
the independent reference for every map.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.aio.client import NBDClient, export_info, list_exports, list_meta_contexts
from nbdcore.constants import NBD_STATE_DIRTY, TransmissionFlag
from nbdcore.exceptions import HandshakeError, OptionError, RequestError, UsageError
from nbdcore.tls import TLSConfig
from tests.peers import qemu10, stop_peer, tool, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20
GiB = 1 << 30
Extent = tuple[int, int, int]  # offset, length, flags


# --- helpers ----------------------------------------------------------------------------------


def run(*args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)
    if proc.returncode:
        raise AssertionError(f"{args[0]} failed: {proc.stderr or proc.stdout}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, args: list[str], sock: str | None = None, port: int | None = None) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.proc, sock=sock, port=port, timeout=15)

    def stop(self) -> None:
        stop_peer(self.proc)


def merge(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for off, n, f in extents:
        if out and out[-1][2] == f and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n, f)
        else:
            out.append((off, n, f))
    return out


async def walk(client: NBDClient, context: str, *, filtered: bool = True) -> list[Extent]:
    """The whole export's map for one context, from repeated raw block_status answers."""
    offset, end = 0, client.size
    out: list[Extent] = []
    while offset < end:
        answer = await client.block_status(
            offset, end - offset, contexts=[context] if filtered else None
        )
        lengths, flags = answer[context]
        assert len(lengths) >= 1
        for n, f in zip(lengths, flags, strict=True):
            n = min(n, end - offset)
            out.append((offset, n, f))
            offset += n
            if offset >= end:
                break
    return merge(out)


def nbdinfo_map(uri: str, context: str) -> list[Extent]:
    data = json.loads(run(tool("nbdinfo"), f"--map={context}", "--json", uri))
    return merge([(e["offset"], e["length"], e["type"]) for e in data])


def dirty_ranges(extents: list[Extent]) -> list[tuple[int, int]]:
    return [(off, off + n) for off, n, f in extents if f & NBD_STATE_DIRTY]


# --- qemu-nbd 7.2 with two bitmaps -------------------------------------------------------------

# What qemu-io writes, and so what each bitmap must show (granularity 64 KiB for b0, 128 KiB b1).
B0_WRITES = "write -P 0x11 0 64k\nwrite -z 2M 256k\nwrite -P 0x33 5M 4k\n"
B1_WRITES = "write -P 0x22 1M 128k\nwrite -P 0x44 40M 1k\n"
B0_DIRTY = [(0, 64 * 1024), (2 * MiB, 2 * MiB + 256 * 1024), (5 * MiB, 5 * MiB + 64 * 1024)]
B1_DIRTY = [(1 * MiB, 1 * MiB + 128 * 1024), (40 * MiB, 40 * MiB + 128 * 1024)]


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = tmp_path_factory.mktemp("qemu72") / "d.qcow2"
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    run(qemu_img, "create", "-f", "qcow2", str(img), "64M")
    run(qemu_img, "bitmap", "--add", "--granularity", "65536", str(img), "b0")
    run(qemu_io, "-f", "qcow2", str(img), stdin=B0_WRITES)
    run(qemu_img, "bitmap", "--disable", str(img), "b0")
    run(qemu_img, "bitmap", "--add", "--granularity", "131072", str(img), "b1")
    run(qemu_io, "-f", "qcow2", str(img), stdin=B1_WRITES)
    return img


@pytest.fixture(scope="module")
def qemu72(qcow2: Path) -> Iterator[str]:
    sock = str(qcow2.parent / "nbd.sock")
    args = [tool("qemu-nbd"), "-r", "-t", "-e", "8", "-f", "qcow2", "-x", "disk"]
    srv = Server([*args, "-B", "b0", "-B", "b1", "-k", sock, str(qcow2)], sock=sock)
    yield f"nbd+unix:///disk?socket={sock}"
    srv.stop()


CONTEXTS = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]


async def test_qemu72_negotiation(qemu72: str) -> None:
    async with await NBDClient.connect(qemu72, meta_contexts=CONTEXTS) as client:
        assert client.structured_replies and not client.extended_headers
        assert client.export_name == "disk" and client.size == 64 * MiB
        assert client.read_only and client.flags & TransmissionFlag.SEND_DF
        assert set(client.meta_contexts) == set(CONTEXTS)
        assert len(set(client.meta_contexts.values())) == 3
        assert client.block_size is not None and client.block_size.maximum >= MiB


async def test_qemu72_block_status_matches_nbdinfo(qemu72: str) -> None:
    async with await NBDClient.connect(qemu72, meta_contexts=CONTEXTS) as client:
        for context in CONTEXTS:
            ours = await walk(client, context)
            assert ours == nbdinfo_map(qemu72, context), context
        assert dirty_ranges(await walk(client, "qemu:dirty-bitmap:b0")) == B0_DIRTY
        assert dirty_ranges(await walk(client, "qemu:dirty-bitmap:b1")) == B1_DIRTY
        # One request answers every context, consecutive from the offset.
        answer = await client.block_status(1000, 3000)
        assert set(answer) == set(CONTEXTS)
        for lengths, flags in answer.values():
            assert len(lengths) == len(flags) >= 1 and min(lengths) > 0
        # REQ_ONE: exactly one extent per context, never longer than asked.
        one = await client.block_status(0, 4 * MiB, req_one=True)
        assert all(len(lengths) == 1 and lengths[0] <= 4 * MiB for lengths, _ in one.values())


async def test_qemu72_reads_match_qemu_io(qemu72: str) -> None:
    async with await NBDClient.connect(qemu72) as client:
        assert await client.pread(0, 64 * 1024) == b"\x11" * 64 * 1024
        assert await client.pread(1 * MiB, 128 * 1024) == b"\x22" * 128 * 1024
        assert await client.pread(5 * MiB - 512, 4608) == bytes(512) + b"\x33" * 4096
        assert await client.pread(2 * MiB, 256 * 1024) == bytes(256 * 1024)
        assert await client.pread(40 * MiB, 1024, df=True) == b"\x44" * 1024
        buf = bytearray(8 * MiB)
        await client.pread_into(buf, 0)
        assert (
            buf[: 64 * 1024] == b"\x11" * 64 * 1024
            and buf[5 * MiB : 5 * MiB + 4096] == b"\x33" * 4096
        )
        # qemu answers errors as error chunks: a clear RequestError, the connection lives on.
        # A request qemu refuses (past the end, once our own bounds check is fooled) comes back
        # as an error chunk: a RequestError, and the connection lives on.
        client._conn.size *= 2
        with pytest.raises(RequestError, match="EINVAL"):
            await client.pread(64 * MiB, 4096)
        assert await client.pread(0, 4) == b"\x11" * 4


async def test_qemu72_read_batches_match_single_reads(qemu72: str) -> None:
    """pread_many_into: scattered pieces (the written ranges, holes, a piece across a write's
    edge) land where single reads put the same bytes, also with more pieces than the
    in-flight window (each reply's slot then carries the next piece)."""
    spots = [
        (0, 64 * 1024),
        (1 * MiB, 128 * 1024),
        (5 * MiB - 512, 4608),
        (2 * MiB, 256 * 1024),
        (40 * MiB, 1024),
        (63 * MiB, 4096),
    ]
    async with await NBDClient.connect(qemu72, max_in_flight=8) as client:
        for spread in (spots, spots * 3):  # 6 pieces fit the window of 8; 18 do not
            buf = bytearray(sum(n for _, n in spread))
            view, pieces, pos = memoryview(buf), [], 0
            for off, n in spread:
                pieces.append((view[pos : pos + n], off))
                pos += n
            await client.pread_many_into(pieces)
            expected = b"".join([await client.pread(off, n) for off, n in spread])
            assert buf == expected
            assert buf[:4] == b"\x11" * 4 and b"\x33" * 4096 in buf and b"\x44" * 1024 in buf
        assert client._slots.free == 8


@pytest.mark.parametrize("window", [1, 3, 16])
async def test_qemu72_read_batches_overlapping_in_a_small_window(
    qemu72: str, window: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Many batches at once, of 1 to 40 pieces, in a window of ``window`` requests: each slot
    passes from batch to batch and none waits forever (a stall fails on the timeout)."""
    rng = random.Random(window)
    async with await NBDClient.connect(qemu72, max_in_flight=window) as client:
        batches = []
        for _ in range(24):
            spots = [
                (rng.randrange(0, 64 * MiB - 8192), rng.randrange(1, 8192))
                for _ in range(rng.randint(1, 40))
            ]
            bufs = [bytearray(n) for _, n in spots]
            batches.append((spots, bufs))
        futures = [
            client.pread_many_into(
                [(memoryview(b), off) for b, (off, _) in zip(bufs, spots, strict=True)]
            )
            for spots, bufs in batches
        ]
        await asyncio.wait_for(asyncio.gather(*futures), 60)
        for spots, bufs in batches:
            assert [bytes(b) for b in bufs] == [await client.pread(off, n) for off, n in spots]
        assert client._slots.free == window
    # A slot handed over in a callback: an exception there would only be logged by asyncio.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


async def test_qemu72_usage_errors(qemu72: str) -> None:
    async with await NBDClient.connect(qemu72, meta_contexts=["base:allocation"]) as client:
        with pytest.raises(UsageError, match="read-only"):
            await client.pwrite(b"x", 0)
        with pytest.raises(UsageError, match="outside the export"):
            await client.pread(client.size, 1)
        with pytest.raises(UsageError, match="not negotiated"):
            await client.block_status(0, 512, contexts=["qemu:dirty-bitmap:b0"])
        assert await client.pread(0, 1) == b"\x11"


async def test_qemu72_listing(qemu72: str) -> None:
    exports = await list_exports(qemu72)
    assert [e.name for e in exports] == ["disk"]
    assert exports[0].size == 64 * MiB
    info = await export_info(qemu72)
    assert info.size == 64 * MiB and info.flags & TransmissionFlag.READ_ONLY
    assert set(CONTEXTS) <= set(info.meta_contexts)
    bitmaps = await list_meta_contexts(qemu72, queries=["qemu:dirty-bitmap:"])
    assert sorted(bitmaps) == ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    with pytest.raises(OptionError, match="ERR_UNKNOWN"):
        await NBDClient.connect(qemu72.replace("/disk?", "/nope?"))


async def test_qemu72_unknown_context_is_just_absent(qemu72: str) -> None:
    async with await NBDClient.connect(
        qemu72, meta_contexts=["qemu:dirty-bitmap:nope", "base:allocation", "x-other:thing"]
    ) as client:
        assert list(client.meta_contexts) == ["base:allocation"]


async def test_qemu72_writes_read_back(tmp_path: Path) -> None:
    img = tmp_path / "w.raw"
    img.write_bytes(b"")
    os.truncate(img, 48 * MiB)
    sock = str(tmp_path / "w.sock")
    srv = Server([tool("qemu-nbd"), "-t", "-f", "raw", "-k", sock, str(img)], sock=sock)
    try:
        uri = f"nbd+unix:///?socket={sock}"
        async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
            assert not client.read_only
            pattern = bytes(range(256)) * 4096  # 1 MiB
            await client.pwrite(pattern, 3 * MiB)
            await client.pwrite(b"\xab" * 512, 512, fua=True)
            await client.zero(3 * MiB + 4096, 4096)
            await client.trim(8 * MiB, MiB)
            await client.flush()
            expected = bytearray(pattern)
            expected[4096:8192] = bytes(4096)
            assert await client.pread(3 * MiB, MiB) == expected
            assert await client.pread(0, 1024) == bytes(512) + b"\xab" * 512
            big = os.urandom(5 * MiB) * 8  # above the 32 MiB limit: split in pieces
            with pytest.raises(UsageError, match="outside"):
                await client.pwrite(big, 9 * MiB)
            await client.pwrite(big, 4 * MiB)
            assert await client.pread(4 * MiB, 40 * MiB) == big
        assert img.read_bytes()[4 * MiB : 44 * MiB] == big
    finally:
        srv.stop()


# --- qemu-nbd 10: extended headers ----------------------------------------------------------------


@pytest.fixture(scope="module")
def qemu10_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    qemu_nbd = qemu10("qemu-nbd")
    d = tmp_path_factory.mktemp("qemu10")
    img = d / "big.qcow2"
    run(tool("qemu-img"), "create", "-f", "qcow2", str(img), "8G")
    run(tool("qemu-img"), "bitmap", "--add", str(img), "b0")
    run(tool("qemu-io"), "-f", "qcow2", str(img),
        stdin="write -P 0x55 0 64k\nwrite -P 0x66 6G 128k\nwrite -z 7G 1M\n")  # fmt: skip
    sock = str(d / "nbd.sock")
    srv = Server(
        [qemu_nbd, "-r", "-t", "-e", "8", "-f", "qcow2", "-B", "b0", "-k", sock, str(img)],
        sock=sock,
    )
    yield f"nbd+unix:///?socket={sock}"
    srv.stop()


async def test_qemu10_extended_block_status_beyond_4g(qemu10_uri: str) -> None:
    contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
    async with await NBDClient.connect(qemu10_uri, meta_contexts=contexts) as ext:
        assert ext.extended_headers and ext.size == 8 * GiB
        assert ext.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
        answer = await ext.block_status(0, ext.size)
        lengths, _ = answer["qemu:dirty-bitmap:b0"]
        # One 64-bit request, one answer reaching past 4 GiB.
        assert sum(lengths) > 4 * GiB
        assert sum(answer["base:allocation"][0]) > 4 * GiB
        dirty = dirty_ranges(await walk(ext, "qemu:dirty-bitmap:b0"))
        assert dirty == [(0, 65536), (6 * GiB, 6 * GiB + 131072), (7 * GiB, 7 * GiB + MiB)]
        filtered = await ext.block_status(0, ext.size, contexts=["qemu:dirty-bitmap:b0"])
        assert list(filtered) == ["qemu:dirty-bitmap:b0"]
        assert list(filtered["qemu:dirty-bitmap:b0"][0]) == list(lengths)
        assert await ext.pread(6 * GiB, 16) == b"\x66" * 16
        # Data then a hole: DATA and HOLE chunks under extended headers.
        assert await ext.pread(0, 256 * 1024) == b"\x55" * 65536 + bytes(192 * 1024)
        assert await ext.pread(7 * GiB - 4096, 8192) == bytes(8192)
        ext_maps = {c: await walk(ext, c, filtered=False) for c in contexts}
    async with await NBDClient.connect(
        qemu10_uri, meta_contexts=contexts, extended_headers=False
    ) as compact:
        assert not compact.extended_headers and compact.structured_replies
        answer = await compact.block_status(0, compact.size)
        assert all(sum(v[0]) < 4 * GiB for v in answer.values())
        for c in contexts:
            compact_map = await walk(compact, c)
            assert compact_map == ext_maps[c], c
            assert compact_map == nbdinfo_map(qemu10_uri, c)


# --- TLS ------------------------------------------------------------------------------------------


def make_pki(d: Path, cn: str = "nbdgw test CA") -> None:
    """A CA, a server certificate for localhost and a client certificate, in the layout of
    qemu's tls-creds-x509 (which verifies client certificates by default) and libnbd."""
    d.mkdir(parents=True, exist_ok=True)
    openssl = tool("openssl")
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"), "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    ext = d / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "server-key.pem"),
        "-out", str(d / "server.csr"), "-subj", "/CN=localhost")  # fmt: skip
    run(openssl, "x509", "-req", "-in", str(d / "server.csr"), "-CA", str(d / "ca-cert.pem"),
        "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-out", str(d / "server-cert.pem"), "-extfile", str(ext))  # fmt: skip
    cext = d / "client.ext"
    cext.write_text("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                    "extendedKeyUsage=clientAuth\n")  # fmt: skip
    run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "client-key.pem"),
        "-out", str(d / "client.csr"), "-subj", "/CN=nbdgw client")  # fmt: skip
    run(openssl, "x509", "-req", "-in", str(d / "client.csr"), "-CA", str(d / "ca-cert.pem"),
        "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
        "-out", str(d / "client-cert.pem"), "-extfile", str(cext))  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(qcow2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    d = tmp_path_factory.mktemp("tls")
    make_pki(d / "pki")
    make_pki(d / "other", cn="some other CA")
    port = free_port()
    srv = Server(
        [tool("qemu-nbd"), "-r", "-t", "-e", "8", "-f", "qcow2", "-x", "disk",
         "--object", f"tls-creds-x509,id=tls0,dir={d / 'pki'},endpoint=server",
         "--tls-creds", "tls0", "-b", "127.0.0.1", "-p", str(port), str(qcow2)],
        port=port,
    )  # fmt: skip
    yield d, port
    srv.stop()


async def test_tls_with_the_right_ca(tls_server: tuple[Path, int]) -> None:
    d, port = tls_server
    uri = f"nbds://localhost:{port}/disk?tls-certificates={d / 'pki'}"
    async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        assert client.structured_replies and "base:allocation" in client.meta_contexts
        assert await client.pread(0, 64 * 1024) == b"\x11" * 64 * 1024
    # The same through an explicit TLSConfig and the IP address in the certificate.
    pki = d / "pki"
    tls = TLSConfig(
        ca_file=str(pki / "ca-cert.pem"),
        cert_file=str(pki / "client-cert.pem"),
        key_file=str(pki / "client-key.pem"),
        server_hostname="127.0.0.1",
    )
    async with await NBDClient.connect(f"nbd://127.0.0.1:{port}/disk", tls=tls) as client:
        assert await client.pread(1 * MiB, 4) == b"\x22" * 4


async def test_tls_with_a_wrong_ca_fails_clearly(tls_server: tuple[Path, int]) -> None:
    d, port = tls_server
    uri = f"nbds://localhost:{port}/disk?tls-certificates={d / 'other'}"
    with pytest.raises(HandshakeError, match=r"TLS handshake failed.*certificate verify failed"):
        await NBDClient.connect(uri, timeout=10)


async def test_plaintext_to_a_tls_server_is_refused(tls_server: tuple[Path, int]) -> None:
    _, port = tls_server
    with pytest.raises(OptionError, match="ERR_TLS_REQD"):
        await NBDClient.connect(f"nbd://127.0.0.1:{port}/disk", timeout=10)


async def test_qemu10_writes_with_extended_headers(tmp_path: Path) -> None:
    img = tmp_path / "w.raw"
    img.write_bytes(b"")
    os.truncate(img, 64 * MiB)
    sock = str(tmp_path / "w.sock")
    srv = Server(
        [qemu10("qemu-nbd"), "-t", "-e", "4", "-f", "raw", "-k", sock, str(img)], sock=sock
    )
    try:
        uri = f"nbd+unix:///?socket={sock}"
        async with await NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
            assert client.extended_headers and not client.read_only
            payload = os.urandom(3 * MiB)
            await client.pwrite(payload, MiB, fua=True)
            await client.zero(MiB, 4096, fast_zero=False)
            await client.trim(32 * MiB, 4 * MiB)
            await client.flush()
            await client.cache(0, MiB)
            assert await client.pread(MiB, 3 * MiB) == bytes(4096) + payload[4096:]
            # nbdinfo (libnbd 1.14) speaks compact headers: an independent reference.
            assert await walk(client, "base:allocation") == nbdinfo_map(uri, "base:allocation")
        assert img.read_bytes()[MiB + 4096 : 4 * MiB] == payload[4096:]
    finally:
        srv.stop()


async def test_tls_on_a_unix_socket_checks_the_chain(qcow2: Path, tmp_path: Path) -> None:
    make_pki(tmp_path / "pki")
    make_pki(tmp_path / "other", cn="some other CA")
    sock = str(tmp_path / "tls.sock")
    srv = Server(
        [tool("qemu-nbd"), "-r", "-t", "-e", "4", "-f", "qcow2",
         "--object", f"tls-creds-x509,id=tls0,dir={tmp_path / 'pki'},endpoint=server",
         "--tls-creds", "tls0", "-k", sock, str(qcow2)],
        sock=sock,
    )  # fmt: skip
    try:
        # No host name to match on a unix socket: the chain alone is verified, as libnbd does.
        uri = f"nbds+unix:///?socket={sock}&tls-certificates={tmp_path / 'pki'}"
        async with await NBDClient.connect(uri) as client:
            assert await client.pread(0, 4) == b"\x11" * 4
        wrong = f"nbds+unix:///?socket={sock}&tls-certificates={tmp_path / 'other'}"
        with pytest.raises(HandshakeError, match="certificate verify failed"):
            await NBDClient.connect(wrong, timeout=10)
        # Our client certificate, but a CA that did not sign the server's: refused, unless
        # tls-verify-peer=false.
        mixed = tmp_path / "mixed"
        mixed.mkdir()
        for name, src in (("ca-cert.pem", "other"), ("client-cert.pem", "pki"),
                          ("client-key.pem", "pki")):  # fmt: skip
            (mixed / name).write_bytes((tmp_path / src / name).read_bytes())
        mixed_uri = f"nbds+unix:///?socket={sock}&tls-certificates={mixed}"
        with pytest.raises(HandshakeError, match="certificate verify failed"):
            await NBDClient.connect(mixed_uri, timeout=10)
        async with await NBDClient.connect(mixed_uri + "&tls-verify-peer=false") as client:
            assert await client.pread(0, 4) == b"\x11" * 4
    finally:
        srv.stop()
