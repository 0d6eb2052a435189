"""A real libvirtd for the tests, and libvirt domains running the tiny guest of
tests/qemu_guest.py (reference/qemu-live.md: what runs here, the XML that worked, the trap).

The tests start ``virtlogd`` (if nothing answers on its socket) and their own ``libvirtd`` as
root, with its sockets in a private folder (``qemu:///system?socket=...``), so that they do not
talk to a libvirtd someone else runs; both are stopped at the end if the tests started them.
Domains are ``type='qemu'`` (TCG). libvirt runs QEMU as ``libvirt-qemu``: every file QEMU opens
or creates (disks, kernel, initrd, the gateway's backup sockets and scratch images) lives under
a folder that user can traverse and write.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.peers import missing, need_module, tool
from tests.qemu_guest import BLOCK, GUEST_DIR, INIT, build_initrd

INSTALL = "run scripts/install-deps.sh (libvirt-daemon-system, libvirt-clients, python3-libvirt)"
PRIVATE = Path(tempfile.gettempdir()) / "nbdgw-libvirtd"
SOCKET = PRIVATE / "sock" / "libvirt-sock"
URI = f"qemu:///system?socket={SOCKET}"
VIRTLOGD_SOCKET = Path("/run/libvirt/virtlogd-sock")

# The guest of tests/qemu_guest.py, writing each block to vda and then the same block to vdb
# (a two-disk domain: a point in time of both shows a prefix of the writes on each, the same
# one, give or take the write in flight).
INIT_TWO_DISKS = INIT.replace(
    "while [ ! -b /dev/vda ]; do sleep 0.1; done",
    "while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do sleep 0.1; done",
).replace(
    '    echo "WROTE $i $(( off * {block} ))"',
    '    echo "WROTE $i $(( off * {block} ))"\n'
    "    dd if=/tmp/blk of=/dev/vdb bs={block} seek=$off conv=notrunc,fsync 2>/dev/null\n"
    '    echo "WROTE2 $i $(( off * {block} ))"',
)


def _accepts(path: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _wait(path: Path, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not _accepts(path):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not listen on {path}")
        time.sleep(0.1)


def libvirtd() -> Iterator[str]:
    """Start what libvirt needs (once), yield the URI, stop what was started."""
    libvirt = need_module("libvirt", INSTALL)
    for name in ("libvirtd", "virtlogd"):
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            missing(name, INSTALL)
    if os.geteuid() != 0:
        missing("root (libvirtd qemu:///system runs as root here)", "run the tests as root")
    tool("qemu-img")
    if not (GUEST_DIR / "vmlinuz").exists():
        missing(f"the test guest's kernel ({GUEST_DIR})")
    started: list[Path] = []
    if not _accepts(VIRTLOGD_SOCKET):
        pid = PRIVATE / "virtlogd.pid"
        PRIVATE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["/usr/sbin/virtlogd", "-d", "-p", str(pid)], check=True)
        _wait(VIRTLOGD_SOCKET, "virtlogd")
        started.append(pid)
    if not _accepts(SOCKET):
        started.append(start_libvirtd())
    libvirt.registerErrorHandler(lambda _c, _e: None, None)  # the tests look at each error
    conn = libvirt.open(URI)
    conn.close()
    try:
        yield URI
    finally:
        for pid in reversed(started):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid.read_text()), signal.SIGTERM)


def start_libvirtd() -> Path:
    """libvirtd on the private socket; returns its pid file."""
    (PRIVATE / "sock").mkdir(parents=True, exist_ok=True)
    conf = PRIVATE / "libvirtd.conf"
    conf.write_text(
        f'unix_sock_dir = "{SOCKET.parent}"\n'
        'unix_sock_rw_perms = "0700"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
    )
    pid = PRIVATE / "libvirtd.pid"
    subprocess.run(["/usr/sbin/libvirtd", "-d", "-f", str(conf), "-p", str(pid)], check=True)
    _wait(SOCKET, "libvirtd")
    return pid


def stop_libvirtd() -> None:
    """Stop the private libvirtd (its domains keep running: libvirt finds them again)."""
    pid = int((PRIVATE / "libvirtd.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _accepts(SOCKET) or Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise AssertionError("libvirtd did not stop")
        time.sleep(0.1)


def open_connection() -> Any:
    import libvirt

    return libvirt.open(URI)


class LibvirtVM:
    """A libvirt domain running the writing guest: 256 MiB q35 under TCG, ``disks`` virtio
    disks (qcow2, 16 MiB: vda, vdb...), the serial console in a file. Started paused."""

    def __init__(
        self, name: str, disks: int = 1, *, count: int = 60, pause: float = 0.1, size: int = 16
    ) -> None:
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"nbdgw-lv-{name}-"))
        self.folder.chmod(0o777)  # libvirt-qemu opens and creates files here
        self.targets = [f"vd{chr(ord('a') + i)}" for i in range(disks)]
        self.count, self.pause, self.size = count, pause, size
        self.serial = self.folder / "serial.log"
        self.conn: Any = None
        self.dom: Any = None

    def image(self, target: str) -> Path:
        return self.folder / f"{target}.qcow2"

    def xml(self, initrd: Path, kernel: Path) -> str:
        disks = "".join(
            f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{self.image(t)}'/><target dev='{t}' bus='virtio'/></disk>"
            for t in self.targets
        )
        return (
            f"<domain type='qemu'><name>{self.name}</name><memory unit='MiB'>256</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='q35'>hvm</type>"
            f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd>"
            "<cmdline>console=ttyS0 quiet panic=-1</cmdline></os>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
            f"<devices>{disks}<serial type='file'><source path='{self.serial}'/></serial>"
            f"<console type='file'><source path='{self.serial}'/></console></devices></domain>"
        )

    def start(self) -> LibvirtVM:
        import libvirt

        init = INIT_TWO_DISKS if len(self.targets) > 1 else INIT
        initrd = build_initrd(self.folder, self.count, self.pause, init)
        kernel = self.folder / "vmlinuz"
        shutil.copy(GUEST_DIR / "vmlinuz", kernel)
        for t in self.targets:
            subprocess.run(
                [tool("qemu-img"), "create", "-q", "-f", "qcow2", str(self.image(t)),
                 f"{self.size}M"], check=True,
            )  # fmt: skip
        for p in self.folder.iterdir():
            if p.is_file():
                p.chmod(0o666)
        self.conn = open_connection()
        self.cleanup_domain()
        self.dom = self.conn.defineXML(self.xml(initrd, kernel))
        self.dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        return self

    def run(self) -> None:
        self.dom.resume()

    def cleanup_domain(self) -> None:
        """Remove a domain of this name left by an earlier run (its checkpoints first)."""
        import libvirt

        try:
            dom = self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            return
        if dom.isActive():
            dom.destroy()
        for c in dom.listAllCheckpoints():
            c.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        dom.undefine()

    def writes(self, disk: int = 0) -> list[tuple[int, int]]:
        """(i, offset) of every write the guest reported on disk ``disk``, in order."""
        text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        tag = "WROTE" if disk == 0 else "WROTE2"
        return [(int(a), int(b)) for a, b in re.findall(rf"\b{tag} (\d+) (\d+)", text)]

    def wait_writes(self, n: int, timeout: float = 180) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while len(found := self.writes()) < n:
            if not self.dom.isActive():
                raise AssertionError(f"the guest stopped: {self.serial.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest wrote {len(found)} of {n} blocks in time")
            time.sleep(0.1)
        return found

    def checkpoints(self) -> dict[str, str]:
        """libvirt's checkpoints: name -> parent ("" for none)."""
        out = {}
        for c in self.dom.listAllCheckpoints():
            try:
                out[c.getName()] = c.getParent().getName()
            except Exception:
                out[c.getName()] = ""
        return out

    def backup_job(self) -> bool:
        import libvirt

        try:
            self.dom.backupGetXMLDesc(0)
        except libvirt.libvirtError:
            return False
        return True

    def read_disk(self, target: str = "vda") -> bytes:
        """The disk's bytes (the domain stopped, or read while it runs: qemu-img -U)."""
        out = self.folder / f"{target}.raw"
        subprocess.run(
            [tool("qemu-img"), "convert", "-U", "-O", "raw", str(self.image(target)), str(out)],
            check=True,
        )
        return out.read_bytes()

    def stop(self) -> None:
        if self.conn is None:
            return
        try:
            self.cleanup_domain()
        finally:
            self.conn.close()
            self.conn = None
            shutil.rmtree(self.folder, ignore_errors=True)


def guest_image(writes: list[tuple[int, int]], size: int, block: bytes = b"") -> bytearray:
    """The disk after the guest's ``writes`` on a zeroed disk of ``size`` bytes."""
    from tests.qemu_guest import guest_block

    data = bytearray(size)
    for i, off in writes:
        data[off : off + BLOCK] = guest_block(i)
    return data
