"""``nbdgw nbd serve --socket``: restarts on its socket after kill -9 (the stale file of a dead
server is replaced), never takes the socket of a live server or remove a file that is not a
socket, and creates the socket with an explicit mode whatever the umask (review, issue 15)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdcore.storage.image import Image
from tests.peers import ROOT, tool, wait_listening

pytestmark = pytest.mark.interop

MiB = 1 << 20
SERVE = [sys.executable, "-m", "nbdcore.tools.server_cmds"]


def serve(disk: Path, sock: Path, *extra: str, umask: int = 0o022) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*SERVE, str(disk), "--socket", str(sock), "--export", "x", *extra],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        umask=umask,
    )
    wait_listening(proc, sock=sock)
    return proc


def stop(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=30)[1]


def reads(sock: Path) -> bool:
    out = subprocess.run(
        [tool("nbdinfo"), "--size", f"nbd+unix:///x?socket={sock}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode == 0 and out.stdout.strip() == str(MiB)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "d.raw"
    Image.create(path, MiB).close()
    yield path


def test_restarts_on_its_socket_after_kill9(tmp_path: Path, disk: Path) -> None:
    sock = tmp_path / "s"
    first = serve(disk, sock)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert stat.S_ISSOCK(sock.lstat().st_mode)  # left behind, nothing listens
    second = serve(disk, sock)
    try:
        assert reads(sock)
    finally:
        assert "Traceback" not in stop(second)
    assert second.returncode == 0
    assert not sock.exists()  # a clean stop removes it


def test_never_takes_the_socket_of_a_live_server(tmp_path: Path, disk: Path) -> None:
    sock = tmp_path / "s"
    live = serve(disk, sock)
    try:
        proc = subprocess.run(
            [*SERVE, str(disk), "--socket", str(sock), "--export", "x", "--read-only"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1
        assert "in use" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert reads(sock)  # the live one still answers on it
    finally:
        stop(live)


def test_never_removes_a_file_that_is_not_a_socket(tmp_path: Path, disk: Path) -> None:
    path = tmp_path / "s"
    path.write_text("precious")
    proc = subprocess.run(
        [*SERVE, str(disk), "--socket", str(path)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "in use" in proc.stderr
    assert path.read_text() == "precious"


@pytest.mark.parametrize(("extra", "mode"), [((), 0o600), (("--socket-mode", "660"), 0o660)])
def test_socket_mode_is_explicit_whatever_the_umask(
    tmp_path: Path, disk: Path, extra: tuple[str, ...], mode: int
) -> None:
    sock = tmp_path / "s"
    proc = serve(disk, sock, *extra, umask=0)
    try:
        assert stat.S_IMODE(sock.lstat().st_mode) == mode
    finally:
        stop(proc)


def test_socket_mode_must_be_octal(tmp_path: Path, disk: Path) -> None:
    proc = subprocess.run(
        [*SERVE, str(disk), "--socket", str(tmp_path / "s"), "--socket-mode", "rw"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "not an octal mode" in proc.stderr
    assert not os.path.exists(tmp_path / "s")
