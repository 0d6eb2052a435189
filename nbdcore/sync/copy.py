"""Copy a whole export, sparse-aware, over several connections: the engine of ``nbdgw nbd copy``.

Shaped after nbdcopy: when the export allows multi-conn, ``connections`` blocking clients
(:mod:`nbdcore.sync.client`), one thread each, take stripes of the export in turn. A worker
asks base:allocation about its stripe (when the server offers it), hands the runs that read as
zeroes to the sink without reading them, and reads the rest with a small window of requests in
flight. Each worker writes its own pieces (``os.pwrite`` at their offsets), so the threads never
wait for each other; a sequential sink (a pipe) gets one connection and its pieces in order.

Why threads and blocking sockets: in Python this is the fastest way to move READ data (the
waits happen in the kernel with the GIL released; docs/benchmarks.md, client-read).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final, Protocol

from nbdcore._record import Frozen
from nbdcore.client import BULK_READ
from nbdcore.constants import CONTEXT_BASE_ALLOCATION, NBD_STATE_ZERO
from nbdcore.exceptions import NBDError, UsageError
from nbdcore.sync.client import NBDClient
from nbdcore.tls import TLSConfig
from nbdcore.uri import NBDURI

__all__ = ["CopyResult", "FileSink", "NullSink", "Sink", "copy_export"]

# A stripe is the unit of work a worker takes: long enough that a BLOCK_STATUS answer covers a
# good part of it, short enough that the connections finish together.
STRIPE: Final = 64 << 20
# nbdcopy's own rule: up to 4 connections, but no more than its threads, which default to the
# CPU count (2 on 2 CPUs). Here each connection is a thread taking the GIL between its
# syscalls, so more threads than CPUs would only add contention.
DEFAULT_CONNECTIONS: Final = min(4, os.cpu_count() or 1)
# Reads in flight in all, split over the connections (at least one each), of BULK_READ (960 KiB)
# each. 2 GiB over 2 connections from a long-running qemu-nbd, 1 read each: 0.8-1.0 s of its
# CPU; 2 x 512 KiB each 1.1-1.3 s, 2 x 1 MiB each 1.1-1.6 s (no page faults in any): the more
# data in flight, the less of it is still in the CPU caches when it is sent and received
# (bench/results/2026-12-07/copy/, docs/benchmarks.md).
DEFAULT_IN_FLIGHT: Final = 2
DEFAULT_REQUEST_SIZE: Final = BULK_READ
SPARSE_UNIT: Final = 65536  # zero detection granularity of copies into regular files


class Sink(Protocol):
    """Where a copy goes. ``sequential`` sinks get their pieces in order from one thread;
    the others may be called from several threads at once, for disjoint ranges."""

    sequential: bool

    def write(self, offset: int, data: memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None:
        """``[offset, offset + length)`` reads as zeroes on the source."""

    def finish(self, size: int) -> None: ...


class NullSink:
    """Discards everything, as nbdcopy's ``null:``: measures the reading alone."""

    sequential = False

    def write(self, offset: int, data: memoryview) -> None:
        pass

    def zero(self, offset: int, length: int) -> None:
        pass

    def finish(self, size: int) -> None:
        pass


