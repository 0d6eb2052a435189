"""FAST_ZERO against real clients (review L20): an export on a block device (a loop device
here) cannot zero without writing zeroes, so it does not advertise SEND_FAST_ZERO (nbdinfo),
refuses a fast zero that a non-strict libnbd sends anyway without touching the data, and
still takes a whole qemu-img convert -n; a file export next to it advertises and honours it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.storage.disk import RawFileDisk
from nbdcore.storage.image import Image
from tests.peers import LIBNBD_PYTHONPATH, missing, tool

pytestmark = pytest.mark.interop

MiB = 1 << 20
SIZE = 8 * MiB
PATTERN = b"\xa5" * MiB


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "backing.raw"
    backing.write_bytes(PATTERN + bytes(SIZE - MiB))
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        missing("a loop device (root and /dev/loop-control)", "run the interop tests as root")
    proc = subprocess.run(
        [tool("losetup"), "-f", "--show", str(backing)], capture_output=True, timeout=30
    )
    if proc.returncode != 0:
        missing(f"a loop device ({proc.stderr.decode().strip()})", "run as root with loop")
    dev = proc.stdout.decode().strip()
    try:
        yield dev
    finally:
        subprocess.run([tool("losetup"), "-d", dev], capture_output=True, timeout=30)


@pytest.fixture
async def served(tmp_path: Path, loop_device: str) -> AsyncIterator[tuple[str, str]]:
    """(block device URI, file URI), both served by one in-process server."""
    filepath = tmp_path / "file.raw"
    filepath.write_bytes(PATTERN + bytes(SIZE - MiB))
    block = Image(RawFileDisk(loop_device))
    plain = Image(RawFileDisk(filepath))
    srv = NBDServer([ExportConfig("block", block), ExportConfig("file", plain)])
    sock = str(tmp_path / "nbd.sock")
    await srv.start_unix(sock)
    try:
        yield f"nbd+unix:///block?socket={sock}", f"nbd+unix:///file?socket={sock}"
    finally:
        await srv.close()
        block.close()
        plain.close()


async def run(*cmd: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> str:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 60)
    assert proc.returncode == 0, (cmd, out, err)
    return out.decode()


# Non-strict libnbd sends the flag even where it is not advertised, as a careless client would.
FAST_ZERO_SCRIPT = """
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
result = {"can_fast_zero": h.can_fast_zero()}
try:
    h.zero(65536, 0, nbd.CMD_FLAG_FAST_ZERO)
    result["zero"] = "ok"
except nbd.Error as e:
    result["zero"] = e.errno
result["head"] = h.pread(65536, 0).hex()[:8]
print(__import__("json").dumps(result))
"""


async def fast_zero(uri: str) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=LIBNBD_PYTHONPATH)
    out = await run("/usr/bin/python3", "-c", FAST_ZERO_SCRIPT, uri, env=env)
    result: dict[str, object] = json.loads(out)
    return result


async def test_block_device_does_not_advertise_fast_zero(served: tuple[str, str]) -> None:
    block, file = served
    info = json.loads(await run(tool("nbdinfo"), "--json", block))
    (export,) = info["exports"]
    assert export["can_zero"] is True and export["can_fast_zero"] is False
    info = json.loads(await run(tool("nbdinfo"), "--json", file))
    (export,) = info["exports"]
    assert export["can_fast_zero"] is True


async def test_fast_zero_refused_on_block_device_data_untouched(
    served: tuple[str, str],
) -> None:
    block, file = served
    result = await fast_zero(block)
    assert result["can_fast_zero"] is False
    assert result["zero"] in ("EINVAL", "ENOTSUP")  # refused before any write
    assert result["head"] == "a5a5a5a5"
    # The file export punches: the same request succeeds and the data reads as zeroes.
    result = await fast_zero(file)
    assert result == {"can_fast_zero": True, "zero": "ok", "head": "00000000"}


async def test_qemu_img_convert_onto_block_device(served: tuple[str, str], tmp_path: Path) -> None:
    block, _ = served
    src = tmp_path / "src.raw"
    src.write_bytes(bytes(MiB) + os.urandom(2 * MiB) + bytes(SIZE - 3 * MiB))
    await run(tool("qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", str(src), block)
    out = await run(tool("qemu-img"), "compare", "-f", "raw", "-F", "raw", block, str(src))
    assert "identical" in out


async def test_fast_zero_after_a_refused_punch_over_nbd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file system refuses a punch after the export was advertised fast (the probe at
    open said yes): the fast zero fails with ENOTSUP and nothing is written, instead of the
    old fallback to writing zeroes; a plain zero still works."""
    import ctypes
    import errno

    from nbdcore.aio.client import NBDClient
    from nbdcore.constants import Errno
    from nbdcore.exceptions import RequestError
    from nbdcore.storage import disk as disk_mod

    path = tmp_path / "disk.raw"
    path.write_bytes(PATTERN + bytes(SIZE - MiB))
    image = Image(RawFileDisk(path))
    srv = NBDServer([ExportConfig("disk", image)])
    sock = str(tmp_path / "nbd.sock")
    await srv.start_unix(sock)
    try:
        async with await NBDClient.connect(f"nbd+unix:///disk?socket={sock}") as client:

            def refuse(fd: int, mode: int, offset: int, length: int) -> int:
                ctypes.set_errno(errno.EOPNOTSUPP)
                return -1

            monkeypatch.setattr(disk_mod, "_fallocate", refuse)
            with pytest.raises(RequestError) as info:
                await client.zero(0, 65536, fast_zero=True)
            assert info.value.errno == Errno.ENOTSUP
            assert await client.pread(0, 65536) == PATTERN[:65536]
            await client.zero(0, 65536)
            assert await client.pread(0, 65536) == bytes(65536)
    finally:
        await srv.close()
        image.close()
