"""Several NBD connections to one export, used as one client (multi-conn).

The spec allows a client to spread its commands over more than one connection only when the
export advertises NBD_FLAG_CAN_MULTI_CONN ("In the absence of this flag, clients SHOULD NOT
multiplex their commands over more than one connection to the export"). :meth:`connect` opens
the first connection, and the others only when that flag is set.

Why bother: against qemu-nbd one connection is bound by the server (a 208 KiB socket buffer and
one coroutine per connection, see docs/benchmarks.md); nbdcopy opens four.

Flush: with CAN_MULTI_CONN, "the effects of NBD_CMD_FLUSH and NBD_CMD_FLAG_FUA MUST be visible
across all connections when the server sends its reply to that command", and a FLUSH covers the
writes the server has *replied to* (on any connection) before it. So :meth:`flush` first waits
for every write, trim and zero started before it, on every connection, then sends one FLUSH.
"""

from __future__ import annotations

import asyncio
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

from nbdcore.aio.client import NBDClient
from nbdcore.constants import TransmissionFlag
from nbdcore.exceptions import ConnectionLostError, NBDError, NBDTimeoutError, UsageError
from nbdcore.tls import TLSConfig
from nbdcore.uri import NBDURI
from nbdcore.wire import BlockSize

__all__ = ["MultiConnClient"]

DEFAULT_CONNECTIONS: Final = 4
_T = TypeVar("_T")


