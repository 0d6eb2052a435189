"""The Go client (tests/clients/go), built from the stubs scripts/gen-clients generates with buf
and Debian's protoc-gen-go and protoc-gen-go-grpc, calls a real gateway process: the exports it
lists, the extents it decodes and the rich error it reads must be what the gateway serves and
what was written to the disk; it checks the CRC32C of every data message, and a byte changed
in flight (tests/gateway/corrupting_proxy.py) makes it fail naming the range."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gateway.cli_support import (
    ENV,
    EmbeddedDisk,
    GatewayProcess,
    cli,
    granules,
    make_embedded_disk,
)
from tests.gateway.corrupting_proxy import CorruptingProxy
from tests.peers import ROOT, tool

pytestmark = pytest.mark.interop

TOKEN = "go-token"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in ("go", "protoc-gen-go", "protoc-gen-go-grpc"):
        tool(name)
    out = tmp_path_factory.mktemp("clients")
    proc = subprocess.run(
        [str(ROOT / "scripts" / "gen-clients"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # the first build compiles grpc-go; later ones hit the build cache
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The stubs were generated here, not taken from anywhere else.
    assert (out / "go/src/nbdgw.dev/gen/go/nbdgw/v1/bitmap_service_grpc.pb.go").exists()
    return out / "nbdgw-go-client"


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    disk = make_embedded_disk(tmp_path / "disk.img")
    other = make_embedded_disk(tmp_path / "other.img", seed=2)
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ["--image", f"disk={disk.path}", "--image", f"other={other.path}"]
    args += ["--token-file", str(tmp_path / "token")]  # Go must send it too
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        yield gw, disk


def merged(rows: list[list[int]]) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for off, length, flags in rows:
        if out and out[-1][0] + out[-1][1] == off and out[-1][2] == flags:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((off, length, flags))
    return out


def run_client(client: Path, gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(client), "-target", gw.target, *args],
        capture_output=True,
        text=True,
        timeout=90,
        env=ENV,
    )


def test_go_client_lists_streams_and_reads_rich_errors(
    go_client: Path, gateway: tuple[GatewayProcess, EmbeddedDisk]
) -> None:
    gw, disk = gateway
    proc = run_client(go_client, gw, "-token", TOKEN, "-export", "disk")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    got: dict[str, Any] = json.loads(proc.stdout)

    exports = json.loads(
        cli("export", "list", "--json", "--target", gw.target, "--token", TOKEN, check=True).stdout
    )
    assert [e["name"] for e in got["exports"]] == [e["name"] for e in exports]
    assert got["pages"] == 2  # page_size 1: the page token works from Go
    assert got["exports"][0] == {
        "name": "exports/disk",
        "size_bytes": disk.size,
        "clear_mode": "CLEAR_MODE_AT_SOURCE",
    }

    # Every extent of the export, decoded from the packed columns: the dirty ones are exactly
    # the granules written since the bitmap was added.
    extents = got["extents"]
    assert extents["end"] == disk.size and extents["messages"] >= 1
    rows = merged(extents["rows"])
    assert rows[0][0] == 0 and sum(n for _, n, _ in rows) == disk.size
    assert [(o, n) for o, n, f in rows if f == 1] == granules(disk.dirty, disk.size)

    # The data of the dirty extents, each message's CRC32C checked: the bytes on the disk.
    data = got["data"]
    assert data["end"] == disk.size and data["messages"] >= 1
    assert [(o, n) for o, n, _ in merged([row[:3] for row in data["rows"]])] == granules(
        disk.dirty, disk.size
    )
    data_bytes = 0
    for off, length, flags, allocation, digest in data["rows"]:
        content = bytes(disk.content[off : off + length])
        assert flags == 1
        if allocation == "ALLOCATION_DATA":
            assert digest == hashlib.sha256(content).hexdigest(), f"data at {off}+{length}"
            data_bytes += length
        else:
            assert allocation in ("ALLOCATION_ZERO", "ALLOCATION_HOLE") and digest == ""
            assert content.count(0) == length
    assert data_bytes == data["data_bytes"] > 0

    assert got["not_found"] == {
        "code": "NotFound",
        "reason": "EXPORT_NOT_FOUND",
        "domain": "nbdgw.dev",
        "metadata": {"export": "no-such-export"},
    }


def test_go_client_without_token_is_refused(
    go_client: Path, gateway: tuple[GatewayProcess, EmbeddedDisk]
) -> None:
    gw, _ = gateway
    proc = run_client(go_client, gw)
    assert proc.returncode == 1
    assert "ListExports" in proc.stderr and "Unauthenticated" in proc.stderr


def test_go_client_fails_on_corruption_in_flight(
    go_client: Path, gateway: tuple[GatewayProcess, EmbeddedDisk]
) -> None:
    """One byte of one data message flipped between the gateway and the client: the client
    exits 1 naming the message's range, having printed nothing (it used none of the data)."""
    gw, disk = gateway
    with CorruptingProxy(gw.target) as proxy:
        proc = subprocess.run(
            [str(go_client), "-target", proxy.target, "-token", TOKEN, "-export", "disk"],
            capture_output=True,
            text=True,
            timeout=90,
            env=ENV,
        )
    assert proxy.flipped, "the proxy corrupted nothing"
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert proc.stdout == ""
    assert "go client: the data of [" in proc.stderr and "is corrupt: CRC32C" in proc.stderr
    start, end = proc.stderr.split("the data of [", 1)[1].split(")", 1)[0].split(", ")
    assert 0 <= int(start) < int(end) <= disk.size
