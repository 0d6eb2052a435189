"""NBD hosts and their connection pools: reconnect with exponential backoff, up/down state.

A :class:`Host` is one NBD server (an address and TLS settings). It tracks whether it is up: a
connection failure (refused, reset, lost, timed out) starts a probe task that reconnects with
exponential backoff; until a probe succeeds the host is *down* and its RPCs fail fast with
UNAVAILABLE and a RetryInfo saying when the next attempt is. State changes are reported to a
callback (the gateway turns them into grpc.health.v1 statuses).

An :class:`ExportPool` keeps idle connections of one export, keyed by the set of metadata
contexts negotiated on them (NBD fixes the contexts at NBD_OPT_GO, so a connection can only
serve requests for the contexts it was opened with). Leases are bounded per host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from gateway import errors
from gateway.config import ExportConfig, GatewayConfig, HostConfig
from nbdcore.aio.client import NBDClient, list_meta_contexts
from nbdcore.constants import TransmissionFlag
from nbdcore.exceptions import UsageError
from nbdcore.uri import NBDURI
from nbdcore.wire import BlockSize

log = logging.getLogger("nbdgw.hosts")
T = TypeVar("T")


@dataclass(frozen=True)
class KnownExport:
    """What the host said about an export on the last connection."""

    nbd_export_name: str
    description: str | None
    size: int
    flags: TransmissionFlag
    block_size: BlockSize | None
    read_only: bool
    # The host acknowledged NBD_OPT_X_NBDGW_CLEAR: bitmaps clear at the source over NBD.
    clear_extension: bool = False


class Host:
    """One NBD host: where to connect, whether it is up, and the reconnect loop."""

    # Whether the first probe restores state that calls depend on (a QMP host's snapshot
    # recovery): the gateway waits for it before serving. Other hosts are probed in the
    # background, so that one that stalls at its greeting delays nothing.
    first_probe_restores_state = False

    def __init__(
        self,
        config: HostConfig,
        settings: GatewayConfig,
        on_change: Callable[[Host], Awaitable[None]] | None = None,
        uri: NBDURI | None = None,
    ) -> None:
        self.config = config
        self.name = config.label
        self.settings = settings
        self.uri = uri if uri is not None else config.uri
        self.up = True
        self.last_error = ""
        self.exports: list[str] = []  # nbd export names, for probing
        self._on_change = on_change
        # Leases bound the connections in use; _open counts every open connection (in use,
        # idle, or closing), which must stay within the host's own limit: qemu-nbd accepts
        # only `-e N` clients and leaves the next one waiting, it does not refuse it.
        self.max_connections = config.max_connections or settings.max_connections_per_host
        self._leases = asyncio.Semaphore(self.max_connections)
        self._open = 0
        self._slot_freed = asyncio.Event()
        self._probe_task: asyncio.Task[None] | None = None
        self._next_attempt = 0.0  # monotonic time of the next probe while down
        self._closed = False
        self.pools: list[ExportPool] = []
        self._watch_task: asyncio.Task[None] | None = None
        self.last_used = time.monotonic()  # when a lease last ended (for the liveness check)
        self._busy = 0  # leases held now: traffic in progress proves the host alive

    @property
    def open_connections(self) -> int:
        """NBD connections open to the host now: in use, idle or closing (for metrics)."""
        return self._open

    def uri_for(self, nbd_export: str) -> str:
        if self.uri is None:
            raise RuntimeError(f"host {self.name} has no address yet")
        return str(_with_export(self.uri, nbd_export))

    def retry_after(self) -> float:
        """Seconds until the next reconnect attempt (what RetryInfo tells clients)."""
        if self.up:
            return self.settings.backoff_initial
        return max(self._next_attempt - time.monotonic(), 0.05)

    def unavailable(self, export: str) -> errors.GatewayError:
        return errors.host_unavailable(
            export, self.name, self.last_error or "not connected", self.retry_after()
        )

    async def connect(self, nbd_export: str, contexts: Sequence[str]) -> NBDClient:
        """A new connection, counted against the host's limit (close it with :meth:`discard`)."""
        await self._reserve()
        try:
            return await NBDClient.connect(
                self.uri_for(nbd_export),
                meta_contexts=contexts,
                tls=self.config.tls,
                timeout=self.settings.connect_timeout,
                # Asked of every host: those without it answer ERR_UNSUP and nothing changes.
                clear_extension=True,
            )
        except BaseException as exc:
            self._release()
            if isinstance(exc, TimeoutError) and self._open > 0:
                # The usual cause: a host that accepts fewer clients than we hold open
                # leaves the next one waiting (qemu-nbd's default is -e 1).
                log.warning(
                    "host %s: connection timed out while %d others are open; does it accept"
                    " fewer clients than max_connections=%d (qemu-nbd -e)?",
                    self.name,
                    self._open,
                    self.max_connections,
                )
            raise

    async def _reserve(self) -> None:
        """Wait for room for one more connection, closing an idle one if that makes room."""
        while self._open >= self.max_connections:
            victim = self._pop_idle()
            if victim is not None:
                await self._close(victim)
                continue
            # Every slot is in use or closing: a lease ends or a close completes soon.
            self._slot_freed.clear()
            await self._slot_freed.wait()
        self._open += 1  # no await since the check: nobody took the slot meanwhile

    def _release(self) -> None:
        self._open -= 1
        self._slot_freed.set()

    def _pop_idle(self) -> NBDClient | None:
        for pool in self.pools:
            client = pool.pop_idle()
            if client is not None:
                return client
        return None

    async def _close(self, client: NBDClient) -> None:
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), timeout=5)
        finally:
            self._release()

    def discard(self, client: NBDClient) -> None:
        """Close a connection in the background (the caller may be unwinding a cancellation)."""
        task = asyncio.get_running_loop().create_task(self._close(client))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def list_contexts(self, nbd_export: str) -> list[str]:
        async with self._leases:
            await self._reserve()
            try:
                return await self._list_contexts(nbd_export)
            finally:
                self._release()

    async def _list_contexts(self, nbd_export: str) -> list[str]:
        try:
            found = await list_meta_contexts(self.uri_for(nbd_export), tls=self.config.tls)
        except UsageError:
            # No structured replies (nbd-server, nbdkit --no-sr): no metadata contexts.
            return []
        if not found:
            # Zero queries means "all contexts" only if the server chooses so (spec: MAY);
            # ask by namespace for the ones the gateway knows about.
            found = await list_meta_contexts(
                self.uri_for(nbd_export), queries=["base:", "qemu:"], tls=self.config.tls
            )
        return list(dict.fromkeys(found))

    def report_failure(self, exc: BaseException) -> None:
        """A connection to this host failed: drop idle connections and start probing."""
        if self._closed or not errors.is_connection_failure(exc):
            return
        self.last_error = str(exc) or type(exc).__name__
        for pool in self.pools:
            pool.drop_idle()
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.get_running_loop().create_task(
                self._probe_loop(), name=f"nbdgw-probe-{self.name}"
            )

    async def check(self) -> bool:
        """Probe the host once now (used at start-up); returns whether it is up.

        Also starts the liveness watch: readiness must follow a dead host without any RPC.
        """
        if self._watch_task is None and self.settings.host_check_interval > 0:
            self._watch_task = asyncio.get_running_loop().create_task(
                self._watch(), name=f"nbdgw-watch-{self.name}"
            )
        try:
            await self._probe_once()
        except Exception as exc:
            if not errors.is_connection_failure(exc):
                # It answered, if only to refuse: it is up.
                await self._set_up(True)
                return True
            self.last_error = str(exc) or type(exc).__name__
            await self._set_up(False)
            self._next_attempt = time.monotonic() + self.settings.backoff_initial
            self.report_failure(exc)
            return False
        await self._set_up(True)
        return True

    async def _probe_once(self) -> None:
        export = self.exports[0] if self.exports else ""
        client = await asyncio.wait_for(
            self.connect(export, ()), timeout=self.settings.connect_timeout
        )
        await self._close(client)

    async def _probe_loop(self) -> None:
        delay = self.settings.backoff_initial
        while not self._closed:
            try:
                await self._probe_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not errors.is_connection_failure(exc):
                    break  # it answered: up (the RPC gets the real error)
                self.last_error = str(exc) or type(exc).__name__
                # Jitter (half to all of the delay) keeps gateways from reconnecting in step.
                wait = delay * (0.5 + random.random() / 2)
                self._next_attempt = time.monotonic() + wait
                await self._set_up(False)
                log.warning("host %s down (%s); retry in %.1fs", self.name, self.last_error, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.settings.backoff_max)
                continue
            break
        if not self._closed:
            await self._set_up(True)

    def _drop_closed_idle(self) -> bool:
        """Discard idle connections the host hung up on; returns whether there were any."""
        found = False
        for pool in self.pools:
            found = pool.drop_closed_idle() or found
        return found

    async def _watch(self) -> None:
        """Every interval: an idle connection the host closed (EOF/reset), or no traffic for
        the whole interval, triggers one probe; a failed probe marks the host down and starts
        the reconnect loop, which marks it up again (readiness follows both ways)."""
        interval = self.settings.host_check_interval
        # Polling idle connections often is cheap (no I/O): the client reads all the time,
        # so a peer's EOF is already recorded in its ``closed`` state.
        tick = min(interval, 0.5)
        last_check = time.monotonic()
        while not self._closed:
            await asyncio.sleep(tick)
            if not self.up or (self._probe_task is not None and not self._probe_task.done()):
                last_check = time.monotonic()
                continue  # the reconnect loop owns the host while it is down
            if self._busy:
                # Traffic in progress: a failure there reports itself, and a probe could
                # wait behind the host's client limit (qemu-nbd -e) and time out wrongly.
                last_check = time.monotonic()
                continue
            hung_up = self._drop_closed_idle()
            now = time.monotonic()
            idle_for = now - max(self.last_used, last_check)
            if not hung_up and idle_for < interval:
                continue
            last_check = now
            try:
                await self._probe_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Only a connection failure means down: a refusal is an answer.
                if errors.is_connection_failure(exc):
                    log.warning("host %s: liveness check failed: %s", self.name, exc)
                    self.report_failure(exc)

    async def _set_up(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        if up:
            log.info("host %s up", self.name)
            self.last_error = ""
        if self._on_change is not None:
            await self._on_change(self)

    async def close(self) -> None:
        self._closed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self._probe_task is not None:
            self._probe_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe_task
        for pool in self.pools:
            await pool.close()


class ExportPool:
    """Idle NBD connections of one export, keyed by their negotiated metadata contexts."""

    def __init__(self, config: ExportConfig, host: Host) -> None:
        self.config = config
        self.host = host
        self.known: KnownExport | None = None
        self._idle: dict[frozenset[str], list[NBDClient]] = {}
        host.pools.append(self)
        if config.nbd_export not in host.exports:
            host.exports.append(config.nbd_export)

    @property
    def name(self) -> str:
        return self.config.name

    def drop_idle(self) -> None:
        idle, self._idle = self._idle, {}
        for clients in idle.values():
            for client in clients:
                self.host.discard(client)

    def drop_closed_idle(self) -> bool:
        """Discard the idle connections the host has closed; returns whether there were any."""
        found = False
        for clients in self._idle.values():
            for client in [c for c in clients if c.closed]:
                clients.remove(client)
                self.host.discard(client)
                found = True
        return found

    def pop_idle(self) -> NBDClient | None:
        """Any idle connection (the host needs room for another)."""
        for clients in self._idle.values():
            if clients:
                return clients.pop(0)  # the oldest
        return None

    async def close(self) -> None:
        idle, self._idle = self._idle, {}
        for clients in idle.values():
            for client in clients:
                await self.host._close(client)

    @contextlib.asynccontextmanager
    async def connection(
        self, contexts: Sequence[str] = (), *, fresh: bool = False
    ) -> AsyncIterator[NBDClient]:
        """Lease a connection with exactly ``contexts`` negotiated (those the host offers).

        Raises GatewayError (UNAVAILABLE) at once while the host is down. A connection whose
        user raised anything is closed rather than reused: it may hold unanswered requests.
        """
        if not self.host.up:
            raise self.host.unavailable(self.name)
        key = frozenset(contexts)
        async with self.host._leases:
            client = None
            idle = self._idle.get(key)
            while idle and not fresh and client is None:
                client = idle.pop()
                if client.closed:  # the host hung up while it was idle
                    self.host.discard(client)
                    client = None
            if client is None:
                try:
                    client = await self.host.connect(self.config.nbd_export, sorted(key))
                except Exception as exc:
                    self.host.report_failure(exc)
                    raise
            self._remember(client)
            self.host._busy += 1
            try:
                yield client
            except BaseException as exc:
                self.host.report_failure(exc)
                self.host.discard(client)
                raise
            finally:
                self.host._busy -= 1
            self.host.last_used = time.monotonic()
            if len(self._idle.setdefault(key, [])) < self.host.settings.max_idle_per_export:
                self._idle[key].append(client)
            else:
                self.host.discard(client)

    async def run(self, contexts: Sequence[str], fn: Callable[[NBDClient], Awaitable[T]]) -> T:
        """Run ``fn`` on a leased connection; if a *reused* connection turns out dead, run it
        once more on a fresh one (an idle connection may have been closed by the host)."""
        key = frozenset(contexts)
        reused = bool(self._idle.get(key))
        try:
            async with self.connection(contexts) as client:
                return await fn(client)
        except Exception as exc:
            if not (reused and errors.is_connection_failure(exc)):
                raise
        async with self.connection(contexts, fresh=True) as client:
            return await fn(client)

    def _remember(self, client: NBDClient) -> None:
        self.known = KnownExport(
            nbd_export_name=client.export_name,
            description=client.description,
            size=client.size,
            flags=client.flags,
            block_size=client.block_size,
            read_only=client.read_only,
            clear_extension=client.clear_extension,
        )


_BACKGROUND: set[asyncio.Task[None]] = set()


def _with_export(uri: NBDURI, export: str) -> NBDURI:
    return uri.replace(export=export)