class MultiConnClient:
    """N :class:`NBDClient` connections to one export behind the NBDClient API. Use
    :meth:`connect`. Each request goes to the connection with the fewest requests in flight;
    a connection that fails fails its own requests (the error names it) and is skipped after."""

    def __init__(self, clients: Sequence[NBDClient]) -> None:
        if not clients:
            raise UsageError("a MultiConnClient needs at least one connection")
        self._clients = list(clients)
        self._busy = [0] * len(self._clients)
        self._next = 0  # round-robin among equally busy connections
        # Data-changing commands not yet answered, for flush (see the module docstring).
        self._writes: set[asyncio.Future[None]] = set()
        #: Why additional connections could not be opened (empty when all were).
        self.connect_errors: tuple[BaseException, ...] = ()

    @classmethod
    async def connect(
        cls,
        uri: str | NBDURI,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        meta_contexts: Sequence[str] = (),
        tls: TLSConfig | None = None,
        extended_headers: bool = True,
        structured_replies: bool = True,
        max_in_flight: int = 16,
        timeout: float | None = 30.0,  # noqa: ASYNC109 (NBDClient's API; applies per request)
        extra_timeout: float = 5.0,
    ) -> MultiConnClient:
        """Connect once; when the export advertises CAN_MULTI_CONN, open ``connections - 1``
        more (concurrently). ``max_in_flight`` is per connection. An additional connection
        that fails or is not ready within ``extra_timeout`` seconds is left out (see
        :attr:`connections` and :attr:`connect_errors`); only the first one must succeed."""
        if connections < 1:
            raise UsageError("connections must be at least 1")
        u = NBDURI.parse(uri) if isinstance(uri, str) else uri

        async def one() -> NBDClient:
            return await NBDClient.connect(
                u,
                meta_contexts=meta_contexts,
                tls=tls,
                extended_headers=extended_headers,
                structured_replies=structured_replies,
                max_in_flight=max_in_flight,
                timeout=timeout,
            )

        async def extra() -> NBDClient:
            # A server that limits its clients (qemu-nbd -e 2) leaves the surplus connections
            # without a greeting: give up on them soon and go on with fewer.
            async with asyncio.timeout(extra_timeout):
                return await one()

        first = await one()
        clients = [first]
        errors: list[BaseException] = []
        try:
            if first.can_multi_conn and connections > 1:
                tasks = [asyncio.ensure_future(extra()) for _ in range(connections - 1)]
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for r in results:
                    if isinstance(r, NBDClient):
                        clients.append(r)
                    elif isinstance(r, NBDError | OSError | TimeoutError):
                        errors.append(r)
                    else:
                        raise r
                for c in clients[1:]:
                    _check_same(first, c)
        except BaseException:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
            raise
        self = cls(clients)
        self.connect_errors = tuple(errors)
        return self

    # --- attributes (those of the first connection; the others were checked to agree) ------------

    @property
    def connections(self) -> int:
        """How many connections were opened (1 without CAN_MULTI_CONN)."""
        return len(self._clients)

    @property
    def clients(self) -> tuple[NBDClient, ...]:
        return tuple(self._clients)

    @property
    def export_name(self) -> str:
        return self._clients[0].export_name

    @property
    def description(self) -> str | None:
        return self._clients[0].description

    @property
    def size(self) -> int:
        return self._clients[0].size

    @property
    def flags(self) -> TransmissionFlag:
        return self._clients[0].flags

    @property
    def block_size(self) -> BlockSize | None:
        return self._clients[0].block_size

    @property
    def meta_contexts(self) -> dict[str, int]:
        """Negotiated contexts (names are what count: ids may differ between connections)."""
        return self._clients[0].meta_contexts

    @property
    def structured_replies(self) -> bool:
        return self._clients[0].structured_replies

    @property
    def extended_headers(self) -> bool:
        return self._clients[0].extended_headers

    @property
    def read_only(self) -> bool:
        return self._clients[0].read_only

    @property
    def can_multi_conn(self) -> bool:
        return self._clients[0].can_multi_conn

    @property
    def max_payload(self) -> int:
        return min(c.max_payload for c in self._clients)

    @property
    def closed(self) -> bool:
        return all(c.closed for c in self._clients)

    # --- dispatch ---------------------------------------------------------------------------------

    def _pick(self) -> int:
        """The open connection with the fewest requests in flight (round-robin among ties)."""
        n = len(self._clients)
        best = -1
        for k in range(n):
            i = (self._next + k) % n
            if self._clients[i].closed:
                continue
            if best < 0 or self._busy[i] < self._busy[best]:
                best = i
        if best < 0:
            raise ConnectionLostError("every connection to the server is closed")
        self._next = (best + 1) % n
        return best

    async def _on(self, call: Callable[[NBDClient], Awaitable[_T]]) -> _T:
        i = self._pick()
        self._busy[i] += 1
        try:
            return await call(self._clients[i])
        except (ConnectionLostError, NBDTimeoutError) as exc:
            if len(self._clients) == 1:
                raise
            # Say which connection: the others may still be fine.
            raise type(exc)(f"connection {i + 1} of {len(self._clients)}: {exc}") from exc
        finally:
            self._busy[i] -= 1

    async def _write(self, call: Callable[[NBDClient], Awaitable[None]]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes.add(done)
        try:
            await self._on(call)
        finally:
            self._writes.discard(done)
            done.set_result(None)

    def _steps(self, length: int) -> range:
        return range(0, length, self.max_payload)

    # --- commands ---------------------------------------------------------------------------------

    async def pread(self, offset: int, length: int, *, df: bool = False) -> bytes:
        if df or length <= self.max_payload:
            return await self._on(lambda c: c.pread(offset, length, df=df))
        buf = bytearray(length)
        await self.pread_into(buf, offset)
        return bytes(buf)

    async def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``; a read larger than the maximum
        payload is split and its pieces spread over the connections."""
        view = memoryview(buf).cast("B")
        step = self.max_payload
        if len(view) <= step:
            await self._on(lambda c: c.pread_into(view, offset))
            return
        await _gather(
            self._read_piece(view[p : p + step], offset + p) for p in self._steps(len(view))
        )

    def pread_many_into(self, pieces: Sequence[tuple[memoryview, int]]) -> asyncio.Future[None]:
        """:meth:`NBDClient.pread_many_into` on the least busy connection: a batch stays on
        one connection, so that its READs leave in one write."""
        return asyncio.ensure_future(self._on(lambda c: c.pread_many_into(pieces)))

    async def _read_piece(self, view: memoryview, offset: int) -> None:
        await self._on(lambda c: c.pread_into(view, offset))

    async def pwrite(self, data: bytes | memoryview, offset: int, *, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        step = self.max_payload
        if len(view) <= step:
            await self._write(lambda c: c.pwrite(view, offset, fua=fua))
            return
        await _gather(
            self.pwrite(view[p : p + step], offset + p, fua=fua) for p in self._steps(len(view))
        )

    async def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        await self._write(lambda c: c.trim(offset, length, fua=fua))

    async def zero(
        self,
        offset: int,
        length: int,
        *,
        no_hole: bool = False,
        fast_zero: bool = False,
        fua: bool = False,
    ) -> None:
        await self._write(
            lambda c: c.zero(offset, length, no_hole=no_hole, fast_zero=fast_zero, fua=fua)
        )

    async def cache(self, offset: int, length: int) -> None:
        await self._on(lambda c: c.cache(offset, length))

    async def flush(self) -> None:
        """Wait for the data-changing commands already started (on every connection) to be
        answered, then send one FLUSH: with CAN_MULTI_CONN it covers the writes every
        connection got a reply to (without it there is one connection)."""
        pending = list(self._writes)
        if pending:
            await asyncio.wait(pending)
        await self._on(lambda c: c.flush())

    async def block_status(
        self,
        offset: int,
        length: int,
        *,
        contexts: Sequence[str] | None = None,
        req_one: bool = False,
    ) -> dict[str, tuple[array[int], array[int]]]:
        return await self._on(
            lambda c: c.block_status(offset, length, contexts=contexts, req_one=req_one)
        )

    async def read_range(
        self,
        buf: memoryview | bytearray,
        offset: int,
        *,
        request_size: int = 1 << 20,
        in_flight: int | None = None,
    ) -> None:
        """Fill ``buf`` from ``offset`` with ``request_size`` reads, ``in_flight`` at a time
        (default: 2 per connection), spread over the connections. Memory: ``buf`` only."""
        if request_size < 1:
            raise UsageError("request_size must be at least 1")
        view = memoryview(buf).cast("B")
        step = min(request_size, self.max_payload)
        depth = in_flight if in_flight is not None else 2 * len(self._clients)
        if depth < 1:
            raise UsageError("in_flight must be at least 1")
        positions = iter(range(0, len(view), step))

        async def worker() -> None:
            for p in positions:  # shared iterator: each worker takes the next piece
                await self._read_piece(view[p : p + step], offset + p)

        await _gather(worker() for _ in range(depth))

    # --- closing ----------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close every connection (NBD_CMD_DISC on each); the first error is raised after all
        were closed."""
        results = await asyncio.gather(*(c.close() for c in self._clients), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    async def __aenter__(self) -> MultiConnClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _check_same(first: NBDClient, other: NBDClient) -> None:
    """Every connection must see the same export, or spreading requests would mix two disks."""
    if (other.size, other.flags, set(other.meta_contexts)) != (
        first.size,
        first.flags,
        set(first.meta_contexts),
    ):
        raise NBDError(
            "the server described the export differently on another connection "
            f"(size {other.size} vs {first.size}, flags {other.flags!r} vs {first.flags!r})"
        )


async def _gather(coros: Iterable[Awaitable[Any]]) -> None:
    """Run the coroutines concurrently; on the first error cancel the rest, then raise it."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
