"""Bad arguments of every kind get the right code, ErrorInfo reason and details; a host that is
down fails only its own export; health and reflection."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import GatewayConfig
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import KiB, MiB, Rich, call_error, stream_all
from tests.gateway.test_service_embedded import SIZE, make_image

U64 = (1 << 64) - 1


@pytest.fixture
async def gw(tmp_path: Path, start_gateway):
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    # A host that is not running: its socket does not exist.
    config.add_uri_export("down", f"nbd+unix:///x?socket={tmp_path / 'nobody.sock'}")
    return await start_gateway(config)


async def stream_error(gw, **fields) -> Rich:
    return await call_error(gw.stub.StreamExtents(pb.StreamExtentsRequest(**fields)))


def assert_invalid(err: Rich, *fields: str) -> None:
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err.message
    assert err.info.reason == "INVALID_FIELD"
    assert err.fields() == set(fields)
    for f in fields:
        assert f in err.message


async def test_stream_bad_fields(gw) -> None:
    assert_invalid(await stream_error(gw), "export", "context")
    assert_invalid(await stream_error(gw, export="disk"), "context")
    assert_invalid(await stream_error(gw, export="exports/", context="backup"), "export")
    assert_invalid(await stream_error(gw, export="exports/a/b", context="backup"), "export")
    assert_invalid(await stream_error(gw, export="disk", context="backup", length=0), "length")
    err = await stream_error(gw, export="disk", context="backup", offset=U64, length=2)
    assert_invalid(err, "length")
    assert "overflow" in err.message
    assert_invalid(await stream_error(gw, export="disk", context="backup", filter=7), "filter")
    assert_invalid(await stream_error(gw, export="disk", context="x" * 5000), "context")
    # Several at once are reported together.
    assert_invalid(
        await stream_error(gw, context="backup", length=0, filter=9), "export", "length", "filter"
    )


async def test_stream_unknown_things(gw) -> None:
    err = await stream_error(gw, export="exports/nope", context="backup")
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.info.reason == "EXPORT_NOT_FOUND"
    assert err.info.metadata["export"] == "nope"
    assert err.detail(error_details_pb2.ResourceInfo).resource_name == "exports/nope"
    err = await stream_error(gw, export="disk", context="qemu:dirty-bitmap:nope")
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert err.info.reason == "BITMAP_NOT_FOUND"
    resource = err.detail(error_details_pb2.ResourceInfo)
    assert resource.resource_type == "nbdgw.dev/Bitmap"
    assert "qemu:dirty-bitmap:backup" in err.info.metadata["offered"]
    err = await stream_error(gw, export="disk", context="other:namespace")
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_stream_ranges(gw) -> None:
    err = await stream_error(gw, export="disk", context="backup", offset=SIZE)
    assert err.code == grpc.StatusCode.OUT_OF_RANGE
    assert err.info.reason == "RANGE_PAST_END"
    assert err.info.metadata["size"] == str(SIZE)
    assert err.detail(error_details_pb2.BadRequest).field_violations[0].field == "offset"
    err = await stream_error(gw, export="disk", context="backup", offset=SIZE - 1, length=2)
    assert err.code == grpc.StatusCode.OUT_OF_RANGE
    assert err.detail(error_details_pb2.BadRequest).field_violations[0].field == "length"
    # The last byte alone is fine.
    last = await stream_all(gw.stub, export="disk", context="backup", offset=SIZE - 1, length=1)
    assert last.rows == [(SIZE - 1, 1, 0, 0)]


async def test_stream_bad_resume(gw) -> None:
    fields = dict(export="disk", context="backup", max_extents_per_message=1)
    whole = await stream_all(gw.stub, **fields)
    token = whole.messages[1].resume_token
    for bad in ("garbage!", "AAAA", token[:-2], token + "AAAA"):
        err = await stream_error(gw, resume_token=bad, **fields)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, bad
        assert err.info.reason == "INVALID_RESUME_TOKEN"
        assert err.fields() == {"resume_token"}
    # A token of another request (different filter, range or context) is refused.
    for other in (
        dict(fields, filter=pb.EXTENT_FILTER_SET),
        dict(fields, offset=4096),
        dict(fields, context="quiet"),
        dict(fields, include_data=True),
    ):
        err = await stream_error(gw, resume_token=token, **other)
        assert err.info.reason == "INVALID_RESUME_TOKEN"
        assert "different request" in err.message
    # Disagreeing resume_offset, or one outside the range.
    err = await stream_error(gw, resume_token=token, resume_offset=1, **fields)
    assert_invalid(err, "resume_offset")
    err = await stream_error(gw, resume_offset=SIZE + 1, **fields)
    assert_invalid(err, "resume_offset")
    err = await stream_error(gw, resume_offset=0, **dict(fields, offset=MiB, length=MiB))
    assert_invalid(err, "resume_offset")


async def test_clear_bad_fields(gw) -> None:
    async def clear_error(**fields) -> Rich:
        return await call_error(gw.stub.ClearRange(pb.ClearRangeRequest(**fields)))

    assert_invalid(await clear_error(), "export", "bitmap", "length")
    assert_invalid(await clear_error(export="disk", bitmap="backup", length=0), "length")
    err = await clear_error(export="disk", bitmap="backup", offset=U64, length=U64)
    assert_invalid(err, "length")
    err = await clear_error(export="nope", bitmap="backup", length=KiB)
    assert err.code == grpc.StatusCode.NOT_FOUND and err.info.reason == "EXPORT_NOT_FOUND"
    # How a remote host clears (at the source, in the ledger, or not at all) is known only
    # from the host itself: while it is down, the clear is retryable.
    err = await clear_error(export="down", bitmap="backup", length=KiB)
    assert err.code == grpc.StatusCode.UNAVAILABLE
    assert err.info.reason == "HOST_UNAVAILABLE"


async def test_list_bad_fields(gw) -> None:
    err = await call_error(gw.stub.ListExports(pb.ListExportsRequest(page_size=-1)))
    assert_invalid(err, "page_size")
    err = await call_error(gw.stub.ListExports(pb.ListExportsRequest(page_token="%%%")))
    assert err.info.reason == "INVALID_PAGE_TOKEN"
    err = await call_error(gw.stub.ListBitmaps(pb.ListBitmapsRequest()))
    assert_invalid(err, "parent")
    err = await call_error(gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="disk", page_size=-5)))
    assert_invalid(err, "page_size")
    err = await call_error(gw.stub.GetExport(pb.GetExportRequest()))
    assert_invalid(err, "name")
    err = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="exports/zzz")))
    assert err.code == grpc.StatusCode.NOT_FOUND


async def test_down_host_fails_alone(gw) -> None:
    for call in (
        gw.stub.GetExport(pb.GetExportRequest(name="exports/down")),
        gw.stub.ListBitmaps(pb.ListBitmapsRequest(parent="exports/down")),
        gw.stub.StreamExtents(pb.StreamExtentsRequest(export="down", context="backup")),
    ):
        err = await call_error(call)
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.info.reason == "HOST_UNAVAILABLE"
        assert err.info.metadata["export"] == "down"
        delay = err.detail(error_details_pb2.RetryInfo).retry_delay
        assert delay.ToNanoseconds() > 0
        assert "resume_offset" not in err.info.metadata  # nothing was streamed
    listed = await gw.stub.ListExports(pb.ListExportsRequest())
    state = {e.name: e.state for e in listed.exports}
    assert state == {
        "exports/disk": pb.EXPORT_STATE_AVAILABLE,
        "exports/down": pb.EXPORT_STATE_UNAVAILABLE,
    }
    ok = await stream_all(gw.stub, export="disk", context="backup")
    assert ok.messages[-1].next_offset == SIZE

    health = health_pb2_grpc.HealthStub(gw.channel)

    async def check(service: str) -> int:
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        return resp.status

    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert await check("") == serving
    assert await check("exports/disk") == serving
    assert await check("exports/down") == not_serving
    assert await check("nbdgw.v1.BitmapService") == not_serving
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await check("exports/unknown")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection(gw) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)

    async def ask(**fields):
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**fields)]))
        replies = [r async for r in call]
        assert len(replies) == 1
        return replies[0]

    resp = await ask(list_services="")
    names = {s.name for s in resp.list_services_response.service}
    assert {"nbdgw.v1.BitmapService", "grpc.health.v1.Health"} <= names
    resp = await ask(file_containing_symbol="nbdgw.v1.BitmapService")
    files = resp.file_descriptor_response.file_descriptor_proto
    assert files and any(b"StreamExtents" in f for f in files)
