"""The client library's check of a stream's digest, against a real gateway: the iterators ask for
a digest, hash what they receive and compare it with the gateway's before the last batch. A
proxy that alters a byte and rewrites the message's CRC32C to match (a corruption CRC32C misses)
gets through the per-message check, and the digest stops it: in the library, in both flavours,
and in ``nbdgw backup --digest``."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import nbdgw
from nbdgw.errors import ConfigurationError, DigestMismatch
from nbdgw.integrity import RangeDigest
from tests.gateway.cli_support import EmbeddedDisk, GatewayProcess, cli
from tests.gateway.client_support import FLAVOURS, Flavoured, client, serve_embedded
from tests.gateway.corrupting_proxy import CorruptingProxy
from tests.gateway.test_client_inplace import compressible  # noqa: F401  (a fixture)

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    yield from serve_embedded(tmp_path_factory, "digest")


def digest_of(algorithm: str, content: bytes | bytearray, start: int = 0) -> bytes:
    """The digest of ``content`` at ``start``, computed here from the disk's own bytes."""
    d = RangeDigest(algorithm, start)
    d.update(start, content)
    return d.finish(start + len(content))


def drain(c: Flavoured, stream: Any, into: list[Any]) -> None:
    """Item by item, so that what came before a failure is kept in ``into``."""
    if c.runner is None:
        into.extend(stream)
        return

    async def run() -> None:
        async for item in stream:
            into.append(item)

    c.runner.run(run())


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_iterators_check_the_digest_of_what_they_received(
    served: tuple[GatewayProcess, EmbeddedDisk], flavour: str, algorithm: str
) -> None:
    gw, disk = served
    part = (3 * 1024 * 1024 + 4096, 9 * 1024 * 1024)  # a range that starts inside a block
    with client(flavour, gw.target) as c:
        batches = c.call(
            "iter_batches", "disk", "base:allocation", include_data=True, digest=algorithm
        )
        assert [b for b in batches if b.digest] == [batches[-1]]
        assert batches[-1].digest == digest_of(algorithm, disk.content)
        # Without the data the gateway hashes what it reads: the same digest, unchecked here.
        bare = c.call("iter_batches", "disk", "base:allocation", digest=algorithm)
        assert not any(b.data for b in bare) and bare[-1].digest == batches[-1].digest
        # Part of the disk, in small messages, compressed: the digest of that range.
        chunks = c.call(
            "iter_data",
            "disk",
            "base:allocation",
            offset=part[0],
            length=part[1],
            max_extents_per_message=1,
            digest=algorithm,
            compression="zstd",
        )
        got = bytearray(part[1])
        for chunk in chunks:
            if chunk.data is not None:
                got[chunk.offset - part[0] : chunk.end - part[0]] = chunk.data
        assert got == disk.content[part[0] : part[0] + part[1]]
        tail = c.call(
            "iter_batches",
            "disk",
            "base:allocation",
            offset=part[0],
            length=part[1],
            digest=algorithm,
            include_data=True,
        )
        assert tail[-1].digest == digest_of(algorithm, got, part[0])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_digest_of_compressed_data_is_of_the_data(
    compressible: tuple[GatewayProcess, Path],  # noqa: F811
    flavour: str,
) -> None:
    gw, path = compressible
    content = path.read_bytes()
    with client(flavour, gw.target) as c:
        batches = c.call(
            "iter_batches",
            "disk",
            "base:allocation",
            include_data=True,
            digest="blake3",
            compression="zstd",
            compression_level=5,
        )
    assert any(b.raw.data_compression == "zstd" for b in batches), "nothing was compressed"
    assert batches[-1].digest == digest_of("blake3", content)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_digest_stops_a_corruption_that_crc32c_misses(
    served: tuple[GatewayProcess, EmbeddedDisk], flavour: str
) -> None:
    gw, disk = served
    # Without a digest, the altered message passes its (rewritten) CRC32C: one byte of the
    # data received is not the disk's, and nothing says so.
    with CorruptingProxy(gw.target, fix_crc=True) as proxy, client(flavour, proxy.target) as c:
        chunks = c.call("iter_data", "disk", "base:allocation")
    assert proxy.flipped and proxy.crc_fixed == 1 and proxy.crc_not_found == 0
    got = bytearray(disk.size)
    for chunk in chunks:
        if chunk.data is not None:
            got[chunk.offset : chunk.end] = chunk.data
    assert sum(a != b for a, b in zip(got, disk.content, strict=True)) == 1

    # With one, the stream fails before its last batch, naming the whole range.
    received: list[nbdgw.ExtentBatch] = []
    with CorruptingProxy(gw.target, fix_crc=True) as proxy, client(flavour, proxy.target) as c:
        stream = c.client.iter_batches(
            "disk", "base:allocation", include_data=True, digest="blake3"
        )
        with pytest.raises(DigestMismatch, match=r"blake3 digest is [0-9a-f]{64} here") as info:
            drain(c, stream, received)
    assert proxy.crc_fixed == 1
    assert (info.value.offset, info.value.next_offset) == (0, disk.size)
    assert f"[0, {disk.size})" in str(info.value)
    assert received and received[-1].next_offset < disk.size  # the last batch never came
    assert not any(b.digest for b in received)


def test_backup_digest_stops_a_corruption_that_crc32c_misses(
    served: tuple[GatewayProcess, EmbeddedDisk], tmp_path: Path
) -> None:
    gw, _disk = served
    out = tmp_path / "full.img"
    with CorruptingProxy(gw.target, fix_crc=True) as proxy:
        proc = cli("backup", "disk", str(out), "--full", "--digest", "blake3", "--target",
                   proxy.target)  # fmt: skip
    assert proxy.crc_fixed == 1
    assert proc.returncode != 0
    assert "differs from the gateway's" in proc.stderr, proc.stderr
    assert "the backup is not what the disk held" in proc.stderr


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_digest_options_are_checked_before_anything_is_sent(flavour: str) -> None:
    # Nothing listens there: an option refused locally never reaches the network.
    with client(flavour, "127.0.0.1:9") as c:
        with pytest.raises(ConfigurationError, match="unknown digest 'md5'"):
            c.call("iter_data", "disk", "base:allocation", digest="md5")
        with pytest.raises(ConfigurationError, match="unknown compression 'gzip'"):
            c.call("iter_batches", "disk", "base:allocation", compression="gzip")
        with pytest.raises(ConfigurationError, match="compression_level 3 without compression"):
            c.call("iter_data", "disk", "base:allocation", compression_level=3)
        # The digest covers the whole range: a stream resumed from an earlier run's token
        # cannot check it.
        with pytest.raises(ConfigurationError, match="resumed from an earlier run"):
            c.call("iter_data", "disk", "base:allocation", digest="blake3", resume_token="x")


def test_async_digest_stream_can_be_left_early(
    served: tuple[GatewayProcess, EmbeddedDisk],
) -> None:
    """A consumer that stops before the end gets no verdict and no error."""
    gw, _disk = served

    async def main() -> int:
        async with nbdgw.AsyncClient(gw.target) as c:
            n = 0
            async for _chunk in c.iter_data("disk", "base:allocation", digest="sha256"):
                n += 1
                if n == 3:
                    break
            return n

    assert asyncio.run(main()) == 3
