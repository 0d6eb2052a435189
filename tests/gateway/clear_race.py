"""The race of issue 15: a writer keeps writing 4 KiB blocks to a live writable export while a
consumer streams the dirty extents with their data, stores them, and clears what it read.

A granule that ends up *clean* in the bitmap while the consumer's copy of it differs from the
disk is a write lost to every later incremental backup. With conditional clears (the
`clear_token` of the message that carried the range) there must be none, however the writes
and the clears interleave; with the old unconditional clear there are some in every run that
lasts a few seconds (``unconditional=True`` shows it).

Used by tests/gateway/test_clear_race.py (bounded) and by ``scripts/fuzz --long`` (the same
test for ``NBDGW_CLEAR_RACE_SECONDS``)."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import dataclass, field

import grpc

from nbdcore.sync.client import NBDClient as BlockingClient
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.clear_support import G, dirty_runs

BLOCK = 4096


class Writer(threading.Thread):
    """Writes 4 KiB blocks of fresh bytes at random offsets until stopped; ``writes`` counts
    them (each completed before the next starts, so their order is the time order)."""

    def __init__(self, uri: str, size: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.size = size
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with BlockingClient.connect(self.uri) as client:
                while not self.stop.is_set():
                    offset = self.rng.randrange(self.size // BLOCK) * BLOCK
                    self.writes += 1
                    stamp = self.writes.to_bytes(8, "little") + offset.to_bytes(8, "little")
                    client.pwrite(stamp * (BLOCK // 16), offset)
                    # A short breath between writes: they land throughout the consumer's
                    # rounds instead of saturating the host.
                    time.sleep(self.rng.random() * 0.002)
        except BaseException as exc:  # reported by the test
            self.error = exc


@dataclass
class RaceResult:
    rounds: int = 0
    clears: int = 0
    cleared_bytes: int = 0
    kept_bytes: int = 0
    writes: int = 0
    stale_clean: list[int] = field(default_factory=list)  # granules lost: stale and clean


def _runs(msg: pb.StreamExtentsResponse) -> list[tuple[int, int, int]]:
    """(start, length, allocation) of the message's rows."""
    out = []
    pos = msg.offset
    for i, length in enumerate(msg.lengths):
        pos += msg.offset_deltas[i] if msg.offset_deltas else 0
        kind = msg.allocation[i] if msg.allocation else pb.ALLOCATION_DATA
        out.append((pos, length, kind))
        pos += length
    return out


def consume_round(
    stub: pb_grpc.BitmapServiceStub,
    export: str,
    bitmap: str,
    copy: bytearray,
    result: RaceResult,
    *,
    unconditional: bool,
    store_delay: float = 0.003,
) -> None:
    """One backup round: stream the dirty extents with data into ``copy``, and clear each
    message's dirty runs as soon as it is stored."""
    request = pb.StreamExtentsRequest(
        export=export, context=bitmap, filter=pb.EXTENT_FILTER_SET, include_data=True
    )
    for msg in stub.StreamExtents(request):
        data = memoryview(msg.data)
        pos = 0
        runs: list[list[int]] = []
        for start, length, kind in _runs(msg):
            if kind == pb.ALLOCATION_DATA:
                copy[start : start + length] = data[pos : pos + length]
                pos += length
            else:
                copy[start : start + length] = bytes(length)
            if runs and runs[-1][0] + runs[-1][1] == start:
                runs[-1][1] += length
            else:
                runs.append([start, length])
        # Storing takes time (a real consumer writes to its backup target): writes land
        # between the read and the clear.
        time.sleep(store_delay)
        for start, length in runs:
            clear = pb.ClearRangeRequest(export=export, bitmap=bitmap, offset=start, length=length)
            if unconditional:
                clear.unconditional = True
            else:
                assert msg.clear_token, "a live writable export hands out clear tokens"
                clear.clear_token = msg.clear_token
            resp = stub.ClearRange(clear)
            result.clears += 1
            result.cleared_bytes += resp.cleared_bytes
            result.kept_bytes += resp.kept_bytes
    result.rounds += 1


def run_race(
    target: str,
    export: str,
    bitmap: str,
    nbd_uri: str,
    initial: bytes,
    *,
    seconds: float,
    min_clears: int,
    seed: int = 15,
    unconditional: bool = False,
    store_delay: float = 0.003,
) -> RaceResult:
    """Run the race for ``seconds`` (and at least ``min_clears`` clears), then compare: every
    granule clean in the host's bitmap must hold in the copy what the disk holds."""
    size = len(initial)
    copy = bytearray(initial)
    result = RaceResult()
    writer = Writer(nbd_uri, size, seed)
    writer.start()
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 24)])
    try:
        stub = pb_grpc.BitmapServiceStub(channel)
        deadline = time.monotonic() + seconds
        while (time.monotonic() < deadline or result.clears < min_clears) and writer.is_alive():
            consume_round(
                stub,
                export,
                bitmap,
                copy,
                result,
                unconditional=unconditional,
                store_delay=store_delay,
            )
    finally:
        writer.stop.set()
        writer.join(30)
        channel.close()
    if writer.error is not None:
        raise writer.error
    result.writes = writer.writes
    # Everything has landed: read the disk and the bitmap straight from the host.
    with BlockingClient.connect(nbd_uri) as client:
        disk = bytearray()
        for offset in range(0, size, 1 << 20):
            disk += client.pread(offset, min(1 << 20, size - offset))
    dirty = set()
    for start, length in asyncio.run(dirty_runs(nbd_uri, f"qemu:dirty-bitmap:{bitmap}")):
        dirty.update(range(start // G, (start + length - 1) // G + 1))
    for g in range(-(-size // G)):
        if g not in dirty and copy[g * G : (g + 1) * G] != disk[g * G : (g + 1) * G]:
            result.stale_clean.append(g)
    return result
