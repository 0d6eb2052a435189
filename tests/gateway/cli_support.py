"""Support for the command-line tests: real ``nbdgw serve`` processes in front of the embedded
nbdcore host or a real qemu-nbd, disks with bitmaps dirtied at known places, and running
``nbdgw`` commands as a person would (a subprocess, its exit code, stdout and stderr)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbdcore.storage import Image
from tests.peers import UnixPeer, tool

KiB = 1024
MiB = 1024 * KiB
GRANULARITY = 64 * KiB
ENV = {**os.environ, "no_proxy": "*", "NO_PROXY": "*", "PYTHONUNBUFFERED": "1"}
ENV.pop("NBDGW_TARGET", None)
ENV.pop("NBDGW_TOKEN", None)


def nbdgw(*args: str, timeout: float = 60, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``nbdgw ARGS`` in a fresh interpreter."""
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"nbdgw {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
    return proc


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    """Run ``nbdgw ARGS`` in this process (faster than :func:`nbdgw`; same outputs)."""
    from gateway.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 2
    proc = subprocess.CompletedProcess(["nbdgw", *args], code, out.getvalue(), err.getvalue())
    if check and proc.returncode != 0:
        raise AssertionError(f"nbdgw {' '.join(args)} -> {proc.returncode}: {proc.stderr}")
    return proc


def run(*cmd: str, input: str | None = None) -> str:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed: {proc.stderr}{proc.stdout}")
    return proc.stdout


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """A failed command: the exit code, nothing on stdout, one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("nbdgw")
    return lines[0]


class GatewayProcess:
    """``nbdgw serve`` as a subprocess on 127.0.0.1:0; ``target`` once it is listening."""

    def __init__(self, *args: str, data_dir: Path) -> None:
        self.args = ["serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *args]
        self.proc: subprocess.Popen[str] | None = None
        self.target = ""
        self.nbd_socket = ""

    def start(self) -> GatewayProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        # The gateway prints its address once it listens (and only then).
        for line in self.proc.stdout:
            if "gateway listening on " in line:
                self.target = line.rsplit(" ", 1)[1].strip()
            elif "embedded NBD host on " in line:
                self.nbd_socket = line.rsplit("socket=", 1)[1].strip()
            elif line.startswith("Try:"):
                break
            if time.monotonic() > deadline:
                break
        if not self.target:
            assert self.proc.stderr is not None
            self.proc.kill()
            err = self.proc.stderr.read()
            self.stop()
            raise AssertionError(f"the gateway did not start: {err[-2000:]}")
        return self

    def nbd_uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.nbd_socket}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self.proc = None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- backups ---------------------------------------------------------------------------------


def dirty_map(target: str, export: str, bitmap: str) -> list[tuple[int, int]]:
    out = cli("bitmap", "map", export, "--context", bitmap, "--dirty", "--json", "--target", target)
    assert out.returncode == 0, out.stderr
    return [(e["offset"], e["length"]) for e in json.loads(out.stdout)]


def is_hole(path: Path, offset: int, length: int) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) >= offset + length
    except OSError:  # ENXIO: no data after offset
        return True
    finally:
        os.close(fd)


def check_incremental(output: Path, source: bytes, dirty: list[tuple[int, int]]) -> None:
    """The dirty ranges hold the source's bytes, everything else reads as zeroes."""
    data = output.read_bytes()
    assert len(data) == len(source)
    pos = 0
    for off, length in dirty:
        assert data[pos:off].count(0) == off - pos, f"clean range {pos}-{off} was written"
        assert data[off : off + length] == source[off : off + length], f"dirty {off}+{length}"
        pos = off + length
    assert data[pos:].count(0) == len(data) - pos


