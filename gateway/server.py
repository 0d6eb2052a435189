"""Building and running the gateway: the grpc.aio server with the BitmapService, health and
reflection, the NBD hosts and their pools, the embedded nbdcore host, and graceful shutdown.

Health (grpc.health.v1) service names:

- ``""``: liveness; SERVING while the process runs (NOT_SERVING once shutting down).
- ``nbdgw.v1.BitmapService``: readiness; SERVING while every NBD host is up.
- ``exports/{export}``: SERVING while that export's host is up; on the API port only for
  callers that may GetExport it (gateway.security.access), never on the plaintext health port.

The gateway serves as soon as it listens; each host is probed in the background, and is not
"up" for readiness before its first probe ends (a host that stalls at its greeting delays
nothing else). Only a QMP host's first probe is awaited: it recovers the host's snapshots.

Shutdown (SIGTERM/SIGINT, or :meth:`Gateway.stop`): every health status turns NOT_SERVING, open
StreamExtents calls end at their next message boundary with UNAVAILABLE
(GATEWAY_SHUTTING_DOWN) carrying their resume position, new calls are answered the same until
they stop coming (gateway.drain: grpc would cancel them), then the server stops with a grace
period for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME

from gateway.api.bitmaps import Backend, BitmapServicer
from gateway.api.csi import IdentityServicer, SnapshotMetadataServicer
from gateway.api.framing import add_bitmap_service
from gateway.api.health import HealthServicer
from gateway.api.reflection import enable_server_reflection
from gateway.api.snapshots import SnapshotServicer
from gateway.config import (
    EMBEDDED_HOST,
    ConfigError,
    GatewayConfig,
    HostConfig,
    ensure_data_dir,
    parse_listen,
)
from gateway.drain import Drain
from gateway.hosts.libvirt import LibvirtHost, discover_disks
from gateway.hosts.libvirt_snapshots import LibvirtSnapshots
from gateway.hosts.pool import ExportPool, Host
from gateway.hosts.qmp import QmpHost
from gateway.hosts.qmp_snapshots import QmpSnapshots
from gateway.hosts.snapshots import Snapshots
from gateway.ledger import Ledger
from gateway.observability import InFlight, Metrics, MetricsServer, ObservabilityInterceptor
from gateway.security.access import AccessInterceptor, Authenticator, OverallHealthInterceptor
from gateway.security.certs import CertificateError, CertificateReloader
from gateway.security.limits import Limiter
from nbdcore.aio.server import ExportConfig as NBDExportConfig
from nbdcore.aio.server import NBDServer, stale_unix_socket
from nbdcore.memory import give_back_freed_memory, keep_freed_memory
from nbdcore.storage.image import Image
from nbdcore.uri import NBDURI
from nbdgw.csi.v1 import csi_pb2 as csi_pb
from nbdgw.csi.v1 import csi_pb2_grpc as csi_grpc
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc

log = logging.getLogger("nbdgw.server")

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["BitmapService"].full_name
SNAPSHOT_SERVICE_NAME: str = spb.DESCRIPTOR.services_by_name["SnapshotService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

MiB = 1024 * 1024

# How often the gateway looks whether streams ended (and memory can be given back), and the
# longest it waits for every stream to end before trimming anyway.
TRIM_CHECK_INTERVAL = 2.0
TRIM_MAX_WAIT = 30.0


GRPC_OPTIONS: list[tuple[str, Any]] = [
    # Clients of long streams keep connections alive with pings; let them, within reason.
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.max_receive_message_length", 4 * MiB),
    # grpc sets SO_REUSEPORT by default: a second gateway on the same port would silently
    # share it (and half the calls). Fail instead.
    ("grpc.so_reuseport", 0),
    # Streams per HTTP/2 connection (SETTINGS_MAX_CONCURRENT_STREAMS): one client connection
    # cannot open many thousands of calls (each pins memory) before any limit of ours sees
    # them. Not lower: a client that opens a burst before it has read the server's SETTINGS
    # gets REFUSED_STREAM (UNAVAILABLE) for the calls over it (128 failed 143 of a burst of
    # 400 in test_security_load).
    ("grpc.max_concurrent_streams", 1024),
]


def check_bindable(host: str, port: int, listen: str) -> None:
    """Fail with one clear OSError if ``host:port`` cannot be bound, before grpc tries: grpc's C
    core would print a line of its own to stderr and raise a RuntimeError with no errno."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return  # grpc resolves names its own way: let it report them
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as grpc binds
        try:
            probe.bind(address)
        except OSError as exc:
            hint = "; another process has it: stop it or choose another port"
            raise OSError(
                exc.errno,
                f"cannot listen on {listen}: {exc.strerror}"
                + (hint if exc.errno == errno.EADDRINUSE else ""),
            ) from None


