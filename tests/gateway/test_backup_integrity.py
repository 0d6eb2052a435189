"""End-to-end checks of the data path through real processes: ``nbdgw backup --digest`` records
the digest of what it stored, ``nbdgw verify`` checks a chain against it and against the
export, and data corrupted in flight (a proxy flips one byte between the gateway and its
client) fails every client loudly, naming the range, with nothing bad written."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli.backup import BackupState, state_path
from gateway.integrity import RangeDigest
from tests.gateway.cli_support import (
    ENV,
    EmbeddedDisk,
    GatewayProcess,
    MiB,
    cli,
    make_embedded_disk,
    run_and_kill,
)
from tests.gateway.corrupting_proxy import CorruptingProxy
from tests.gateway.test_node_client import NODE_DIR, node  # noqa: F401  (a fixture)
from tests.peers import ROOT

pytestmark = pytest.mark.interop


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    disk = make_embedded_disk(tmp_path / "disk.img")
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw:
        yield gw, disk


def digest_of(algorithm: str, content: bytes | bytearray) -> str:
    d = RangeDigest(algorithm, 0)
    d.update(0, content)
    return d.finish(len(content)).hex()


def test_backup_records_its_digest_and_verify_checks_the_chain(
    gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    gw, disk = gateway
    full, inc = tmp_path / "full.img", tmp_path / "inc.img"
    target = ("--target", gw.target)
    proc = cli("backup", "disk", str(full), "--full", "--digest", "blake3", *target)
    assert proc.returncode == 0, proc.stderr
    state = BackupState.load(state_path(full))
    assert state.digest == digest_of("blake3", disk.content)  # the disk's content, computed here
    assert state.digest in proc.stdout
    proc = cli("backup", "disk", str(inc), "--bitmap", "backup", "--digest", "sha256", *target)
    assert proc.returncode == 0, proc.stderr
    inc_state = BackupState.load(state_path(inc))
    assert inc_state.digest == digest_of("sha256", inc.read_bytes())  # holes outside the dirty

    proc = cli("verify", "disk", str(full), str(inc), "--segment", "4M", *target)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{full}: matches its blake3 digest" in proc.stdout
    assert f"{inc}: matches its sha256 digest" in proc.stdout
    assert "matches disk" in proc.stdout

    # One flipped byte in the stored full backup, where no incremental covers it (clean data):
    # both checks see it, and the second names the MiB it lies in.
    at = 4 * MiB + 12345
    with full.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    proc = cli("verify", "disk", str(full), str(inc), "--segment", "4M", *target)
    assert proc.returncode == 1
    assert f"{full}: DIFFERS from the blake3 digest recorded" in proc.stdout
    assert f"DIFFERS from disk (blake3) in [{4 * MiB}, {5 * MiB})" in proc.stdout
    assert f"{inc}: matches its sha256 digest" in proc.stdout


def test_backup_with_digest_resumes_after_a_kill(
    gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    gw, disk = gateway
    out = tmp_path / "full.img"
    args = ["backup", "disk", str(out), "--full", "--digest", "blake3", "--target", gw.target]
    killed = run_and_kill([*args, "--save-every", "1M"], state_path(out), 3 * MiB, disk.size)
    assert killed["resume_token"] and killed["digest_state"]
    proc = cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == bytes(disk.content)
    assert BackupState.load(state_path(out)).digest == digest_of("blake3", disk.content)


def test_backup_that_clears_with_digest_resumes_after_a_kill(
    gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    """Killed after it cleared what it had stored: on resume the gateway must not hash the
    current block again from the bitmap, where those ranges are clean now (they were
    delivered, and the digest covers them)."""
    gw, disk = gateway
    out = tmp_path / "inc.img"
    args = ["backup", "disk", str(out), "--bitmap", "backup", "--clear", "--digest", "sha256"]
    args += ["--target", gw.target]
    # Inside the 6 MiB dirty run at 8 MiB, not on a block boundary (checkpoints every 1 MiB
    # of data fall where the messages end).
    killed = run_and_kill([*args, "--save-every", "1M"], state_path(out), 9 * MiB, disk.size)
    assert killed["bytes_cleared"] > 0 and killed["digest_state"] and killed["resume_token"]
    proc = cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr
    state = BackupState.load(state_path(out))
    assert state.digest == digest_of("sha256", out.read_bytes())
    for off, n in disk.dirty:  # every dirty byte stored
        assert out.read_bytes()[off : off + n] == disk.content[off : off + n]


def test_corruption_in_flight_fails_the_backup_and_writes_nothing_bad(
    gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    gw, disk = gateway
    out = tmp_path / "full.img"
    with CorruptingProxy(gw.target) as proxy:
        proc = cli("backup", "disk", str(out), "--full", "--target", proxy.target)
    assert proxy.flipped, "the proxy corrupted nothing"
    assert proc.returncode == 1
    assert "is corrupt: CRC32C" in proc.stderr and "--resume" in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    start = int(line.split("the data of [", 1)[1].split(",", 1)[0])
    assert start < disk.size
    # Every byte written is the disk's (the rest is still a hole: zeros).
    written = out.read_bytes()
    for pos in range(0, disk.size, MiB):
        got, want = written[pos : pos + MiB], disk.content[pos : pos + MiB]
        assert got == want or got.count(0) == len(got), f"bad data at {pos}"
    # Resumed without the proxy, the backup completes with the disk's bytes.
    proc = cli("backup", "disk", str(out), "--full", "--resume", "--target", gw.target)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == bytes(disk.content)


def test_corruption_in_flight_fails_the_node_client(
    node: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    disk = make_embedded_disk(tmp_path / "disk.img")
    with (
        GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw,
        CorruptingProxy(gw.target) as proxy,
    ):
        args = ["--target", proxy.target, "--export", "disk", "--bitmap", "backup"]
        proc = subprocess.run(
            [node, str(NODE_DIR / "client.js"), *args],
            capture_output=True,
            text=True,
            timeout=90,
            env=ENV,
            cwd=ROOT,
        )
    assert proxy.flipped
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]["message"]
    assert "is corrupt: CRC32C" in error and "data of [" in error


def test_compressed_backup_is_the_same(
    gateway: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    gw, disk = gateway
    out = tmp_path / "full.img"
    proc = cli("backup", "disk", str(out), "--full", "--compress", "--target", gw.target)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == bytes(disk.content)
    bad = cli("backup", "disk", str(tmp_path / "x.img"), "--full", "--compress", "25")
    assert bad.returncode == 2 and "--compress LEVEL must be 1 to 19" in bad.stderr


def test_corruption_in_flight_fails_the_python_client(
    gateway: tuple[GatewayProcess, EmbeddedDisk],
) -> None:
    import nbdgw
    from nbdgw.errors import DataCorrupted

    gw, disk = gateway
    with CorruptingProxy(gw.target) as proxy, nbdgw.Client(proxy.target) as client:
        received = []
        with pytest.raises(DataCorrupted, match="is corrupt: CRC32C") as info:
            for chunk in client.iter_data("disk", "base:allocation"):
                received.append(chunk)
    assert proxy.flipped
    assert info.value.offset < info.value.next_offset <= disk.size
    # What came before the corrupt message is the disk's.
    for chunk in received:
        if chunk.data is not None:
            assert bytes(chunk.data) == disk.content[chunk.offset : chunk.end]
    assert all(chunk.end <= info.value.offset for chunk in received)
