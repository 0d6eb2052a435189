"""tests.peers.wait_listening / stop_peer, the one "start a peer and wait until it listens"
helper (review L15), against real processes: a unix socket, a TCP port that must not be
connected to, a peer that dies, one that never listens."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import stop_peer, wait_listening

LISTEN_UNIX = """
import socket, sys, time
time.sleep(0.3)
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); time.sleep(60)
"""
LISTEN_TCP = """
import socket, sys, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
print(s.getsockname()[1], flush=True)
conn, _ = s.accept()  # a probe that connected would take the only connection
print("accepted", flush=True); time.sleep(60)
"""


def python(code: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "s.sock"
    proc = python(LISTEN_UNIX, str(sock))
    try:
        wait_listening(proc, sock=sock, timeout=20)
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
    finally:
        stop_peer(proc)
    assert proc.returncode is not None


def test_tcp_port_is_not_connected_to() -> None:
    proc = python(LISTEN_TCP)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        wait_listening(proc, port=port, timeout=20)
        with socket.create_connection(("127.0.0.1", port)):
            assert proc.stdout.readline() == b"accepted\n"  # ours was the first connection
    finally:
        stop_peer(proc)


def test_a_peer_that_exits_is_reported_with_its_stderr(tmp_path: Path) -> None:
    proc = python("import sys; sys.exit('no such export')")
    with pytest.raises(AssertionError, match="exited with 1: no such export"):
        wait_listening(proc, sock=tmp_path / "never.sock", timeout=20)


def test_a_peer_that_never_listens_times_out(tmp_path: Path) -> None:
    proc = python("import time; time.sleep(60)")
    try:
        with pytest.raises(AssertionError, match="did not start listening"):
            wait_listening(proc, sock=tmp_path / "never.sock", timeout=0.3)
    finally:
        stop_peer(proc)
    assert proc.returncode is not None
