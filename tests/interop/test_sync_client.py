"""The blocking client (nbdcore.sync.client) and the copy engine (nbdcore.sync.copy) against real
servers: qemu-nbd 7.2 and 10, TLS, nbd-server, nbdkit. The servers and images are the ones of
test_client_qemu.py and test_client_peers.py, so both clients are held to the same facts."""

# ruff: noqa: F811 - the fixtures imported from those modules are parameters here

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from nbdcore.constants import NBD_STATE_DIRTY, TransmissionFlag
from nbdcore.exceptions import (
    ConnectionLostError,
    HandshakeError,
    NBDError,
    OptionError,
    RequestError,
    UsageError,
)
from nbdcore.sync.client import NBDClient
from nbdcore.sync.copy import FileSink, NullSink, copy_export
from nbdcore.tls import TLSConfig
from tests.interop.test_client_peers import nbd_server, nbdkit  # noqa: F401 - fixtures
from tests.interop.test_client_qemu import (  # noqa: F401 - fixtures
    B0_DIRTY,
    B1_DIRTY,
    CONTEXTS,
    qcow2,
    qemu10_uri,
    qemu72,
    tls_server,
)
from tests.interop.test_client_qemu import nbdinfo_map as nbdinfo_map_merged
from tests.peers import tool

MiB = 1 << 20


def walk(client: NBDClient, context: str) -> list[tuple[int, int, int]]:
    """Every extent of ``context`` over the export by repeated block status, merged."""
    out: list[tuple[int, int, int]] = []
    pos = 0
    while pos < client.size:
        lengths, flags = client.block_status(pos, client.size - pos)[context]
        for n, f in zip(lengths, flags, strict=True):
            n = min(n, client.size - pos)
            if out and out[-1][2] == f and out[-1][0] + out[-1][1] == pos:
                out[-1] = (out[-1][0], out[-1][1] + n, f)
            else:
                out.append((pos, n, f))
            pos += n
            if pos >= client.size:
                break
    return out


