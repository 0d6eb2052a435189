"""Fixtures for the gateway tests: a gateway running in-process on 127.0.0.1:0 with a real
grpc.aio channel, real qemu-nbd hosts serving qcow2 disks whose bitmaps qemu-io dirtied, and
helpers that decode streams and rich error statuses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from gateway.config import GatewayConfig
from gateway.server import Gateway
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.peers import UnixPeer, tool

MiB = 1024 * 1024
KiB = 1024


# --- an in-process gateway ----------------------------------------------------------------


@dataclass
class Running:
    gateway: Gateway
    target: str
    channel: grpc.aio.Channel
    stub: pb_grpc.BitmapServiceStub


@pytest.fixture
async def start_gateway() -> AsyncIterator[Callable[..., Any]]:
    """``await start_gateway(config)`` -> Running (stopped at the end of the test), once every
    host has been probed (``wait_hosts=False``: as soon as it listens)."""
    running: list[Running] = []

    async def start(
        config: GatewayConfig, *, wait_hosts: bool = True, **channel_options: Any
    ) -> Running:
        config.listen = "127.0.0.1:0"
        config.backoff_initial = 0.05
        config.backoff_max = 0.5
        config.connect_timeout = 5.0
        gw = Gateway(config)
        listening = await gw.start()
        if wait_hosts:  # start() probes hosts in the background; most tests want them known
            await gw.hosts_checked()
        target = f"127.0.0.1:{listening.port}"
        options = [("grpc.max_receive_message_length", 16 * MiB), *channel_options.items()]
        channel = grpc.aio.insecure_channel(target, options=options)
        run = Running(gw, target, channel, pb_grpc.BitmapServiceStub(channel))
        running.append(run)
        return run

    yield start
    for run in running:
        await run.channel.close()
        await run.gateway.stop(grace=0)


# --- decoding -------------------------------------------------------------------------------


@dataclass
class Rich:
    """A failed call's code, message and decoded google.rpc.Status details."""

    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    details: list[Any] = field(default_factory=list)
    trailers: dict[str, str] = field(default_factory=dict)

    def detail(self, kind: type) -> Any:
        found = [d for d in self.details if isinstance(d, kind)]
        assert found, f"no {kind.__name__} in {self.details}"
        return found[0]

    def fields(self) -> set[str]:
        bad = self.detail(error_details_pb2.BadRequest)
        return {v.field for v in bad.field_violations}


_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.ResourceInfo,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.RetryInfo,
    error_details_pb2.QuotaFailure,
)


def rich(err: grpc.aio.AioRpcError) -> Rich:
    trailers = {k: v for k, v in (err.trailing_metadata() or ())}
    raw = trailers.get("grpc-status-details-bin")
    assert raw is not None, f"no status details in {err.code()} {err.details()}"
    status = status_pb2.Status.FromString(raw)
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    details = []
    for packed in status.details:
        assert isinstance(packed, any_pb2.Any)
        for kind in _DETAIL_TYPES:
            if packed.Is(kind.DESCRIPTOR):
                msg = kind()
                packed.Unpack(msg)
                details.append(msg)
                break
        else:
            raise AssertionError(f"unknown detail {packed.type_url}")
    infos = [d for d in details if isinstance(d, error_details_pb2.ErrorInfo)]
    assert len(infos) == 1, "every error carries exactly one ErrorInfo"
    assert infos[0].domain == "nbdgw.dev"
    assert infos[0].reason in pb.ErrorReason.keys() or (  # noqa: SIM118
        "ERROR_REASON_" + infos[0].reason in pb.ErrorReason.keys()  # noqa: SIM118
    )
    text = {k: v for k, v in trailers.items() if isinstance(v, str)}
    return Rich(err.code(), err.details() or "", infos[0], details, text)


