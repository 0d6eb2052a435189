"""The nbdgw clear extension never bothers a peer without it: qemu-nbd (7.2 and 10) and nbdkit
answer NBD_OPT_X_NBDGW_CLEAR with ERR_UNSUP and the connection goes on as before; libnbd
(nbdinfo, python3-libnbd) never sees it on our server, whose bitmap it reads as usual."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.exceptions import UsageError
from nbdcore.storage.image import Image
from tests.interop.test_client_peers import Peer
from tests.peers import LIBNBD_PYTHONPATH, qemu10, tool

CTX = "qemu:dirty-bitmap:b0"


def qcow2_with_bitmap(path: Path) -> None:
    subprocess.run([tool("qemu-img"), "create", "-q", "-f", "qcow2", str(path), "4M"], check=True)
    subprocess.run([tool("qemu-img"), "bitmap", "--add", str(path), "b0"], check=True)
    subprocess.run(
        [tool("qemu-io"), "-f", "qcow2", str(path)],
        input=b"write 0 64k\n",
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("version", ["7.2", "10"])
async def test_qemu_nbd_refuses_the_option_and_serves_on(tmp_path: Path, version: str) -> None:
    binary = tool("qemu-nbd") if version == "7.2" else qemu10("qemu-nbd")
    disk = tmp_path / "d.qcow2"
    qcow2_with_bitmap(disk)
    sock = str(tmp_path / "q.sock")
    peer = Peer([binary, "-r", "-t", "-f", "qcow2", "-B", "b0", "-k", sock, str(disk)], sock=sock)
    try:
        uri = f"nbd+unix:///?socket={sock}"
        async with await NBDClient.connect(
            uri, meta_contexts=[CTX], clear_extension=True
        ) as client:
            assert not client.clear_extension
            lengths, flags = (await client.block_status(0, 1 << 20))[CTX]
            assert flags[0] == 1 and lengths[0] == 65536
            with pytest.raises(UsageError):
                await client.clear(0, 65536, CTX)  # never sent to a peer without it
            assert len(await client.pread(0, 4096)) == 4096
    finally:
        peer.stop()


async def test_nbdkit_refuses_the_option(tmp_path: Path) -> None:
    sock = str(tmp_path / "k.sock")
    peer = Peer([tool("nbdkit"), "-f", "-U", sock, "memory", "1M"], sock=sock)
    try:
        async with await NBDClient.connect(
            f"nbd+unix:///?socket={sock}", meta_contexts=["base:allocation"], clear_extension=True
        ) as client:
            assert not client.clear_extension
            await client.pwrite(b"x" * 512, 0)
            assert await client.pread(0, 512) == b"x" * 512
    finally:
        peer.stop()


async def test_libnbd_reads_our_bitmap_without_the_extension(tmp_path: Path) -> None:
    image = Image.create(tmp_path / "d.raw", 1 << 20)
    image.add_bitmap("b0", granularity=65536)
    image.write(b"y" * 1000, 70000)
    sock = str(tmp_path / "s")
    async with NBDServer([ExportConfig("", image)]) as server:
        await server.start_unix(sock)
        uri = f"nbd+unix:///?socket={sock}"
        out = await asyncio.to_thread(
            subprocess.run,
            [tool("nbdinfo"), f"--map={CTX}", "--json", uri],
            capture_output=True,
            text=True,
            check=True,
        )
        assert [(e["offset"], e["length"], e["type"]) for e in json.loads(out.stdout)] == [
            (0, 65536, 0),
            (65536, 65536, 1),
            (131072, (1 << 20) - 131072, 0),
        ]
        # python3-libnbd (1.14) negotiates as always and never meets the extension.
        script = (
            "import nbd, sys\n"
            "h = nbd.NBD(); h.add_meta_context(sys.argv[2]); h.connect_uri(sys.argv[1])\n"
            "print(h.can_meta_context(sys.argv[2]), h.pread(512, 0) == bytes(512))\n"
        )
        env = dict(os.environ, PYTHONPATH=LIBNBD_PYTHONPATH)
        done = await asyncio.to_thread(
            subprocess.run,
            ["/usr/bin/python3", "-c", script, uri, CTX],
            capture_output=True,
            text=True,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", "True"]
    image.close()
