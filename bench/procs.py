"""Processes: the peers (qemu-nbd, our server, the gateway), timed tool runs, worker runs.

Every process a benchmark starts is a context manager that stops it (SIGTERM, then SIGKILL) on
the way out, so an interrupted run leaves nothing behind. Sockets live in a private temporary
directory; TCP only ever binds 127.0.0.1 port 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.harness import NotAvailable

ROOT = Path(__file__).resolve().parent.parent
QEMU10_BIN = ROOT / ".cache" / "qemu10" / "usr" / "bin"
LIBNBD_PYTHONPATH = "/usr/lib/python3/dist-packages"
SYSTEM_PYTHON = "/usr/bin/python3"
# Exit code by which a worker says "this side cannot run yet" (a component is missing).
EXIT_NOT_AVAILABLE = 3


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise NotAvailable(f"{name} is not installed (scripts/install-deps.sh)")
    return path


def qemu10_tool(name: str) -> str:
    path = QEMU10_BIN / name
    if not path.exists():
        raise NotAvailable(f"qemu 10 {name} is not unpacked in {QEMU10_BIN} (install-deps.sh)")
    return str(path)


@contextmanager
def tempdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="nbdgw-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# Where the copy benchmarks write their output: tmpfs, as issue 17 measured them. On this
# class of machine the disk under /tmp writes 300-450 MB/s durably, so a backup (which fsyncs)
# into /tmp measures the disk, not the data path.
TMPFS = Path("/dev/shm")


@contextmanager
def tmpfs_dir(room: int) -> Iterator[Path]:
    """A fresh directory on tmpfs with ``room`` bytes free; NotAvailable where there is none
    (the benchmark says so rather than silently writing to a disk)."""
    if not TMPFS.is_dir():
        raise NotAvailable(f"{TMPFS} is missing: the copy benchmarks write to tmpfs")
    st = os.statvfs(TMPFS)
    if st.f_bavail * st.f_frsize < room:
        raise NotAvailable(f"{TMPFS} has less than {room >> 20} MiB free")
    path = Path(tempfile.mkdtemp(prefix="nbdgw-bench-", dir=TMPFS))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unix_uri(sock: Path, export: str = "disk") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


def _failed(cmd: Sequence[str], code: int, stderr: bytes) -> RuntimeError:
    return RuntimeError(f"{' '.join(cmd)} exited {code}: {stderr.decode(errors='replace')[-500:]}")


def timed(cmd: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> float:
    """Wall-clock seconds of a reference tool run (exec included: a few ms), its output dropped."""
    start = time.perf_counter()
    proc = subprocess.run(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise _failed(cmd, proc.returncode, proc.stderr)
    return elapsed


def output(cmd: Sequence[str], *, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise _failed(cmd, proc.returncode, proc.stderr)
    return proc.stdout.decode()


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_worker(*args: str, timeout: float = 600) -> dict[str, Any]:
    """Run ``python -m bench.workers ARGS`` (our side, in a fresh interpreter so nothing of the
    harness weighs on it) and return the JSON object it prints last."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.workers", *args],
        capture_output=True,
        env=worker_env(),
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode == EXIT_NOT_AVAILABLE:
        raise NotAvailable(err.splitlines()[-1] if err else "worker says not available")
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} exited {proc.returncode}: {err[-800:]}")
    lines = proc.stdout.decode().strip().splitlines()
    if not lines:
        raise RuntimeError(f"worker {args[0]} printed nothing: {err[-800:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


class Background:
    """A long-running peer process; stopped with SIGTERM (qemu-nbd must not be SIGKILLed while
    writable: its bitmaps would stay marked in-use)."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str] | None = None, log: Path):
        self.cmd = list(cmd)
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-800:]
        except OSError:
            return ""

    def wait_ready(self, ready: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.cmd[0]} exited {self.proc.returncode} at start: {self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{' '.join(self.cmd)} not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def nbd_ready(uri: str) -> Callable[[], bool]:
    nbdinfo = tool("nbdinfo")

    def ready() -> bool:
        proc = subprocess.run(
            [nbdinfo, "--size", uri], capture_output=True, timeout=30, check=False
        )
        return proc.returncode == 0

    return ready


@contextmanager
def background(
    cmd: Sequence[str],
    ready: Callable[[], bool],
    *,
    log: Path,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> Iterator[Background]:
    proc = Background(cmd, env=env, log=log)
    try:
        proc.wait_ready(ready, timeout)
        yield proc
    finally:
        proc.stop()


@contextmanager
def qemu_nbd(
    image: Path,
    fmt: str,
    workdir: Path,
    *,
    bitmaps: Sequence[str] = (),
    name: str = "qemu-nbd",
    read_only: bool = True,
    qemu10: bool = False,
) -> Iterator[str]:
    """qemu-nbd 7.2 (or 10, which offers extended headers) serving ``image`` as export
    ``disk`` on a unix socket; yields the URI. ``-e 8``: room for nbdcopy's connections and
    ours; ``-t``: stay up between clients."""
    with qemu_nbd_process(
        image, fmt, workdir, bitmaps=bitmaps, name=name, read_only=read_only, qemu10=qemu10
    ) as (uri, _):
        yield uri


@contextmanager
def qemu_nbd_process(
    image: Path,
    fmt: str,
    workdir: Path,
    *,
    bitmaps: Sequence[str] = (),
    name: str = "qemu-nbd",
    read_only: bool = True,
    qemu10: bool = False,
) -> Iterator[tuple[str, Background]]:
    """:func:`qemu_nbd`, yielding the process too (for its CPU time)."""
    sock = workdir / f"{name}.sock"
    binary = qemu10_tool("qemu-nbd") if qemu10 else tool("qemu-nbd")
    cmd = [binary, "-t", "-e", "8", "-f", fmt, "-x", "disk", "-k", str(sock)]
    if read_only:
        cmd.append("-r")
    for b in bitmaps:
        cmd += ["-B", b]
    cmd.append(str(image))
    uri = unix_uri(sock)
    with background(cmd, nbd_ready(uri), log=workdir / f"{name}.log") as proc:
        yield uri, proc


def peak_rss_mib(pid: int) -> float:
    """VmHWM (peak resident set) of a live process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def missing(*specs: str) -> str | None:
    """Why one of ``module`` or ``module:attribute`` cannot be imported (a component that has not
    landed yet), or None."""
    import importlib

    for spec in specs:
        module, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            return f"{module} has not landed ({exc})"
        if attr and not hasattr(mod, attr):
            return f"{module}.{attr} has not landed"
    return None
