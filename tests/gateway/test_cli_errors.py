"""Errors a new user meets: one line that names the command and says what to do, never a gRPC
resolver message, a C-core log line or a raw ``[Errno N]``."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.gateway.cli_support import GatewayProcess, assert_one_line_error, cli, nbdgw


@pytest.mark.parametrize("target", ["http://127.0.0.1", "127.0.0.1", "dns:///x:1", "host:port"])
def test_a_target_that_is_not_host_port(target: str) -> None:
    line = assert_one_line_error(cli("exports", "--target", target), 2)
    assert "--target must be HOST:PORT (for example 127.0.0.1:50051)" in line


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "soon"])
def test_a_deadline_must_be_positive(timeout: str) -> None:
    line = assert_one_line_error(cli("exports", "--timeout", timeout), 2)
    assert "--timeout" in line


def test_an_http_url_is_the_plaintext_target(tmp_path: Path) -> None:
    with GatewayProcess(data_dir=tmp_path) as gw:
        plain = cli("exports", "--target", gw.target, check=True).stdout
        url = cli("exports", "--target", f"http://{gw.target}/", check=True).stdout
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
    line = assert_one_line_error(cli("bitmap", "list", str(missing)), 1)
    assert line == f"nbdgw bitmap list: {missing}: No such file or directory"


def test_serve_help_shows_no_rest_markup() -> None:
    text = cli("serve", "--help").stdout
    assert "'nbdgw serve': run the gateway." in text
    assert "``" not in text and ":mod:" not in text


def test_a_gateway_that_is_not_there() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nobody listens there
    line = assert_one_line_error(cli("exports", "--target", f"127.0.0.1:{port}"), 1)
    assert line == (
        f"nbdgw exports: UNAVAILABLE: cannot reach the gateway at 127.0.0.1:{port}: connection"
        " refused; is 'nbdgw serve' running there? (--target or $NBDGW_TARGET)"
    )
    line = assert_one_line_error(cli("exports", "--target", "nbdgw.invalid:50051"), 1)
    assert "cannot reach the gateway at nbdgw.invalid:50051: its host name does not resolve" in line
