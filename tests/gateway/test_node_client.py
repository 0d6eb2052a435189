"""The Node client (tests/clients/node, @grpc/grpc-js loading the .proto files at run time)
calls every RPC of a real gateway process; what it saw must match what the Python side sees
and what is on the disk."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.integrity import RangeDigest
from tests.gateway.cli_support import (
    ENV,
    EmbeddedDisk,
    GatewayProcess,
    cli,
    granules,
    make_certs,
    make_embedded_disk,
)
from tests.peers import IN_CI, ROOT, tool

pytestmark = pytest.mark.interop

NODE_DIR = ROOT / "tests" / "clients" / "node"
CONTEXT = "qemu:dirty-bitmap:backup"
ARGS = ("--export", "disk", "--bitmap", CONTEXT)
TOKEN = "node-token"


@pytest.fixture
def node() -> str:
    path = tool("node")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        msg = f"{NODE_DIR}/node_modules is missing: run scripts/install-deps.sh"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    disk = make_embedded_disk(tmp_path / "disk.img")
    other = make_embedded_disk(tmp_path / "other.img", seed=2)
    (tmp_path / "token").write_text(TOKEN + "\n")
    args = ["--image", f"disk={disk.path}", "--image", f"other={other.path}"]
    args += ["--token-file", str(tmp_path / "token")]  # Node must send it too
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        yield gw, disk


def merged(rows: list[list[Any]]) -> list[tuple[int, int, int]]:
    """Node's rows as (offset, length, flags), adjacent equal flags joined."""
    out: list[tuple[int, int, int]] = []
    for row in rows:
        off, length, flags = int(row[0]), int(row[1]), row[2]
        if out and out[-1][0] + out[-1][1] == off and out[-1][2] == flags:
            out[-1] = (out[-1][0], out[-1][1] + length, flags)
        else:
            out.append((off, length, flags))
    return out


def python_map(target: str, *extra: str) -> list[tuple[int, int, int]]:
    proc = cli("bitmap", "map", "disk", "--context", CONTEXT, "--json", "--target", target, *extra,
               "--token", TOKEN)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [(e["offset"], e["length"], e["type"]) for e in json.loads(proc.stdout)]


