"""The CSI SnapshotMetadata service on nbdcore hosts (the gateway's embedded host, and a separate
``nbdgw nbd serve`` process): the same
checks as against QEMU (test_csi_qmp.py), through ``Snapshots.checkpoint_delta`` and the
checkpoints of nbdcore images. Writes before, between and after two checkpoints; the delta is
exactly the granules written between; allocated matches ``nbdinfo --map`` of the snapshot that
holds the checkpoint's point in time; the Python and the Node client agree."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.config import GatewayConfig
from nbdcore.aio.client import NBDClient
from nbdgw.csi.v1 import csi_pb2 as cpb
from nbdgw.csi.v1 import csi_pb2_grpc as cpb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.test_csi_qmp import flat, nbdinfo_allocated, node_bin, stream
from tests.gateway.test_node_client import NODE_DIR
from tests.gateway.test_snapshots import SIZE, granules, make_disk
from tests.gateway.test_snapshots_remote import Host

pytestmark = pytest.mark.interop


@pytest.mark.parametrize("kind", ["embedded", "remote"])
async def test_csi_on_nbdcore_host(start_gateway: Any, tmp_path: Path, kind: str) -> None:
    make_disk(tmp_path / "disk.img")
    config = GatewayConfig(data_dir=tmp_path / "data")
    host = None
    if kind == "embedded":
        config.add_image_export("disk", tmp_path / "disk.img")
    else:
        host = Host(tmp_path / "disk.img", tmp_path / "host.sock").start()
        config.add_uri_export("disk", host.uri)
    sock = tmp_path / "csi.sock"
    config.csi_socket = str(sock)
    try:
        await check_csi(await start_gateway(config), sock)
    finally:
        if host is not None:
            host.stop()


async def check_csi(run: Any, sock: Path) -> None:
    snapshots = spb_grpc.SnapshotServiceStub(run.channel)
    rng = random.Random(3)

    async def write(data: bytes, offset: int) -> None:
        async def on(client: NBDClient) -> None:
            await client.pwrite(data, offset)
            await client.flush()

        await run.gateway.pools["disk"].run([], on)

    async def scatter(count: int) -> list[tuple[int, int]]:
        done = []
        for _ in range(count):
            length = rng.randrange(1, 200 << 10)
            offset = rng.randrange(SIZE - length)
            await write(rng.randbytes(length), offset)
            done.append((offset, length))
        return done

    before = await scatter(8)
    await snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="disk", snapshot_id="s0", checkpoint_id="c0")
    )
    between = await scatter(12)
    await snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(
            parent="disk", snapshot_id="s1", checkpoint_id="c1", since_checkpoint="c0"
        )
    )
    after = await scatter(5)

    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    meta = cpb_grpc.SnapshotMetadataStub(channel)
    delta_req = cpb.GetMetadataDeltaRequest(
        base_snapshot_id="disk/c0", target_snapshot_id="disk/c1"
    )
    delta_msgs = await stream(meta.GetMetadataDelta(delta_req))
    delta = flat(delta_msgs)
    assert delta_msgs[0].volume_capacity_bytes == SIZE
    want = granules(between)
    assert granules(delta) == want
    assert granules(before) - want and not (granules(before) - want) & granules(delta)
    assert granules(after) - want and not (granules(after) - want) & granules(delta)
    for max_results in (1, 7, 0):
        r = cpb.GetMetadataDeltaRequest()
        r.CopyFrom(delta_req)
        r.max_results = max_results
        assert flat(await stream(meta.GetMetadataDelta(r)), 0, max_results) == delta
    for i, (off, length) in enumerate(delta):
        r = cpb.GetMetadataDeltaRequest()
        r.CopyFrom(delta_req)
        r.starting_offset = off + length // 2
        assert flat(await stream(meta.GetMetadataDelta(r)), r.starting_offset) == delta[i:]

    # Allocated at each checkpoint = nbdinfo --map of the snapshot holding its point in time.
    allocated = {}
    for snap, checkpoint in (("s0", "c0"), ("s1", "c1")):
        pool = run.gateway.pools[f"disk@{snap}"]
        uri = pool.host.uri_for(pool.config.nbd_export)
        req = cpb.GetMetadataAllocatedRequest(snapshot_id=f"disk/{checkpoint}")
        allocated[checkpoint] = flat(await stream(meta.GetMetadataAllocated(req)))
        assert allocated[checkpoint] == await asyncio.to_thread(nbdinfo_allocated, uri)
    assert want <= granules(allocated["c1"])

    # The Node client agrees.
    proc = await asyncio.to_thread(
        subprocess.run,
        [node_bin(), str(NODE_DIR / "csi.js"), "--socket", str(sock), "--allocated", "disk/c1",
         "--delta", "disk/c0,disk/c1", "--max", "7"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(proc.stdout)["streams"]
    for key, want_ranges in (
        ("allocated:disk/c1", allocated["c1"]),
        ("delta:disk/c0,disk/c1", delta),
    ):
        got = [(int(o), int(s)) for _, _, rows in seen[key] for o, s in rows]
        assert got == want_ranges, key

    # Base after target; a checkpoint the chain lacks.
    for base, target, code in (
        ("disk/c1", "disk/c0", grpc.StatusCode.INVALID_ARGUMENT),
        ("disk/nosuch", "disk/c1", grpc.StatusCode.NOT_FOUND),
    ):
        r = cpb.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stream(meta.GetMetadataDelta(r))
        assert exc.value.code() == code, exc.value.details()
    await channel.close()