def raw_of(qcow2: Path, tmp: Path) -> bytes:
    raw = tmp / "ref.raw"
    subprocess.run(
        [tool("qemu-img"), "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw)],
        check=True,
    )
    return raw.read_bytes()


# --- the client ----------------------------------------------------------------------------


def test_qemu72_negotiation_and_block_status(qemu72: str) -> None:
    with NBDClient.connect(qemu72, meta_contexts=CONTEXTS) as client:
        assert client.structured_replies and not client.extended_headers
        assert client.export_name == "disk" and client.size == 64 * MiB and client.read_only
        assert set(client.meta_contexts) == set(CONTEXTS)
        for context in CONTEXTS:
            assert walk(client, context) == nbdinfo_map_merged(qemu72, context), context
        b0 = [(o, o + n) for o, n, f in walk(client, "qemu:dirty-bitmap:b0") if f & NBD_STATE_DIRTY]
        b1 = [(o, o + n) for o, n, f in walk(client, "qemu:dirty-bitmap:b1") if f & NBD_STATE_DIRTY]
        assert b0 == B0_DIRTY and b1 == B1_DIRTY
        one = client.block_status(0, 4 * MiB, contexts=["qemu:dirty-bitmap:b1"], req_one=True)
        assert list(one) == ["qemu:dirty-bitmap:b1"] and len(one["qemu:dirty-bitmap:b1"][0]) == 1
        with pytest.raises(UsageError, match="not negotiated"):
            client.block_status(0, 4096, contexts=["qemu:dirty-bitmap:zz"])


def test_qemu72_reads_match_qemu_io(qemu72: str, qcow2: Path, tmp_path: Path) -> None:
    raw = raw_of(qcow2, tmp_path)
    with NBDClient.connect(qemu72) as client:
        assert client.pread(0, 64 * 1024) == b"\x11" * 64 * 1024
        assert client.pread(5 * MiB - 512, 4608) == bytes(512) + b"\x33" * 4096
        assert client.pread(40 * MiB, 1024, df=True) == b"\x44" * 1024
        buf = bytearray(9 * MiB)
        client.pread_into(buf, 123 * 4096)
        assert buf == raw[123 * 4096 : 123 * 4096 + 9 * MiB]
        # Out of order and in order, every byte exactly once, from several ranges.
        ranges = [(0, 3 * MiB + 4096), (40 * MiB, 65536), (63 * MiB, MiB)]
        seen: dict[int, bytes] = {}
        for offset, data in client.iter_reads(ranges, request_size=256 * 1024, window=5):
            assert offset not in seen
            seen[offset] = bytes(data)  # the buffer is reused: copy
        expect = {o + k for o, n in ranges for k in range(0, n, 256 * 1024)}
        assert set(seen) == expect
        for offset, data in seen.items():
            assert data == raw[offset : offset + len(data)]
        offsets = [
            o for o, _ in client.iter_reads(ranges, request_size=MiB, window=4, ordered=True)
        ]
        assert offsets == sorted(offsets) and len(offsets) == 6
        # Stopping early: the reads in flight land before the generator lets go of their
        # buffers, and the next call finds the connection in step.
        reads = client.iter_reads([(0, 8 * MiB)], request_size=MiB, window=4, ordered=True)
        for offset, data in reads:
            assert offset == 0 and bytes(data[:4]) == b"\x11" * 4
            break
        reads.close()  # what leaving the loop does once the generator is collected
        assert client.pread(MiB, 8) == b"\x22" * 8
        assert client._done == {}  # no reply of the abandoned reads was left behind
        # An error chunk from qemu is a RequestError; the connection carries on.
        client._conn.size *= 2  # fool our own bounds check
        with pytest.raises(RequestError, match="EINVAL"):
            client.pread(64 * MiB, 4096)
        with pytest.raises(RequestError):
            list(client.iter_reads([(63 * MiB, 2 * MiB)], request_size=MiB, window=2))
        assert client.pread(0, 4) == b"\x11" * 4
    assert client.closed
    with pytest.raises(NBDError, match="closed"):
        client.pread(0, 4)


def test_qemu10_extended_headers(qemu10_uri: str) -> None:
    contexts = ["base:allocation", "qemu:dirty-bitmap:b0"]
    with NBDClient.connect(qemu10_uri, meta_contexts=contexts) as client:
        assert client.extended_headers and client.size == 8 << 30
        # One 64-bit BLOCK_STATUS may answer past 4 GiB; the dirty bits are where qemu-io wrote.
        dirty = [(o, n) for o, n, f in walk(client, "qemu:dirty-bitmap:b0") if f & NBD_STATE_DIRTY]
        assert dirty[0][0] == 0 and any(o <= 6 << 30 < o + n for o, n in dirty)
        assert client.pread(6 << 30, 4096) == b"\x66" * 4096
    with NBDClient.connect(qemu10_uri, extended_headers=False) as client:
        assert not client.extended_headers and client.structured_replies
        assert client.pread(0, 8) == b"\x55" * 8


def test_tls(tls_server: tuple[Path, int]) -> None:
    d, port = tls_server
    uri = f"nbds://localhost:{port}/disk?tls-certificates={d / 'pki'}"
    with NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        assert "base:allocation" in client.meta_contexts
        assert client.pread(0, 64 * 1024) == b"\x11" * 64 * 1024
        buf = bytearray(3 * MiB)  # a payload larger than a TLS record, through the TLS path
        client.pread_into(buf, 0)
        assert buf[MiB : MiB + 128 * 1024] == b"\x22" * 128 * 1024
    pki = d / "pki"
    tls = TLSConfig(
        ca_file=str(pki / "ca-cert.pem"),
        cert_file=str(pki / "client-cert.pem"),
        key_file=str(pki / "client-key.pem"),
        server_hostname="127.0.0.1",
    )
    with NBDClient.connect(f"nbd://127.0.0.1:{port}/disk", tls=tls) as client:
        assert client.pread(1 * MiB, 4) == b"\x22" * 4
    wrong = f"nbds://localhost:{port}/disk?tls-certificates={d / 'other'}"
    with pytest.raises(HandshakeError, match="certificate verify failed"):
        NBDClient.connect(wrong, timeout=10)
    with pytest.raises(OptionError, match="ERR_TLS_REQD"):
        NBDClient.connect(f"nbd://127.0.0.1:{port}/disk", timeout=10)


def test_nbd_server_without_structured_replies(nbd_server: tuple[str, Path]) -> None:
    uri, img = nbd_server
    with NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        assert not client.structured_replies and client.meta_contexts == {}
        assert client.pread(0, 11) == b"nbd-server!"
        client.pwrite(b"written by the sync client", MiB)
        if client.flags & TransmissionFlag.SEND_FLUSH:
            client.flush()
        assert client.pread(MiB, 26) == b"written by the sync client"
        with pytest.raises(UsageError, match="structured replies"):
            client.block_status(0, 4096)
    assert img.read_bytes()[MiB : MiB + 26] == b"written by the sync client"


def test_nbdkit_writes_zeroes_trims(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("memory", "size=8M")
    with NBDClient.connect(uri, meta_contexts=["base:allocation"]) as client:
        client.pwrite(b"\xaa" * (3 * MiB), 0)
        client.zero(MiB, 4096)
        client.trim(2 * MiB, MiB)
        client.cache(0, 4096)
        data = client.pread(0, 3 * MiB)
        assert data[:MiB] == b"\xaa" * MiB and data[MiB : MiB + 4096] == bytes(4096)
        assert data[2 * MiB :] == bytes(MiB)  # nbdkit memory reads trimmed ranges as zeroes
        lengths, flags = client.block_status(0, 8 * MiB)["base:allocation"]
        assert sum(lengths) >= 8 * MiB and flags[-1] & 1  # the tail is a hole


def test_unreachable_and_unknown_export(qemu72: str, tmp_path: Path) -> None:
    with pytest.raises(ConnectionLostError, match="cannot connect"):
        NBDClient.connect(f"nbd+unix:///disk?socket={tmp_path / 'none.sock'}")
    sock = qemu72.split("socket=")[1]
    with pytest.raises(OptionError, match=r"nope|ERR_UNKNOWN"):
        NBDClient.connect(f"nbd+unix:///nope?socket={sock}")


# --- copy_export ---------------------------------------------------------------------------


def test_copy_to_sparse_file_over_connections(qemu72: str, qcow2: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    out.write_bytes(b"\xff" * (5 * MiB))  # stale content must not survive
    done = []
    fd = os.open(out, os.O_WRONLY)
    os.ftruncate(fd, 0)
    try:
        result = copy_export(
            qemu72,
            FileSink(fd, sequential=False, sparse=True),
            connections=4,
            request_size=256 * 1024,
            stripe=8 * MiB,  # 8 stripes: every worker gets some
            progress=lambda n, size: done.append((n, size)),
        )
    finally:
        os.close(fd)
    assert result.connections == 4 and result.size == 64 * MiB
    assert out.read_bytes() == raw_of(qcow2, tmp_path)
    data = sum(n for _, n, f in nbdinfo_map_merged(qemu72, "base:allocation") if not f & 2)
    assert result.bytes_read == data  # what reads as zeroes was not read
    assert os.stat(out).st_blocks * 512 <= data + 64 * 4096
    assert sum(n for n, _ in done) == 64 * MiB and {s for _, s in done} == {64 * MiB}


def test_copy_sequential_keeps_order(qemu72: str, qcow2: Path, tmp_path: Path) -> None:
    """A pipe gets every byte in order, zeroes included, over one connection."""
    r, w = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, MiB), b"")))
    reader.start()
    try:
        result = copy_export(
            qemu72, FileSink(w, sequential=True, sparse=False), request_size=128 * 1024, window=4
        )
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    assert result.connections == 1
    assert b"".join(chunks) == raw_of(qcow2, tmp_path)


