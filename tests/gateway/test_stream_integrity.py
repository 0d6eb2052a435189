"""StreamExtents' integrity fields against a real gateway over the embedded host: a CRC32C in
every data message, the stream digest (however the stream is cut, resumed, or sent without
its data), zstd, and the refusal of unknown names."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.api.bitmaps import decode_resume_state, encode_resume
from gateway.config import GatewayConfig
from gateway.integrity import crc32c
from nbdcore.aio.client import NBDClient
from nbdgw._core import message_data
from nbdgw.integrity import RangeDigest
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import MiB, call_error, rich, rows_of, stream_all
from tests.gateway.test_service_embedded import SIZE, make_image


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_image(tmp_path / "disk.img")


def local_digest(
    algorithm: str, content: bytes, messages: list[pb.StreamExtentsResponse], start: int = 0
) -> bytes:
    """The digest of what ``messages`` delivered, computed from the disk's own bytes."""
    d = RangeDigest(algorithm, start)
    for m in messages:
        for offset, length, _flags, kind in rows_of(m):
            if kind == pb.ALLOCATION_DATA:
                d.update(offset, content[offset : offset + length])
    return d.finish(messages[-1].range_end)


async def test_every_data_message_carries_its_crc32c(start_gateway: Any, disk: Path) -> None:
    gw = await start_gateway(config_of(disk))
    got = await stream_all(gw.stub, export="disk", context="base:allocation", include_data=True)
    with_data = [m for m in got.messages if m.data]
    assert with_data
    for m in got.messages:
        assert m.HasField("data_crc32c") == bool(m.data)
        if m.data:
            assert m.data_crc32c == crc32c(m.data)
            assert message_data(m) == m.data
        assert not m.digest  # none asked for


def config_of(disk: Path) -> GatewayConfig:
    config = GatewayConfig(data_dir=disk.parent / "data")
    config.add_image_export("disk", disk)
    return config


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
async def test_digest_is_the_disk_content_however_the_stream_is_cut(
    start_gateway: Any, disk: Path, algorithm: str
) -> None:
    gw = await start_gateway(config_of(disk))
    content = await asyncio.to_thread(disk.read_bytes)
    base = {"export": "disk", "context": "base:allocation", "digest": algorithm}
    full = await stream_all(gw.stub, **base, include_data=True)
    digest = full.messages[-1].digest
    assert len(digest) == 32
    assert [m for m in full.messages if m.digest] == [full.messages[-1]]
    assert digest == local_digest(algorithm, content, full.messages)
    # The same without the data (the gateway reads and hashes), and cut in small messages.
    hashed = await stream_all(gw.stub, **base)
    assert not any(m.data for m in hashed.messages)
    assert hashed.messages[-1].digest == digest
    small = await stream_all(gw.stub, **base, include_data=True, max_extents_per_message=1)
    assert small.messages[-1].digest == digest
    # A dirty bitmap's stream hashes what it delivers: the dirty data only.
    dirty = await stream_all(
        gw.stub, **{**base, "context": "backup"}, filter=pb.EXTENT_FILTER_SET, include_data=True
    )
    assert dirty.messages[-1].digest == local_digest(algorithm, content, dirty.messages)
    assert dirty.messages[-1].digest != digest


async def first_messages(
    gw: Any, request: pb.StreamExtentsRequest, k: int
) -> list[pb.StreamExtentsResponse]:
    head = []
    async for m in gw.stub.StreamExtents(request):
        head.append(m)
        if len(head) == k:
            break
    return head


def resumed_from(request: pb.StreamExtentsRequest, token: str) -> pb.StreamExtentsRequest:
    again = pb.StreamExtentsRequest()
    again.CopyFrom(request)
    again.resume_token = token
    return again