# --- TLS -------------------------------------------------------------------------------------


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and gateway.test, a client certificate:
    ``ca_pem``, ``server_pem``, ``server_key``, ``client_pem``, ``client_key``..."""
    openssl = tool("openssl")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"),
        "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=nbdgw test CA")  # fmt: skip
    (d / "server.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:gateway.test\n")
    (d / "client.cnf").write_text("extendedKeyUsage=clientAuth\n")
    for name, cn in (("server", "127.0.0.1"), ("client", "backup-client")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"),
            "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")  # fmt: skip
        run("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"),
            "-CAkey", str(d / "ca.key"), "-CAcreateserial", "-out", str(d / f"{name}.pem"),
            "-days", "2", "-extfile", str(d / f"{name}.cnf"))  # fmt: skip
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


# --- the embedded host: an nbdcore Image with a bitmap ------------------------------------------


@dataclass
class EmbeddedDisk:
    """A raw image with bitmap ``backup`` and what was written after the bitmap was added."""

    path: Path
    size: int
    content: bytearray  # the whole disk, as written
    dirty: list[tuple[int, int]] = field(default_factory=list)  # written after add_bitmap


def make_embedded_disk(path: Path, *, size: int = 32 * MiB, seed: int = 1) -> EmbeddedDisk:
    """Data before the bitmap (clean), then data, zeroes and sub-granule writes after it."""
    rng = random.Random(seed)
    disk = EmbeddedDisk(path, size, bytearray(size))
    image = Image.create(path, size)
    try:

        def write(offset: int, length: int, *, track: bool) -> None:
            data = rng.randbytes(length)
            image.write(data, offset)
            disk.content[offset : offset + length] = data
            if track:
                disk.dirty.append((offset, length))

        write(0, 256 * KiB, track=False)
        write(4 * MiB, 1 * MiB, track=False)
        image.add_bitmap("backup", granularity=GRANULARITY)
        write(64 * KiB, 64 * KiB, track=True)  # inside the clean data
        write(1 * MiB + 4 * KiB, 10 * KiB, track=True)  # sub-granule
        write(8 * MiB, 6 * MiB, track=True)  # several data messages
        for i in range(40):  # fragments
            write(16 * MiB + i * 192 * KiB, 64 * KiB, track=True)
        image.write_zeroes(4 * MiB + 128 * KiB, 256 * KiB)  # dirty but zero, over data
        disk.content[4 * MiB + 128 * KiB : 4 * MiB + 384 * KiB] = bytes(256 * KiB)
        disk.dirty.append((4 * MiB + 128 * KiB, 256 * KiB))
        write(size - 64 * KiB, 64 * KiB, track=True)  # the last granule
        image.flush()
    finally:
        image.close()
    return disk


def granules(ranges: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """The dirty map the bitmap must hold for these writes: whole granules, merged."""
    marked = sorted(
        {
            g
            for off, n in ranges
            for g in range(off // GRANULARITY, (off + n - 1) // GRANULARITY + 1)
        }
    )
    out: list[tuple[int, int]] = []
    for g in marked:
        start = g * GRANULARITY
        length = min(GRANULARITY, size - start)
        if out and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((start, length))
    return out


# --- qemu: a qcow2 disk whose bitmaps qemu-io dirtied, served by qemu-nbd -------------------------


@dataclass
class QemuDisk:
    path: Path
    raw: Path  # the same content as a raw file: the ground truth for data
    size: int
    b0_writes: list[tuple[int, int]]  # what dirtied b0 (b1 was added after b0 was disabled)


def make_qemu_disk(directory: Path, size: int = 32 * MiB) -> QemuDisk:
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    path = directory / "disk.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size))
    run(qemu_io, "-f", "qcow2", str(path), input="write -P 0x11 0 1M\n")
    run(qemu_img, "bitmap", "--add", "--granularity", str(GRANULARITY), str(path), "b0")
    data = [
        (128 * KiB, 4 * KiB, 0x22),
        (3 * MiB, 3 * MiB + 512, 0x33),
        (size - 4 * KiB, 4096, 0x44),
    ]
    zeroes = [(8 * MiB, 512 * KiB)] + [(12 * MiB + i * 128 * KiB, 64 * KiB) for i in range(30)]
    cmds = [f"write -P {p} {o} {n}" for o, n, p in data]
    cmds += [f"write -z {o} {n}" for o, n in zeroes]
    run(qemu_io, "-f", "qcow2", str(path), input="\n".join(cmds) + "\n")
    run(qemu_img, "bitmap", "--disable", str(path), "b0")
    run(qemu_img, "bitmap", "--add", "--granularity", str(GRANULARITY), str(path), "b1")
    run(qemu_io, "-f", "qcow2", str(path), input="write -P 0x55 20M 64k\n")
    raw = directory / "disk.raw"
    run(qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    return QemuDisk(path, raw, size, [(o, n) for o, n, _ in data] + zeroes)


def run_and_kill(
    args: list[str], spath: Path, threshold: int, size: int | None = None
) -> dict[str, Any]:
    """Start ``nbdgw ARGS`` (a backup) and SIGKILL it once its recorded progress passes
    ``threshold``; returns the state recorded at the time of the kill, which is not complete
    (and, with ``size``, short of it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise AssertionError(f"the backup ended before it was killed: {err}")
            try:
                state = json.loads(spath.read_text())
            except (FileNotFoundError, ValueError):
                state = None
            if state is not None and state["next_offset"] >= threshold:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                assert not state["complete"]
                assert size is None or state["next_offset"] < size
                return dict(state)
            time.sleep(0.002)
        raise AssertionError("the backup made no progress")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def hold_mid_backup(pid: int, spath: Path, past: int, timeout: float = 60) -> dict[str, Any]:
    """Stop the backup process ``pid`` (SIGSTOP) at a moment its recorded state says it is in
    progress: its snapshot recorded (if it takes one), a checkpoint past ``past`` bytes, and not
    complete. Returns that state with the process still stopped, so that whatever the caller
    kills next lands mid-backup by construction, not by luck; the caller sends SIGCONT."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        os.kill(pid, signal.SIGSTOP)
        try:
            state = json.loads(spath.read_text())  # replaced atomically: never half
        except (FileNotFoundError, ValueError):
            state = None
        if (
            state is not None
            and not state["complete"]
            and past <= state["next_offset"] < state["size"]
        ):
            return dict(state)
        os.kill(pid, signal.SIGCONT)
        if state is not None and state["complete"]:
            raise AssertionError(f"the backup completed before passing {past}: {state}")
        time.sleep(0.003)
    raise AssertionError(f"the backup did not pass {past} in {timeout}s")


class QemuNBD(UnixPeer):
    """A read-only qemu-nbd serving a qcow2 disk with bitmaps b0 and b1 (and, with ``-A``,
    qemu:allocation-depth) on a unix socket."""

    def __init__(
        self, disk: QemuDisk, socket: Path, export: str = "disk", binary: str | None = None
    ) -> None:
        super().__init__(socket, export)
        self.binary = binary
        self.disk = disk

    def command(self) -> list[str]:
        cmd = [self.binary or tool("qemu-nbd"), "-r", "-t", "-e", "16", "-A", "-f", "qcow2"]
        cmd += ["-x", self.export, "-B", "b0", "-B", "b1", "-k", str(self.socket)]
        return [*cmd, str(self.disk.path)]
