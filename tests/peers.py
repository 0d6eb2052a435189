"""Where the real NBD peers live, and how a test asks for one.

Locally a missing peer skips the test with the command that installs it; in CI (CI=true) it is a
failure, because a silently skipped interop test proves nothing.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
QEMU10_DIR = Path(os.environ.get("NBDGW_QEMU10_DIR", ROOT / ".cache" / "qemu10")) / "usr" / "bin"
LIBNBD_PYTHONPATH = "/usr/lib/python3/dist-packages"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, install: str = "run scripts/install-deps.sh") -> NoReturn:
    """``what`` is not installed: skip the test locally, fail it in CI; ``install`` says how to
    get it. Every test that needs something optional asks through here (or :func:`tool`)."""
    msg = f"{what} is not installed: {install}"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def need_module(name: str, install: str) -> ModuleType:
    """Import ``name``, or :func:`missing` it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", install)


def _missing(what: str) -> None:
    missing(what)


def tool(name: str) -> str:
    """Path of a Debian-installed tool (qemu-nbd 7.2, nbdinfo, nbdkit...)."""
    path = shutil.which(name)
    if path is None:
        _missing(name)
        raise AssertionError  # unreachable
    return path


def qemu10(name: str) -> str:
    """Path of a qemu 10 tool (extended headers) unpacked from bookworm-backports."""
    path = QEMU10_DIR / name
    if not path.exists():
        _missing(f"qemu 10 {name} ({path})")
    return str(path)


# --- peers we start ------------------------------------------------------------------------------


def _unix_accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def _tcp_listening(port: int) -> bool:
    """Whether something LISTENs on ``port``, read from /proc/net/tcp{,6} without connecting:
    a server that serves one client (nbd-server, qemu-nbd without -t) would spend its only
    connection on the probe."""
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # header
                for line in f:
                    fields = line.split()
                    if fields[1].endswith(needle.rstrip()) and fields[3] == "0A":  # LISTEN
                        return True
        except OSError:
            continue
    return False


def wait_listening(
    proc: subprocess.Popen[Any],
    *,
    sock: str | os.PathLike[str] | None = None,
    port: int | None = None,
    uri: str | None = None,
    timeout: float = 20.0,
) -> None:
    """Wait until the peer we started in ``proc`` listens: its unix socket ``sock`` accepts a
    connection, or TCP ``port`` is in LISTEN state; with ``uri`` also until an NBD handshake
    there works (``nbdinfo --size``: qemu-nbd accepts before its export is ready). Raises
    AssertionError, with what the peer wrote on stderr, if it exits or the time runs out."""
    if sock is None and port is None and uri is None:
        raise ValueError("wait_listening needs sock, port or uri")
    name = Path(str(proc.args[0] if isinstance(proc.args, list) else proc.args)).name
    nbdinfo = tool("nbdinfo") if uri is not None else ""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr else b""
            text = err.decode(errors="replace") if isinstance(err, bytes) else str(err)
            raise AssertionError(f"{name} exited with {proc.returncode}: {text}")
        ready = (sock is None or _unix_accepts(os.fspath(sock))) and (
            port is None or _tcp_listening(port)
        )
        if ready and uri is not None:
            probe = subprocess.run([nbdinfo, "--size", uri], capture_output=True, timeout=10)
            ready = probe.returncode == 0
        if ready:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not start listening within {timeout} s")
        time.sleep(0.05)


def stop_peer(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    """Stop a peer we started: ``sig`` (SIGTERM: qemu-nbd then releases its bitmaps cleanly),
    SIGKILL if it has not exited after ``timeout`` seconds; closes its pipes."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class UnixPeer:
    """An NBD server a test runs on a unix socket: subclasses say how (:meth:`command`); this
    starts it, waits until it serves the export, and stops it (SIGTERM first: qemu-nbd then
    stores its bitmaps cleanly; SIGKILL only for :meth:`kill` or a peer that will not exit)."""

    env: dict[str, str] | None = None  # the environment of the process (None: ours)
    start_timeout: float = 20.0
    stop_timeout: float = 20.0

    def __init__(self, socket: Path, export: str = "disk") -> None:
        self.socket = socket
        self.export = export
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Any:
        if self.socket.exists():  # left by a peer killed before
            self.socket.unlink()
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env
        )
        wait_listening(self.proc, sock=self.socket, uri=self.uri, timeout=self.start_timeout)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_peer(self.proc, sig, self.stop_timeout)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)