async def test_digest_survives_a_resume_inside_a_block(start_gateway: Any, disk: Path) -> None:
    gw = await start_gateway(config_of(disk))
    request = pb.StreamExtentsRequest(
        export="disk",
        context="backup",
        filter=pb.EXTENT_FILTER_SET,
        include_data=True,
        digest="blake3",
        max_extents_per_message=1,
    )
    whole = [m async for m in gw.stub.StreamExtents(request)]
    rows = [r for m in whole for r in rows_of(m)]
    # The first message ends inside the first 1 MiB block (three granules of data at 0): the
    # resumed gateway hashes its start again. Every other message end is tried too.
    assert 0 < whole[0].next_offset < 1 * MiB
    # The last message's token too: a resume there sends one empty message with the digest.
    for k in range(1, len(whole) + 1):
        head = await first_messages(gw, request, k)
        tail = [
            m async for m in gw.stub.StreamExtents(resumed_from(request, head[-1].resume_token))
        ]
        assert tail[0].offset == head[-1].next_offset
        assert tail[-1].digest == whole[-1].digest, f"resumed after message {k}"
        assert [r for m in head + tail for r in rows_of(m)] == rows

    # resume_offset cannot carry the digest's state.
    request.resume_offset = whole[0].next_offset
    err = await call_error(gw.stub.StreamExtents(request))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "resume_token" in err.message


async def test_zstd_data_decompresses_to_the_same_bytes(start_gateway: Any, disk: Path) -> None:
    gw = await start_gateway(config_of(disk))
    base = {"export": "disk", "context": "base:allocation", "include_data": True}
    raw = await stream_all(gw.stub, **base)
    packed = await stream_all(gw.stub, **base, compression="zstd", compression_level=5)
    compressed = [m for m in packed.messages if m.data_compression == "zstd"]
    assert compressed, "the sample pattern compresses"
    assert sum(len(m.data) for m in packed.messages) < sum(len(m.data) for m in raw.messages)
    assert b"".join(map(message_data, packed.messages)) == b"".join(map(message_data, raw.messages))
    for m in compressed:
        assert m.data_crc32c == crc32c(message_data(m))  # of the data, not of the frame


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"digest": "md5"}, "digest"),
        ({"compression": "gzip", "include_data": True}, "compression"),
        (
            {"compression": "zstd", "compression_level": 22, "include_data": True},
            "compression_level",
        ),
        # A level alone: most likely a forgotten compression="zstd".
        ({"compression_level": 5, "include_data": True}, "compression_level"),
    ],
)
async def test_unknown_names_are_invalid_argument(
    start_gateway: Any, disk: Path, fields: dict[str, Any], field: str
) -> None:
    gw = await start_gateway(config_of(disk))
    request = pb.StreamExtentsRequest(export="disk", context="base:allocation", **fields)
    err = await call_error(gw.stub.StreamExtents(request))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.info.reason == "INVALID_FIELD" or err.info.reason.endswith("INVALID_FIELD")
    assert field in err.message
    # The gateway goes on serving.
    ok = await stream_all(gw.stub, export="disk", context="base:allocation")
    assert ok.messages[-1].next_offset == SIZE


