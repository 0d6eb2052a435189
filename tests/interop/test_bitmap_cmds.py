"""``nbdgw bitmap ...`` and ``nbdgw disk create`` as a person runs them: exit codes, stdout,
one-line errors; qemu-img and qemu-io check the disk from the outside.

Most commands run in-process through ``gateway.cli.main`` (the same parser and error handling;
a subprocess costs over a second of imports on a loaded machine); ``test_as_subprocesses`` runs
the real ``python -m gateway`` for each kind of command."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli import main
from nbdcore.storage import Image
from nbdcore.tools import REMOVED_IN
from tests.peers import ROOT, tool

G = 65536


def run_subprocess(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "gateway", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def run_in_process(*args: str | Path) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    argv = [str(a) for a in args]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def nbdgw(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = run_in_process(*args)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def fails(*args: str | Path) -> str:
    """Run a command expected to fail with a one-line error; return that line."""
    result = nbdgw(*args, check=False)
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nbdgw {args[0]}"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def listing(disk: Path) -> dict[str, dict[str, object]]:
    return {
        row["name"]: row
        for row in json.loads(nbdgw("disk", "bitmap", "list", disk, "--json").stdout)
    }


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    nbdgw("disk", "create", path, "10M")
    return path


@pytest.mark.interop
def test_create_is_a_sparse_raw_disk(disk: Path) -> None:
    info = json.loads(
        subprocess.run(
            [tool("qemu-img"), "info", "--output=json", "-f", "raw", str(disk)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert info["virtual-size"] == 10 * 1024 * 1024
    assert info["actual-size"] < 1024 * 1024  # sparse
    assert "no bitmaps" in nbdgw("disk", "bitmap", "list", disk).stdout
    assert "exists" in fails("disk", "create", disk, "1M")


def test_add_list_remove(disk: Path) -> None:
    nbdgw("disk", "bitmap", "add", disk, "backup")
    nbdgw("disk", "bitmap", "add", "-g", "4K", "--disable", disk, "weekly snapshot")
    rows = listing(disk)
    assert rows == {
        "backup": {
            "name": "backup",
            "granularity": 65536,
            "enabled": True,
            "dirty_bytes": 0,
            "size": 10485760,
        },
        "weekly snapshot": {
            "name": "weekly snapshot",
            "granularity": 4096,
            "enabled": False,
            "dirty_bytes": 0,
            "size": 10485760,
        },
    }
    table = nbdgw("disk", "bitmap", "list", disk).stdout.splitlines()
    assert table[0].split() == ["NAME", "GRANULARITY", "ENABLED", "DIRTY"]
    assert table[1].split() == ["backup", "65536", "yes", "0"]
    nbdgw("disk", "bitmap", "remove", disk, "backup")
    assert list(listing(disk)) == ["weekly snapshot"]


def test_errors_are_one_line(disk: Path, tmp_path: Path) -> None:
    nbdgw("disk", "bitmap", "add", disk, "b")
    assert "already exists" in fails("disk", "bitmap", "add", disk, "b")
    assert "no bitmap named 'nope'" in fails("disk", "bitmap", "remove", disk, "nope")
    assert "no bitmap named 'nope'" in fails("disk", "bitmap", "clear", disk, "nope")
    assert "no bitmap named 'nope'" in fails("disk", "bitmap", "merge", disk, "nope", "b")
    assert "cannot be empty" in fails("disk", "bitmap", "add", disk, "")
    assert "too long" in fails("disk", "bitmap", "add", disk, "n" * 1024)
    assert "power of two" in fails("disk", "bitmap", "add", "-g", "1000", disk, "g")
    assert "No such file" in fails("disk", "bitmap", "list", tmp_path / "missing.raw")
    assert "No such file" in fails("disk", "bitmap", "add", tmp_path / "missing.raw", "b")
    assert "outside" in fails(
        "disk", "bitmap", "clear", disk, "b", "--offset", "11M", "--length", "1"
    )
    bad = nbdgw("disk", "bitmap", "add", "-g", "12Q", disk, "g", check=False)
    assert bad.returncode == 2 and "not a size" in bad.stderr
    assert list(listing(disk)) == ["b"]  # nothing was lost or half-made


def test_clear_prints_exactly_what_it_cleared(disk: Path) -> None:
    nbdgw("disk", "bitmap", "add", disk, "b")
    with Image.open(disk) as image:
        image.write(b"\x01" * (5 * G), 2 * G + 100)  # granules 2..7 dirty
    assert listing(disk)["b"]["dirty_bytes"] == 6 * G
    # [3G - 1, 6G + 1) holds granules 3, 4 and 5 wholly.
    out = nbdgw(
        "bitmap", "clear", disk, "b", "--offset", str(3 * G - 1), "--length", str(3 * G + 2)
    )
    assert out.stdout.splitlines() == [f"{3 * G} {3 * G}"]
    out = nbdgw(
        "disk", "bitmap", "clear", disk, "b", "--offset", "100", "--length", "1000", "--json"
    )
    assert json.loads(out.stdout) == []
    extents = json.loads(nbdgw("disk", "bitmap", "map", disk, "b", "--json").stdout)
    assert [(e["offset"], e["length"], e["dirty"]) for e in extents] == [
        (0, 2 * G, False),
        (2 * G, G, True),
        (3 * G, 3 * G, False),
        (6 * G, 2 * G, True),
        (8 * G, 10 * 1024 * 1024 - 8 * G, False),
    ]
    out = nbdgw("disk", "bitmap", "clear", disk, "b")  # the whole bitmap
    assert out.stdout.splitlines() == [f"0 {10 * 1024 * 1024}"]
    assert listing(disk)["b"]["dirty_bytes"] == 0


def test_enable_disable_merge(disk: Path) -> None:
    nbdgw("disk", "bitmap", "add", "-g", "512", disk, "fine")
    nbdgw("disk", "bitmap", "add", disk, "coarse")
    nbdgw("disk", "bitmap", "disable", disk, "coarse")
    assert listing(disk)["coarse"]["enabled"] is False
    with Image.open(disk) as image:
        image.write(b"x", 5 * G + 7)
    rows = listing(disk)
    assert rows["fine"]["dirty_bytes"] == 512
    assert rows["coarse"]["dirty_bytes"] == 0
    nbdgw("disk", "bitmap", "merge", disk, "fine", "coarse")
    assert listing(disk)["coarse"]["dirty_bytes"] == G
    nbdgw("disk", "bitmap", "enable", disk, "coarse")
    assert listing(disk)["coarse"]["enabled"] is True


def test_busy_image_and_readers(disk: Path) -> None:
    nbdgw("disk", "bitmap", "add", disk, "b")
    with Image.open(disk) as image:
        image.write(b"x", 0)
        assert "in use" in fails("disk", "bitmap", "clear", disk, "b")
        # Looking works while a writer (a server) has the image.
        assert listing(disk)["b"]["dirty_bytes"] == G
    nbdgw("disk", "bitmap", "clear", disk, "b")


@pytest.mark.interop
def test_data_seen_by_qemu_io(disk: Path) -> None:
    nbdgw("disk", "bitmap", "add", disk, "b")
    with Image.open(disk) as image:
        image.write(b"\xab" * 4096, 3 * G)
        image.write_zeroes(3 * G + 1024, 1024)
    qemu_io = tool("qemu-io")
    for command in (f"read -P 0xab {3 * G} 1024", f"read -P 0 {3 * G + 1024} 1024"):
        result = subprocess.run(
            [qemu_io, "-f", "raw", "-r", "-c", command, str(disk)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "Pattern verification failed" not in result.stdout, result.stdout


def test_help_lists_the_commands() -> None:
    out = nbdgw("disk", "bitmap", "--help").stdout
    for command in ("add", "remove", "list", "map", "enable", "disable", "clear", "merge"):
        assert command in out


def test_as_subprocesses(disk: Path) -> None:
    """The real command: output, exit codes and one-line errors across a process boundary."""
    assert run_subprocess("disk", "bitmap", "add", "-g", "64K", disk, "b").returncode == 0
    with Image.open(disk) as image:
        image.write(b"x", G + 1)
    listed = run_subprocess("disk", "bitmap", "list", disk, "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout)[0]["dirty_bytes"] == G
    cleared = run_subprocess(
        "disk", "bitmap", "clear", disk, "b", "--offset", "0", "--length", "1M"
    )
    assert (cleared.returncode, cleared.stdout) == (0, f"0 {1024 * 1024}\n")
    dup = run_subprocess("disk", "bitmap", "add", disk, "b")
    assert dup.returncode == 1
    assert dup.stderr == "nbdgw disk bitmap add: bitmap 'b' already exists\n"
    usage = run_subprocess("disk", "bitmap", "add", "-g", "lots", disk, "c")
    assert usage.returncode == 2 and "not a size" in usage.stderr


def test_the_old_spelling_on_a_file_still_works(disk: Path) -> None:
    """Until 0.2, ``nbdgw bitmap VERB DISK`` with DISK an existing file is ``disk bitmap``."""
    old = run_subprocess("bitmap", "add", "-g", "64K", disk, "b")
    notice = f"nbdgw: 'bitmap add' is deprecated, use 'disk bitmap add' (removed in {REMOVED_IN})"
    assert (old.returncode, old.stderr) == (0, notice + "\n")
    listed = run_subprocess("bitmap", "list", disk, "--json")
    assert json.loads(listed.stdout)[0]["name"] == "b"
    dup = run_subprocess("bitmap", "add", disk, "b")
    assert dup.returncode == 1
    assert dup.stderr.splitlines()[1] == "nbdgw disk bitmap add: bitmap 'b' already exists"


@pytest.mark.interop
@pytest.mark.parametrize("granularity", [512 * 8, 65536])
def test_same_dirty_map_as_qemu(tmp_path: Path, granularity: int) -> None:
    """The same writes dirty the same granules in our bitmap as in a qcow2 persistent bitmap
    (qemu-io writes, qemu-nbd serves it, nbdinfo reads it), including the partial last one."""
    size = 10 * 1024 * 1024 + 1536
    rng = random.Random(granularity)
    ops = []
    for _ in range(40):
        length = rng.choice((1, 512, 4096, 100_000, rng.randrange(1, 400_000)))
        offset = rng.randrange(0, size - length + 1)
        ops.append((rng.choice(("write", "zero")), offset, length))
    ops.append(("write", size - 1, 1))

    qcow2 = tmp_path / "d.qcow2"
    qemu_img, qemu_io, qemu_nbd = tool("qemu-img"), tool("qemu-io"), tool("qemu-nbd")
    nbdinfo = tool("nbdinfo")
    subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", qcow2, str(size)], check=True)
    add = [qemu_img, "bitmap", "--add", "--granularity", str(granularity), qcow2, "b0"]
    subprocess.run(add, check=True)
    script = "".join(
        f"write {'-z' if op == 'zero' else '-P 0x5a'} {offset} {length}\n"
        for op, offset, length in ops
    )
    io = subprocess.run(
        [qemu_io, "-f", "qcow2", qcow2], input=script, capture_output=True, text=True, check=True
    )
    assert "error" not in io.stdout.lower(), io.stdout

    raw = tmp_path / "d.raw"
    nbdgw("disk", "create", raw, str(size))
    nbdgw("disk", "bitmap", "add", "-g", str(granularity), raw, "b0")
    with Image.open(raw) as image:
        for op, offset, length in ops:
            if op == "zero":
                image.write_zeroes(offset, length)
            else:
                image.write(b"\x5a" * length, offset)
    ours = [
        (e["offset"], e["length"], int(e["dirty"]))
        for e in json.loads(nbdgw("disk", "bitmap", "map", raw, "b0", "--json").stdout)
    ]

    sock = tmp_path / "nbd.sock"
    uri = f"nbd+unix:///disk?socket={sock}"
    server = subprocess.Popen(
        [qemu_nbd, "-r", "-t", "-f", "qcow2", "-x", "disk", "-B", "b0", "-k", str(sock), qcow2]
    )
    try:
        for _ in range(200):
            ready = subprocess.run([nbdinfo, "--size", uri], capture_output=True)
            if ready.returncode == 0:
                break
            time.sleep(0.05)
        mapped = subprocess.run(
            [nbdinfo, "--json", "--map=qemu:dirty-bitmap:b0", uri],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    theirs = [(e["offset"], e["length"], e["type"]) for e in json.loads(mapped.stdout)]
    assert any(flags for _, _, flags in theirs)
    assert ours == theirs
