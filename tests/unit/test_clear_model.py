"""The NBD clear extension against a model bitmap: random writes, clears (through
NBD_CMD_X_NBDGW_CLEAR) and restarts of the server and its image, with hypothesis. After every
step the server's bitmap must equal the model, and every clear's reply must say exactly what
the model cleared. Also: negotiation with and without the extension, and bad requests."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbdcore.aio.client import NBDClient
from nbdcore.aio.server import ExportConfig, NBDServer
from nbdcore.exceptions import RequestError, UsageError
from nbdcore.storage.image import Image

GRAN = 4096
SIZE = 64 * GRAN + 1000  # a short last granule
CTX = "qemu:dirty-bitmap:b0"


class Model:
    def __init__(self) -> None:
        self.dirty = [False] * ((SIZE + GRAN - 1) // GRAN)

    def write(self, offset: int, length: int) -> None:
        for g in range(offset // GRAN, (offset + length - 1) // GRAN + 1):
            self.dirty[g] = True

    def clear(self, offset: int, length: int) -> list[tuple[int, int]]:
        first = -(-offset // GRAN)
        stop = offset + length
        end = len(self.dirty) if stop == SIZE else stop // GRAN
        if first >= end:
            return []
        for g in range(first, end):
            self.dirty[g] = False
        return [(first * GRAN, min(end * GRAN, SIZE) - first * GRAN)]

    def runs(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for g, d in enumerate(self.dirty):
            if d:
                start, n = g * GRAN, min(GRAN, SIZE - g * GRAN)
                if out and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((start, n))
        return out


async def server_runs(client: NBDClient) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    while pos < SIZE:
        lengths, flags = (await client.block_status(pos, SIZE - pos))[CTX]
        for n, f in zip(lengths, flags, strict=True):
            n = min(n, SIZE - pos)
            if f & 1:
                if out and out[-1][0] + out[-1][1] == pos:
                    out[-1] = (out[-1][0], out[-1][1] + n)
                else:
                    out.append((pos, n))
            pos += n
    return out


class Host:
    """The image, an NBD server over it and a client with the extension; restartable."""

    def __init__(self, directory: Path, extended: bool) -> None:
        self.dir = directory
        self.extended = extended
        self.image = Image.create(directory / "d.raw", SIZE)
        self.image.add_bitmap("b0", granularity=GRAN)

    async def start(self) -> NBDClient:
        self.server = NBDServer([ExportConfig("d", self.image)])
        sock = str(self.dir / "s")
        await self.server.start_unix(sock)
        self.client = await NBDClient.connect(
            f"nbd+unix:///d?socket={sock}",
            meta_contexts=[CTX],
            clear_extension=True,
            extended_headers=self.extended,
        )
        assert self.client.clear_extension
        return self.client

    async def restart(self) -> NBDClient:
        await self.stop()
        self.image = Image.open(self.dir / "d.raw")
        return await self.start()

    async def stop(self) -> None:
        await self.client.close()
        await self.server.close()
        self.image.close()


offsets = st.integers(0, SIZE - 1)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.integers(1, 3 * GRAN)),
        st.tuples(st.just("clear"), offsets, st.integers(1, 12 * GRAN)),
        st.tuples(st.just("restart"), st.just(0), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.booleans())
def test_clears_writes_and_restarts_match_the_model(
    steps: list[tuple[str, int, int]], extended: bool
) -> None:
    async def main(directory: Path) -> None:
        host = Host(directory, extended)
        model = Model()
        client = await host.start()
        try:
            for op, offset, length in steps:
                length = min(length, SIZE - offset)
                if op == "write":
                    await client.pwrite(b"\x01" * length, offset)
                    model.write(offset, length)
                elif op == "clear":
                    got = await client.clear(offset, length, CTX)
                    assert list(got.runs) == model.clear(offset, length)
                    assert got.granularity == GRAN
                else:
                    client = await host.restart()
                assert await server_runs(client) == model.runs()
        finally:
            await host.stop()

    directory = Path(tempfile.mkdtemp(prefix="nbdgw-clear-model-"))
    try:
        asyncio.run(main(directory))
    finally:
        shutil.rmtree(directory)


async def test_negotiation_and_bad_requests(tmp_path: Path) -> None:
    image = Image.create(tmp_path / "d.raw", SIZE)
    image.add_bitmap("b0", granularity=GRAN)
    sock = str(tmp_path / "s")
    uri = f"nbd+unix:///d?socket={sock}"
    async with NBDServer([ExportConfig("d", image)]) as server:
        await server.start_unix(sock)
        # Not asked: not on.
        async with await NBDClient.connect(uri, meta_contexts=[CTX]) as client:
            assert not client.clear_extension
            with pytest.raises(UsageError):
                await client.clear(0, GRAN, CTX)
        # Without structured replies the option is not even sent.
        async with await NBDClient.connect(
            uri, structured_replies=False, clear_extension=True
        ) as client:
            assert not client.clear_extension
        async with await NBDClient.connect(
            uri, meta_contexts=[CTX, "base:allocation"], clear_extension=True
        ) as client:
            assert client.clear_extension
            with pytest.raises(UsageError):  # local checks: range, context
                await client.clear(0, SIZE + 1, CTX)
            with pytest.raises(UsageError):
                await client.clear(0, GRAN, "qemu:dirty-bitmap:nope")
            # Clean already: the same answer (the whole granules inside the range).
            assert (await client.clear(0, GRAN, CTX)).runs == ((0, GRAN),)
    # A server that does not offer it answers the option like any unknown option.
    async with NBDServer([ExportConfig("d", image)], clear_extension=False) as server:
        sock2 = str(tmp_path / "s2")
        await server.start_unix(sock2)
        async with await NBDClient.connect(
            f"nbd+unix:///d?socket={sock2}", meta_contexts=[CTX], clear_extension=True
        ) as client:
            assert not client.clear_extension
            assert await client.block_status(0, GRAN)
    image.close()


async def test_read_only_image_refuses_with_eperm(tmp_path: Path) -> None:
    path = tmp_path / "d.raw"
    image = Image.create(path, SIZE)
    image.add_bitmap("b0", granularity=GRAN)
    image.write(b"x" * GRAN, 0)
    image.close()
    image = Image.open(path, read_only=True)
    sock = str(tmp_path / "s")
    async with NBDServer([ExportConfig("d", image)]) as server:
        await server.start_unix(sock)
        async with await NBDClient.connect(
            f"nbd+unix:///d?socket={sock}", meta_contexts=[CTX], clear_extension=True
        ) as client:
            with pytest.raises(RequestError) as info:
                await client.clear(0, GRAN, CTX)
            assert info.value.errno == 1  # EPERM
            assert (await server_runs(client)) == [(0, GRAN)]
    image.close()