class FileSink:
    """A file descriptor: sparse into a regular file that was truncated to empty (zero runs and
    all-zero pieces stay holes), written in full at each offset into anything else (a device),
    or as a plain stream (``sequential``: stdout, pipes)."""

    _ZEROES = bytes(1 << 20)

    def __init__(self, fd: int, *, sequential: bool, sparse: bool) -> None:
        self.fd = fd
        self.sequential = sequential
        self.sparse = sparse

    def write(self, offset: int, data: memoryview) -> None:
        if self.sparse:
            self._put_sparse(data, offset)
        else:
            self._put(data, offset)

    def zero(self, offset: int, length: int) -> None:
        if self.sparse:
            return  # a hole already
        zeroes = memoryview(self._ZEROES)
        while length:
            n = min(length, len(zeroes))
            self._put(zeroes[:n], offset)
            offset += n
            length -= n

    def _put_sparse(self, view: memoryview, offset: int) -> None:
        """Write the data but leave out all-zero pieces of ``SPARSE_UNIT`` bytes (a server
        without base:allocation sends its holes as zeroes)."""
        unit = SPARSE_UNIT
        zeroes = self._ZEROES
        start = -1  # start of the current run of non-zero pieces
        for i in range(0, len(view), unit):
            if zeroes.startswith(view[i : i + unit]):  # memcmp, no copy
                if start >= 0:
                    self._put(view[start:i], offset + start)
                    start = -1
            elif start < 0:
                start = i
        if start >= 0:
            self._put(view[start:], offset + start)

    def _put(self, view: memoryview, offset: int) -> None:
        while view:
            n = os.write(self.fd, view) if self.sequential else os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def finish(self, size: int) -> None:
        if self.sparse:
            os.ftruncate(self.fd, size)


class CopyResult(Frozen):
    __slots__ = ("bytes_read", "connections", "seconds", "size")
    size: Final[int]
    bytes_read: Final[int]  # data read from the server (the rest read as zeroes)
    connections: Final[int]
    seconds: Final[float]

    def __init__(self, size: int, bytes_read: int, connections: int, seconds: float) -> None:
        self.size = size
        self.bytes_read = bytes_read
        self.connections = connections
        self.seconds = seconds


