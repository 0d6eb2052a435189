"""Whole commands, timed as a user meets them: process start, imports, connecting, the work,
and the exit, by wall clock around each process, ours and the reference alike.

- ``commands-copy``: ``nbdgw nbd copy URI null:`` against ``nbdcopy URI null:``, both from the
  same qemu-nbd 7.2 with the same number of connections.
- ``commands-backup``: ``nbdgw backup --full`` through a running gateway (in front of that
  qemu-nbd) into a file, against ``nbdcopy URI FILE`` from the host, both into the same
  directory on tmpfs (as issue 17 measured them: the disk under /tmp would be what is timed).
  The gateway process runs all along and is not timed (as in production); each output is
  checked against the source once (the warm-up call), and removed after every call.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench import procs
from bench.fixtures import BITMAP, GRANULE, Fixtures
from bench.gateway_suites import DATA_MESSAGE, bare_grpc_server, gateway
from bench.harness import GIB_S, Benchmark, Metric, Row, Side, Target
from bench.suites import (
    NBDCOPY_CONNECTIONS,
    Sides,
    _size,
    gib_s,
    nbdcopy_cmd,
    nbdcopy_side,
    nbdcopy_what,
    optional,
)
from nbdcore.sync.copy import DEFAULT_IN_FLIGHT, DEFAULT_REQUEST_SIZE


def compile_bytecode() -> None:
    """Compile our modules, as pip does when it installs nbdgw: a user's ``nbdgw`` starts from
    bytecode. A checkout run with PYTHONDONTWRITEBYTECODE=1 (as on the shared machines) would
    otherwise compile every module it imports at every start, and time that."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dirs = [str(procs.ROOT / d) for d in ("nbdcore", "gateway", "nbdgw")]
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", *dirs],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def nbdgw_cmd(*args: str) -> list[str]:
    """The ``nbdgw`` console script of this interpreter's environment: what a user runs."""
    script = Path(sys.executable).with_name("nbdgw")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "gateway", *args]