def health_name(export: str) -> str:
    return f"exports/{export}"


@dataclass
class Listening:
    """Where the gateway ended up listening."""

    host: str
    port: int
    nbd_socket: str | None
    health_port: int | None = None
    metrics_port: int | None = None
    csi_socket: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# The CSI sidecar's probes: answered (not ready) while the gateway drains, as health checks.
CSI_IDENTITY = f"/{csi_pb.DESCRIPTOR.services_by_name['Identity'].full_name}/"


class Gateway:
    """The whole gateway. ``await start()``, then ``await stop()`` (or ``await serve()``)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.images: dict[str, Image] = {}
        self.hosts: dict[str, Host] = {}
        self.pools: dict[str, ExportPool] = {}
        self.nbd_server: NBDServer | None = None
        self.health = HealthServicer(self._export_health)
        self.shutdown = asyncio.Event()
        # The API port's calls and the CSI socket's, each counted while they run.
        self.in_flight, self.csi_in_flight = InFlight(), InFlight()
        self.drain = Drain(self.shutdown, self.in_flight)
        self.csi_drain = Drain(self.shutdown, self.csi_in_flight, open_prefixes=(CSI_IDENTITY,))
        self.backend = Backend(
            self.pools, self.images, self.shutdown, embedded=lambda: self.nbd_server
        )
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.csi_server: grpc.aio.Server | None = None
        self.certificates: CertificateReloader | None = None  # gRPC TLS files, reloaded
        self.limiter = Limiter(config.limits)
        self._host_checks: list[asyncio.Task[None]] = []
        self._checked: set[str] = set()  # hosts probed once since the start
        self.listening: Listening | None = None
        self._stopped = asyncio.Event()
        # Metrics read the hosts and the ledger when scraped (gateway.observability).
        self.metrics = Metrics(process=True)
        self.metrics.track_hosts(lambda: list(self.hosts.values()))
        self.metrics.track_ledger(lambda: getattr(self.backend, "ledger", None))
        self.metrics.track_tokens(lambda: self.config.tokens)
        self.metrics.track_limiter(lambda: self.limiter)
        self.metrics_server: MetricsServer | None = None
        self.snapshots = Snapshots(self)
        self.qmp_snapshots = QmpSnapshots(self)
        self.snapshots.qmp = self.qmp_snapshots
        self.libvirt_snapshots = LibvirtSnapshots(self)
        self.snapshots.libvirt = self.libvirt_snapshots

    async def _add_libvirt_host(self, host_cfg: HostConfig) -> None:
        cfg = self.config
        if host_cfg.all_disks:  # every disk of the domain: exports DOMAIN-DISK
            try:
                disks = await discover_disks(host_cfg)
            except Exception as exc:
                raise ConfigError(
                    f"host {host_cfg.name}: cannot list the disks of libvirt domain"
                    f" {host_cfg.domain} ({exc}); name them in [[exports]] instead"
                ) from None
            for disk in disks:
                name = f"{host_cfg.domain}-{disk.target}"
                if name not in cfg.exports:
                    cfg.add_libvirt_export(
                        name, host_cfg.libvirt or "", host_cfg.domain or "", disk.target,
                        host=host_cfg.name,
                    )  # fmt: skip
        host = LibvirtHost(host_cfg, cfg, self._host_changed, folder=cfg.data_dir / "libvirt")
        self.libvirt_snapshots.attach(host)
        self.hosts[host_cfg.name] = host

    async def start(self) -> Listening:
        cfg = self.config
        nbd_socket = None
        if cfg.uses_embedded:
            try:
                nbd_socket = await self._start_embedded()
            except BaseException:
                await self._close_backends()  # the images it opened
                raise
        for host_cfg in cfg.hosts.values():
            uri = host_cfg.uri
            if host_cfg.qmp:
                qmp_host = QmpHost(host_cfg, cfg, self._host_changed, folder=cfg.data_dir / "qmp")
                self.qmp_snapshots.attach(qmp_host)
                self.hosts[host_cfg.name] = qmp_host
                continue
            if host_cfg.libvirt:
                await self._add_libvirt_host(host_cfg)
                continue
            if host_cfg.name == EMBEDDED_HOST:
                uri = NBDURI(scheme="nbd+unix", socket=nbd_socket)
            self.hosts[host_cfg.name] = Host(host_cfg, cfg, self._host_changed, uri=uri)
        for export in cfg.exports.values():
            self.pools[export.name] = ExportPool(export, self.hosts[export.host])
        self.snapshots.restore()  # snapshots the embedded images kept across a restart
        # The ledger file is created only once some export needs it (a generation in the
        # configuration, or SetExportGeneration later); an existing one is always read.
        foreign = [e for e in cfg.exports.values() if e.host != EMBEDDED_HOST]
        if foreign and (cfg.ledger_file.exists() or any(e.generation for e in foreign)):
            await self._open_ledger()
        self.backend.open_ledger = self._open_ledger if foreign else None

        await self.health.set("", SERVING)
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        for name in self.pools:
            await self.health.set(health_name(name), NOT_SERVING)
        # Serve at once and probe the hosts in the background: a host that stalls at its
        # greeting delayed the start of every export by the connect timeout. Until its first
        # probe ends a host's exports are NOT_SERVING (a down host keeps being retried).
        self._host_checks = [
            asyncio.create_task(self._first_check(host), name=f"nbdgw-first-check-{host.name}")
            for host in self.hosts.values()
        ]
        # Except a host whose first probe restores what calls will ask about (a QMP host's
        # snapshots): serving before it would answer from state not yet recovered.
        await asyncio.gather(
            *(
                task
                for host, task in zip(self.hosts.values(), self._host_checks, strict=True)
                if host.first_probe_restores_state
            )
        )

        metrics_port = None
        if cfg.metrics_listen:
            metrics_port = await self._start_metrics_server(cfg.metrics_listen)
        self.limiter = Limiter(cfg.limits)  # shared with the plaintext health port
        access = AccessInterceptor(
            Authenticator(cfg.tokens, client_certificates=bool(cfg.grpc_tls_client_ca_file)),
            cfg.policy,
            self.limiter,
        )
        interceptors = [ObservabilityInterceptor(self.metrics, self.in_flight), self.drain, access]
        server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        # StreamExtents sends data messages it serialized itself (gateway.api.framing).
        add_bitmap_service(BitmapServicer(self.backend), server)
        spb_grpc.add_SnapshotServiceServicer_to_server(SnapshotServicer(self.snapshots), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        if cfg.reflection:
            # grpc.reflection.v1 and v1alpha (gateway.api.reflection).
            enable_server_reflection(
                (SERVICE_NAME, SNAPSHOT_SERVICE_NAME, HEALTH_SERVICE_NAME), server
            )
        host, port = parse_listen(cfg.listen)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            check_bindable(host, port, cfg.listen)
        except OSError:
            await self._close_backends()
            raise
        try:
            credentials = self._server_credentials()
            if credentials is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc's way of saying the bind failed
            bound = 0
            why = str(exc)
        except ConfigError:
            await self._close_backends()
            raise
        else:
            why = "address in use or not available"
        if bound == 0:
            await self._close_backends()
            raise OSError(errno.EADDRINUSE, f"cannot listen on {cfg.listen}: {why}")
        await server.start()
        self.server = server
        self.listening = Listening(host, bound, nbd_socket, metrics_port=metrics_port)
        if cfg.health_listen:
            self.listening.health_port = await self._start_health_server(cfg.health_listen)
        if cfg.csi_socket:
            self.listening.csi_socket = await self._start_csi_server(cfg.csi_socket)
        log.info("gateway listening on %s", self.listening.address)
        return self.listening

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        cfg = self.config
        if not cfg.grpc_tls_cert_file and not cfg.grpc_tls_key_file:
            return None
        if not (cfg.grpc_tls_cert_file and cfg.grpc_tls_key_file):
            raise ConfigError("gRPC TLS needs both a certificate and a key file")
        try:
            self.certificates = CertificateReloader(
                cfg.grpc_tls_cert_file, cfg.grpc_tls_key_file, cfg.grpc_tls_client_ca_file
            )
        except CertificateError as exc:
            raise ConfigError(str(exc)) from None
        # Renewed certificate files are picked up at the next TLS handshake, without a restart.
        return self.certificates.credentials()

    async def _start_health_server(self, listen: str) -> int:
        """A plaintext port with only grpc.health.v1 (the same statuses as the main port).
        Its calls are counted in the same metrics (and logged at DEBUG, as health checks on
        the main port are): the kubelet's probes show up in grpc_server_handled_total."""
        host, port = parse_listen(listen)
        interceptors = [
            ObservabilityInterceptor(self.metrics),
            OverallHealthInterceptor(self.limiter),
        ]
        server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        check_bindable(host, port, listen)
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {listen}: {exc}") from None
        await server.start()
        self.health_server = server
        return bound

    async def _start_csi_server(self, path: str) -> str:
        """csi.v1.Identity and csi.v1.SnapshotMetadata on a unix socket (gateway.api.csi), for
        the external-snapshot-metadata sidecar of the same pod. No tokens: who may call is who
        may open the socket; the sidecar authenticates the Kubernetes callers itself. Calls are
        counted and logged like those of the main port."""
        sock = path
        # A socket left by a run that was killed is replaced; one a live server (another
        # gateway) still answers on is not ours to take.
        if not stale_unix_socket(sock):
            raise OSError(
                errno.EADDRINUSE,
                f"cannot listen on the CSI socket {sock}: another process answers on it, or it"
                " is not a socket",
            )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
        server = grpc.aio.server(
            options=GRPC_OPTIONS,
            interceptors=[
                ObservabilityInterceptor(self.metrics, self.csi_in_flight),
                self.csi_drain,
            ],
        )
        csi_grpc.add_IdentityServicer_to_server(IdentityServicer(self), server)
        csi_grpc.add_SnapshotMetadataServicer_to_server(SnapshotMetadataServicer(self), server)
        try:
            bound = server.add_insecure_port(f"unix:{sock}")
        except RuntimeError as exc:
            bound = 0
            why = str(exc)
        else:
            why = "cannot bind it"
        if bound == 0:
            await server.stop(0)
            raise OSError(errno.EADDRNOTAVAIL, f"cannot serve CSI on {sock}: {why}")
        await server.start()
        self.csi_server = server
        log.info("CSI SnapshotMetadata on unix:%s", sock)
        return sock

    async def _start_embedded(self) -> str:
        cfg = self.config
        exports = []
        for export in cfg.exports.values():
            if export.host != EMBEDDED_HOST:
                continue
            assert export.image is not None
            image = Image.open(export.image, read_only=export.read_only)
            if image.writer_active and image.bitmaps:
                log.warning(
                    "export %s: %s is open for writing by another process; its bitmaps are"
                    " served as they were at the start and miss that process's later writes"
                    " (incremental backups would miss them)",
                    export.name,
                    export.image,
                )
            self.images[export.name] = image
            exports.append(
                NBDExportConfig(
                    name=export.nbd_export,
                    image=image,
                    description=export.description,
                    read_only=export.read_only,
                )
            )
        ensure_data_dir(cfg.data_dir)
        sock = str((cfg.data_dir / "nbd.sock").absolute())
        self.nbd_server = NBDServer(exports)
        # Mode 0600; a socket left by a killed run is replaced, a live gateway's never is.
        await self.nbd_server.start_unix(sock)
        log.info("embedded NBD host on %s", sock)
        return sock

    async def _open_ledger(self) -> Ledger:
        """The clear ledger for exports of hosts that cannot clear (gateway.ledger)."""
        if self.backend.ledger is not None:
            return self.backend.ledger
        cfg = self.config
        ledger = await Ledger.open(
            cfg.ledger_file,
            synchronous=cfg.ledger_synchronous,
            max_intervals=cfg.ledger_max_intervals,
        )
        if self.backend.ledger is not None:  # opened meanwhile by a concurrent call
            await ledger.aclose()
            return self.backend.ledger
        self.backend.ledger = ledger
        for export in cfg.exports.values():
            if export.generation is not None:
                current = await ledger.apply_config_generation(export.name, export.generation)
                if current != export.generation:
                    log.info(
                        "export %s: generation %r (set through the API) replaces the"
                        " configured %r until the configuration changes",
                        export.name,
                        current,
                        export.generation,
                    )
        return ledger

    async def _start_metrics_server(self, listen: str) -> int:
        """The plaintext /metrics port (before the gRPC port, so a failure stops nothing)."""
        host, port = parse_listen(listen)
        server = MetricsServer(self.metrics)
        try:
            bound = await server.start(host, port)
        except OSError as exc:
            await self._close_backends()
            raise OSError(
                exc.errno, f"cannot listen on {listen} (metrics): {exc.strerror}"
            ) from None
        self.metrics_server = server
        return bound

    async def _host_changed(self, host: Host) -> None:
        self.metrics.host_changed(host.name, host.up)
        await self._update_health()

    def _export_health(self, export: str) -> health_pb2.HealthCheckResponse.ServingStatus | None:
        """What health says of ``exports/{export}`` before it has a status of its own (a
        snapshot's export, until the next change); None: no such export."""
        pool = self.pools.get(export)
        if pool is None:
            return None
        return SERVING if self._ready(pool.host) and not self.shutdown.is_set() else NOT_SERVING

    async def _first_check(self, host: Host) -> None:
        await host.check()
        self._checked.add(host.name)
        await self._update_health()

    async def hosts_checked(self) -> None:
        """Wait until every host has been probed once (start() does not)."""
        await asyncio.gather(*self._host_checks, return_exceptions=True)

    def _ready(self, host: Host) -> bool:
        return host.up and host.name in self._checked

    async def _update_health(self) -> None:
        # A copy: snapshots add and remove exports while this awaits (gateway.hosts.snapshots).
        for name, pool in list(self.pools.items()):
            status = SERVING if self._ready(pool.host) else NOT_SERVING
            await self.health.set(health_name(name), status)
        ready = all(self._ready(host) for host in self.hosts.values())
        await self.health.set(SERVICE_NAME, SERVING if ready else NOT_SERVING)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, streams end with their resume position, then stop."""
        if self.shutdown.is_set():
            await self._stopped.wait()
            return
        self.shutdown.set()
        grace = self.config.grace_period if grace is None else grace
        try:
            await self.health.enter_graceful_shutdown()
            # New calls are refused UNAVAILABLE until they stop coming and the running ones
            # have ended (gateway.drain), half the grace at most.
            settled = await asyncio.gather(
                self.drain.settle(grace / 2), self.csi_drain.settle(grace / 2)
            )
            refused = self.drain.refused + self.csi_drain.refused
            if refused:
                log.info("refused %d new calls while stopping (%.2fs)", refused, max(settled))
            grace = max(0.0, grace - max(settled))
            if self.server is not None:
                await self.server.stop(grace)
            if self.health_server is not None:
                await self.health_server.stop(0)
            if self.csi_server is not None:
                # Its streams end at their next message with a resume offset (gateway.api.csi).
                await self.csi_server.stop(grace)
            if self.metrics_server is not None:
                await self.metrics_server.close()
            await self._close_backends()
        finally:
            self._stopped.set()

    async def _close_backends(self) -> None:
        for task in self._host_checks:
            task.cancel()
        await asyncio.gather(*self._host_checks, return_exceptions=True)
        for host in self.hosts.values():
            await host.close()
        self.hosts.clear()
        if self.nbd_server is not None:
            await self.nbd_server.close()
            self.nbd_server = None
        for image in self.images.values():
            image.close()
        self.images.clear()
        if self.backend.ledger is not None:
            await self.backend.ledger.aclose()
            self.backend.ledger = None

    async def serve(self, on_ready: Any = None) -> None:
        """Start, run until SIGTERM/SIGINT, stop gracefully."""
        keep_freed_memory()  # this is the gateway process: tune its allocator once
        trimmer = asyncio.create_task(self._give_back_memory(), name="nbdgw-trim")
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            listening = await self.start()
            if on_ready is not None:
                on_ready(listening)
            # Not server.wait_for_termination(): cancelling it breaks a later server.stop().
            await stop.wait()
            log.info("shutting down (grace %.1fs)", self.config.grace_period)
        finally:
            trimmer.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def _give_back_memory(self) -> None:
        """Give freed stream buffers back to the system once streams have ended: at once when
        none is left running, else at most every TRIM_MAX_WAIT seconds (a trim while streams
        run makes them page-fault their buffers in again)."""
        seen = self.limiter.ended_streams
        clock = asyncio.get_running_loop().time
        last = clock()
        while True:
            await asyncio.sleep(TRIM_CHECK_INTERVAL)
            ended = self.limiter.ended_streams
            if ended == seen:
                continue
            if self.limiter.streams and clock() - last < TRIM_MAX_WAIT:
                continue
            seen, last = ended, clock()
            give_back_freed_memory()
