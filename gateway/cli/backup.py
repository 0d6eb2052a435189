"""``nbdgw backup``: an incremental (or full) backup of an export, through the gateway.

The output is a sparse raw image the size of the export. An incremental backup writes the
ranges the bitmap marks dirty (dirty ranges that read as zeroes become holes, without moving
their bytes) and leaves the rest a hole; ``--full`` writes every allocated range. Since a hole
may mean "unchanged" or "now zero", the dirty ranges are recorded in the sidecar map
``OUTPUT.nbdgw-dirty`` (:class:`DirtyMap`): an incremental is OUTPUT *and* its map, and
``nbdgw restore BASE INCREMENTAL...`` lays it over a full image (:func:`apply_incremental`).

Crash safety rests on one ordering, per checkpoint (a few MiB of stream at most):

1. the data of every range up to ``next_offset`` is written and fsync'd, and so are the dirty
   ranges behind it in the map (with --clear, every range the step 3 clears: once the bitmap
   forgets a range, the map is the only record that it changed);
2. the sidecar state file (``OUTPUT.nbdgw-backup.json``) is replaced atomically with the new
   ``next_offset`` and, with ``--clear``, the dirty runs behind it that are still to clear;
3. with ``--clear``, those runs are cleared in the bitmap (ClearRange). On a live writable
   export the clears are conditional on the stream's ``clear_token``: the gateway keeps (does
   not clear) every granule written since the copy and says which; those are copied again,
   fsync'd and cleared with the new copy's token (a few rounds; what is still kept stays
   dirty for the next backup). Without tokens (a host without write history) the clears are
   unconditional, and the runs are read again after them and the output fixed where they
   changed (see ``_Backup._recheck``), fsync'd;
4. the state file is replaced again, without those runs.

Without ``--clear`` there is no step 3, and steps 1-2 run in a thread while the stream goes
on (:class:`_Writer`): the order is the same, only the stream does not wait for the disk.

A crash before 2 leaves the range dirty: the resumed run copies it again (harmless). A crash
after 2 leaves the runs in the state file: the resumed run clears and rechecks them first. Only
a range that is on disk is ever cleared, and a write racing the backup is either in the output
or still dirty in the bitmap.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gateway.cli import backup_snapshots
from gateway.cli.backup_state import (
    BackupError,
    BackupState,
    state_path,
)
from gateway.cli.common import (
    CommandError,
    describe_error,
    full_context_name,
    iter_rows,
    open_client,
    stream_retry,
    warn,
)
from gateway.integrity import ZSTD_LEVELS
from nbdcore.durable import fsync_dir, write_atomic
from nbdcore.memory import keep_freed_memory
from nbdcore.tools.progress import Progress
from nbdgw import AsyncClient, Bitmap, BitmapKind, ClearMode, ExtentBatch, Retry
from nbdgw import errors as client_errors
from nbdgw.integrity import COMPRESSION_ZSTD, RangeDigest
from nbdgw.v1 import bitmap_service_pb2 as pb

MAP_SUFFIX = ".nbdgw-dirty"
MAP_FORMAT = "nbdgw-dirty-map"
MAP_VERSION = 1

# fallocate(2) flags (linux/falloc.h).
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_CHUNK = 1 << 20


def map_path(output: Path) -> Path:
    return output.with_name(output.name + MAP_SUFFIX)


class DirtyMap:
    """``OUTPUT.nbdgw-dirty``: which ranges of OUTPUT the backup holds (all others: unchanged).

    A text file: one JSON header line (format, version, export, context, size, full), then
    one ``OFFSET LENGTH`` line per dirty range, appended at each checkpoint and fsync'd before
    any of them is cleared. Ranges may overlap or repeat (a resumed run records again what it
    copies again): the map is their union. A crash in the middle of an append leaves a partial
    last line, which the next open cuts off (it was never fsync'd, so nothing was cleared).
    """

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self._pending: list[str] = []
        try:
            raw = _read_all(self.fd)
            if not raw:
                self._pending.append(json.dumps(header, sort_keys=True))
                if header["full"]:
                    self._pending.append(f"0 {header['size']}")
                self.sync()
                fsync_dir(path.parent)
                return
            found, _ = _parse_map(path, raw)
            for key in ("export", "context", "size", "full"):
                if found.get(key) != header[key]:
                    raise BackupError(
                        f"{path}: records {key} {found.get(key)!r}, not {header[key]!r}: it is "
                        "not the map of this backup"
                    )
            os.ftruncate(self.fd, raw.rfind(b"\n") + 1)  # a partial last line, never synced
        except BaseException:
            os.close(self.fd)
            raise

    def add(self, runs: list[list[int]]) -> None:
        self._pending.extend(f"{offset} {length}" for offset, length in runs if length)

    def sync(self) -> None:
        if self._pending:
            data = memoryview(("\n".join(self._pending) + "\n").encode())
            while data:
                data = data[os.write(self.fd, data) :]
            self._pending.clear()
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

    @staticmethod
    def load(path: Path) -> tuple[dict[str, Any], list[tuple[int, int]]]:
        """The header and the merged, sorted dirty ranges of a map file."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise BackupError(
                f"{path} is missing: without it nothing says which ranges of the backup "
                "changed (backups made before nbdgw recorded maps cannot be restored this way)"
            ) from None
        return _parse_map(path, raw)


