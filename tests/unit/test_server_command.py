"""``nbdgw nbd serve`` is wired into the nbdgw command and parses as documented."""

from __future__ import annotations

import pytest

from gateway.cli import build_parser
from nbdcore.tools import server_cmds


def test_nbd_serve_is_registered() -> None:
    args = build_parser().parse_args(
        [
            "nbd",
            "serve",
            "d.raw",
            "--socket",
            "s",
            "--bitmap",
            "a",
            "--bitmap",
            "b",
            "--export",
            "x",
            "--read-only",
        ]
    )
    assert args.func is server_cmds.serve
    assert (args.disk, args.socket, args.bitmap, args.export, args.read_only) == (
        "d.raw",
        "s",
        ["a", "b"],
        "x",
        True,
    )


def test_socket_or_listen_is_required() -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["nbd", "serve", "d.raw"])
    with pytest.raises(SystemExit):
        parser.parse_args(["nbd", "serve", "d.raw", "--socket", "s", "--listen", "h:1"])
