"""The CSI SnapshotMetadata service (gateway.api.csi) on its unix socket, against a running QEMU
(10.0) whose disk gets writes before, between and after two checkpoints. Two clients: Python
(nbdgw.csi.v1, generated from proto/nbdgw/csi/v1 by scripts/gen-proto) and Node
(tests/clients/node/csi.js, loading the same .proto at run time). The delta covers exactly
the writes between the checkpoints; allocated matches ``nbdinfo --map`` of the same point in
time; every stream keeps the spec's rules and resumes from any boundary or offset; bad input
gets the spec's codes."""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

from nbdgw.csi.v1 import csi_pb2 as cpb
from nbdgw.csi.v1 import csi_pb2_grpc as cpb_grpc
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.test_node_client import NODE_DIR
from tests.gateway.test_qmp_gateway import qmp_config
from tests.peers import IN_CI, tool
from tests.qemu_vm import GRANULE, GuestlessVM, Writer, granules

pytestmark = [pytest.mark.interop, pytest.mark.slow]

Range = tuple[int, int]
DRIVER = "csi.nbdgw.example.com"
SIZE = 16 << 20


@pytest.fixture
def vm(tmp_path: Path):
    machine = GuestlessVM(tmp_path / "vm", "10", disks=2, size=SIZE).start()
    yield machine
    machine.stop()


def node_bin() -> str:
    path = tool("node")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        msg = f"{NODE_DIR}/node_modules is missing: run scripts/install-deps.sh"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


async def stream(call: Any) -> list[Any]:
    return [m async for m in call]


def flat(messages: list[Any], start: int = 0, max_results: int = 0) -> list[Range]:
    """The ranges of a stream, after checking every rule of the spec on it."""
    kinds = {(m.block_metadata_type, m.volume_capacity_bytes) for m in messages}
    assert len(kinds) <= 1, f"type and capacity change within the stream: {kinds}"
    out = []
    for m in messages:
        assert m.block_metadata, "no empty message"
        if max_results:
            assert len(m.block_metadata) <= max_results
        out += [(b.byte_offset, b.size_bytes) for b in m.block_metadata]
    assert all(size > 0 for _, size in out)
    for a, b in itertools.pairwise(out):
        assert a[0] + a[1] <= b[0], f"not strictly increasing: {a} then {b}"
    if out:
        assert out[0][0] + out[0][1] > start, "a range ends at or before starting_offset"
    return out


def covered(ranges: list[Range]) -> set[int]:
    return granules(ranges)


def nbdinfo_allocated(uri: str) -> list[Range]:
    proc = subprocess.run(
        [tool("nbdinfo"), "--map", "--json", uri], capture_output=True, text=True, check=True
    )
    out: list[Range] = []
    for e in json.loads(proc.stdout):
        if e["type"] & 1:  # a hole
            continue
        if out and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["offset"], e["length"]))
    return out


