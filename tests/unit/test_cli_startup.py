"""`nbdgw` starts lazily: a command imports only what it runs (the time it takes is measured in
bench/, not here), --version imports nothing of the gateway, and a typo'd command gets a hint."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__
from gateway.cli import COMMAND_MODULES, build_parser, commands

HEAVY = ("grpc", "asyncio", "google.protobuf", "gateway.api", "gateway.server", "nbdcore.aio")


def imported_by(*argv: str) -> tuple[int, str, set[str]]:
    """Run `nbdgw ARGV` in a fresh interpreter; its exit code, output and imported modules."""
    code = (
        "import json, sys\n"
        "from gateway.cli import main\n"
        f"try:\n    rc = main({list(argv)!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "sys.stdout.flush()\n"
        "print('\\n' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    return proc.returncode, proc.stdout, modules


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.startswith(HEAVY))


def test_the_table_says_what_each_module_registers() -> None:
    for name, names in COMMAND_MODULES.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(name).register(sub, {"": sub})
        assert tuple(sub.choices) == names, name


def test_the_whole_tree_has_every_command_once() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == commands()


def test_version_imports_nothing_heavy() -> None:
    rc, out, modules = imported_by("--version")
    assert (rc, out.strip()) == (0, f"nbdgw {__version__}")
    assert heavy(modules) == []
    assert "importlib.metadata" not in modules


@pytest.mark.parametrize(
    "argv",
    [
        ["nbd", "copy", "--help"],
        ["nbd", "serve", "--help"],
        ["disk", "bitmap", "list", "--help"],
        ["disk", "snapshot", "create", "--help"],
    ],
)
def test_nbdcore_commands_do_not_import_the_gateway(argv: list[str]) -> None:
    rc, out, modules = imported_by(*argv)
    assert rc == 0 and "usage: nbdgw" in out
    assert heavy(modules) == []


def test_nbd_copy_runs_without_asyncio_or_ssl(tmp_path: Path) -> None:
    """The blocking copy's whole path (parse, import the engine, connect: refused here) pays
    for neither asyncio nor ssl at start-up (a third of it, docs/benchmarks.md)."""
    uri = f"nbd+unix:///disk?socket={tmp_path / 'none.sock'}"
    rc, _, modules = imported_by("nbd", "copy", uri, "null:")
    assert rc == 1
    assert "nbdcore.sync.copy" in modules  # it got as far as connecting
    assert heavy(modules) == [] and "ssl" not in modules


def test_a_gateway_command_imports_its_own_module_only() -> None:
    rc, _, modules = imported_by("export", "list", "--help")
    assert rc == 0
    assert "gateway.cli.exports" in modules
    assert not {"gateway.cli.serve", "gateway.cli.backup", "gateway.cli.map"} & modules


def test_an_old_spelling_starts_as_lazily_as_its_new_one() -> None:
    rc, out, modules = imported_by("snapshot", "create", "--help")  # no file: the gateway's
    assert rc == 0 and "usage: nbdgw snapshot create" in out
    rc, out, modules = imported_by("exports", "--help")
    assert rc == 0 and "usage: nbdgw export list" in out
    assert "gateway.cli.exports" in modules and "gateway.cli.bitmaps" not in modules


def test_a_typo_gets_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.cli import main

    assert main(["exprots"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "nbdgw: unknown command 'exprots'; did you mean 'export'? 'nbdgw --help' lists them"
    )


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["bitmap", "lsit", "vm1"],
            "nbdgw bitmap: error: unknown command 'lsit'; did you mean 'list'? (one of: list, map,"
            " clear, remaining, add, remove) (see --help)",
        ),
        (
            ["bitmap", "map", "vm1", "--contxt", "backup"],
            "nbdgw bitmap map: error: unrecognized arguments: --contxt backup; did you mean"
            " --context? (see --help)",
        ),
        (
            ["disk", "bitmap", "list", "d.img", "--jsn"],
            "nbdgw disk bitmap list: error: unrecognized arguments: --jsn; did you mean --json?"
            " (see --help)",
        ),
        (
            ["nbd", "copy", "nbd://h/e", "out", "--conections=2"],
            "nbdgw nbd copy: error: unrecognized arguments: --conections=2; did you mean"
            " --connections? (see --help)",
        ),
    ],
)
def test_a_typo_below_the_top_is_one_line_with_a_hint(
    argv: list[str], line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", line + "\n")