async def test_digest_resumes_after_a_shutdown(start_gateway: Any, disk: Path) -> None:
    """A gateway that shuts down mid-stream ends it with UNAVAILABLE and a resume token whose
    digest state goes with the position it names (the digest may already hold the data of a
    message it then did not send); the next gateway finishes the same digest."""
    fields = {
        "export": "disk",
        "context": "base:allocation",
        "include_data": True,
        "digest": "blake3",
        "max_extents_per_message": 1,
    }
    gw = await start_gateway(config_of(disk))
    want = (await stream_all(gw.stub, **fields)).messages[-1].digest
    for k in (1, 2, 3):
        got: list[pb.StreamExtentsResponse] = []
        stopping = None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for msg in gw.stub.StreamExtents(pb.StreamExtentsRequest(**fields)):
                got.append(msg)
                if len(got) == k:
                    stopping = asyncio.ensure_future(gw.gateway.stop(grace=10))
        assert stopping is not None
        await stopping
        err = rich(info.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert int(err.info.metadata["resume_offset"]) == got[-1].next_offset
        gw = await start_gateway(config_of(disk))
        rest = await stream_all(gw.stub, **fields, resume_token=err.info.metadata["resume_token"])
        assert rest.messages[0].offset == got[-1].next_offset
        assert rest.messages[-1].digest == want, f"stopped after message {k}"


async def test_digest_only_stream_resumes_from_its_last_token(
    start_gateway: Any, disk: Path
) -> None:
    """Without data the last message's token is made after the digest is finished: it must
    not count the last block twice."""
    gw = await start_gateway(config_of(disk))
    request = pb.StreamExtentsRequest(
        export="disk", context="base:allocation", digest="sha256", max_extents_per_message=3
    )
    whole = [m async for m in gw.stub.StreamExtents(request)]
    for k, last in enumerate(whole, 1):
        tail = [m async for m in gw.stub.StreamExtents(resumed_from(request, last.resume_token))]
        assert tail[-1].digest == whole[-1].digest, f"resumed after message {k} of {len(whole)}"


def dirty_digest_request() -> pb.StreamExtentsRequest:
    # Small messages on the dirty bitmap: the first ends inside the first 1 MiB block, after
    # data of that block was delivered (three granules at 0).
    return pb.StreamExtentsRequest(
        export="disk",
        context="backup",
        filter=pb.EXTENT_FILTER_SET,
        include_data=True,
        digest="sha256",
        max_extents_per_message=1,
    )


async def test_digest_resumes_after_the_delivered_ranges_were_cleared(
    start_gateway: Any, disk: Path
) -> None:
    """A backup that clears as it goes (``nbdgw backup --clear``) and resumes: the ranges it
    cleared no longer pass the filter, but they were delivered and the digest covers them."""
    gw = await start_gateway(config_of(disk))
    request = dirty_digest_request()
    want = [m async for m in gw.stub.StreamExtents(request)][-1].digest
    head = await first_messages(gw, request, 1)
    assert 0 < head[-1].next_offset < 1 * MiB
    cleared = await gw.stub.ClearRange(
        pb.ClearRangeRequest(
            export="disk",
            bitmap="backup",
            offset=0,
            length=head[-1].next_offset,
            clear_token=head[-1].clear_token,
        )
    )
    assert cleared.cleared_bytes > 0
    tail = [m async for m in gw.stub.StreamExtents(resumed_from(request, head[-1].resume_token))]
    assert tail[0].offset == head[-1].next_offset
    assert tail[-1].digest == want


async def test_digest_resumes_after_a_write_to_what_was_delivered(
    start_gateway: Any, disk: Path
) -> None:
    """A live disk written, between the delivery and the resume, where the stream had been:
    the digest is of what was delivered, not of what the disk holds now."""
    config = config_of(disk)
    gw = await start_gateway(config)
    request = dirty_digest_request()
    want = [m async for m in gw.stub.StreamExtents(request)][-1].digest
    head = await first_messages(gw, request, 1)
    uri = f"nbd+unix:///disk?socket={(config.data_dir / 'nbd.sock').absolute()}"
    writer = await NBDClient.connect(uri)
    try:
        await writer.pwrite(b"\xee" * 4096, 4096)  # inside the first granule, delivered
        await writer.flush()
    finally:
        await writer.close()
    tail = [m async for m in gw.stub.StreamExtents(resumed_from(request, head[-1].resume_token))]
    assert tail[-1].digest == want


async def test_digest_resume_without_the_kept_state_reads_the_block_again(
    start_gateway: Any, disk: Path
) -> None:
    """A token whose stream's state is not kept (a version 2 token, as a gateway restart or
    an old gateway leaves): the block is read again, right when nothing changed."""
    gw = await start_gateway(config_of(disk))
    request = dirty_digest_request()
    want = [m async for m in gw.stub.StreamExtents(request)][-1].digest
    head = await first_messages(gw, request, 2)
    token = head[-1].resume_token
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert raw[0] == 3  # this gateway's tokens name their stream
    position, state, stream_id = decode_resume_state(token, raw[9:25])
    assert state is not None and stream_id is not None and state[1] < position
    old = encode_resume(raw[9:25], position, state)
    tail = [m async for m in gw.stub.StreamExtents(resumed_from(request, old))]
    assert tail[-1].digest == want
    # A token of an unknown version says so.
    bad = base64.urlsafe_b64encode(bytes([7]) + raw[1:]).decode().rstrip("=")
    err = await call_error(gw.stub.StreamExtents(resumed_from(request, bad)))
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown token version 7" in err.message