def copy_export(
    uri: str | NBDURI,
    sink: Sink,
    *,
    connections: int = DEFAULT_CONNECTIONS,
    request_size: int = DEFAULT_REQUEST_SIZE,
    window: int | None = None,
    tls: TLSConfig | None = None,
    timeout: float | None = 30.0,
    progress: Callable[[int, int], None] | None = None,
    stripe: int = STRIPE,
) -> CopyResult:
    """Copy the export at ``uri`` into ``sink``; ``progress(n, size)`` is called (from the
    workers, one at a time) as each ``n`` bytes of the export's ``size`` are done. The first
    error stops every worker and is raised once all have stopped. ``window``: reads in
    flight per connection (default: :data:`DEFAULT_IN_FLIGHT` over the connections used)."""
    if connections < 1 or (window is not None and window < 1) or request_size < 4096 or stripe < 1:
        raise UsageError("connections and window must be >= 1, request_size >= 4096, stripe >= 1")
    start = time.monotonic()
    contexts = [CONTEXT_BASE_ALLOCATION]
    first = NBDClient.connect(uri, meta_contexts=contexts, tls=tls, timeout=timeout)
    clients = [first]
    try:
        if sink.sequential or not first.can_multi_conn:
            connections = 1
        for _ in range(connections - 1):
            clients.append(NBDClient.connect(uri, meta_contexts=contexts, tls=tls, timeout=timeout))
        size = first.size
        block = first.block_size.minimum if first.block_size is not None else 1
        # Stripes are whole blocks (and whole requests), so no read straddles two workers.
        unit = max(block, 4096)
        stripe = max(stripe - stripe % unit, unit)
        if window is None:
            window = max(1, DEFAULT_IN_FLIGHT // len(clients))
        job = _Job(size, stripe, sink, request_size, window, block, progress)
        if len(clients) == 1:
            job.work(first)
        else:
            threads = [
                threading.Thread(target=job.work, args=(c,), name=f"nbd-copy-{i}", daemon=True)
                for i, c in enumerate(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if job.error is not None:
            raise job.error
        sink.finish(size)
        return CopyResult(size, job.bytes_read, len(clients), time.monotonic() - start)
    finally:
        for c in clients:
            c.close()


class _Job:
    """What the workers share: the next stripe, the first error, the progress callback."""

    def __init__(
        self,
        size: int,
        stripe: int,
        sink: Sink,
        request_size: int,
        window: int,
        block: int,
        progress: Callable[[int, int], None] | None,
    ) -> None:
        self.size = size
        self.stripe = stripe
        self.sink = sink
        self.request_size = request_size
        self.window = window
        self.block = block
        self.progress = progress
        self.error: BaseException | None = None
        self.bytes_read = 0
        self._next = 0
        self._lock = threading.Lock()

    def _take(self) -> tuple[int, int] | None:
        with self._lock:
            if self.error is not None:
                raise _Stopped
            if self._next >= self.size:
                return None
            offset = self._next
            self._next = min(offset + self.stripe, self.size)
            return offset, self._next - offset

    def _done(self, n: int, read: int) -> None:
        with self._lock:
            if self.error is not None:
                raise _Stopped
            self.bytes_read += read
            if self.progress is not None:
                self.progress(n, self.size)

    def work(self, client: NBDClient) -> None:
        try:
            if self.sink.sequential:
                self._work_in_order(client)
            else:
                # One pipeline over all the stripes this worker takes: its reads stay in
                # flight across stripe boundaries and its buffers are allocated once. The
                # BLOCK_STATUS of the next stripe goes out while reads are in flight (the
                # client keeps their replies for the pipeline).
                reads = client.iter_reads(
                    self._data_ranges(client), request_size=self.request_size, window=self.window
                )
                for o, view in reads:
                    self.sink.write(o, view)
                    self._done(len(view), len(view))
        except BaseException as exc:
            with self._lock:
                if self.error is None:
                    self.error = exc

    def _data_ranges(self, client: NBDClient) -> Iterator[tuple[int, int]]:
        """The data runs of the stripes this worker takes; zero runs go to the sink here."""
        while (stripe := self._take()) is not None:
            for o, n, is_zero in _runs(client, *stripe, self.block):
                if is_zero:
                    self._zero(o, n)
                else:
                    yield o, n

    def _work_in_order(self, client: NBDClient) -> None:
        """For a sequential sink (one worker): each zero run waits for the data before it."""
        while (stripe := self._take()) is not None:
            for o, n, is_zero in _runs(client, *stripe, self.block):
                if is_zero:
                    self._zero(o, n)
                    continue
                reads = client.iter_reads(
                    [(o, n)], request_size=self.request_size, window=self.window, ordered=True
                )
                for offset, view in reads:
                    self.sink.write(offset, view)
                    self._done(len(view), len(view))

    def _zero(self, offset: int, length: int) -> None:
        self.sink.zero(offset, length)
        self._done(length, 0)


class _Stopped(NBDError):
    """Another worker failed: this one stops (its error is not the one reported)."""


def _runs(
    client: NBDClient, offset: int, length: int, block: int
) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, reads as zero) runs covering ``[offset, offset + length)`` (a range that
    starts on a block boundary), from base:allocation when the server offers it, else one data
    run. Data runs are widened to whole blocks (reads MUST be block multiples) and merged; the
    zero runs are what is left."""
    end = offset + length
    if CONTEXT_BASE_ALLOCATION not in client.meta_contexts:
        yield offset, length, False
        return
    data: list[list[int]] = []  # merged [start, stop) data runs
    pos = offset
    while pos < end:
        lengths, flags = client.block_status(pos, end - pos)[CONTEXT_BASE_ALLOCATION]
        for n, f in zip(lengths, flags, strict=True):
            n = min(n, end - pos)
            if not f & NBD_STATE_ZERO:
                start = pos - pos % block
                stop = min(-(-(pos + n) // block) * block, end)
                if data and start <= data[-1][1]:
                    data[-1][1] = max(data[-1][1], stop)
                else:
                    data.append([start, stop])
            pos += n
            if pos >= end:
                break
    done = offset
    for start, stop in data:
        if start > done:
            yield done, start - done, True
        yield start, stop - start, False
        done = stop
    if end > done:
        yield done, end - done, True
