"""nbdcore.tools.run: the one runner of ``nbdgw`` and of the nbdcore tools run alone (review
L15: gateway/cli/__init__.py and nbdcore/tools/client_cmds.py had a copy each)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.cli import backup
from nbdcore import tools
from nbdcore.exceptions import RequestError
from nbdcore.tools import client_cmds


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="demo")
    sub = p.add_subparsers(dest="command")

    async def fail_async(args: argparse.Namespace) -> int:
        raise RequestError(5, "disk on fire", 4096)

    def fail_os(args: argparse.Namespace) -> int:
        raise FileNotFoundError(2, "No such file or directory", "/nope")

    async def ok_async(args: argparse.Namespace) -> int:
        return 3

    for name, func in [("fa", fail_async), ("fo", fail_os), ("ok", ok_async)]:
        sub.add_parser(name).set_defaults(func=func)
    sub.add_parser("none").set_defaults(func=lambda args: None)
    return p


@pytest.mark.parametrize(
    ("argv", "code", "err"),
    [
        (["fa"], 1, "disk on fire"),
        (["fo"], 1, "/nope"),
        (["ok"], 3, ""),
        (["none"], 0, ""),
        ([], 2, "usage: demo"),
    ],
)
def test_run(capsys: pytest.CaptureFixture[str], argv: list[str], code: int, err: str) -> None:
    assert tools.run(parser(), argv) == code
    stderr = capsys.readouterr().err
    assert err in stderr
    if code == 1:  # one line, named after the command, no traceback
        assert stderr.startswith(f"demo {argv[0]}: ") and stderr.count("\n") == 1
        assert "[Errno" not in stderr


def test_both_commands_use_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    uri = f"nbd+unix:///?socket={tmp_path / 'none.sock'}"
    for main in (cli.main, client_cmds.main):
        assert main(["nbd", "list", uri]) == 1
        stderr = capsys.readouterr().err
        assert stderr.startswith("nbdgw nbd list: ") and stderr.count("\n") == 1, stderr
    assert cli.main.__code__.co_names.count("run") == 1
    assert client_cmds.main.__code__.co_names.count("run") == 1


def test_backup_state_survives_short_writes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The state file is written by nbdcore.storage.store.write_atomic, which loops on short
    writes (the old copy wrote once and kept whatever fit)."""
    real_write = os.write

    def short_write(fd: int, data: Any) -> int:
        return real_write(fd, bytes(data[:7]))

    monkeypatch.setattr(os, "write", short_write)
    state = backup.BackupState(export="e", context="c", size=1 << 20, full=False, clear=True)
    state.pending_clear = [[0, 65536], [1 << 19, 4096]]
    path = tmp_path / "out.img.nbdgw-backup.json"
    state.save(path)
    monkeypatch.undo()
    assert backup.BackupState.load(path) == state