def test_node_client_calls_every_rpc(
    node: str, gateway: tuple[GatewayProcess, EmbeddedDisk]
) -> None:
    gw, disk = gateway
    before = python_map(gw.target)
    proc = subprocess.run(
        [
            node,
            str(NODE_DIR / "client.js"),
            "--target",
            gw.target,
            *ARGS,
            "--clear",
            "--token",
            TOKEN,
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    got = json.loads(proc.stdout)
    assert "error" not in got

    assert got["health"] == {"": "SERVING", "nbdgw.v1.BitmapService": "SERVING"}

    exports = json.loads(
        cli("export", "list", "--json", "--target", gw.target, "--token", TOKEN, check=True).stdout
    )
    assert got["list_exports"]["pages"] == 2  # page_size 1: the page token works from Node
    assert [e["name"] for e in got["list_exports"]["exports"]] == [e["name"] for e in exports]
    export = got["get_export"]
    assert export["name"] == "exports/disk" and int(export["size_bytes"]) == disk.size
    assert export["clear_mode"] == "CLEAR_MODE_AT_SOURCE" and export["read_only"] is False

    bitmaps = json.loads(
        cli("bitmap", "list", "disk", "--json", "--target", gw.target, "--token", TOKEN).stdout
    )
    assert [b["context"] for b in got["list_bitmaps"]] == [b["context"] for b in bitmaps]

    # StreamExtents, all extents: the same map the Python side prints (nbdinfo's format).
    assert got["extents"]["end"] == str(disk.size)
    assert merged(got["extents"]["rows"]) == before

    # With data: exactly the dirty granules, and the bytes that are on the disk.
    dirty = granules(disk.dirty, disk.size)
    data_rows = got["dirty_with_data"]["rows"]
    assert [(o, n) for o, n, _ in merged(data_rows)] == dirty
    data_bytes = 0
    for off, length, flags, allocation, digest in data_rows:
        off, length = int(off), int(length)
        content = bytes(disk.content[off : off + length])
        assert flags == 1
        if allocation == "ALLOCATION_DATA":
            assert digest == hashlib.sha256(content).hexdigest(), f"data at {off}+{length}"
            data_bytes += length
        else:
            assert allocation in ("ALLOCATION_ZERO", "ALLOCATION_HOLE")
            assert content.count(0) == length
    assert data_bytes == got["dirty_with_data"]["data_bytes"] > 0
    # Node checked the stream's sha256 digest against the gateway's (it exits 1 when they
    # differ): the digest of exactly these bytes, by gateway.integrity's definition.
    ours = RangeDigest("sha256", 0)
    for off, length, _, allocation, _ in data_rows:
        if allocation == "ALLOCATION_DATA":
            ours.update(int(off), disk.content[int(off) : int(off) + int(length)])
    assert got["dirty_with_data"]["digest"] == ours.finish(disk.size).hex()

    # Resumed after a dropped call, by token and by offset: no gap, no repeat.
    resumed = got["resumed"]
    assert resumed["head_messages"] == 2 and 0 < int(resumed["resume_offset"]) < disk.size
    assert resumed["end"] == str(disk.size)
    assert merged(resumed["rows"]) == before
    assert merged(resumed["by_offset_rows"]) == before

    # Errors, with their google.rpc.Status details decoded in Node.
    nf = got["not_found"]
    assert (nf["code"], nf["name"]) == (5, "NOT_FOUND")
    info = next(d["value"] for d in nf["details"] if d["type"] == "google.rpc.ErrorInfo")
    assert (info["reason"], info["domain"]) == ("EXPORT_NOT_FOUND", "nbdgw.dev")
    assert any(d["type"] == "google.rpc.ResourceInfo" for d in nf["details"])
    oor = got["out_of_range"]
    assert (oor["code"], oor["name"]) == (11, "OUT_OF_RANGE")
    assert any(d["value"].get("reason") == "RANGE_PAST_END" for d in oor["details"])

    # ClearRange of the first dirty run: Node saw it go, and so does the Python side.
    cleared = got["clear"]["response"]["cleared_ranges"]
    assert [(int(r["offset"]), int(r["length"])) for r in cleared] == dirty[:1]
    # Conditional on the token Node's stream carried; nothing wrote since, nothing kept.
    assert got["clear_token"] and got["clear"]["response"]["conditional"]
    assert got["clear"]["response"]["kept_ranges"] == []
    after = [(o, n) for o, n, f in python_map(gw.target, "--dirty")]
    assert after == dirty[1:]
    assert [(o, n) for o, n, _ in merged(got["dirty_after_clear"])] == after

    # RPCs added to v1 later, called when the proto has them.
    if "remaining_dirty" in got:
        assert got["remaining_dirty"]["end"] == str(disk.size)
        assert [(o, n) for o, n, _ in merged(got["remaining_dirty"]["rows"])] == after
    if "set_generation" in got:
        generation = got["set_generation"]
        if "error" in generation:  # refused for an export that does not use the ledger
            assert any(d["type"] == "google.rpc.ErrorInfo" for d in generation["error"]["details"])
        else:
            assert generation["generation"] == "node-client"


def test_node_client_reports_a_dead_gateway(node: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [node, str(NODE_DIR / "client.js"), "--target", "127.0.0.1:1", *ARGS],
        capture_output=True,
        text=True,
        timeout=90,
        env=ENV,
    )
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["name"] == "UNAVAILABLE"


def test_node_client_without_the_token(
    node: str, gateway: tuple[GatewayProcess, EmbeddedDisk]
) -> None:
    gw, _ = gateway
    proc = subprocess.run(
        [node, str(NODE_DIR / "client.js"), "--target", gw.target, *ARGS],
        capture_output=True,
        text=True,
        timeout=90,
        env=ENV,
    )
    assert proc.returncode == 1
    got = json.loads(proc.stdout)
    assert got["health"]["nbdgw.v1.BitmapService"] == "SERVING"  # health needs no token
    assert got["error"]["name"] == "UNAUTHENTICATED"
    assert "list_exports" not in got


def test_node_client_over_mutual_tls(node: str, tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    disk = make_embedded_disk(tmp_path / "disk.img")
    args = ["--image", f"disk={disk.path}", "--grpc-tls-client-ca-file", str(certs["ca_pem"])]
    args += ["--grpc-tls-cert-file", str(certs["server_pem"])]
    args += ["--grpc-tls-key-file", str(certs["server_key"])]
    tls = ["--tls-ca", str(certs["ca_pem"]), "--tls-server-name", "gateway.test"]
    client = ["--tls-cert", str(certs["client_pem"]), "--tls-key", str(certs["client_key"])]
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        script = [node, str(NODE_DIR / "client.js"), "--target", gw.target, *ARGS, *tls]
        ok = subprocess.run([*script, *client], capture_output=True, text=True, timeout=90)
        refused = subprocess.run(script, capture_output=True, text=True, timeout=90)
    assert ok.returncode == 0, ok.stderr + ok.stdout
    got = json.loads(ok.stdout)
    assert [(o, n) for o, n, _ in merged(got["dirty_with_data"]["rows"])] == granules(
        disk.dirty, disk.size
    )
    assert refused.returncode == 1  # no client certificate: the handshake fails
    assert json.loads(refused.stdout)["error"]["name"] == "UNAVAILABLE"