def commands_copy(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    # What `nbdgw nbd copy` does by default (qemu-nbd offers multi-conn on a read-only export).
    window = max(1, DEFAULT_IN_FLIGHT // NBDCOPY_CONNECTIONS)

    @contextmanager
    def setup() -> Iterator[Sides]:
        data = fx.data_raw()
        compile_bytecode()
        with procs.tempdir() as work, procs.qemu_nbd(data.file, "raw", work) as uri:
            ours = nbdgw_cmd(
                "nbd", "copy", "--connections", str(NBDCOPY_CONNECTIONS), "--no-progress", uri,
                "null:",
            )  # fmt: skip
            yield {
                "nbdgw nbd copy": lambda: gib_s(data.size, procs.timed(ours)),
                "nbdcopy": nbdcopy_side(uri, data.size),
            }

    return Benchmark(
        name="commands-copy",
        title=f"read a {_size(fx.sizes.data_bytes)} raw image from qemu-nbd 7.2, whole commands",
        metric=GIB_S,
        setup=setup,
        rows=[
            Row(
                f"nbdgw nbd copy URI null: ({NBDCOPY_CONNECTIONS} connections, {window} x"
                f" {DEFAULT_REQUEST_SIZE >> 10} KiB in flight each) / {nbdcopy_what()} URI null:;"
                " both whole processes, start and exit included",
                "nbdgw nbd copy",
                "nbdcopy",
                Target(">=", 1.2),
            )
        ],
    )


def _to_file(cmd: list[str], out: Path, source: Path, size: int) -> Callable[[], float]:
    """A side that runs ``cmd`` (which writes ``out``), checks ``out`` once, removes it."""
    checked = False

    def side() -> float:
        nonlocal checked
        seconds = procs.timed(cmd)
        try:
            if not checked:
                if not filecmp.cmp(out, source, shallow=False):
                    raise RuntimeError(f"{' '.join(cmd)} wrote a file that differs from the disk")
                checked = True
        finally:
            for path in out.parent.glob(out.name + "*"):
                os.unlink(path)
        return gib_s(size, seconds)

    return side


def commands_backup(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        data = fx.data_raw()
        compile_bytecode()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            uri = stack.enter_context(procs.qemu_nbd(data.file, "raw", work))
            gw = optional(stack, gateway(uri, work))
            # Four sides write a copy each; each removes its copy after the round.
            out = stack.enter_context(procs.tmpfs_dir(2 * data.size))
            backup: Sides = {}
            if isinstance(gw, tuple):
                target = gw[0]
                for name, extra in (
                    ("nbdgw backup --full", []),
                    ("nbdgw backup --full, blake3 digest", ["--digest", "blake3"]),
                ):
                    cmd = nbdgw_cmd("backup", "--full", "--target", target, *extra, "disk")
                    path = out / name.replace(" ", "_").replace(",", "")
                    backup[name] = _to_file([*cmd, str(path)], path, data.file, data.size)
            else:
                backup["nbdgw backup --full"] = gw
            nbdcopy_out = out / "nbdcopy.raw"
            flushed = out / "nbdcopy-flush.raw"
            bare, _ = stack.enter_context(bare_grpc_server(["--file", data.file], work))
            bare_out = out / "bare-grpc.raw"
            drain = [sys.executable, "-m", "bench.workers", "bare-grpc-drain", bare]
            drain += ["--message-size", str(DATA_MESSAGE), "--out", str(bare_out)]
            yield {
                **backup,
                "bare grpcio stream into a file": _to_file(drain, bare_out, data.file, data.size),
                "nbdcopy to a file": _to_file(
                    nbdcopy_cmd(uri, str(nbdcopy_out)), nbdcopy_out, data.file, data.size
                ),
                # Durable like the backup: --flush fsyncs the file before nbdcopy exits.
                "nbdcopy --flush to a file": _to_file(
                    [*nbdcopy_cmd(uri, str(flushed)), "--flush"], flushed, data.file, data.size
                ),
            }

    return Benchmark(
        name="commands-backup",
        title=f"back up a {_size(fx.sizes.data_bytes)} all-data raw image into a file on tmpfs,"
        " whole commands",
        metric=GIB_S,
        setup=setup,
        rows=[
            Row(
                "nbdgw backup --full through the gateway (one StreamExtents stream, CRC32C"
                " checked and written on the event loop, fsync every 32 MiB in the background) / "
                f"{nbdcopy_what()} URI FILE from the host; both whole processes into the same"
                " directory on tmpfs, start and exit included",
                "nbdgw backup --full",
                "nbdcopy to a file",
                Target(">=", 0.8),
            ),
            Row(
                "same, recording a blake3 digest / nbdcopy URI FILE",
                "nbdgw backup --full, blake3 digest",
                "nbdcopy to a file",
            ),
            # The ceiling of any gateway built on grpcio here: the bytes of the file itself
            # (no NBD, no qemu-nbd, no protobuf, no checksum, no state) streamed by a bare
            # grpcio server and written by a minimal grpc.aio client. The target row's 0.8x
            # is above it on this machine (docs/benchmarks.md, "The ceiling").
            Row(
                "bare grpcio server streaming the file (1 MiB messages, no NBD, no protobuf),"
                " a minimal grpc.aio client os.pwrite()ing each message into tmpfs, fsync at"
                " the end / nbdcopy URI FILE; both whole processes, start and exit included",
                "bare grpcio stream into a file",
                "nbdcopy to a file",
            ),
            Row(
                "nbdgw backup --full (as the first row) / the bare grpcio stream into a file"
                " (the row above): what the gateway, NBD and qemu-nbd cost over the ceiling",
                "nbdgw backup --full",
                "bare grpcio stream into a file",
            ),
            # nbdcopy without --flush leaves the file's last pages in the page cache (it starts
            # their writeback, sync_file_range, and exits); the backup is on disk when it ends.
            Row(
                "nbdgw backup --full (as the first row) / the same nbdcopy with --flush (the"
                " file fsync'd before it exits, as the backup's is); both whole processes",
                "nbdgw backup --full",
                "nbdcopy --flush to a file",
            ),
        ],
    )


def commands_incremental(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    @contextmanager
    def setup() -> Iterator[Sides]:
        qcow = fx.incremental_qcow2()
        sparse = fx.incremental_sparse_qcow2()
        dirty_bytes = qcow.extents * GRANULE
        compile_bytecode()
        with ExitStack() as stack:
            work = stack.enter_context(procs.tempdir())
            uri = stack.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=[BITMAP]))
            # A second qemu-nbd (its own socket) serving only the changed granules.
            sparse_work = stack.enter_context(procs.tempdir())
            sparse_uri = stack.enter_context(procs.qemu_nbd(sparse.file, "qcow2", sparse_work))
            gw = optional(stack, gateway(uri, work))
            out = stack.enter_context(procs.tmpfs_dir(3 * qcow.size))
            ours: Side
            if isinstance(gw, tuple):
                path = out / "incremental.img"
                cmd = nbdgw_cmd("backup", "--bitmap", BITMAP, "--target", gw[0], "disk", str(path))
                ours = _incremental_side(cmd, path, qcow.size, dirty_bytes)
            else:
                ours = gw
            full = out / "nbdcopy.raw"
            copy = nbdcopy_cmd(uri, str(full))

            def nbdcopy_full() -> float:
                seconds = procs.timed(copy)
                full.unlink()
                return gib_s(qcow.size, seconds)

            changed = out / "nbdcopy-changed.raw"
            yield {
                "nbdgw backup --bitmap": ours,
                "nbdcopy to a file": nbdcopy_full,
                "nbdcopy of the changed data": _incremental_side(
                    nbdcopy_cmd(sparse_uri, str(changed)), changed, qcow.size, dirty_bytes
                ),
            }

    return Benchmark(
        name="commands-incremental",
        title=f"incremental backup of a {_size(fx.sizes.data_bytes)} qcow2 image, 10% dirty in"
        " 64 KiB granules one in ten, into tmpfs, whole commands",
        metric=GIB_S,
        setup=setup,
        rows=[
            Row(
                "nbdgw backup --bitmap b0 through the gateway (one StreamExtents stream, filter"
                " SET, CRC32C checked and written on the event loop, fsync every 32 MiB in the"
                " background), dirty bytes per second / "
                f"{nbdcopy_what()} URI FILE of the whole disk, disk bytes per second; both"
                " whole processes into the same directory on tmpfs, start and exit included",
                "nbdgw backup --bitmap",
                "nbdcopy to a file",
                Target(">=", 0.8),
            ),
            # Like for like: nbdcopy cannot select the dirty ranges, so it copies an image
            # whose only data are those granules (the rest unallocated, which it skips): the
            # same bytes in the same 3,277 pieces, into the same kind of sparse file.
            Row(
                "nbdgw backup --bitmap b0 (as the first row), dirty bytes per second /"
                f" {nbdcopy_what()} URI FILE of a qcow2 image holding only the dirty granules"
                " (same offsets and bytes, the rest unallocated), data bytes per second; both"
                " whole processes into tmpfs, start and exit included",
                "nbdgw backup --bitmap",
                "nbdcopy of the changed data",
            ),
        ],
    )


def _incremental_side(cmd: list[str], out: Path, size: int, dirty: int) -> Callable[[], float]:
    """Runs ``cmd`` (a copy of the dirty granules into ``out``); checks once that ``out`` holds
    exactly the written granules and zeros elsewhere."""
    checked = False

    def side() -> float:
        nonlocal checked
        seconds = procs.timed(cmd)
        try:
            if not checked:
                every, pattern = Fixtures.INCREMENTAL_EVERY, Fixtures.INCREMENTAL_PATTERN
                with out.open("rb") as f:
                    for g in range(0, size // GRANULE):
                        chunk = f.read(GRANULE)
                        want = bytes([pattern]) * GRANULE if g % every == 0 else bytes(GRANULE)
                        if chunk != want:
                            raise RuntimeError(f"{out.name} is wrong at {g * GRANULE}")
                checked = True
        finally:
            for path in out.parent.glob(out.name + "*"):
                os.unlink(path)
        return gib_s(dirty, seconds)

    return side


MS = Metric("ms", higher_is_better=False)
# Starts per sample: one start is a few tens of ms, close to the timer's and the scheduler's
# noise; the sample is their mean.
STARTS = 10


def _starts(cmd: list[str]) -> Callable[[], float]:
    def side() -> float:
        return 1000 * sum(procs.timed(cmd) for _ in range(STARTS)) / STARTS

    return side


def commands_startup(fx: Fixtures, opts: dict[str, int]) -> Benchmark:
    """What every command pays before it does anything: the interpreter, the imports, argparse.
    The reference is the same interpreter doing nothing (`python -c pass`, site and the
    editable install's import hook included, as for nbdgw)."""

    @contextmanager
    def setup() -> Iterator[Sides]:
        compile_bytecode()
        yield {
            "python -c pass": _starts([sys.executable, "-c", "pass"]),
            "nbdgw --version": _starts(nbdgw_cmd("--version")),
            "nbdgw nbd copy --help": _starts(nbdgw_cmd("nbd", "copy", "--help")),
            "nbdgw export list --help": _starts(nbdgw_cmd("export", "list", "--help")),
        }

    goal = Target(">=", 0.5)  # at most twice python -c pass
    return Benchmark(
        name="commands-startup",
        title=f"start-up of a command, mean of {STARTS} starts per sample, from bytecode",
        metric=MS,
        setup=setup,
        rows=[
            Row("nbdgw --version / python -c pass", "nbdgw --version", "python -c pass", goal),
            Row(
                "nbdgw nbd copy --help / python -c pass",
                "nbdgw nbd copy --help",
                "python -c pass",
                goal,
            ),
            Row(
                "nbdgw export list --help (a gateway command) / python -c pass",
                "nbdgw export list --help",
                "python -c pass",
            ),
        ],
    )


def benchmarks(fx: Fixtures, opts: dict[str, int]) -> list[Benchmark]:
    return [
        commands_startup(fx, opts),
        commands_copy(fx, opts),
        commands_backup(fx, opts),
        commands_incremental(fx, opts),
    ]
