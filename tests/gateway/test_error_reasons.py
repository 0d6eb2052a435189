"""One ErrorInfo reason per cause, as docs/api.md says: health checks carry rich errors too, a
generation on an export that clears at the source is GENERATIONS_NOT_SUPPORTED, a clear of a
context that is not a dirty bitmap is CLEAR_NOT_SUPPORTED on a live and a snapshot export alike
(READ_ONLY only for an image open read-only), the snapshot limit is RESOURCE_EXHAUSTED with a
QuotaFailure, AddBitmap off a VM host is BITMAP_MANAGEMENT_NOT_SUPPORTED, and
max_preserved_bytes 0 is the documented default, not "no limit"."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from nbdcore.storage import Image
from nbdcore.storage.snapshot import MAX_SNAPSHOTS
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.clear_support import NbdcoreHost
from tests.gateway.conftest import MiB, Rich, call_error
from tests.gateway.test_service_embedded import make_image

GiB = 1024 * MiB
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def gw(tmp_path: Path, start_gateway: Any) -> Any:
    config = GatewayConfig(data_dir=tmp_path / "data", health_listen="127.0.0.1:0")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    config.add_image_export("frozen", make_image(tmp_path / "frozen.img"), read_only=True)
    # A host that is not running: a foreign export, so the gateway has a ledger to offer.
    config.add_uri_export("down", f"nbd+unix:///x?socket={tmp_path / 'nobody.sock'}")
    return await start_gateway(config)


def assert_reason(err: Rich, code: grpc.StatusCode, reason: str) -> None:
    assert (err.code, err.info.reason, err.info.domain) == (code, reason, "nbdgw.dev"), err.message


# --- health ---------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["api", "health"])
async def test_health_errors_carry_error_info(gw: Any, port: str) -> None:
    """On the API port and on the plaintext health port alike (which has only the overall
    statuses)."""
    if port == "api":
        channel = gw.channel
    else:
        target = f"127.0.0.1:{gw.gateway.listening.health_port}"
        channel = grpc.aio.insecure_channel(target)
    stub = health_pb2_grpc.HealthStub(channel)

    async def check(service: str) -> int:
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status

    try:
        assert await check("") == SERVING
        if port == "api":
            assert await check("exports/disk") == SERVING
            assert await check("exports/down") == NOT_SERVING
            err = await call_error(check("exports/nope"))
            assert_reason(err, grpc.StatusCode.NOT_FOUND, "EXPORT_NOT_FOUND")
            assert err.info.metadata["export"] == "nope"
            assert err.detail(error_details_pb2.ResourceInfo).resource_name == "exports/nope"
        else:  # only the overall statuses (issue 15): existing or not, an export is not here
            for name in ("exports/disk", "exports/down", "exports/nope"):
                err = await call_error(check(name))
                assert_reason(err, grpc.StatusCode.NOT_FOUND, "HEALTH_SERVICE_NOT_FOUND")
                assert err.info.metadata["service"] == name
                assert "no per-export status" in err.message
        err = await call_error(check("nbdgw.v1.NoSuchService"))
        assert_reason(err, grpc.StatusCode.NOT_FOUND, "HEALTH_SERVICE_NOT_FOUND")
        assert err.info.metadata["service"] == "nbdgw.v1.NoSuchService"
        assert "exports/{export}" in err.message  # says which names there are
    finally:
        if channel is not gw.channel:
            await channel.close()


@pytest.mark.parametrize("recorded", [False, True])
async def test_health_of_a_snapshot_export(gw: Any, recorded: bool) -> None:
    """A snapshot's export exists as soon as it is created: its health is its host's, not
    EXPORT_NOT_FOUND; once released, it is gone, even if a host change gave it a status of its
    own meanwhile (``recorded``)."""
    snaps = spb_grpc.SnapshotServiceStub(gw.channel)
    snap = await snaps.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="s"))
    if recorded:
        await gw.gateway._update_health()  # what a host going up or down does
    stub = health_pb2_grpc.HealthStub(gw.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=snap.export))
    assert snap.export == "exports/disk@s" and resp.status == SERVING
    await snaps.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name=snap.name))
    err = await call_error(stub.Check(health_pb2.HealthCheckRequest(service=snap.export)))
    assert_reason(err, grpc.StatusCode.NOT_FOUND, "EXPORT_NOT_FOUND")


# --- SetExportGeneration --------------------------------------------------------------------


async def test_generation_of_an_export_that_clears_at_the_source(gw: Any) -> None:
    err = await call_error(
        gw.stub.SetExportGeneration(pb.SetExportGenerationRequest(export="disk", generation="g"))
    )
    assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "GENERATIONS_NOT_SUPPORTED")
    violation = err.detail(error_details_pb2.PreconditionFailure).violations[0]
    assert violation.subject == "exports/disk" and "at the source" in violation.description
    export = await gw.stub.GetExport(pb.GetExportRequest(name="disk"))
    assert export.clear_mode == pb.CLEAR_MODE_AT_SOURCE and export.generation == ""


async def test_generation_without_any_ledger(tmp_path: Path, start_gateway: Any) -> None:
    """Only embedded exports: the gateway has no ledger at all; same cause, same reason."""
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    gw = await start_gateway(config)
    err = await call_error(
        gw.stub.SetExportGeneration(pb.SetExportGenerationRequest(export="disk", generation="g"))
    )
    assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "GENERATIONS_NOT_SUPPORTED")
    assert not config.ledger_file.exists()


async def test_generation_of_a_remote_host_that_clears(tmp_path: Path, start_gateway: Any) -> None:
    """`nbdgw nbd serve` clears at the source through the NBD extension: no generation either."""
    disk = tmp_path / "disk.img"
    make_image(disk)
    host = NbdcoreHost(disk, tmp_path / "host.sock").start()
    try:
        config = GatewayConfig(data_dir=tmp_path / "data")
        config.add_uri_export("remote", host.uri)
        gw = await start_gateway(config)
        export = await gw.stub.GetExport(pb.GetExportRequest(name="remote"))
        assert export.clear_mode == pb.CLEAR_MODE_AT_SOURCE
        err = await call_error(
            gw.stub.SetExportGeneration(
                pb.SetExportGenerationRequest(export="remote", generation="g")
            )
        )
        assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "GENERATIONS_NOT_SUPPORTED")
    finally:
        host.stop()


# --- ClearRange refusals --------------------------------------------------------------------


async def clear_error(gw: Any, export: str, bitmap: str) -> Rich:
    return await call_error(
        gw.stub.ClearRange(pb.ClearRangeRequest(export=export, bitmap=bitmap, length=MiB))
    )


async def test_clear_refusals_have_one_reason_per_cause(gw: Any) -> None:
    snaps = spb_grpc.SnapshotServiceStub(gw.channel)
    snap = await snaps.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="disk", snapshot_id="s", bitmaps=["backup"])
    )
    # Not a dirty bitmap: CLEAR_NOT_SUPPORTED, whether the export is live, a snapshot's (whose
    # data is read-only) or read-only itself.
    for export in ("disk", snap.export, "frozen"):
        err = await clear_error(gw, export, "base:allocation")
        assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "CLEAR_NOT_SUPPORTED")
        assert "only dirty bitmaps" in err.message, export
    # A dirty bitmap of an image open read-only: READ_ONLY.
    err = await clear_error(gw, "frozen", "backup")
    assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "READ_ONLY")
    # ...while a snapshot's fork clears, read-only data or not.
    cleared = await gw.stub.ClearRange(
        pb.ClearRangeRequest(export=snap.export, bitmap="backup", length=MiB)
    )
    assert cleared.clear_mode == pb.CLEAR_MODE_AT_SOURCE and cleared.cleared_bytes > 0


async def test_add_and_remove_bitmap_off_vm_hosts_is_not_a_clear_refusal(gw: Any) -> None:
    """AddBitmap/RemoveBitmap on an embedded or a plain NBD host: a reason of its own (it was
    CLEAR_NOT_SUPPORTED with 'cannot clear' in its words), naming the host's kind."""
    for export in ("disk", "down"):
        err = await call_error(
            gw.stub.AddBitmap(pb.AddBitmapRequest(parent=f"exports/{export}", bitmap="b9"))
        )
        assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "BITMAP_MANAGEMENT_NOT_SUPPORTED")
        assert "clear" not in err.message, err.message
        assert err.info.metadata["host_kind"] == ("embedded" if export == "disk" else "nbd")
    err = await call_error(
        gw.stub.RemoveBitmap(
            pb.RemoveBitmapRequest(name="exports/disk/bitmaps/qemu:dirty-bitmap:backup")
        )
    )
    assert_reason(err, grpc.StatusCode.FAILED_PRECONDITION, "BITMAP_MANAGEMENT_NOT_SUPPORTED")