def load_complete(path: Path) -> tuple[BackupState, dict[str, Any], list[tuple[int, int]]]:
    """A finished backup of 'nbdgw backup' (restore and verify read them): its state, its
    map's header and the ranges it holds; BackupError when it is none or is unfinished."""
    try:
        state = BackupState.load(state_path(path))
    except FileNotFoundError:
        raise BackupError(f"{state_path(path)} is missing: {path} is no nbdgw backup") from None
    if not state.complete:
        raise BackupError(f"{path} is incomplete: finish it with 'nbdgw backup --resume'")
    header, runs = DirtyMap.load(map_path(path))
    return state, header, runs


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _parse_map(path: Path, raw: bytes) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    lines = raw.split(b"\n")[:-1]  # the text after the last newline: empty, or a partial line
    try:
        header = json.loads(lines[0]) if lines else None
        if not isinstance(header, dict) or header.get("format") != MAP_FORMAT:
            raise ValueError("no nbdgw-dirty-map header")
        if header.get("version") != MAP_VERSION:
            raise ValueError(f"unknown version {header.get('version')!r}")
        size = header["size"]
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad size {size!r}")
        runs = []
        for number, line in enumerate(lines[1:], 2):
            fields = line.split()
            offset, length = int(fields[0]), int(fields[1])
            if len(fields) != 2 or offset < 0 or length <= 0 or offset + length > size:
                raise ValueError(f"line {number}: bad range {line.decode(errors='replace')!r}")
            runs.append((offset, length))
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as exc:
        raise BackupError(f"{path}: not a usable dirty map: {exc}") from None
    runs.sort()
    merged: list[tuple[int, int]] = []
    for offset, length in runs:
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            start = merged[-1][0]
            merged[-1] = (start, max(merged[-1][1], offset + length - start))
        else:
            merged.append((offset, length))
    return header, merged


