"""A tiny real guest that writes to its virtio disk (reference/qemu-live.md): Debian's cloud
kernel, a busybox initramfs built here, booted by qemu-system-x86_64 under TCG in a few
seconds. Its /init writes known blocks to /dev/vda one at a time (each fsync'd) and prints
``WROTE I OFFSET`` on the serial console after each, which the test reads from a file.

QEMU starts paused (``-S``): the test sets up the gateway and the bitmap, then lets it run.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.peers import ROOT, missing
from tests.qemu_vm import GuestlessVM

GUEST_DIR = Path(os.environ.get("NBDGW_GUEST_DIR", ROOT / ".cache" / "guest"))
MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev",
           "virtio_pci", "virtio_blk")  # fmt: skip
BLOCK = 4096
STRIDE = 37  # consecutive writes land in different 64 KiB granules

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/$m.ko; done
while [ ! -b /dev/vda ]; do sleep 0.1; done
echo READY
granules=$(( $(cat /sys/block/vda/size) / 128 ))
i=0
while [ $i -lt {count} ]; do
    off=$(( (i * {stride}) % granules * 16 ))
    yes "guest:$i;" | head -c {block} > /tmp/blk
    dd if=/tmp/blk of=/dev/vda bs={block} seek=$off conv=notrunc,fsync 2>/dev/null
    echo "WROTE $i $(( off * {block} ))"
    i=$(( i + 1 ))
    sleep {pause}
done
echo DONE
poweroff -f
"""


def guest_block(i: int) -> bytes:
    """The block the guest's write ``i`` puts on the disk."""
    unit = f"guest:{i};\n".encode()
    return (unit * (BLOCK // len(unit) + 1))[:BLOCK]


def build_initrd(folder: Path, count: int, pause: float, init_script: str = INIT) -> Path:
    """A gzip'd newc initramfs: busybox, the virtio modules and the writing /init (``INIT``,
    or a variant with the same fields)."""
    if not (GUEST_DIR / "vmlinuz").exists() or not (GUEST_DIR / "busybox").exists():
        missing(f"the test guest's kernel and busybox ({GUEST_DIR})")
    root = folder / "initramfs"
    shutil.rmtree(root, ignore_errors=True)
    for d in ("bin", "lib", "proc", "sys", "dev", "tmp"):
        (root / d).mkdir(parents=True)
    shutil.copy(GUEST_DIR / "busybox", root / "bin" / "busybox")
    for m in MODULES:
        shutil.copy(GUEST_DIR / "modules" / f"{m}.ko", root / "lib" / f"{m}.ko")
    init = root / "init"
    init.write_text(
        init_script.format(modules=" ".join(MODULES), count=count, stride=STRIDE, block=BLOCK,
                    pause=pause)
    )  # fmt: skip
    init.chmod(0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # This machine has no cpio binary: busybox's makes the archive.
    archive = subprocess.run(
        [str(GUEST_DIR / "busybox"), "cpio", "-o", "-H", "newc"],
        input="\n".join(names).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    out = folder / "initrd.gz"
    out.write_bytes(gzip.compress(archive, compresslevel=1))
    return out


class GuestVM(GuestlessVM):
    """A q35 machine with 256 MiB, one virtio disk (``drive0``, device ``vd0``) and the guest."""

    def __init__(self, folder: Path, version: str = "7", *, count: int = 60, pause: float = 0.1):
        super().__init__(folder, version, disks=1, size=16 << 20)
        self.count = count
        self.pause = pause
        self.serial = folder / "serial.log"

    def command(self) -> list[str]:
        initrd = build_initrd(self.folder, self.count, self.pause)
        argv = super().command()
        argv[argv.index("none")] = "q35"  # -machine
        argv += [
            "-m", "256", "-S", "-no-reboot",
            "-kernel", str(GUEST_DIR / "vmlinuz"), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1",
            "-serial", f"file:{self.serial}",
            "-device", "virtio-blk-pci,drive=drive0,id=vd0",
        ]  # fmt: skip
        return argv

    def run(self) -> None:
        """Let the paused guest boot and write."""
        self.cmd("cont")

    def writes(self) -> list[tuple[int, int]]:
        """(i, offset) of every write the guest reported, in order."""
        text = self.serial.read_text(errors="replace") if self.serial.exists() else ""
        return [(int(a), int(b)) for a, b in re.findall(r"WROTE (\d+) (\d+)", text)]

    def wait_writes(self, n: int, timeout: float = 120) -> list[tuple[int, int]]:
        deadline = time.monotonic() + timeout
        while len(found := self.writes()) < n:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the guest stopped: {self.serial.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest wrote {len(found)} of {n} blocks in time")
            time.sleep(0.05)
        return found
