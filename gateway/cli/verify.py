"""``nbdgw verify EXPORT BACKUP [INCREMENTAL...]``: check a backup chain without copying it again.

Two checks, both with the stream digest of :mod:`nbdgw.integrity`:

1. each backup against itself: the digest recorded when it was made (``nbdgw backup
   --digest``) against the digest of its file now (a full backup: the disk as it was; an
   incremental: its dirty data, holes elsewhere, as its stream delivered it);
2. the chain against the export (or a snapshot export, ``EXPORT@SNAPSHOT``): the image the
   chain restores to (the full backup, each incremental's dirty ranges laid over it, as
   ``nbdgw restore`` would) against the gateway's digest of the export's content, which it
   reads and hashes without sending the data. The disk is cut into segments, one stream each;
   a segment that differs is cut again, down to the digest's 1 MiB blocks, to name where.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.cli.backup import load_complete
from gateway.cli.backup_state import BackupError
from gateway.cli.common import (
    CommandError,
    open_client,
    stream_retry,
)
from nbdgw import AsyncClient
from nbdgw.integrity import DIGEST_BLOCK, RangeDigest
from nbdgw.v1 import bitmap_service_pb2 as pb

_CHUNK = 1 << 20


@dataclass
class _Layer:
    """One file of the chain and the ranges of the disk it holds (sorted, merged)."""

    path: Path
    fd: int
    starts: list[int]
    ends: list[int]

    def parts(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pieces of ``[start, end)`` this layer holds."""
        i = bisect.bisect_right(self.ends, start)
        out = []
        while i < len(self.starts) and self.starts[i] < end:
            lo, hi = max(self.starts[i], start), min(self.ends[i], end)
            if lo < hi:
                out.append((lo, hi))
            i += 1
        return out


def file_digest(algorithm: str, layers: list[_Layer], start: int, end: int) -> bytes:
    """The digest of ``[start, end)`` of the image the layers make (the last one on top)."""
    digest = RangeDigest(algorithm, start)
    pos = start
    while pos < end:
        n = min(_CHUNK, end - pos)
        chunk = bytearray(n)
        for layer in layers:
            for lo, hi in layer.parts(pos, pos + n):
                data = os.pread(layer.fd, hi - lo, lo)
                chunk[lo - pos : lo - pos + len(data)] = data
                # A short read is the end of the file: zeros, as in chunk already.
                chunk[lo - pos + len(data) : hi - pos] = bytes(hi - lo - len(data))
        digest.update(pos, chunk)
        pos += n
    return digest.finish(end)


# A digest stream is resumed as backup's data stream is, by default.
_RETRY = stream_retry(5)


async def gateway_digest(
    client: AsyncClient, args: argparse.Namespace, algorithm: str, start: int, end: int
) -> bytes:
    request = pb.StreamExtentsRequest(
        export=args.export,
        context="base:allocation",
        offset=start,
        length=end - start,
        filter=pb.EXTENT_FILTER_ALL,
        digest=algorithm,
    )
    digest = b""
    async for batch in client.stream_extents(request, retry=_RETRY):
        digest = bytes(batch.raw.digest)
    if not digest:
        raise BackupError("the gateway sent no digest (is it older than this nbdgw?)")
    return digest


async def run(args: argparse.Namespace) -> int:
    """``nbdgw verify``."""
    if args.segment <= 0:
        raise CommandError("--segment must be positive")
    chain = [args.backup, *args.incrementals]
    loaded = []
    for path in chain:
        state, _, runs = load_complete(path)
        loaded.append((path, state, runs))
    base_state = loaded[0][1]
    if not base_state.full:
        raise BackupError(f"{args.backup} is an incremental: the chain starts with a full backup")
    size = base_state.size
    algorithm = args.digest or base_state.digest_algorithm or "blake3"
    failures = 0
    layers: list[_Layer] = []
    try:
        for path, state, runs in loaded:
            if state.size != size:
                raise BackupError(f"{path} is a backup of a {state.size}-byte disk, not {size}")
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            whole = [(0, size)] if state.full else runs
            layer = _Layer(path, fd, [o for o, _ in whole], [o + n for o, n in whole])
            layers.append(layer)
            # 1. The file against the digest recorded when it was made.
            if not state.digest:
                print(f"{path}: no digest recorded (made without --digest): not checked alone")
                continue
            own = await asyncio.to_thread(file_digest, state.digest_algorithm, [layer], 0, size)
            if own.hex() == state.digest:
                print(f"{path}: matches its {state.digest_algorithm} digest")
            else:
                failures += 1
                print(
                    f"{path}: DIFFERS from the {state.digest_algorithm} digest recorded when it"
                    f" was made ({own.hex()} now, {state.digest} then)"
                )
        # 2. The chain against the export, segment by segment; a segment that differs is cut
        # in eighths again, down to one digest block, to name where.
        async with open_client(args) as client:

            async def same(start: int, end: int) -> bool:
                theirs, ours = await asyncio.gather(
                    gateway_digest(client, args, algorithm, start, end),
                    asyncio.to_thread(file_digest, algorithm, layers, start, end),
                )
                return theirs == ours

            differ: list[tuple[int, int]] = []
            todo = [(a, min(a + args.segment, size)) for a in range(0, size, args.segment)]
            while todo:
                start, end = todo.pop(0)
                if await same(start, end):
                    continue
                if end - start <= DIGEST_BLOCK:
                    if differ and differ[-1][1] == start:
                        differ[-1] = (differ[-1][0], end)
                    else:
                        differ.append((start, end))
                    continue
                step = max(DIGEST_BLOCK, -(-(end - start) // 8 // DIGEST_BLOCK) * DIGEST_BLOCK)
                todo[:0] = [(a, min(a + step, end)) for a in range(start, end, step)]
        names = " + ".join(str(p) for p in chain)
        if differ:
            failures += 1
            ranges = ", ".join(f"[{a}, {b})" for a, b in differ)
            print(f"{names} DIFFERS from {args.export} ({algorithm}) in {ranges}")
        else:
            print(f"{names} matches {args.export} ({algorithm}, {size} bytes)")
    finally:
        for layer in layers:
            os.close(layer.fd)
    return 1 if failures else 0
