"""The old spellings of `nbdgw` commands and flags: each still parses into its new command, with
one notice on stderr; where an old local and a new gateway spelling collide, an existing file
means the old local form (docs/cli.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.cli import build_parser, commands
from gateway.cli.aliases import ALIASES, rewrite, table
from nbdcore.tools import REMOVED_IN, command_name

NOTICE = "nbdgw: {!r} is deprecated, use {!r} (removed in " + REMOVED_IN + ")"


def parse(argv: list[str]) -> argparse.Namespace:
    words = rewrite(argv)
    return build_parser(words[0]).parse_args(words)


def notices(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("old", list(ALIASES))
def test_every_old_command_names_a_new_one(old: tuple[str, ...]) -> None:
    new, _ = ALIASES[old]
    assert new[0] in commands() and old[0] not in commands()
    parser = build_parser(new[0])
    for word in new:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]


@pytest.mark.parametrize(
    ("argv", "command", "old", "new"),
    [
        (["exports", "--json"], "nbdgw export list", "exports", "export list"),
        (["bitmaps", "vm1"], "nbdgw bitmap list", "bitmaps", "bitmap list"),
        (["generation", "vm1", "g1"], "nbdgw export generation", "generation", "export generation"),
        (
            ["clear", "vm1", "--bitmap", "b", "--offset", "0", "--length", "1M"],
            "nbdgw bitmap clear",
            "clear",
            "bitmap clear",
        ),
        (
            ["remaining", "vm1", "--bitmap", "b"],
            "nbdgw bitmap remaining",
            "remaining",
            "bitmap remaining",
        ),
        (["add-bitmap", "vm1", "b"], "nbdgw bitmap add", "add-bitmap", "bitmap add"),
        (["remove-bitmap", "vm1", "b"], "nbdgw bitmap remove", "remove-bitmap", "bitmap remove"),
        (["snapshots", "list", "vm1"], "nbdgw snapshot list", "snapshots list", "snapshot list"),
        (
            ["snapshots", "release", "vm1", "s1"],
            "nbdgw snapshot release",
            "snapshots release",
            "snapshot release",
        ),
        (
            ["snapshots", "checkpoints", "vm1"],
            "nbdgw checkpoint list",
            "snapshots checkpoints",
            "checkpoint list",
        ),
        (
            ["snapshots", "delete-checkpoint", "vm1", "c1"],
            "nbdgw checkpoint delete",
            "snapshots delete-checkpoint",
            "checkpoint delete",
        ),
        (["map", "sample", "-o", "x.svg"], "nbdgw render", "map", "render"),
    ],
)
def test_an_old_command_runs_the_new_one_with_one_notice(
    capsys: pytest.CaptureFixture[str], argv: list[str], command: str, old: str, new: str
) -> None:
    args = parse(argv)
    assert command_name(args) == command
    assert notices(capsys) == [NOTICE.format(old, new)]


def test_extents_bitmap_is_any_context_so_it_becomes_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse(["extents", "vm1", "--bitmap", "base:allocation", "--dirty"])
    assert command_name(args) == "nbdgw bitmap map"
    assert (args.context, args.bitmap, args.dirty) == ("base:allocation", None, True)
    args = parse(["extents", "vm1", "--bitmap=backup"])
    assert (args.context, args.bitmap) == ("backup", None)
    # One line per use, whatever was renamed.
    assert notices(capsys) == [NOTICE.format("extents", "bitmap map")] * 2


def test_the_new_map_takes_a_context_or_a_dirty_bitmap(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["bitmap", "map", "vm1", "--bitmap", "backup"])
    assert (args.context, args.bitmap) == (None, "backup")
    with pytest.raises(SystemExit):
        parse(["bitmap", "map", "vm1", "--bitmap", "b", "--context", "base:allocation"])
    capsys.readouterr()


def test_snapshot_id_is_positional_and_id_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["snapshot", "create", "vm1", "s1"])
    assert (args.snapshot, args.id) == ("s1", "")
    assert notices(capsys) == []
    # Before or after the export: --id must survive the optional positional left out.
    for argv in (
        ["snapshots", "create", "--id", "s2", "vm1"],
        ["snapshots", "create", "vm1", "--id", "s2"],
    ):
        args = parse(argv)
        assert (args.export, args.snapshot or args.id) == ("vm1", "s2")
        assert notices(capsys) == [
            NOTICE.format("snapshots create", "snapshot create"),
            NOTICE.format("--id", "snapshot create EXPORT SNAPSHOT"),
        ]


def test_old_local_bitmap_commands_on_a_file_are_disk_bitmap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    args = parse(["bitmap", "add", "-g", "64K", str(disk), "b1"])
    assert command_name(args) == "nbdgw disk bitmap add"
    assert (args.disk, args.name, args.granularity) == (str(disk), "b1", 65536)
    assert notices(capsys) == [NOTICE.format("bitmap add", "disk bitmap add")]
    # No such file: the new gateway command, an export name, no notice.
    args = parse(["bitmap", "add", "vm1", "b1"])
    assert command_name(args) == "nbdgw bitmap add"
    assert (args.export, args.name) == ("vm1", "b1")
    assert notices(capsys) == []
    # A verb only the local form has is always the local form.
    args = parse(["bitmap", "merge", "nope.img", "a", "b"])
    assert command_name(args) == "nbdgw disk bitmap merge"
    assert notices(capsys) == [NOTICE.format("bitmap merge", "disk bitmap merge")]
    # An export named like a file here: exports/NAME.
    monkeypatch.chdir(tmp_path)
    assert command_name(parse(["bitmap", "list", "d.img"])) == "nbdgw disk bitmap list"
    args = parse(["bitmap", "list", "exports/d.img"])
    assert command_name(args) == "nbdgw bitmap list"
    capsys.readouterr()


def test_old_local_snapshot_commands_on_a_file_are_disk_snapshot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    disk = tmp_path / "d.img"
    disk.write_bytes(b"")
    args = parse(["snapshot", "create", "--bitmap", "b", str(disk), "s1"])
    assert command_name(args) == "nbdgw disk snapshot create"
    assert (args.disk, args.name, args.bitmap) == (str(disk), "s1", ["b"])
    assert notices(capsys) == [NOTICE.format("snapshot create", "disk snapshot create")]
    args = parse(["snapshot", "release", "vm1", "s1"])
    assert command_name(args) == "nbdgw snapshot release"
    assert notices(capsys) == []


def test_backup_checkpoint_is_a_checkpoint_and_a_size_is_the_old_save_every(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = parse(["backup", "vm1", "out.img", "--checkpoint", "daily-1"])
    assert (args.checkpoint_id, args.checkpoint) == ("daily-1", 32 << 20)
    args = parse(["backup", "vm1", "out.img", "--checkpoint-id", "7", "--save-every", "1M"])
    assert (args.checkpoint_id, args.checkpoint) == ("7", 1 << 20)
    assert notices(capsys) == []
    args = parse(["backup", "vm1", "out.img", "--checkpoint", "64M"])
    assert (args.checkpoint_id, args.checkpoint) == ("", 64 << 20)
    assert notices(capsys) == [NOTICE.format("--checkpoint SIZE", "--save-every SIZE")]


@pytest.mark.parametrize(
    "argv",
    [
        ["nbd", "list", "nbds://h/e"],
        ["nbd", "map", "nbds://h/e"],
        ["nbd", "copy", "nbds://h/e", "null:"],
        ["render", "nbds://h/e", "-o", "x.svg"],
    ],
)
def test_nbd_host_tls_is_nbd_tls_and_tls_still_works(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse([*argv, "--nbd-tls-ca", "ca.pem", "--nbd-tls-cert", "c.pem"])
    assert (args.nbd_tls_ca, args.nbd_tls_cert, args.nbd_tls_key) == ("ca.pem", "c.pem", None)
    assert notices(capsys) == []
    args = parse([*argv, "--tls-ca", "old.pem"])
    assert args.nbd_tls_ca == "old.pem"
    assert notices(capsys) == [NOTICE.format("--tls-ca", "--nbd-tls-ca")]


def test_new_spellings_print_no_notice(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["export", "list"],
        ["bitmap", "map", "vm1", "--context", "base:allocation"],
        ["bitmap", "clear", "vm1", "--bitmap", "b", "--offset", "0", "--length", "4K"],
        ["checkpoint", "list", "vm1"],
        ["disk", "bitmap", "list", "d.img"],
        ["disk", "snapshot", "list", "d.img"],
    ):
        parse(argv)
    assert notices(capsys) == []


def test_the_docs_table_lists_every_old_spelling() -> None:
    rows = dict(table())
    assert rows["snapshots create"] == "snapshot create"
    assert rows["bitmap add DISK ..."] == "disk bitmap add"
    assert len(rows) == len(ALIASES) + 8 + 3


def test_serving_sides_nbd_tls_and_the_old_spellings(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["serve", "--nbd-tls-ca-file", "ca.pem", "--no-nbd-tls-verify"])
    assert (args.tls_ca_file, args.no_tls_verify) == ("ca.pem", True)
    args = parse(["serve"])
    assert (args.tls_ca_file, args.tls_server_hostname) == (None, None)
    assert notices(capsys) == []
    args = parse(["serve", "--tls-ca-file", "old.pem", "--no-tls-verify"])
    assert (args.tls_ca_file, args.no_tls_verify) == ("old.pem", True)
    assert notices(capsys) == [
        NOTICE.format("--tls-ca-file", "--nbd-tls-ca-file"),
        NOTICE.format("--no-tls-verify", "--no-nbd-tls-verify"),
    ]
    args = parse(["nbd", "serve", "d.img", "--socket", "s", "--nbd-tls-cert-file", "c.pem"])
    assert (args.tls_cert, args.tls_key, args.tls_required) == ("c.pem", None, False)
    args = parse(["nbd", "serve", "d.img", "--socket", "s", "--tls-key", "k.pem", "--tls-required"])
    assert (args.tls_key, args.tls_required) == ("k.pem", True)
    assert notices(capsys) == [
        NOTICE.format("--tls-key", "--nbd-tls-key-file"),
        NOTICE.format("--tls-required", "--nbd-tls-required"),
    ]
