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
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.cli import main
from nbdcore.storage import Image
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
    assert len(lines) == 1 and lines[0].startswith("nbdgw: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def listing(disk: Path) -> dict[str, dict[str, object]]:
    return {row["name"]: row for row in json.loads(nbdgw("bitmap", "list", disk, "--json").stdout)}


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
    assert "no bitmaps" in nbdgw("bitmap", "list", disk).stdout
    assert "exists" in fails("disk", "create", disk, "1M")


def test_add_list_remove(disk: Path) -> None:
    nbdgw("bitmap", "add", disk, "backup")
    nbdgw("bitmap", "add", "-g", "4K", "--disable", disk, "weekly snapshot")
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
    table = nbdgw("bitmap", "list", disk).stdout.splitlines()
    assert table[0].split() == ["NAME", "GRANULARITY", "ENABLED", "DIRTY"]
    assert table[1].split() == ["backup", "65536", "yes", "0"]
    nbdgw("bitmap", "remove", disk, "backup")
    assert list(listing(disk)) == ["weekly snapshot"]


def test_errors_are_one_line(disk: Path, tmp_path: Path) -> None:
    nbdgw("bitmap", "add", disk, "b")
    assert "already exists" in fails("bitmap", "add", disk, "b")
    assert "no bitmap named 'nope'" in fails("bitmap", "remove", disk, "nope")
    assert "no bitmap named 'nope'" in fails("bitmap", "clear", disk, "nope")
    assert "no bitmap named 'nope'" in fails("bitmap", "merge", disk, "nope", "b")
    assert "cannot be empty" in fails("bitmap", "add", disk, "")
    assert "too long" in fails("bitmap", "add", disk, "n" * 1024)
    assert "power of two" in fails("bitmap", "add", "-g", "1000", disk, "g")
    assert "No such file" in fails("bitmap", "list", tmp_path / "missing.raw")
    assert "No such file" in fails("bitmap", "add", tmp_path / "missing.raw", "b")
    assert "outside" in fails("bitmap", "clear", disk, "b", "--offset", "11M", "--length", "1")
    bad = nbdgw("bitmap", "add", "-g", "12Q", disk, "g", check=False)
    assert bad.returncode == 2 and "not a size" in bad.stderr
    assert list(listing(disk)) == ["b"]  # nothing was lost or half-made


def test_clear_prints_exactly_what_it_cleared(disk: Path) -> None:
    nbdgw("bitmap", "add", disk, "b")
    with Image.open(disk) as image:
        image.write(b"\x01" * (5 * G), 2 * G + 100)  # granules 2..7 dirty
    assert listing(disk)["b"]["dirty_bytes"] == 6 * G
    # [3G - 1, 6G + 1) holds granules 3, 4 and 5 wholly.
    out = nbdgw(
        "bitmap", "clear", disk, "b", "--offset", str(3 * G - 1), "--length", str(3 * G + 2)
    )
    assert out.stdout.splitlines() == [f"{3 * G} {3 * G}"]
    out = nbdgw("bitmap", "clear", disk, "b", "--offset", "100", "--length", "1000", "--json")
    assert json.loads(out.stdout) == []
    extents = json.loads(nbdgw("bitmap", "map", disk, "b", "--json").stdout)
    assert [(e["offset"], e["length"], e["dirty"]) for e in extents] == [
        (0, 2 * G, False),
        (2 * G, G, True),
        (3 * G, 3 * G, False),
        (6 * G, 2 * G, True),
        (8 * G, 10 * 1024 * 1024 - 8 * G, False),
    ]
    out = nbdgw("bitmap", "clear", disk, "b")  # the whole bitmap
    assert out.stdout.splitlines() == [f"0 {10 * 1024 * 1024}"]
    assert listing(disk)["b"]["dirty_bytes"] == 0


def test_enable_disable_merge(disk: Path) -> None:
    nbdgw("bitmap", "add", "-g", "512", disk, "fine")
    nbdgw("bitmap", "add", disk, "coarse")
    nbdgw("bitmap", "disable", disk, "coarse")
    assert listing(disk)["coarse"]["enabled"] is False
    with Image.open(disk) as image:
        image.write(b"x", 5 * G + 7)
    rows = listing(disk)
    assert rows["fine"]["dirty_bytes"] == 512
    assert rows["coarse"]["dirty_bytes"] == 0
    nbdgw("bitmap", "merge", disk, "fine", "coarse")
    assert listing(disk)["coarse"]["dirty_bytes"] == G
    nbdgw("bitmap", "enable", disk, "coarse")
    assert listing(disk)["coarse"]["enabled"] is True


def test_busy_image_and_readers(disk: Path) -> None:
    nbdgw("bitmap", "add", disk, "b")
    with Image.open(disk) as image:
        image.write(b"x", 0)
        assert "in use" in fails("bitmap", "clear", disk, "b")
        # Looking works while a writer (a server) has the image.
        assert listing(disk)["b"]["dirty_bytes"] == G
    nbdgw("bitmap", "clear", disk, "b")


@pytest.mark.interop
def test_data_seen_by_qemu_io(disk: Path) -> None:
    nbdgw("bitmap", "add", disk, "b")
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
    out = nbdgw("bitmap", "--help").stdout
    for command in ("add", "remove", "list", "map", "enable", "disable", "clear", "merge"):
        assert command in out


def test_as_subprocesses(disk: Path) -> None:
    """The real command: output, exit codes and one-line errors across a process boundary."""
    assert run_subprocess("bitmap", "add", "-g", "64K", disk, "b").returncode == 0
    with Image.open(disk) as image:
        image.write(b"x", G + 1)
    listed = run_subprocess("bitmap", "list", disk, "--json")
    assert listed.returncode == 0
    assert json.loads(listed.stdout)[0]["dirty_bytes"] == G
    cleared = run_subprocess("bitmap", "clear", disk, "b", "--offset", "0", "--length", "1M")
    assert (cleared.returncode, cleared.stdout) == (0, f"0 {1024 * 1024}\n")
    dup = run_subprocess("bitmap", "add", disk, "b")
    assert dup.returncode == 1
    assert dup.stderr == "nbdgw: bitmap 'b' already exists\n"
    usage = run_subprocess("bitmap", "add", "-g", "lots", disk, "c")
    assert usage.returncode == 2 and "not a size" in usage.stderr
