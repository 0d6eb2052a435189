"""``nbdgw snapshot create|list|release`` as a user runs them (through gateway.cli.main)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from nbdcore.storage import Image


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.raw"
    with Image.create(path, 4 * 1024 * 1024) as image:
        image.add_bitmap("b")
        image.add_bitmap("c", granularity=4096)
        image.write(b"x" * 70000, 0)
    return path


def test_create_list_release(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "create", str(disk), "s1", "--bitmap", "b", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["name"] == "s1" and list(created["forks"]) == ["b"]
    assert created["forks"]["b"]["dirty_bytes"] == 131072
    assert main(["snapshot", "create", str(disk), "s2", "--max-size", "1M"]) == 0
    assert "forked b, c" in capsys.readouterr().out

    with Image.open(disk) as image:  # the live bitmaps restarted clean; a write preserves
        assert image.bitmaps["b"].dirty_bytes() == 0
        image.write(b"y" * 10, 5)

    assert main(["snapshot", "list", str(disk), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["s1", "s2"]
    assert [r["used_bytes"] for r in rows] == [65536, 65536]
    assert rows[1]["max_bytes"] == 1024 * 1024
    assert main(["snapshot", "list", str(disk)]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:2] == ["NAME", "CREATED"]
    assert "b(131072)" in table

    assert main(["snapshot", "release", str(disk), "s1"]) == 0
    assert main(["snapshot", "release", str(disk), "s1"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "nbdgw: no snapshot named 's1' (never created, or released already)"
    with Image.open(disk, read_only=True) as image:
        assert sorted(image.snapshots) == ["s2"]
        # s1's fork (the first 128 KiB) merged back, plus the write since.
        assert image.bitmaps["b"].dirty_bytes() == 131072


def test_errors_are_one_line(disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["snapshot", "create", str(disk), "s", "--bitmap", "nope"]) == 1
    assert capsys.readouterr().err == "nbdgw: no bitmap named 'nope'\n"
    assert main(["snapshot", "create", str(disk), "bad/name"]) == 1
    assert "snapshot name" in capsys.readouterr().err
    assert main(["snapshot", "list", str(disk)]) == 0
    assert "no snapshots" in capsys.readouterr().out
    with Image.open(disk):  # a server holds the image: the command says so
        assert main(["snapshot", "create", str(disk), "s"]) == 1
        assert "in use" in capsys.readouterr().err
