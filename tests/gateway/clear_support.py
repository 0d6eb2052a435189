"""Support for the ClearRange tests: an ``nbdgw nbd serve`` host process (a remote nbdcore
host, which offers the NBD clear extension), a writable qemu-nbd, and bitmap maps read
straight from a host with nbdcore's client (never through the gateway under test)."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from nbdcore.aio.client import NBDClient
from nbdcore.extents import iter_extents
from nbdcore.storage import Image
from tests.peers import UnixPeer, tool

KiB = 1024
MiB = 1024 * KiB
G = 64 * KiB  # granularity of every bitmap here
ENV = {**os.environ, "no_proxy": "*", "NO_PROXY": "*", "PYTHONUNBUFFERED": "1"}


def make_image(path: Path, size: int, dirty: list[tuple[int, int]], bitmap: str = "b0") -> None:
    """A raw image with ``bitmap`` (64 KiB granules) dirty over ``dirty``."""
    image = Image.create(path, size)
    try:
        image.add_bitmap(bitmap, granularity=G)
        for offset, length in dirty:
            image.write(bytes([0x5A]) * length, offset)
        image.flush()
    finally:
        image.close()


class NbdcoreHost(UnixPeer):
    """``nbdgw nbd serve DISK`` on a unix socket, as a separate process."""

    env = ENV
    start_timeout = 30.0

    def __init__(
        self, disk: Path, socket: Path, export: str = "disk", extra: tuple[str, ...] = ()
    ) -> None:
        super().__init__(socket, export)
        self.disk = disk
        self.extra = extra

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gateway", "nbd", "serve", str(self.disk)]
        return [*cmd, "--socket", str(self.socket), "--export", self.export, *self.extra]


class ReadOnlyQemu(UnixPeer):
    """qemu-nbd -r serving bitmap b0 of a qcow2 disk (may be killed with SIGKILL)."""

    start_timeout = 30.0

    def __init__(self, disk: Path, socket: Path) -> None:
        super().__init__(socket)
        self.disk = disk

    def command(self) -> list[str]:
        cmd = [tool("qemu-nbd"), "-r", "-t", "-e", "16", "-f", "qcow2", "-x", self.export]
        return [*cmd, "-B", "b0", "-k", str(self.socket), str(self.disk)]


class WritableQemuNBD(UnixPeer):
    """qemu-nbd serving a private copy of a qcow2 disk *writable* (no -r); stop it with
    SIGTERM (SIGKILL would leave its bitmaps marked in use)."""

    start_timeout = 30.0

    def __init__(self, disk: Path, socket: Path, export: str = "disk") -> None:
        super().__init__(socket, export)
        self.disk = disk

    def command(self) -> list[str]:
        cmd = [tool("qemu-nbd"), "-t", "-e", "8", "-f", "qcow2", "-x", self.export]
        return [*cmd, "-B", "b0", "-k", str(self.socket), str(self.disk)]


async def dirty_runs(uri: str, context: str) -> list[tuple[int, int]]:
    """The dirty runs of ``context`` as the host itself reports them (merged)."""
    out: list[tuple[int, int]] = []
    async with await NBDClient.connect(uri, meta_contexts=[context]) as client:
        async for batch in iter_extents(client, [context]):  # type: ignore[arg-type]
            pos = batch.offset
            for length, flags in zip(batch.lengths, batch.flags[0], strict=True):
                if flags & 1:
                    if out and out[-1][0] + out[-1][1] == pos:
                        out[-1] = (out[-1][0], out[-1][1] + length)
                    else:
                        out.append((pos, length))
                pos += length
    return out


def run_async(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]