class OutputImage:
    """The raw output file: positional writes, holes for zero ranges, fsync."""

    def __init__(self, path: Path, size: int, *, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.path = path
        self.fd = os.open(path, flags, 0o644)
        try:
            current = os.fstat(self.fd).st_size
            if not create and current != size:
                raise BackupError(
                    f"{path}: size {current} does not match the export size {size}; "
                    "it is not the output of this backup"
                )
            os.ftruncate(self.fd, size)
        except BaseException:
            os.close(self.fd)
            raise
        self._fallocate: Any = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            self._fallocate = libc.fallocate
            self._fallocate.argtypes = [
                ctypes.c_int,
                ctypes.c_int,
                ctypes.c_int64,
                ctypes.c_int64,
            ]

    def write(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        start, length = offset, len(view)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
        # Start the writeback now (DONTNEED on dirty pages starts it without waiting), so
        # that the checkpoint's fsync waits for less; and a backup does not push the rest of
        # the machine's page cache out.
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)

    def update(self, data: memoryview | None, offset: int, length: int) -> int:
        """Make ``[offset, offset+length)`` hold ``data`` (None: zeroes) if it does not yet;
        returns the number of bytes that had to change."""
        if data is not None:  # at most one message's data (1 MiB)
            if os.pread(self.fd, length, offset) == data:
                return 0
            self.write(data, offset)
            return length
        if self._is_hole(offset, length):
            return 0
        pos, end = offset, offset + length
        while pos < end:  # zero ranges can be huge: compare in bounded pieces
            n = min(_ZERO_CHUNK, end - pos)
            if os.pread(self.fd, n, pos).count(0) != n:
                self.zero(offset, length)
                return length
            pos += n
        return 0

    def _is_hole(self, offset: int, length: int) -> bool:
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as exc:
            return exc.errno == errno.ENXIO  # no data after offset at all

    def zero(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` read as zeroes, as a hole when possible.

        In a fresh file the range is a hole already: SEEK_DATA finds no data in it and nothing
        is done. Data can be there after a resume (the source changed since the first run).
        """
        end = offset + length
        if self._is_hole(offset, length):
            return
        if self._fallocate is not None:
            mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
            if self._fallocate(self.fd, mode, offset, length) == 0:
                return
        zeroes = bytes(min(_ZERO_CHUNK, length))
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.write(memoryview(zeroes)[:n], offset)
            offset += n

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


_RECHECK_GAP = 1 << 20
# Runs to clear are kept in memory and in the state file until a checkpoint: bound them.
_MAX_PENDING_RUNS = 1024
# Dirty runs copied since the last checkpoint (the map's next lines): bound them too.
_MAX_MAPPED_RUNS = 1 << 16
_CLEARS_IN_FLIGHT = 8
# Up to this many runs per checkpoint are cleared one call each, exactly.
_PRECISE_CLEAR_RUNS = 64
# Rounds of copying again what conditional clears kept (written meanwhile); what a busy disk
# still rewrites after that stays dirty, for the next backup.
_KEPT_ROUNDS = 3


def _intersections(runs: list[list[int]], start: int, end: int) -> Iterator[tuple[int, int]]:
    """The parts of ``[start, end)`` inside the sorted ``runs``, as ``(lo, hi)``."""
    for offset, length in runs:
        lo, hi = max(offset, start), min(offset + length, end)
        if lo < hi:
            yield lo, hi


def _spans(runs: list[list[int]], gap: int) -> list[list[int]]:
    """The runs, merged where at most ``gap`` bytes separate them."""
    spans: list[list[int]] = []
    for offset, length in runs:
        if spans and offset - sum(spans[-1]) <= gap:
            spans[-1][1] = offset + length - spans[-1][0]
        else:
            spans.append([offset, length])
    return spans


def _split(runs: list[list[int]], start: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``[start, end)`` cut into pieces ``(lo, hi, inside one of the sorted runs)``."""
    pos = start
    for offset, length in runs:
        lo, hi = max(offset, pos), min(offset + length, end)
        if lo >= hi:
            if offset >= end:
                break
            continue
        if pos < lo:
            yield pos, lo, False
        yield lo, hi, True
        pos = hi
    if pos < end:
        yield pos, end, False


def _groups(runs: list[list[int]]) -> list[list[list[int]]]:
    """The sorted runs in groups of neighbours, each read again with one stream."""
    groups: list[list[list[int]]] = []
    for run in runs:
        if groups and run[0] - sum(groups[-1][-1]) <= _RECHECK_GAP:
            groups[-1].append(run)
        else:
            groups.append([run])
    return groups


def _merge_run(runs: list[list[int]], offset: int, length: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == offset:
        runs[-1][1] += length
    else:
        runs.append([offset, length])


class _Committer:
    """Commits a stream's checkpoints (fsync, then the state file) in a thread while the stream
    goes on: the stream does not stop for the disk at every checkpoint, only at the end.

    The messages themselves are written on the event loop as they come (os.pwrite, the
    digest): a writer thread bought nothing on an idle machine and cost more than it gained on
    a busy one, the hop to it and the GIL's way back to a busy loop (client CPU per GiB of a
    full backup 2.07 against 2.08 s at load 1-2, 2.34 against 2.55 s at load 5;
    docs/benchmarks.md).
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbdgw-backup-sync")
        self._commit: asyncio.Future[None] | None = None

    async def commit(self, job: Callable[[], None]) -> None:
        """Run ``job`` (a checkpoint's syncs and state) in the background, once the previous
        one is done (checkpoints are committed in order)."""
        await self.committed()
        future = asyncio.get_running_loop().run_in_executor(self._pool, job)
        # Marked as retrieved: one dropped by close() after an error is not logged again.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._commit = future

    async def committed(self) -> None:
        """Wait for the last :meth:`commit`; raises its error."""
        commit, self._commit = self._commit, None
        if commit is not None:
            await commit

    def close(self) -> None:
        """Stop: a commit running is waited for (it uses the output's file descriptor, which
        is closed after this)."""
        self._pool.shutdown(wait=True)


class _Backup:
    """One run of a backup: the stream, the output file, the checkpoints."""

    def __init__(
        self,
        client: AsyncClient,
        state: BackupState,
        spath: Path,
        out: OutputImage,
        checkpoint: int,
        dirty_map: DirtyMap,
    ) -> None:
        self.client = client
        self.state = state
        self.spath = spath
        self.out = out
        self.map = dirty_map
        self.mapped: list[list[int]] = []  # dirty runs copied since the last checkpoint
        self.checkpoint_bytes = max(checkpoint, 1)
        self.dirty: list[list[int]] = [list(r) for r in state.pending_clear]
        # The clear token of the oldest message that carried a run of ``dirty`` ("" when the
        # stream hands none out): an older position is always safe, it only keeps more.
        self.token = state.pending_token
        self.unsynced = 0
        self.last_sync = time.monotonic()
        self.copied = 0
        self.processed = 0  # bytes of the extents streamed (data, zeroes, holes)
        # How a stream is resumed (--retries); the client's own calls are not retried.
        self.retry = Retry(attempts=0)
        self.recheck = True
        self.digest: RangeDigest | None = None  # with --digest: ours, of what was received
        self.compress = 0  # with --compress: the zstd level
        self.clear_gap = 64 << 10
        # What it reads and clears: the export, or its snapshot (gateway.cli.backup_snapshots).
        self.source = state.export
        self.committer = _Committer()

    async def checkpoint(self, next_offset: int, *, final: bool) -> None:
        """fsync; record the new position with the runs still to clear; clear them; recheck
        them; record that they are done (see the module docstring for why this order)."""
        self.out.sync()
        state = self.state
        state.next_offset = next_offset
        state.complete = final and not self.dirty
        to_clear: list[list[int]] = []
        keep: list[list[int]] = []
        if state.clear and self.dirty:
            to_clear = list(self.dirty)
            # A run that reaches the checkpoint may continue in the next message.
            if not final and sum(to_clear[-1]) == next_offset:
                keep = [to_clear.pop()]
        # Many runs: one ClearRange per span of runs at most a granule apart, not per run,
        # since the gateway limits the rate of calls. The clean gaps inside a span are
        # cleared too: a no-op, unless a write dirtied them since the stream passed them;
        # the recheck cannot tell, so it copies the gaps' current bytes (at most as much
        # again as the runs) and no write is lost.
        # With a token, a gap written since the copy is kept, not cleared: nothing to recheck.
        many = len(to_clear) > _PRECISE_CLEAR_RUNS
        spans = _spans(to_clear, self.clear_gap) if many else to_clear
        conditional = bool(self.token)
        self.map.add(self.mapped)
        self.mapped = []
        if self.recheck and not conditional:
            # The recheck makes OUTPUT hold the current bytes of the whole spans, and the
            # bitmap forgets them: the map must name them all (gaps included).
            self.map.add(spans)
        self.map.sync()  # before the state names runs to clear: see the module docstring
        # The spans, not the runs: a resumed run clears and rechecks exactly them again.
        state.pending_clear = [list(r) for r in spans + keep]
        state.pending_token = self.token
        state.save(self.spath)
        if to_clear:
            kept = await self._clear(spans, self.token)
            if conditional:
                await self._copy_kept(kept)
            elif self.recheck:
                await self._recheck(spans, to_clear)
                self.out.sync()
            self.dirty = keep
            if not keep:
                self.token = ""
            state.pending_clear = [list(r) for r in keep]
            state.pending_token = self.token
            state.complete = final
            state.save(self.spath)
        self.unsynced = 0
        self.last_sync = time.monotonic()

    async def _commit_in_background(self, next_offset: int) -> None:
        """A checkpoint that clears nothing (a backup without --clear), committed by the
        committer's thread while the stream goes on: the output and the map are fsync'd,
        then the state file records ``next_offset`` (the same order as :meth:`checkpoint`).
        ``state.next_offset`` moves only once that is done: it is the progress saved."""
        state = self.state
        saved = dataclasses.replace(
            state, next_offset=next_offset, complete=False, digest_state=list(state.digest_state)
        )
        mapped, self.mapped = self.mapped, []

        def commit() -> None:
            self.out.sync()
            self.map.add(mapped)
            self.map.sync()
            saved.save(self.spath)
            state.next_offset = next_offset

        await self.committer.commit(commit)
        self.unsynced = 0
        self.last_sync = time.monotonic()

    async def _clear(self, runs: list[list[int]], token: str) -> list[list[int]]:
        """ClearRange every run, a few calls in flight (a fragmented bitmap has many runs);
        conditional on ``token`` when there is one, and then returns the kept ranges (written
        since the copy), in order. Without a token the clear is unconditional: the recheck
        that follows (or --no-recheck's promise that nothing writes) makes it safe."""
        state = self.state
        slots = asyncio.Semaphore(_CLEARS_IN_FLIGHT)
        kept: list[list[int]] = []

        async def clear(offset: int, length: int) -> None:
            attempt = 0
            while True:
                try:
                    async with slots:
                        result = await self.client.clear_range(
                            self.source,
                            state.context,
                            offset,
                            length,
                            generation=state.generation,
                            clear_token=token,
                            unconditional=not token,
                        )
                    break
                except client_errors.ResourceExhausted as exc:
                    # Over the gateway's rate limit: wait as long as its RetryInfo says. A
                    # RESOURCE_EXHAUSTED without RetryInfo (the ledger's interval cap) does not
                    # pass with time: report it at once.
                    if exc.retry_after is None or attempt >= 100:
                        raise
                    attempt += 1
                    await asyncio.sleep(exc.retry_after)
            state.bytes_cleared += result.cleared_bytes
            kept.extend([r.offset, r.length] for r in result.kept)

        # Not a TaskGroup: its ExceptionGroup would hide the gRPC error from the one-line report.
        tasks = [asyncio.ensure_future(clear(offset, length)) for offset, length in runs]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return sorted(kept)

    async def _copy_kept(self, kept: list[list[int]]) -> None:
        """Copy again the ranges conditional clears kept (written after they were copied),
        then clear them conditionally on the new copy's token; a few rounds. The map names
        them before they are cleared (a kept gap between runs was not in it). What a busy
        disk keeps rewriting stays dirty: the next backup copies it."""
        state = self.state
        for _round in range(_KEPT_ROUNDS):
            if not kept:
                return
            state.bytes_kept += sum(n for _, n in kept)
            self.map.add(kept)
            self.map.sync()
            again: list[list[int]] = []
            for group in _groups(kept):
                start, end = group[0][0], sum(group[-1])
                token = await self._copy_range(start, end - start, group)
                self.out.sync()  # on disk before the bitmap forgets it
                again += await self._clear(group, token)
            kept = again
        state.bytes_left_dirty += sum(n for _, n in kept)

    async def _copy_range(self, offset: int, length: int, runs: list[list[int]]) -> str:
        """Write the current bytes of ``runs`` (inside ``[offset, offset + length)``) to the
        output; returns the stream's clear token."""
        request = pb.StreamExtentsRequest(
            export=self.source,
            context=self.state.context,
            offset=offset,
            length=length,
            filter=pb.EXTENT_FILTER_ALL,
            include_data=True,
        )
        token = ""
        async for batch in self.client.stream_extents(request, retry=self.retry):
            # Every message of one stream carries the same token; a resumed stream's is newer,
            # so the first is the one that covers every byte written to the output here.
            token = token or batch.clear_token
            data = batch.data
            assert data is not None  # a data stream's, checked
            pos = 0
            for start, n, _flags, allocation in iter_rows(batch.raw):
                chunk = None
                if allocation == pb.ALLOCATION_DATA:
                    chunk = data[pos : pos + n]
                    pos += n
                for lo, hi in _intersections(runs, start, start + n):
                    piece = None if chunk is None else chunk[lo - start : hi - start]
                    self.state.bytes_written += self.out.update(piece, lo, hi - lo)
        return token

    async def _recheck(self, spans: list[list[int]], runs: list[list[int]]) -> None:
        """Read the runs just cleared again and fix the output where they changed.

        ``spans`` were cleared; ``runs`` (inside them) were dirty when streamed. A write that
        lands after a range was read but before it was cleared would otherwise be
        lost: the clear erases its dirty bit and the backup holds the older bytes. Every write
        marks the bitmap again after its data is written, so a write whose mark the clear
        erased is complete, and this read, which starts after the clear, sees its bytes.
        """
        state = self.state
        for group in _groups(spans):
            start, end = group[0][0], sum(group[-1])
            request = pb.StreamExtentsRequest(
                export=self.source,
                context=state.context,
                offset=start,
                length=end - start,
                filter=pb.EXTENT_FILTER_ALL,
                include_data=True,
            )
            async for batch in self.client.stream_extents(request, retry=self.retry):
                data = batch.data
                assert data is not None  # a data stream's, checked
                pos = 0
                for offset, length, _flags, allocation in iter_rows(batch.raw):
                    chunk = None
                    if allocation == pb.ALLOCATION_DATA:
                        chunk = data[pos : pos + length]
                        pos += length
                    for lo, hi in _intersections(group, offset, offset + length):
                        for a, b, in_run in _split(runs, lo, hi):
                            piece = None if chunk is None else chunk[a - offset : b - offset]
                            changed = self.out.update(piece, a, b - a)
                            if in_run:
                                state.bytes_rechecked += b - a
                                state.bytes_rewritten += changed
                            else:
                                state.bytes_gap_copied += changed

    async def run(self, progress: Progress) -> None:
        state = self.state
        if state.next_offset < state.size:
            request = pb.StreamExtentsRequest(
                export=self.source,
                context=state.context,
                filter=pb.EXTENT_FILTER_ALL if state.full else pb.EXTENT_FILTER_SET,
                include_data=True,
            )
            if self.compress:
                # How the data travels, not what it is: a resumed run may choose otherwise.
                request.compression = COMPRESSION_ZSTD
                request.compression_level = self.compress
            if state.digest_algorithm:
                request.digest = state.digest_algorithm
                self.digest = self._resume_digest()
                if state.next_offset:
                    # The token carries the gateway's digest state; an offset would not.
                    request.resume_token = state.resume_token
            elif state.next_offset:
                request.resume_offset = state.next_offset
            last = None
            # The client checks each message's data (CRC32C, zstd) and leaves it in the bytes
            # gRPC received: batch.data is a view of them, written without another copy.
            async for batch in self.client.stream_extents(request, retry=self.retry):
                self._apply(batch)
                last = batch
                progress.update(self.processed, position=batch.next_offset / state.size)
                if batch.next_offset >= state.size:
                    break
                if (
                    self.unsynced >= self.checkpoint_bytes
                    or len(self.dirty) >= _MAX_PENDING_RUNS
                    or len(self.mapped) >= _MAX_MAPPED_RUNS
                    or time.monotonic() - self.last_sync >= 5.0
                ):
                    if self.digest is not None:
                        state.resume_token = batch.resume_token
                        chain, block = self.digest.state
                        state.digest_state = [chain.hex(), block]
                    if state.clear:
                        await self.checkpoint(batch.next_offset, final=False)
                    else:
                        await self._commit_in_background(batch.next_offset)
            await self.committer.committed()
            if self.digest is not None and last is not None:
                self._check_digest(last)
        # A stream that ends with OK covered the whole range.
        await self.checkpoint(state.size, final=True)
        progress.update(self.processed, position=1.0, force=True)

    def _resume_digest(self) -> RangeDigest:
        """Our digest of what the stream delivered: new, or as the last checkpoint left it,
        with the start of its block read again from OUTPUT (fsync'd up to the checkpoint;
        what the stream did not deliver there is a hole, which reads as the zeros the digest
        counts it as)."""
        state = self.state
        if not state.next_offset:
            return RangeDigest(state.digest_algorithm, 0)
        try:
            chain, block = bytes.fromhex(state.digest_state[0]), int(state.digest_state[1])
            digest = RangeDigest(state.digest_algorithm, block, chain=chain)
        except (ValueError, IndexError, TypeError):
            raise BackupError(
                f"{self.spath}: no usable digest state to resume from; {restart_advice(state)}"
            ) from None
        if not state.resume_token or not 0 <= block <= state.next_offset:
            raise BackupError(f"{self.spath}: no usable resume token; {restart_advice(state)}")
        pos = block
        while pos < state.next_offset:
            chunk = os.pread(self.out.fd, min(_ZERO_CHUNK, state.next_offset - pos), pos)
            if not chunk:
                raise BackupError(f"{self.out.path}: ends before {pos}")
            digest.update(pos, chunk)
            pos += len(chunk)
        return digest

    def _check_digest(self, last: ExtentBatch) -> None:
        assert self.digest is not None
        ours = self.digest.finish(self.state.size)
        theirs = bytes(last.raw.digest)
        if not theirs:
            raise BackupError("the gateway sent no digest (is it older than this nbdgw?)")
        if theirs != ours:
            raise BackupError(
                f"the {self.state.digest_algorithm} digest of the data received"
                f" ({ours.hex()}) differs from the gateway's ({theirs.hex()}): the"
                f" backup is not what the disk held; {restart_advice(self.state)}"
            )
        self.state.digest = ours.hex()
        self.state.digest_state = []

    def _apply(self, batch: ExtentBatch) -> None:
        """Account for ``batch`` (extents, dirty runs, progress) and write its data
        (:meth:`_store`). The client checked its data (CRC32C, and the size of its DATA
        extents) before it came here."""
        state = self.state
        msg = batch.raw
        writes: list[tuple[int, int]] = []  # data rows: (offset, length), in stream order
        zeros: list[tuple[int, int]] = []
        for offset, length, flags, allocation in iter_rows(msg):
            if offset + length > state.size:
                raise BackupError(f"the gateway sent an extent past the end ({offset}+{length})")
            self.processed += length
            if allocation == pb.ALLOCATION_DATA:
                writes.append((offset, length))
            elif allocation in (pb.ALLOCATION_ZERO, pb.ALLOCATION_HOLE):
                zeros.append((offset, length))
            else:
                raise BackupError(f"the gateway did not say whether {offset}+{length} holds data")
            if flags & 1:
                if state.clear:
                    if not self.dirty:
                        self.token = batch.clear_token
                    _merge_run(self.dirty, offset, length)
                if not state.full:  # a full backup's map is the whole disk already
                    _merge_run(self.mapped, offset, length)
        data_bytes = sum(length for _, length in writes)
        state.bytes_written += data_bytes
        self.copied += data_bytes
        self.unsynced += data_bytes + 16 * len(msg.lengths)
        data = batch.data
        assert data is not None  # a data stream's
        self._store(data, writes, zeros)

    def _store(
        self,
        data: memoryview,
        writes: list[tuple[int, int]],
        zeros: list[tuple[int, int]],
    ) -> None:
        """Write a message's data, in stream order (checked whole by the client before any of
        it came here: a corrupt message writes nothing)."""
        pos = 0
        for offset, length in writes:
            chunk = data[pos : pos + length]
            self.out.write(chunk, offset)
            if self.digest is not None:
                self.digest.update(offset, chunk)
            pos += length
        for offset, length in zeros:
            self.out.zero(offset, length)


async def run(args: argparse.Namespace) -> int:
    """``nbdgw backup``."""
    output: Path = args.output
    spath = state_path(output)
    since = backup_snapshots.since_context(args)
    if since:
        context = since
    elif args.bitmap:
        context = full_context_name(args.bitmap)
    elif args.full:
        context = "base:allocation"
    elif args.resume:
        # The state file records what the backup reads, whether it is full and whether it
        # clears: --resume alone continues it as it was started.
        recorded = _load_state(spath)
        context = recorded.context
        args.full = recorded.full if args.full is None else args.full
        args.clear = recorded.clear if args.clear is None else args.clear
    else:
        raise CommandError("--bitmap is required (or --full for a full backup)")
    if args.clear and context == "base:allocation":
        raise CommandError("--clear needs --bitmap (the bitmap to clear)")
    if args.checkpoint <= 0:
        raise CommandError("--checkpoint must be positive")
    if args.compress is not None and args.compress not in ZSTD_LEVELS:
        low, high = ZSTD_LEVELS.start, ZSTD_LEVELS.stop - 1
        raise CommandError(f"--compress LEVEL must be {low} to {high}")

    # Each message's ~1 MiB buffers (grpc's, the parsed message's) come from glibc's heap
    # again, not from fresh mmaps page-faulted in: a third of this process's CPU time.
    keep_freed_memory()
    # The calls fail at once (a person is waiting); the data streams resume (--retries).
    async with open_client(args) as client:
        export = await client.get_export(args.export)
        size = export.size
        export_name = export.id or args.export
        bitmaps = {b.context: b for b in await client.list_bitmaps(args.export)}
        if since:  # a view of the snapshot still to take
            await backup_snapshots.check_checkpoint(client, args.export, args.since)
            bitmaps[context] = Bitmap(
                name="", export=export_name, context=context, kind=BitmapKind.DIRTY_BITMAP,
                export_size=size,
            )  # fmt: skip
        if context not in bitmaps and args.snapshot:
            # A context only the snapshot has (a running QEMU's since:CHECKPOINT view).
            snap_export = f"{args.export.removeprefix('exports/')}@{args.snapshot}"
            bitmaps.update({b.context: b for b in await client.list_bitmaps(snap_export)})
        if context not in bitmaps:
            offered = ", ".join(sorted(bitmaps)) or "none"
            raise BackupError(
                f"export {export_name!r} has no context {context!r} (offered: {offered})"
            )
        if args.clear and bitmaps[context].clear_mode == ClearMode.UNSUPPORTED:
            # A running QEMU's live bitmap clears only through a snapshot's fork: refused
            # unless the backup reads a snapshot whose fork clears (decided before anything
            # is written).
            source = ""
            if args.snapshot:
                source = f"{export_name}@{args.snapshot}"
            elif args.snapshot_mode != "never" and await backup_snapshots.takes_snapshots(
                client, args.export
            ):
                source = "a snapshot"
            if source and source != "a snapshot":
                found = {b.context: b for b in await client.list_bitmaps(source)}.get(context)
                if found is None or found.clear_mode == ClearMode.UNSUPPORTED:
                    source = ""
            if not source:
                why = bitmaps[context].clear_unsupported_reason or "the gateway refuses"
                raise BackupError(f"{context} cannot be cleared: {why}")

        snapshots = backup_snapshots
        prepared = _prepare(args, spath, export_name, context, size)
        if prepared is None:
            done = BackupState.load(spath)  # complete; its snapshot may still need releasing
            if done.snapshot and not args.keep_snapshot:
                await snapshots.release_snapshot(client, done)
            print(f"{output}: backup already complete", file=sys.stderr)
            return 0
        state, create = prepared
        generation = bitmaps[context].generation if state.clear else ""
        if state.generation != generation:
            if state.generation:
                raise BackupError(
                    f"the generation of export {export_name!r} changed from"
                    f" {state.generation!r} to {generation!r} since the backup started: it"
                    " shows another point in time; start a new backup"
                )
            state.generation = generation
            state.save(spath)
        await snapshots.take_snapshot(client, args, state, spath, warn(args))

        header = {
            "format": MAP_FORMAT,
            "version": MAP_VERSION,
            "export": state.export,
            "context": state.context,
            "size": state.size,
            "full": state.full,
        }
        if state.next_offset and not map_path(output).exists():
            raise BackupError(
                f"{map_path(output)} is missing: the backup was started without a dirty map "
                "(by an older nbdgw, or the file was deleted), so nothing would record which "
                f"ranges it copied; {restart_advice(state)}"
            )
        dirty_map = DirtyMap(map_path(output), header)
        try:
            out = OutputImage(output, size, create=create)
        except BaseException:
            dirty_map.close()
            raise
        backup: _Backup | None = None
        try:
            backup = _Backup(client, state, spath, out, args.checkpoint, dirty_map)
            backup.retry = stream_retry(args.retries)
            backup.compress = args.compress or 0
            # A ledger-masked bitmap belongs to a point-in-time export: nothing writes to what
            # it describes, so there is no race to recheck for.
            backup.recheck = args.recheck and bitmaps[context].clear_mode != ClearMode.LEDGER_MASK
            if state.snapshot:  # a snapshot does not change either
                backup.source = snapshots.source_export(state)
                backup.recheck = False
            backup.clear_gap = max(bitmaps[context].granularity, 64 << 10)
            # To do: the dirty bytes of an incremental started now (ListBitmaps counts them);
            # a full backup or a resumed one shows how far through the disk it is instead.
            dirty = bitmaps[context].dirty_bytes or 0  # None: not known
            fresh = not state.full and state.next_offset == 0 and dirty > 0
            progress = Progress(dirty if fresh else None, enabled=args.progress)
            try:
                await backup.run(progress)
            except client_errors.NbdgwError as exc:  # a call failed, a stream broke its promise
                said = describe_error(exc, args)
                if isinstance(exc, client_errors.DataCorrupted):
                    said += "; nothing of it was stored"
                raise BackupError(
                    f"{said}; the progress up to {state.next_offset} is saved: run the same"
                    " command with --resume to continue"
                ) from None
            except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C
                progress.close()
                print(
                    f"nbdgw backup: interrupted; the progress up to {state.next_offset} is saved:"
                    " run the same command with --resume to continue",
                    file=sys.stderr,
                )
                raise
            progress.close()
        finally:
            if backup is not None:
                backup.committer.close()  # before the file it syncs is closed
            out.close()
            dirty_map.close()
        if state.snapshot and not args.keep_snapshot:
            await snapshots.release_snapshot(client, state)

    kind = "full" if state.full else "incremental"
    source = f" (snapshot {state.snapshot})" if state.snapshot else ""
    summary = f"{kind} backup of {export_name}{source} ({context}) to {output}: complete, "
    summary += f"{state.bytes_written} bytes of data"
    if state.clear:
        summary += f", {state.bytes_cleared} bytes cleared"
        if state.bytes_rewritten:
            summary += f" ({state.bytes_rewritten} bytes changed during the backup, copied again)"
    if state.digest:
        summary += f", {state.digest_algorithm} {state.digest}"
    print(summary)
    return 0


def _check_resume(
    state: BackupState, args: argparse.Namespace, export: str, context: str, size: int
) -> None:
    mismatches = []
    if state.export != export:
        mismatches.append(f"export {state.export!r}, not {export!r}")
    if state.context != context:
        mismatches.append(f"context {state.context!r}, not {context!r}")
    if args.full is not None and bool(args.full) != state.full:
        mismatches.append("full" if state.full else "incremental")
    if args.clear is not None and bool(args.clear) != state.clear:
        mismatches.append("with --clear" if state.clear else "without --clear")
    if args.digest is not None and args.digest != state.digest_algorithm:
        mismatches.append(f"--digest {state.digest_algorithm or '(none)'}")
    if mismatches:
        raise BackupError(
            "the interrupted backup was started with different settings: " + "; ".join(mismatches)
        )
    if state.size != size:
        raise BackupError(
            f"the export's size changed from {state.size} to {size} since the backup started; "
            f"{restart_advice(state)}"
        )


def restart_advice(state: BackupState) -> str:
    """What to do instead of going on with ``state``'s backup. Once it cleared ranges from the
    bitmap, a new incremental would miss them: only a full backup has them."""
    if state.clear and state.bytes_cleared:
        return (
            f"start a new full backup (--full): this one already cleared {state.bytes_cleared}"
            " bytes of dirty ranges from the bitmap, which a new incremental would miss"
        )
    return "start a new backup"


def _load_state(spath: Path) -> BackupState:
    try:
        return BackupState.load(spath)
    except FileNotFoundError:
        raise BackupError(
            f"nothing to resume: {spath} does not exist (start without --resume)"
        ) from None


def _prepare(
    args: argparse.Namespace, spath: Path, export_name: str, context: str, size: int
) -> tuple[BackupState, bool] | None:
    """The state to run from, and whether OUTPUT must be created; None when already done."""
    output: Path = args.output
    if args.resume:
        state = _load_state(spath)
        _check_resume(state, args, export_name, context, size)
        if state.complete:
            return None
        create = state.next_offset == 0 and not output.exists()
        if not create and not output.exists():
            raise BackupError(f"{output} is missing: the backup cannot be resumed")
    else:
        for path in (spath, output, map_path(output)):
            if path.exists() or path.is_symlink():
                raise BackupError(
                    f"{path} exists: use --resume to continue an interrupted backup, or "
                    "choose another OUTPUT"
                )
        state = BackupState(
            export=export_name,
            context=context,
            size=size,
            full=bool(args.full),
            clear=bool(args.clear),
            digest_algorithm=args.digest or "",
            since=getattr(args, "since", "") or "",
            checkpoint=getattr(args, "checkpoint_id", "") or "",
        )
        # The state first: a crash right after leaves something --resume understands.
        state.save(spath)
        create = True
    return state, create


def apply_incremental(
    base: OutputImage,
    incremental: Path,
    runs: list[tuple[int, int]],
    progress: Progress | None = None,
) -> int:
    """Copy ``runs`` of ``incremental`` onto ``base``: data as data, holes and zeroes as zeroes
    (punched where possible). Returns the number of data bytes copied; ``progress`` advances
    by every byte of the runs laid."""
    fd = os.open(incremental, os.O_RDONLY | os.O_CLOEXEC)
    copied = 0
    try:
        for offset, length in runs:
            pos, end = offset, offset + length
            while pos < end:
                try:
                    data = min(os.lseek(fd, pos, os.SEEK_DATA), end)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:  # ENXIO: no data after pos at all
                        raise
                    data = end
                if data > pos:
                    base.zero(pos, data - pos)
                    if progress is not None:
                        progress.advance(data - pos)
                if data >= end:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
                while data < hole:
                    chunk = os.pread(fd, min(_ZERO_CHUNK, hole - data), data)
                    if not chunk:
                        raise BackupError(f"{incremental}: ends before offset {data}")
                    base.write(chunk, data)
                    data += len(chunk)
                    copied += len(chunk)
                    if progress is not None:
                        progress.advance(len(chunk))
                pos = hole
    finally:
        os.close(fd)
    return copied


def restore(args: argparse.Namespace) -> int:
    """``nbdgw restore BASE BACKUP...``: BASE is created from a full backup when it is missing."""
    base_path: Path = args.base
    create = not base_path.exists()
    size = -1 if create else base_path.stat().st_size
    plans = []
    previous: tuple[Path, BackupState] | None = None
    # The checkpoints the backups so far reach (None: unknown); an existing BASE: what an
    # earlier restore into it, or the backup it is a copy of, says.
    covered, after = (None, 0.0) if create else _restored(base_path)
    # Check everything before changing anything: a bad argument leaves BASE as it was.
    for path in args.incrementals:
        state, header, runs = load_complete(path)
        if create and previous is None:
            if not state.full:
                raise BackupError(
                    f"{base_path} does not exist and {path} is an incremental backup: a new "
                    "disk starts from a full backup (nbdgw backup --full), listed first"
                )
            size = header["size"]
        if header["size"] != size or path.stat().st_size != size:
            raise BackupError(
                f"{path} is a backup of a {header['size']}-byte disk, {base_path} has {size} bytes"
            )
        if previous is not None:
            _check_chain(previous, (path, state))
        elif state.started <= after:
            raise BackupError(
                f"{path} was taken before what {base_path} already holds: list the backups"
                " oldest first (BASE is restored up to a later one)"
            )
        covered = _check_since(covered, path, state)
        previous = (path, state)
        plans.append((path, runs))
    total = sum(length for _, runs in plans for _, length in runs)
    progress = Progress(total, verb="laid", enabled=args.progress)
    base = OutputImage(base_path, size, create=create)
    try:
        for path, runs in plans:
            copied = apply_incremental(base, path, runs, progress)
            dirty = sum(length for _, length in runs)
            progress.close()
            print(f"{path}: {dirty} dirty bytes applied ({copied} of data, the rest zeroes)")
        base.sync()
    finally:
        base.close()
    if previous is not None:
        record = {
            "checkpoints": sorted(covered) if covered is not None else None,
            "started": previous[1].started,
            # BASE as this restore left it: a record of a file changed since (a backup copied
            # over it) is not used.
            "mtime_ns": base_path.stat().st_mtime_ns,
        }
        write_atomic(_restored_path(base_path), json.dumps(record).encode() + b"\n")
    return 0


def _restored_path(base: Path) -> Path:
    return base.with_name(base.name + ".nbdgw-restored.json")


def _restored(base: Path) -> tuple[set[str] | None, float]:
    """What BASE holds already: (the checkpoints it reaches, None when unknown; when the last
    backup laid into it was taken). From the record of the last restore into it, else from
    the state of the backup it is (or a copy of, with its state file beside it)."""
    try:
        record = json.loads(_restored_path(base).read_text())
        if record.get("mtime_ns") == base.stat().st_mtime_ns:
            checkpoints = record.get("checkpoints")
            return (set(checkpoints) if checkpoints is not None else None), float(record["started"])
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{_restored_path(base)} is unreadable ({exc}): remove it") from None
    try:
        state = BackupState.load(state_path(base))
    except (OSError, ValueError, TypeError, BackupError):
        return None, 0.0  # a disk nbdgw did not make: nothing to check it against
    if not state.complete:
        return None, 0.0
    return _check_since(None, base, state), state.started


def _check_since(covered: set[str] | None, path: Path, state: BackupState) -> set[str] | None:
    """An incremental since checkpoint C follows backups that reach C: one made by a backup
    before it in the list (a missing link, or a later full before an older incremental, would
    leave a wrong disk). Returns the checkpoints reached with ``path``; None when unknown
    (backups of bitmaps, or made by an nbdgw that did not record them): not checked."""
    if state.full:
        return {state.checkpoint} if state.checkpoint else None
    if covered is not None and state.since and state.since not in covered:
        raise BackupError(
            f"{path} holds the changes since checkpoint {state.since!r}, but the backups"
            f" before it reach checkpoint(s) {', '.join(sorted(covered))}: a backup is missing"
            " in between, or the list is not in order"
        )
    if covered is not None and state.checkpoint:
        return covered | {state.checkpoint}
    return covered


def _check_chain(earlier: tuple[Path, BackupState], later: tuple[Path, BackupState]) -> None:
    """Backups are laid oldest first, all of one disk: an older backup after a newer one would
    roll the ranges it holds back in time, silently."""
    (before, a), (after, b) = earlier, later
    if a.export != b.export:
        raise BackupError(
            f"{after} is a backup of export {b.export!r} and {before} of {a.export!r}: "
            "a chain is of one disk"
        )
    if b.started <= a.started:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(b.started))
        raise BackupError(
            f"{after} was taken ({when} UTC) before {before}: list the backups oldest first"
        )