async def test_csi_snapshot_metadata_on_qemu(
    vm: GuestlessVM, start_gateway: Any, tmp_path: Path
) -> None:
    config = qmp_config(tmp_path, vm, disks=2)
    sock = tmp_path / "csi.sock"
    config.csi_socket = str(sock)
    config.csi_driver_name = DRIVER
    run = await start_gateway(config)
    snapshots = spb_grpc.SnapshotServiceStub(run.channel)
    (host,) = run.gateway.hosts.values()
    channel = grpc.aio.insecure_channel(f"unix:{sock}")
    identity = cpb_grpc.IdentityStub(channel)
    meta = cpb_grpc.SnapshotMetadataStub(channel)

    # Identity, as the sidecar checks it before serving.
    info = await identity.GetPluginInfo(cpb.GetPluginInfoRequest())
    assert info.name == DRIVER and info.vendor_version
    caps = await identity.GetPluginCapabilities(cpb.GetPluginCapabilitiesRequest())
    assert cpb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE in [
        c.service.type for c in caps.capabilities
    ]
    probe = await identity.Probe(cpb.ProbeRequest())
    assert probe.HasField("ready") and probe.ready.value

    writer = Writer(vm, host.nbd_socket).open()
    before = [writer.write_pattern(g * GRANULE + 512, 4096, 1) for g in (0, 5, 10, 40)]
    await snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(parent="d0", snapshot_id="s0", checkpoint_id="c0")
    )
    s0 = run.gateway.qmp_snapshots.open[("d0", "s0")]
    uri0 = f"nbd+unix:///{s0.fleece.nbd_name}?socket={host.nbd_socket}"
    alloc0 = flat(await stream(meta.GetMetadataAllocated(cpb.GetMetadataAllocatedRequest(
        snapshot_id="d0/c0"))))  # fmt: skip
    assert alloc0 == await asyncio.to_thread(nbdinfo_allocated, uri0)
    assert covered([(w.offset, len(w.data)) for w in before]) <= covered(alloc0)
    await snapshots.ReleaseSnapshot(spb.ReleaseSnapshotRequest(name="exports/d0/snapshots/s0"))

    between = [writer.write_pattern(g * GRANULE, 8192, 2) for g in (5, 20, 21, 100, 200, 255)]
    between += [writer.write(3 * GRANULE - 100, b"x" * 200)]  # across a granule boundary
    await snapshots.CreateSnapshot(
        spb.CreateSnapshotRequest(
            parent="d0", snapshot_id="s1", checkpoint_id="c1", since_checkpoint="c0"
        )
    )
    after = [writer.write_pattern(g * GRANULE, 4096, 3) for g in (30, 31, 150)]
    writer.close()

    # The delta: every write between the checkpoints, nothing only written before or after.
    delta_req = cpb.GetMetadataDeltaRequest(base_snapshot_id="d0/c0", target_snapshot_id="d0/c1")
    delta_msgs = await stream(meta.GetMetadataDelta(delta_req))
    delta = flat(delta_msgs)
    assert delta_msgs[0].volume_capacity_bytes == SIZE
    assert delta_msgs[0].block_metadata_type == cpb.VARIABLE_LENGTH
    want = covered([(w.offset, len(w.data)) for w in between])
    assert covered(delta) == want
    only_before = covered([(w.offset, len(w.data)) for w in before]) - want
    only_after = covered([(w.offset, len(w.data)) for w in after]) - want
    assert only_before and not only_before & covered(delta)
    assert only_after and not only_after & covered(delta)

    # Allocated at c1 = nbdinfo --map of the snapshot that holds c1's point in time.
    s1 = run.gateway.qmp_snapshots.open[("d0", "s1")]
    uri1 = f"nbd+unix:///{s1.fleece.nbd_name}?socket={host.nbd_socket}"
    alloc_req = cpb.GetMetadataAllocatedRequest(snapshot_id="d0/c1")
    allocated = flat(await stream(meta.GetMetadataAllocated(alloc_req)))
    assert allocated == await asyncio.to_thread(nbdinfo_allocated, uri1)
    assert want <= covered(allocated)

    # max_results 1, 7, 0; resume from the end of every range (so every message boundary) and
    # from inside every range.
    for name, call, req, full in (
        ("delta", meta.GetMetadataDelta, delta_req, delta),
        ("allocated", meta.GetMetadataAllocated, alloc_req, allocated),
    ):
        for max_results in (1, 7, 0):
            r = type(req)()
            r.CopyFrom(req)
            r.max_results = max_results
            msgs = await stream(call(r))
            assert flat(msgs, 0, max_results) == full, name
            if max_results == 1:
                assert len(msgs) == len(full)
        for i, (off, length) in enumerate(full):
            for start, rest in ((off + length, full[i + 1 :]), (off + length // 2, full[i:])):
                r = type(req)()
                r.CopyFrom(req)
                r.starting_offset = start
                r.max_results = 3
                assert flat(await stream(call(r)), start, 3) == rest, (name, start)

    # FIXED_LENGTH: blocks of the size a call's secrets ask for (the class's secret).
    fixed_req = cpb.GetMetadataDeltaRequest(
        base_snapshot_id="d0/c0", target_snapshot_id="d0/c1",
        secrets={"nbdgw.dev/block-size": str(4 * GRANULE)},
    )  # fmt: skip
    fixed_msgs = await stream(meta.GetMetadataDelta(fixed_req))
    fixed = flat(fixed_msgs)
    assert {m.block_metadata_type for m in fixed_msgs} == {cpb.FIXED_LENGTH}
    assert {size for _, size in fixed} == {4 * GRANULE}
    assert {off // (4 * GRANULE) for off, _ in fixed} == {g // 4 for g in want}

    # The Node client, over the same socket: the same answers.
    node = node_bin()
    for extra, max_results in (((), 0), (("--max", "1"), 1)):
        proc = await asyncio.to_thread(
            subprocess.run,
            [node, str(NODE_DIR / "csi.js"), "--socket", str(sock), "--allocated", "d0/c1",
             "--delta", "d0/c0,d0/c1", *extra],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        seen = json.loads(proc.stdout)
        assert seen["info"]["name"] == DRIVER and seen["ready"] is True
        assert "SNAPSHOT_METADATA_SERVICE" in seen["capabilities"]
        for key, want_ranges in (("allocated:d0/c1", allocated), ("delta:d0/c0,d0/c1", delta)):
            msgs = seen["streams"][key]
            assert {(t, c) for t, c, _ in msgs} == {("VARIABLE_LENGTH", str(SIZE))}
            got = [(int(o), int(s)) for _, _, rows in msgs for o, s in rows]
            assert got == want_ranges, key
            if max_results:
                assert all(len(rows) <= max_results for _, _, rows in msgs)

    # Bad input: the spec's code, a message that says what is wrong.
    async def fails(call: Any, req: Any) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stream(call(req))
        return exc.value.code(), exc.value.details() or ""

    NF, IA = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    OOR, FP = grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION
    alloc, dlt = meta.GetMetadataAllocated, meta.GetMetadataDelta

    def A(snapshot_id: str, **kw: Any) -> tuple[Any, Any]:
        return alloc, cpb.GetMetadataAllocatedRequest(snapshot_id=snapshot_id, **kw)

    def D(base: str, target: str, **kw: Any) -> tuple[Any, Any]:
        req = cpb.GetMetadataDeltaRequest(base_snapshot_id=base, target_snapshot_id=target, **kw)
        return dlt, req

    cases = [
        (A("d0/nosuch"), NF, "nosuch"),
        (A("nosuch/c0"), NF, "nosuch"),
        (A("garbage"), NF, "EXPORT/CHECKPOINT"),
        (A(""), IA, "snapshot_id"),
        # c0's point in time was released with s0: it exists, but cannot be answered.
        (A("d0/c0"), FP, "no longer held"),
        (A("d0/c1", starting_offset=-1), OOR, "starting_offset"),
        (A("d0/c1", starting_offset=SIZE + 1), OOR, "starting_offset"),
        (A("d0/c1", max_results=-1), IA, "max_results"),
        (D("d0/c1", "d0/c0"), IA, "base"),
        (D("d1/c0", "d0/c1"), IA, "different volumes"),
        (D("d0/nosuch", "d0/c1"), NF, "nosuch"),
        (D("d0/c0", "d0/nosuch"), NF, "nosuch"),
        (D("", "d0/c1"), IA, "base_snapshot_id"),
        (D("d0/c0", ""), IA, "target_snapshot_id"),
        (D("d0/c0", "d0/c1", starting_offset=-5), OOR, "starting_offset"),
        (D("d0/c0", "d0/c1", starting_offset=SIZE + GRANULE), OOR, "starting_offset"),
    ]
    for (call, req), code, words in cases:
        got = await fails(call, req)
        assert got[0] == code and words in got[1], (req, got)
    # At the very end: nothing left, no error.
    _, end = D("d0/c0", "d0/c1", starting_offset=SIZE)
    assert await stream(meta.GetMetadataDelta(end)) == []
    # The server kept serving everyone: a good call still works.
    assert flat(await stream(meta.GetMetadataDelta(delta_req))) == delta

    # The calls are counted like the others.
    text = run.gateway.metrics.exposition()[0].decode()
    assert 'grpc_service="csi.v1.SnapshotMetadata"' in text
    sent = run.gateway.metrics.csi_ranges_streamed.labels("GetMetadataDelta", "d0")._value.get()
    assert sent >= len(delta) * 5  # every delta stream above counted its ranges
    await channel.close()
