"""The client resumes a stream across a gateway killed (SIGKILL) or stopped (SIGTERM) mid-stream
and restarted on the same address: the consumer sees every extent and every byte exactly once,
as nbdinfo and the image itself say, and the stream's digest, checked by the client, matches.
The disk is served by a real qemu-nbd, which outlives the gateway."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

import nbdgw
from tests.gateway.cli_support import GRANULARITY, GatewayProcess, MiB, QemuDisk, QemuNBD, run
from tests.gateway.client_support import FLAVOURS
from tests.gateway.conftest import nbdinfo_map
from tests.peers import tool

pytestmark = [pytest.mark.interop, pytest.mark.slow]
SIZE = 64 * MiB
KILL_AT = 12 * MiB
B0 = "qemu:dirty-bitmap:b0"


def make_disk(d: Path) -> QemuDisk:
    """A qcow2 whose bitmap b0 is dirty over 40 MiB of patterned data (40 data messages) and
    some zeroes, so that the stream is far from over when the gateway dies."""
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    path = d / "disk.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(path), str(SIZE))
    run(qemu_img, "bitmap", "--add", "--granularity", str(GRANULARITY), str(path), "b0")
    cmds = [f"write -P {i + 1} {i * 2 * MiB} {MiB + 4096 * i}" for i in range(24)]
    cmds += [f"write -z {50 * MiB + i * 256 * 1024} 64k" for i in range(8)]
    run(qemu_io, "-f", "qcow2", str(path), input="\n".join(cmds) + "\n")
    run(qemu_img, "bitmap", "--add", str(path), "b1")  # QemuNBD serves b0 and b1
    raw = d / "disk.raw"
    run(qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    return QemuDisk(path, raw, SIZE, [])


class Restarter:
    """Signals the gateway, and once it is gone starts another on the same address half a
    second later, from a thread: the consumer goes on reading meanwhile, so that the client
    meets the end of the stream, then a dead address, then a live gateway."""

    def __init__(self, first: GatewayProcess, second: GatewayProcess, sig: int) -> None:
        self.first, self.second, self.sig = first, second, sig
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def kill_and_restart(self) -> None:
        proc = self.first.proc
        assert proc is not None and self.thread is None
        # SIGKILL: no goodbye, no resume token in a status. SIGTERM: the stream ends at a
        # message boundary with UNAVAILABLE, RetryInfo and the resume position.
        proc.send_signal(self.sig)

        def restart() -> None:
            try:
                proc.wait(30)
                threading.Event().wait(0.5)
                self.second.start()
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=restart)
        self.thread.start()

    def join(self) -> None:
        assert self.thread is not None, "the stream ended before the gateway was killed"
        self.thread.join()
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_stream_survives_a_killed_gateway(tmp_path: Path, flavour: str, sig: int) -> None:
    disk = make_disk(tmp_path)
    host = QemuNBD(disk, tmp_path / "qemu.sock").start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        listen = f"127.0.0.1:{probe.getsockname()[1]}"
    args = ["--export", f"qd={host.uri}", "--grace-period", "1"]
    first = GatewayProcess(*args, data_dir=tmp_path / "data")
    second = GatewayProcess(*args, data_dir=tmp_path / "data")
    first.args[2] = second.args[2] = listen  # --listen: the same address both times
    restarter = Restarter(first, second, sig)
    events: list[nbdgw.RetryEvent] = []
    chunks: list[nbdgw.DataChunk] = []
    options: dict[str, Any] = {
        "retry": nbdgw.Retry(attempts=12, backoff=0.1, max_backoff=2.0),
        "on_retry": events.append,
    }
    # Small messages: the client cannot have the rest of the stream buffered when it dies.
    # With a digest, which the client checks over its own resumes: the token carries the
    # gateway's state, the client keeps its own.
    stream = {"filter": nbdgw.ExtentFilter.ALL, "max_extents_per_message": 2, "digest": "blake3"}

    def consume(chunk: nbdgw.DataChunk) -> None:
        # Keep a copy: a view would pin every message.
        data = None if chunk.data is None else memoryview(bytes(chunk.data))
        chunks.append(
            nbdgw.DataChunk(chunk.offset, chunk.length, chunk.flags, chunk.allocation, data)
        )
        if chunk.offset >= KILL_AT and restarter.thread is None:
            restarter.kill_and_restart()

    try:
        first.start()
        if flavour == "sync":
            with nbdgw.Client(listen, **options) as c:
                for chunk in c.iter_data("qd", "b0", **stream):
                    consume(chunk)
        else:

            async def main() -> None:
                async with nbdgw.AsyncClient(listen, **options) as c:
                    async for chunk in c.iter_data("qd", "b0", **stream):
                        consume(chunk)

            asyncio.run(main())
        restarter.join()
    finally:
        first.stop()
        second.stop()
        host.stop()

    # The client really was cut off mid-stream, and resumed where it was.
    assert events, "no retry: the gateway died after the stream was over"
    assert all(e.method == "StreamExtents" for e in events)
    assert all(isinstance(e.error, nbdgw.errors.Unavailable) for e in events)
    if sig == signal.SIGTERM:  # the gateway said goodbye, with where to resume
        assert events[0].error.reason == "GATEWAY_SHUTTING_DOWN"
        assert events[0].error.resume_offset == events[0].position
        assert events[0].delay >= (events[0].error.retry_after or 0)
    assert events[0].position is not None and KILL_AT <= events[0].position < SIZE

    # Every byte exactly once, in order: the extents tile the disk...
    pos = 0
    for chunk in chunks:
        assert chunk.offset == pos, f"a {'gap' if chunk.offset > pos else 'repeat'} at {pos}"
        pos = chunk.end
    assert pos == SIZE
    # ...with the host's flags (nbdinfo --map against qemu-nbd, merged the same way)...
    merged: list[tuple[int, int, int]] = []
    for c in chunks:
        if merged and merged[-1][2] == c.flags:
            merged[-1] = (merged[-1][0], merged[-1][1] + c.length, c.flags)
        else:
            merged.append((c.offset, c.length, c.flags))
    host.start()
    try:
        assert merged == [(o, n, f) for o, n, f, _ in nbdinfo_map(host.uri, B0)]
    finally:
        host.stop()
    # ...and the image's bytes.
    image = disk.raw.read_bytes()
    for chunk in chunks:
        want = image[chunk.offset : chunk.end]
        got = chunk.data if chunk.data is not None else bytes(chunk.length)
        assert got == want, f"data differs in {chunk.offset}+{chunk.length}"