async def call_error(coro: Any) -> Rich:
    """Await a unary call (or drain a stream) that must fail; its decoded error."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if hasattr(coro, "__aiter__"):
            async for _ in coro:
                pass
        else:
            await coro
    return rich(info.value)


Row = tuple[int, int, int, int]  # offset, length, flags, allocation (0 when not reported)


def rows_of(msg: pb.StreamExtentsResponse) -> list[Row]:
    out = []
    pos = msg.offset
    alloc = list(msg.allocation) or [0] * len(msg.lengths)
    assert len(msg.offset_deltas) == len(msg.lengths) == len(msg.flags) == len(alloc)
    for delta, length, flags, kind in zip(
        msg.offset_deltas, msg.lengths, msg.flags, alloc, strict=True
    ):
        assert length > 0
        start = pos + delta
        out.append((start, length, flags, kind))
        pos = start + length
    assert pos <= msg.next_offset
    return out


def merged(rows: Sequence[Row]) -> list[Row]:
    """Adjacent rows with equal flags and allocation as one."""
    out: list[Row] = []
    for row in rows:
        if out and out[-1][0] + out[-1][1] == row[0] and out[-1][2:] == row[2:]:
            last = out.pop()
            row = (last[0], last[1] + row[1], *row[2:])  # type: ignore[assignment]
        out.append(row)
    return out


@dataclass
class Streamed:
    messages: list[pb.StreamExtentsResponse]

    @property
    def rows(self) -> list[Row]:
        return [r for m in self.messages for r in rows_of(m)]

    @property
    def data(self) -> dict[int, bytes]:
        """offset -> bytes of every DATA row (split rows joined)."""
        out: dict[int, bytes] = {}
        for m in self.messages:
            pos = 0
            for start, length, _flags, kind in rows_of(m):
                if kind == pb.ALLOCATION_DATA:
                    out[start] = m.data[pos : pos + length]
                    pos += length
            assert pos == len(m.data)
        return out


def check_continuity(messages: Sequence[pb.StreamExtentsResponse], start: int) -> None:
    """Each message starts where the previous ended; the token in each resumes there."""
    pos = start
    for m in messages:
        assert m.offset == pos
        assert m.next_offset >= m.offset
        assert m.resume_token
        pos = m.next_offset


async def stream_all(stub: pb_grpc.BitmapServiceStub, **fields: Any) -> Streamed:
    request = pb.StreamExtentsRequest(**fields)
    messages = [m async for m in stub.StreamExtents(request)]
    assert messages, "a stream always sends at least one message"
    check_continuity(messages, messages[0].offset)
    assert messages[-1].next_offset == messages[-1].range_end
    return Streamed(messages)


# --- qemu: disks with bitmaps, qemu-nbd hosts ----------------------------------------------


def run(*cmd: str, input: str | None = None) -> str:
    proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed: {proc.stderr}{proc.stdout}")
    return proc.stdout


@dataclass
class QemuDisk:
    """A qcow2 disk with bitmaps b0 and b1 dirtied at known places by qemu-io."""

    path: Path
    raw: Path  # the same contents as a raw file (ground truth for data)
    size: int


# Written before any bitmap exists: allocated data, clean in every bitmap.
QEMU_CLEAN = (0, 64 * KiB, 0x11)
# Dirty in b0 (and not in b1, added after b0 was disabled).
QEMU_B0_DATA = [(1 * MiB, 128 * KiB, 0x22), (5 * MiB, 4 * KiB, 0x33)]
QEMU_B0_ZEROES = [(10 * MiB, 256 * KiB)]
QEMU_B0_FRAGMENTS = [(20 * MiB + i * 128 * KiB, 64 * KiB) for i in range(150)]  # < 40 MiB
QEMU_B0_BULK = (40 * MiB, 8 * MiB, 0x55)  # many data messages for include_data
# Dirty in b1 only.
QEMU_B1_DATA = [(2 * MiB, 64 * KiB, 0x44)]


def make_qemu_disk(directory: Path, size: int = 64 * MiB) -> QemuDisk:
    qemu_img, qemu_io = tool("qemu-img"), tool("qemu-io")
    path = directory / "disk.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", str(path), str(size))
    off, n, pat = QEMU_CLEAN
    run(qemu_io, "-f", "qcow2", str(path), input=f"write -P {pat} {off} {n}\n")
    run(qemu_img, "bitmap", "--add", "--granularity", "65536", str(path), "b0")
    cmds = [f"write -P {p} {o} {n}" for o, n, p in [*QEMU_B0_DATA, QEMU_B0_BULK]]
    cmds += [f"write -z {o} {n}" for o, n in [*QEMU_B0_ZEROES, *QEMU_B0_FRAGMENTS]]
    run(qemu_io, "-f", "qcow2", str(path), input="\n".join(cmds) + "\n")
    run(qemu_img, "bitmap", "--disable", str(path), "b0")
    run(qemu_img, "bitmap", "--add", "--granularity", "65536", str(path), "b1")
    cmds = [f"write -P {p} {o} {n}" for o, n, p in QEMU_B1_DATA]
    run(qemu_io, "-f", "qcow2", str(path), input="\n".join(cmds) + "\n")
    raw = directory / "disk.raw"
    run(qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw))
    return QemuDisk(path, raw, size)


@pytest.fixture(scope="module")
def qemu_disk(tmp_path_factory: pytest.TempPathFactory) -> QemuDisk:
    return make_qemu_disk(tmp_path_factory.mktemp("qemu"))


class QemuNBD(UnixPeer):
    """A read-only qemu-nbd serving a qcow2 disk with its bitmaps, on a unix socket."""

    stop_timeout = 10.0

    def __init__(
        self, binary: str, disk: QemuDisk, socket: Path, export: str = "disk", clients: int = 16
    ) -> None:
        super().__init__(socket, export)
        self.clients = clients
        self.binary = binary
        self.disk = disk

    def command(self) -> list[str]:
        return [
            self.binary, "-r", "-t", "-e", str(self.clients), "-f", "qcow2", "-x", self.export,
            "-B", "b0", "-B", "b1", "-k", str(self.socket), str(self.disk.path),
        ]  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> None:
        super().stop(sig)
        if self.socket.exists():
            self.socket.unlink()


@pytest.fixture
def qemu_nbd(qemu_disk: QemuDisk, tmp_path: Path) -> Iterator[QemuNBD]:
    host = QemuNBD(tool("qemu-nbd"), qemu_disk, tmp_path / "qemu.sock").start()
    yield host
    host.stop()


def nbdinfo_map(uri: str, context: str) -> list[Row]:
    """``nbdinfo --map=CONTEXT --json`` as merged rows (allocation 0)."""
    out = run(tool("nbdinfo"), f"--map={context}", "--json", uri)
    rows: list[Row] = [(e["offset"], e["length"], e["type"], 0) for e in json.loads(out)]
    return merged(rows)


async def anbdinfo_map(uri: str, context: str) -> list[Row]:
    """:func:`nbdinfo_map` off the event loop (needed when the loop serves the NBD host)."""
    return await asyncio.to_thread(nbdinfo_map, uri, context)


def wait_until(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


async def wait_health(channel: grpc.aio.Channel, service: str, status: int) -> None:
    """Watch ``service`` until it reports ``status``."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(30):
        async for resp in stub.Watch(health_pb2.HealthCheckRequest(service=service)):
            if resp.status == status:
                return


ENV_NO_PROXY = {**os.environ, "no_proxy": "*", "NO_PROXY": "*"}