def test_copy_null_sink_counts_data(nbdkit) -> None:  # type: ignore[no-untyped-def]
    uri = nbdkit("data", "( 0x11 * 65536 ) @1048576 ( 0x22 * 4096 )", "size=4M")
    result = copy_export(uri, NullSink(), connections=2)
    # nbdkit data reports the data ranges it was given (at its 4 KiB granularity).
    assert result.size == 4 * MiB and 65536 + 4096 <= result.bytes_read < 4 * MiB


def test_copy_default_requests_fit_a_small_maximum(nbdkit, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The default 960 KiB reads are cut to the server's maximum block size (256 KiB here, with
    512-byte blocks; nbdkit fails any larger request), over the default connections."""
    uri = nbdkit(
        "--filter=blocksize-policy",
        "data",
        "( 0x5a * 3000000 ) @4194304 ( 0x11 * 70000 )",
        "size=8M",
        "blocksize-minimum=512",
        "blocksize-maximum=262144",
        "blocksize-error-policy=error",
    )
    out = tmp_path / "out.raw"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        result = copy_export(uri, FileSink(fd, sequential=False, sparse=True))
    finally:
        os.close(fd)
    expected = bytearray(8 * MiB)
    expected[:3000000] = b"\x5a" * 3000000
    expected[4 * MiB : 4 * MiB + 70000] = b"\x11" * 70000
    assert out.read_bytes() == expected
    assert 3000000 + 70000 <= result.bytes_read < 8 * MiB


def test_copy_over_tls(tls_server: tuple[Path, int], qcow2: Path, tmp_path: Path) -> None:
    """The copy's defaults over TLS (ssl imported only when TLS starts; a payload of 960 KiB
    spans many TLS records, read without MSG_WAITALL), into a sparse file."""
    d, port = tls_server
    uri = f"nbds://localhost:{port}/disk?tls-certificates={d / 'pki'}"
    out = tmp_path / "out.raw"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        result = copy_export(uri, FileSink(fd, sequential=False, sparse=True), timeout=20)
    finally:
        os.close(fd)
    assert result.connections >= 1 and result.size == 64 * MiB
    assert out.read_bytes() == raw_of(qcow2, tmp_path)


def test_copy_host_killed_midway_fails_cleanly(tmp_path: Path) -> None:
    """The host dies during the copy: one clear error, every worker ends, no hang."""
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        # All data (no holes for base:allocation to skip): every byte must be read, so the
        # copy is still going when the host is killed at its first piece.
        chunk = b"x" * MiB
        for _ in range(256):
            f.write(chunk)
    sock = tmp_path / "q.sock"
    proc = subprocess.Popen(
        [tool("qemu-nbd"), "-r", "-t", "-e", "8", "-f", "raw", "-x", "d", "-k", str(sock), str(img)]
    )
    try:
        from tests.peers import wait_listening

        wait_listening(proc, sock=str(sock))
        killed = threading.Event()

        def kill(n: int, size: int) -> None:
            if not killed.is_set():
                killed.set()
                proc.send_signal(signal.SIGKILL)

        with pytest.raises((ConnectionLostError, OSError)):
            copy_export(
                f"nbd+unix:///d?socket={sock}", NullSink(), connections=4, progress=kill, timeout=20
            )
        assert killed.is_set()
    finally:
        proc.kill()
        proc.wait()


def test_copy_bad_arguments(qemu72: str) -> None:
    with pytest.raises(UsageError):
        copy_export(qemu72, NullSink(), connections=0)
    with pytest.raises(UsageError):
        copy_export(qemu72, NullSink(), request_size=100)
