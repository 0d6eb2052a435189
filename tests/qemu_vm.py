"""Real QEMU processes for the running-VM tests: a guest-less QEMU with block nodes and QMP
sockets, and a writer that writes through QEMU (so that its writes dirty QEMU's bitmaps as a
guest's would) and remembers every write.

QEMU has one NBD server, started by whoever owns the monitor the gateway was given; the writer
adds its writable export to that server through a second monitor of its own (QEMU accepts
several ``-qmp``), as reference/qemu-live.md describes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbdcore.sync.client import NBDClient
from tests.peers import QEMU10_DIR, missing, stop_peer, tool

MiB = 1 << 20
GRANULE = 64 << 10


def qemu_system(version: str) -> str:
    """``qemu-system-x86_64`` of QEMU ``7`` (Debian's) or ``10`` (unpacked from backports)."""
    if version == "7":
        return tool("qemu-system-x86_64")
    path = QEMU10_DIR / "qemu-system-x86_64"
    if not path.exists():
        missing(f"qemu 10 qemu-system-x86_64 ({path})")
    return str(path)


def _wait_sock(proc: subprocess.Popen[bytes], path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"qemu exited with {proc.returncode}: {err}")
        if time.monotonic() > deadline:
            raise AssertionError(f"qemu did not create {path} within {timeout} s")
        time.sleep(0.02)


class TestMonitor:
    """The test's own blocking QMP connection: a test is an asyncio function, and qemu.qmp's
    blocking wrapper runs an event loop of its own, which cannot nest in the test's."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        json.loads(self.file.readline())  # the greeting
        self.cmd_raw("qmp_capabilities")

    def cmd_raw(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": command}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply: dict[str, Any] = json.loads(self.file.readline())
            if "return" in reply or "error" in reply:
                return reply

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@dataclass
class Disk:
    node: str
    path: Path
    size: int


class GuestlessVM:
    """``qemu-system-x86_64 -machine none`` with qcow2 disks as block nodes ``drive0``,
    ``drive1``... and two monitors: ``qmp`` (for the gateway) and ``test.qmp`` (the test's)."""

    def __init__(self, folder: Path, version: str = "7", disks: int = 1, size: int = 64 * MiB):
        self.folder = folder
        self.binary = qemu_system(version)
        self.version = version
        self.disks = [Disk(f"drive{i}", folder / f"disk{i}.qcow2", size) for i in range(disks)]
        self.qmp_path = folder / "vm.qmp"
        self.test_qmp_path = folder / "test.qmp"
        self.proc: subprocess.Popen[bytes] | None = None
        self._monitor: TestMonitor | None = None
        # QEMU's NBD server, once someone (the gateway) started it: the test's probes use it.
        self.test_nbd_socket: Path | None = None

    def create_disks(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for d in self.disks:
            if not d.path.exists():
                subprocess.run(
                    [tool("qemu-img"), "create", "-q", "-f", "qcow2", str(d.path), str(d.size)],
                    check=True,
                )

    def command(self) -> list[str]:
        argv = [
            self.binary, "-machine", "none", "-nodefaults", "-display", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off",
        ]  # fmt: skip
        for d in self.disks:
            argv += [
                "-blockdev",
                f"driver=qcow2,node-name={d.node},file.driver=file,file.filename={d.path}",
            ]
        return argv

    def start(self) -> GuestlessVM:
        self.create_disks()
        for p in (self.qmp_path, self.test_qmp_path):
            p.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _wait_sock(self.proc, self.qmp_path)
        _wait_sock(self.proc, self.test_qmp_path)
        return self

    def monitor(self) -> TestMonitor:
        """The test's own monitor (blocking)."""
        if self._monitor is None:
            self._monitor = TestMonitor(self.test_qmp_path)
        return self._monitor

    def cmd(self, command: str, **args: Any) -> Any:
        reply = self.monitor().cmd_raw(command, args or None)
        if "error" in reply:
            raise AssertionError(f"{command} {args}: {reply['error']}")
        return reply["return"]

    def bitmaps(self, node: str = "drive0") -> dict[str, dict[str, Any]]:
        for n in self.cmd("query-named-block-nodes", flat=True):
            if n.get("node-name") == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps", []) if b.get("name")}
        raise AssertionError(f"no node {node}")

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.cmd("query-named-block-nodes", flat=True)}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self._monitor is not None:
            with contextlib.suppress(Exception):  # QEMU may be gone already
                self._monitor.close()
            self._monitor = None
        if self.proc is not None:
            stop_peer(self.proc, sig)
        self.proc = None


@dataclass
class Write:
    offset: int
    data: bytes
    started: float
    acked: float = 0.0


@dataclass
class Writer:
    """Writes through a writable NBD export of a disk's node on QEMU's NBD server, one write at
    a time, and keeps every write with when it started and when QEMU acknowledged it."""

    vm: GuestlessVM
    nbd_sock: Path
    node: str = "drive0"
    block: int = 4096
    writes: list[Write] = field(default_factory=list)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _pause: threading.Event = field(default_factory=threading.Event)
    _client: NBDClient | None = None
    error: BaseException | None = None

    @property
    def export(self) -> str:
        return f"writer-{self.node}"

    def open(self) -> Writer:
        """Export the node writable (the NBD server must be running: the gateway starts it)."""
        deadline = time.monotonic() + 20
        while not self.nbd_sock.exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no NBD server on {self.nbd_sock}")
            time.sleep(0.05)
        self.vm.cmd(
            "block-export-add",
            type="nbd", id=self.export, **{"node-name": self.node},
            name=self.export, writable=True,
        )  # fmt: skip
        self._client = NBDClient.connect(f"nbd+unix:///{self.export}?socket={self.nbd_sock}")
        return self

    @property
    def size(self) -> int:
        assert self._client is not None
        return self._client.size

    def write(self, offset: int, data: bytes) -> Write:
        assert self._client is not None
        w = Write(offset, data, time.monotonic())
        self._client.pwrite(data, offset)
        w.acked = time.monotonic()
        self.writes.append(w)
        return w

    def write_pattern(self, offset: int, length: int, tag: int) -> Write:
        return self.write(offset, pattern(offset, length, tag))

    def start(self, seed: int = 1, pace: float = 0.002) -> None:
        """Keep writing blocks at pseudo-random aligned offsets until :meth:`stop`."""

        def run() -> None:
            i = 0
            try:
                while not self._stop.is_set():
                    if self._pause.is_set():
                        time.sleep(0.005)
                        continue
                    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest()
                    off = int.from_bytes(h, "little") % (self.size // self.block) * self.block
                    self.write_pattern(off, self.block, seed * 1_000_000 + i)
                    i += 1
                    time.sleep(pace)
            except BaseException as exc:
                self.error = exc

        self._stop.clear()
        self._thread = threading.Thread(target=run, name="qemu-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self._client is not None:
            with contextlib.suppress(Exception):  # QEMU may be gone
                self._client.close()
            self._client = None

    def acked_since(self, since: float) -> list[Write]:
        return [w for w in self.writes if w.started >= since]

    def image_after(self, base: bytes, writes: list[Write]) -> bytes:
        img = bytearray(base)
        for w in writes:
            img[w.offset : w.offset + len(w.data)] = w.data
        return bytes(img)


def pattern(offset: int, length: int, tag: int) -> bytes:
    """Bytes that say where and which write they come from."""
    unit = f"<{tag}:{offset}>".encode()
    return (unit * (length // len(unit) + 1))[:length]


def granules(
    ranges: Iterator[tuple[int, int]] | list[tuple[int, int]], g: int = GRANULE
) -> set[int]:
    out: set[int] = set()
    for off, length in ranges:
        out.update(range(off // g, (off + length - 1) // g + 1))
    return out


def read_image(path: Path) -> bytes:
    """The guest-visible bytes of an image (qemu-img convert to raw)."""
    raw = path.with_suffix(".raw-read")
    subprocess.run(
        [tool("qemu-img"), "convert", "-U", "-O", "raw", str(path), str(raw)], check=True
    )
    try:
        return raw.read_bytes()
    finally:
        raw.unlink()
