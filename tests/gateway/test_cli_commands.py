"""``nbdgw export list`` and ``bitmap list|map|clear`` against real gateway processes, in front
of a real qemu-nbd (qcow2 bitmaps dirtied by qemu-io) and of the embedded nbdcore host;
``nbdinfo --map`` on the same NBD host is the oracle for the extent maps, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.tools import REMOVED_IN
from tests.gateway.cli_support import (
    GRANULARITY,
    EmbeddedDisk,
    GatewayProcess,
    MiB,
    QemuNBD,
    assert_one_line_error,
    cli,
    granules,
    make_embedded_disk,
    make_qemu_disk,
    nbdgw,
    run,
)
from tests.peers import qemu10, tool

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def qemu_gateway(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, QemuNBD]]:
    tmp = tmp_path_factory.mktemp("cli-qemu")
    host = QemuNBD(make_qemu_disk(tmp), tmp / "qemu.sock").start()
    gw = GatewayProcess("--export", f"vm={host.uri}", data_dir=tmp / "data")
    try:
        yield gw.start(), host
    finally:
        gw.stop()
        host.stop()


@pytest.fixture
def embedded_gateway(tmp_path: Path) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    disk = make_embedded_disk(tmp_path / "disk.img")
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp_path / "data") as gw:
        yield gw, disk


def nbdinfo(uri: str, context: str, *, json_output: bool) -> str:
    args = [tool("nbdinfo"), f"--map={context}", uri]
    return run(*args[:2], "--json", *args[2:]) if json_output else run(*args)


@pytest.mark.parametrize("json_output", [True, False], ids=["json", "text"])
@pytest.mark.parametrize(
    "context",
    ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1", "base:allocation", "qemu:allocation-depth"],
)
def test_extents_identical_to_nbdinfo_on_qemu_nbd(
    qemu_gateway: tuple[GatewayProcess, QemuNBD], context: str, json_output: bool
) -> None:
    gw, host = qemu_gateway
    args = ["bitmap", "map", "vm", "--context", context, "--target", gw.target]
    ours = cli(*args, *(["--json"] if json_output else []), check=True).stdout
    theirs = nbdinfo(host.uri, context, json_output=json_output)
    assert ours == theirs
    assert len(ours.splitlines()) >= 3  # a real map, not an empty one


def test_extents_identical_to_nbdinfo_with_extended_headers(tmp_path: Path) -> None:
    """qemu 10's qemu-nbd offers extended headers (64-bit extents), which the gateway asks for;
    nbdinfo 1.14 does not: the maps must still be the same."""
    host = QemuNBD(make_qemu_disk(tmp_path), tmp_path / "q10.sock", binary=qemu10("qemu-nbd"))
    host.start()
    try:
        with GatewayProcess("--export", f"vm={host.uri}", data_dir=tmp_path / "data") as gw:
            for context in ("qemu:dirty-bitmap:b0", "base:allocation", "qemu:allocation-depth"):
                ours = cli(
                    "bitmap", "map", "vm", "--context", context, "--json", "--target", gw.target
                )
                assert ours.returncode == 0, ours.stderr
                assert ours.stdout == nbdinfo(host.uri, context, json_output=True)
    finally:
        host.stop()


def test_extents_short_bitmap_name_and_dirty_filter(
    qemu_gateway: tuple[GatewayProcess, QemuNBD],
) -> None:
    gw, host = qemu_gateway
    ours = cli("bitmap", "map", "vm", "--context", "b0", "--dirty", "--json", "--target", gw.target)
    assert ours.returncode == 0, ours.stderr
    full = json.loads(nbdinfo(host.uri, "qemu:dirty-bitmap:b0", json_output=True))
    assert json.loads(ours.stdout) == [e for e in full if e["type"] == 1]
    assert granules(host.disk.b0_writes, host.disk.size) == [
        (e["offset"], e["length"]) for e in json.loads(ours.stdout)
    ]


def test_extents_range_is_the_clipped_map(qemu_gateway: tuple[GatewayProcess, QemuNBD]) -> None:
    gw, host = qemu_gateway
    start, length = 3 * MiB + 4096, 10 * MiB
    ours = cli(
        "bitmap", "map", "vm", "--context", "b0", "--json", "--target", gw.target,
        "--offset", str(start), "--length", "10M",
    )  # fmt: skip
    assert ours.returncode == 0, ours.stderr
    expected = []
    for e in json.loads(nbdinfo(host.uri, "qemu:dirty-bitmap:b0", json_output=True)):
        lo, hi = max(e["offset"], start), min(e["offset"] + e["length"], start + length)
        if lo < hi:
            expected.append({**e, "offset": lo, "length": hi - lo})
    assert json.loads(ours.stdout) == expected


def test_exports_and_bitmaps(qemu_gateway: tuple[GatewayProcess, QemuNBD]) -> None:
    gw, host = qemu_gateway
    out = cli("export", "list", "--target", gw.target, "--json", check=True).stdout
    (export,) = json.loads(out)
    assert export["name"] == "exports/vm"
    assert int(export["sizeBytes"]) == host.disk.size  # the API's JSON: camelCase
    text = cli("export", "list", "--target", gw.target, check=True).stdout.splitlines()
    assert text[0].split()[:2] == ["NAME", "SIZE"] and text[1].split()[:2] == ["vm", "32M"]

    out = cli("bitmap", "list", "vm", "--target", gw.target, "--json", check=True).stdout
    contexts = {b["context"]: b for b in json.loads(out)}
    assert set(contexts) == {
        "base:allocation",
        "qemu:allocation-depth",
        "qemu:dirty-bitmap:b0",
        "qemu:dirty-bitmap:b1",
    }
    text = cli("bitmap", "list", "vm", "--target", gw.target, check=True).stdout
    assert "qemu:dirty-bitmap:b1" in text and "dirty-bitmap" in text


def test_clear_refused_on_qemu_nbd(qemu_gateway: tuple[GatewayProcess, QemuNBD]) -> None:
    gw, _ = qemu_gateway
    proc = cli(
        "bitmap", "clear", "vm", "--bitmap", "b0", "--offset", "0", "--length", "1M",
        "--target", gw.target,
    )  # fmt: skip
    line = assert_one_line_error(proc, 1)
    assert "FAILED_PRECONDITION" in line and "[CLEAR_NOT_SUPPORTED]" in line


def test_extents_and_clear_on_embedded_host(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk],
) -> None:
    gw, disk = embedded_gateway
    uri = gw.nbd_uri("disk")
    for context in ("qemu:dirty-bitmap:backup", "base:allocation"):
        for json_output in (True, False):
            args = ["bitmap", "map", "disk", "--context", context, "--target", gw.target]
            ours = cli(*args, *(["--json"] if json_output else []), check=True).stdout
            assert ours == nbdinfo(uri, context, json_output=json_output)

    dirty = granules(disk.dirty, disk.size)
    # The export is writable: a clear carries the token of the stream that read the range.
    listed = cli(
        "bitmap", "map", "disk", "--context", "backup", "--show-clear-token", "--target", gw.target
    )
    token = listed.stderr.strip().removeprefix("clear token: ")
    assert listed.returncode == 0 and token and " " not in token, listed.stderr
    refused = cli("bitmap", "clear", "disk", "--bitmap", "backup", "--offset", "0",
                  "--length", "1M", "--target", gw.target)  # fmt: skip
    line = assert_one_line_error(refused, 1)
    assert "[CLEAR_TOKEN_REQUIRED]" in line
    # In the CLI's words: its flags and commands, not the API's fields and RPCs.
    assert "pass --clear-token with the token that 'nbdgw bitmap map --show-clear-token'" in line
    assert "--unconditional" in line and "clear_token" not in line and "StreamExtents" not in line
    # Clear the second dirty run plus half a granule on each side: only whole granules go.
    off, length = dirty[1]
    proc = cli(
        "bitmap", "clear", "disk", "--bitmap", "backup", "--json", "--target", gw.target,
        "--offset", str(off - GRANULARITY // 2), "--length", str(length + GRANULARITY),
        "--clear-token", token,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    resp = json.loads(proc.stdout)
    assert [(int(r["offset"]), int(r["length"])) for r in resp["clearedRanges"]] == [(off, length)]
    assert int(resp["clearedBytes"]) == length
    assert int(resp["granularityBytes"]) == GRANULARITY
    assert resp["conditional"] and resp["keptRanges"] == []  # nothing wrote since

    after = cli(
        "bitmap", "map", "disk", "--context", "backup", "--dirty", "--json", "--target", gw.target
    )
    assert [(e["offset"], e["length"]) for e in json.loads(after.stdout)] == dirty[:1] + dirty[2:]
    # The NBD host itself (seen by nbdinfo) agrees: cleared at the source.
    full = json.loads(nbdinfo(uri, "qemu:dirty-bitmap:backup", json_output=True))
    assert [(e["offset"], e["length"]) for e in full if e["type"] == 1] == dirty[:1] + dirty[2:]

    # Text output: a summary line, then one line per cleared range.
    off, length = dirty[0]
    proc = cli(
        "bitmap", "clear", "disk", "--bitmap", "qemu:dirty-bitmap:backup", "--target", gw.target,
        "--offset", str(off), "--length", str(length), "--unconditional",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"cleared {length} bytes in 1 range")
    assert lines[1].split() == [str(off), str(length)]


BAD_ARGS = [
    (["bitmap", "map", "disk"], 2, "--bitmap"),
    (["bitmap", "map", "disk", "--context", "b", "--offset", "12x"], 2, "invalid size"),
    (["bitmap", "map", "disk", "--context", "b", "--length", "0"], 2, "--length"),
    (["bitmap", "clear", "disk", "--bitmap", "b", "--offset", "0"], 2, "--length"),
    (["bitmap", "map", "disk", "--context", "b", "--target", "nocolon"], 2, "HOST:PORT"),
    (["export", "list", "--tls-cert", "/nonexistent"], 2, "--tls-key"),
    (["export", "list", "--tls-ca", "/nonexistent/ca.pem"], 2, "cannot read"),
    (["backup", "disk", "out.img"], 2, "--bitmap"),
]


@pytest.mark.parametrize(("args", "code", "needle"), BAD_ARGS, ids=lambda v: str(v)[:30])
def test_bad_arguments_are_one_line(args: list[str], code: int, needle: str) -> None:
    line = assert_one_line_error(cli(*args), code)
    assert needle in line


def test_bad_arguments_in_a_real_process() -> None:
    line = assert_one_line_error(
        nbdgw("bitmap", "clear", "disk", "--bitmap", "b", "--offset", "-1"), 2
    )
    assert "--offset" in line


def test_server_side_errors_are_one_line(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk],
) -> None:
    gw, disk = embedded_gateway
    t = ["--target", gw.target]
    line = assert_one_line_error(nbdgw("bitmap", "list", "nosuch", *t), 1)
    assert line.startswith("nbdgw bitmap list: NOT_FOUND:") and line.endswith("[EXPORT_NOT_FOUND]")
    line = assert_one_line_error(cli("bitmap", "map", "disk", "--context", "nosuch", *t), 1)
    assert "NOT_FOUND" in line and "[BITMAP_NOT_FOUND]" in line
    line = assert_one_line_error(
        cli("bitmap", "map", "disk", "--context", "backup", "--offset", str(disk.size), *t), 1
    )
    assert "OUT_OF_RANGE" in line and "[RANGE_PAST_END]" in line
    line = assert_one_line_error(
        cli(
            "bitmap",
            "clear",
            "disk",
            "--bitmap",
            "base:allocation",
            "--offset",
            "0",
            "--length",
            "1M",
            *t,
        ),
        1,
    )
    assert "FAILED_PRECONDITION" in line
    # Nobody listens on the port the gateway had: UNAVAILABLE, still one line.
    gw.stop()
    line = assert_one_line_error(cli("export", "list", *t, "--timeout", "5"), 1)
    assert "UNAVAILABLE" in line


def test_old_spellings_still_work_with_one_notice(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk],
) -> None:
    """Until 0.2 every old spelling runs its new command, adding one line on stderr."""
    gw, _ = embedded_gateway
    t = ["--target", gw.target]
    pairs = [
        (["exports", *t], ["export", "list", *t], "'exports'", "'export list'"),
        (["bitmaps", "disk", *t], ["bitmap", "list", "disk", *t], "'bitmaps'", "'bitmap list'"),
        (
            ["extents", "disk", "--bitmap", "base:allocation", *t],
            ["bitmap", "map", "disk", "--context", "base:allocation", *t],
            "'extents'",
            "'bitmap map'",
        ),
        (
            ["remaining", "disk", "--bitmap", "backup", *t],
            ["bitmap", "remaining", "disk", "--bitmap", "backup", *t],
            "'remaining'",
            "'bitmap remaining'",
        ),
    ]
    for old, new, old_words, new_words in pairs:
        before, after = cli(*old), cli(*new, check=True)
        assert (before.returncode, before.stdout) == (0, after.stdout), before.stderr
        assert after.stderr == ""
        assert before.stderr.splitlines() == [
            f"nbdgw: {old_words} is deprecated, use {new_words} (removed in {REMOVED_IN})"
        ]
    made = cli("snapshots", "create", "disk", "--id", "old1", "--no-fork", *t)
    assert made.returncode == 0, made.stderr
    assert len(made.stderr.splitlines()) == 2  # the command's notice and --id's
    listed = cli("snapshot", "list", "disk", *t, check=True).stdout
    assert "old1" in listed
    released = cli("snapshots", "release", "disk", "old1", *t)
    assert released.returncode == 0 and released.stdout.startswith("released old1")
    assert "old1" not in cli("snapshot", "list", "disk", *t, check=True).stdout


def test_checkpoint_create_list_delete(
    embedded_gateway: tuple[GatewayProcess, EmbeddedDisk],
) -> None:
    gw, _ = embedded_gateway
    t = ["--target", gw.target]
    assert cli("checkpoint", "list", "disk", *t, check=True).stdout == "no checkpoints of disk\n"
    made = cli("checkpoint", "create", "disk", "k0", *t, check=True)
    assert made.stdout.startswith("checkpoint k0 of disk started")
    cli("checkpoint", "create", "disk", "k1", *t, check=True)
    # Its snapshot is gone; the checkpoints stay, the newest recording.
    assert "k0" not in cli("snapshot", "list", "disk", *t, check=True).stdout
    rows = [line.split() for line in cli("checkpoint", "list", "disk", *t).stdout.splitlines()]
    assert rows[0] == ["NAME", "STATE", "DIRTY", "GRANULARITY"]
    assert [r[:2] for r in rows[1:]] == [["k0", "closed"], ["k1", "recording"]]
    again = assert_one_line_error(cli("checkpoint", "create", "disk", "k1", *t), 1)
    assert (
        again.startswith("nbdgw checkpoint create: ALREADY_EXISTS")
        and "[CHECKPOINT_EXISTS]" in again
    )
    deleted = cli("checkpoint", "delete", "disk", "k1", *t, check=True)
    assert deleted.stdout == "deleted k1; its changes merged into k0\n"
    cli("checkpoint", "delete", "disk", "k0", *t, check=True)
    listed = json.loads(cli("checkpoint", "list", "disk", "--json", *t, check=True).stdout)
    assert listed == {"checkpoints": []}
