"""Errors a new user meets: one line that names the command and says what to do, never a gRPC
resolver message, a C-core log line or a raw ``[Errno N]``."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.gateway.cli_support import GatewayProcess, assert_one_line_error, cli, nbdgw


@pytest.mark.parametrize("target", ["http://127.0.0.1", "127.0.0.1", "dns:///x:1", "host:port"])
def test_a_target_that_is_not_host_port(target: str) -> None:
    line = assert_one_line_error(cli("export", "list", "--target", target), 2)
    assert "--target must be HOST:PORT (for example 127.0.0.1:50051)" in line


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_a_deadline_must_be_positive(timeout: str) -> None:
    line = assert_one_line_error(cli("export", "list", "--timeout", timeout), 2)
    assert "--timeout" in line


def test_an_http_url_is_the_plaintext_target(tmp_path: Path) -> None:
    with GatewayProcess(data_dir=tmp_path) as gw:
        plain = cli("export", "list", "--target", gw.target, check=True).stdout
        url = cli("export", "list", "--target", f"http://{gw.target}/", check=True).stdout
    assert url == plain and "sample" in url


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        proc = nbdgw("serve", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path))
    line = assert_one_line_error(proc, 1)
    assert line == (
        f"nbdgw serve: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "another process has it: stop it or choose another port"
    )


def test_a_missing_file_names_the_file_without_errno(tmp_path: Path) -> None:
    missing = tmp_path / "nope.img"
    line = assert_one_line_error(cli("disk", "bitmap", "list", str(missing)), 1)
    assert line == f"nbdgw disk bitmap list: {missing}: No such file or directory"


def test_serve_help_shows_no_rest_markup() -> None:
    text = cli("serve", "--help").stdout
    assert "'nbdgw serve': run the gateway." in text
    assert "``" not in text and ":mod:" not in text


def test_a_gateway_that_is_not_there() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nobody listens there
    line = assert_one_line_error(cli("export", "list", "--target", f"127.0.0.1:{port}"), 1)
    assert line == (
        f"nbdgw export list: UNAVAILABLE: cannot reach the gateway at 127.0.0.1:{port}: connection"
        " refused; is 'nbdgw serve' running there? (--target or $NBDGW_TARGET)"
    )
    line = assert_one_line_error(cli("export", "list", "--target", "nbdgw.invalid:50051"), 1)
    assert "cannot reach the gateway at nbdgw.invalid:50051: its host name does not resolve" in line
    # Every command over the client says it the same way, in one line: the stream's resumes
    # are for a gateway that went away, not one that was never there.
    for argv in (
        ["bitmap", "map", "vm", "--context", "base:allocation"],
        ["bitmap", "remaining", "vm", "--bitmap", "b"],
        ["snapshot", "list", "vm"],
        ["checkpoint", "list", "vm"],
        ["snapshot", "release", "vm", "s"],
    ):
        line = assert_one_line_error(cli(*argv, "--target", f"127.0.0.1:{port}"), 1)
        name = " ".join(argv[:2])
        assert line.startswith(f"nbdgw {name}: UNAVAILABLE: cannot reach the gateway at"), line


def test_a_down_host_shows_no_size_and_no_clear_mode(tmp_path: Path) -> None:
    """An export whose host never answered: '-' where nothing is known, not 'SIZE 0' and
    'CLEAR unspecified'."""
    gone = f"gone=nbd+unix:///x?socket={tmp_path / 'none.sock'}"
    with GatewayProcess("--export", gone, data_dir=tmp_path / "data") as gw:
        lines = cli("export", "list", "--target", gw.target, check=True).stdout.splitlines()
    header = ["NAME", "SIZE", "STATE", "HOST", "KIND", "RO", "CLEAR", "DESCRIPTION"]
    assert lines[0].split() == header
    name, size, state, _host, kind, _ro, clear = lines[1].split()[:7]
    assert (name, size, state, kind, clear) == ("gone", "-", "unavailable", "nbd", "-")


def test_json_is_the_apis_json(tmp_path: Path) -> None:
    """--json of every gateway command uses the API's JSON mapping (camelCase), as grpcurl
    and buf curl print it."""
    with GatewayProcess(data_dir=tmp_path) as gw:
        t = ["--target", gw.target]
        (export,) = json.loads(cli("export", "list", "--json", *t, check=True).stdout)
        bitmaps = json.loads(cli("bitmap", "list", "sample", "--json", *t, check=True).stdout)
        snap = json.loads(cli("snapshot", "create", "sample", "--json", *t, check=True).stdout)
        listed = cli("snapshot", "list", "sample", *t, check=True).stdout.splitlines()
    assert export["sizeBytes"] == str(64 << 20) and export["clearMode"] == "CLEAR_MODE_AT_SOURCE"
    assert export["hostKind"] == "embedded"
    assert {"granularityBytes", "dirtyBytes", "clearMode"} <= set(bitmaps[-1])
    assert snap["createTime"] and snap["forks"][0]["dirtyBytes"]
    assert listed[0].split()[:4] == ["NAME", "CREATED", "EXPORT", "STATE"]
    assert listed[1].split()[0] == snap["name"].rsplit("/", 1)[-1]