# --- snapshots ------------------------------------------------------------------------------


async def test_snapshot_limit_is_resource_exhausted_with_quota_failure(gw: Any) -> None:
    snaps = spb_grpc.SnapshotServiceStub(gw.channel)
    for i in range(MAX_SNAPSHOTS):
        await snaps.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id=f"s{i}"))
    err = await call_error(
        snaps.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id="one-more"))
    )
    assert_reason(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED")
    assert err.info.metadata["limit"] == str(MAX_SNAPSHOTS) == "8"  # as documented
    quota = err.detail(error_details_pb2.QuotaFailure).violations[0]
    assert quota.subject == "exports/disk" and "release one" in quota.description


@pytest.mark.parametrize(
    ("size", "asked", "limit"),
    [
        (16 * MiB, 0, 256 * MiB),  # 0: 10% of the disk, but at least 256 MiB
        (4 * GiB, 0, 4 * GiB // 10),
        (4 * GiB, 32 * MiB, 32 * MiB),  # as asked
    ],
)
async def test_max_preserved_bytes_zero_is_the_default_limit(
    tmp_path: Path, start_gateway: Any, size: int, asked: int, limit: int
) -> None:
    path = tmp_path / "big.img"
    with Image.create(path, size) as image:  # sparse
        image.add_bitmap("b")
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("big", path)
    gw = await start_gateway(config)
    snaps = spb_grpc.SnapshotServiceStub(gw.channel)
    snap = await snaps.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="big", snapshot_id="s", max_preserved_bytes=asked)
    )
    assert snap.max_preserved_bytes == limit
    listed = await snaps.ListSnapshots(spb.ListSnapshotsRequest(parent="big"))
    assert [s.max_preserved_bytes for s in listed.snapshots] == [limit]
