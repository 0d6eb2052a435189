"""Observability: Prometheus metrics, the interceptor that feeds them and writes the access log,
JSON-lines logging, and the plaintext HTTP endpoint that serves ``/metrics``.

Metrics (one :class:`Metrics` per gateway, in its own registry, so that tests and several
gateways in one process never share counters). The ``grpc_server_*`` families follow
go-grpc-prometheus, the names dashboards for gRPC services already use:

- ``grpc_server_started_total{grpc_type,grpc_service,grpc_method}``
- ``grpc_server_handled_total{grpc_type,grpc_service,grpc_method,grpc_code}``: every finished
  call, refused ones (UNAUTHENTICATED, RESOURCE_EXHAUSTED...) included;
- ``grpc_server_handling_seconds{grpc_type,grpc_service,grpc_method}``: a histogram, up to the
  last message of a stream;
- ``grpc_server_msg_received_total`` / ``grpc_server_msg_sent_total`` (same labels as started);
- ``nbdgw_extents_streamed_total{export}``: extents sent by StreamExtents;
- ``nbdgw_bytes_streamed_total{export}``: bytes of the disk the sent messages cover (their
  ``next_offset - offset``): how much has been mapped;
- ``nbdgw_data_bytes_streamed_total{export}``: disk data carried by ``include_data`` streams;
- ``nbdgw_nbd_host_up{host}`` (1 up, 0 down), ``nbdgw_nbd_connections{host}`` (open NBD
  connections), ``nbdgw_nbd_reconnects_total{host}`` (times a host came back after being down);
- ``nbdgw_clear_ledger_entries{export}``: byte ranges (merged) recorded in the clear ledger, for
  the scopes loaded since the start;
- ``nbdgw_stream_data_buffered_bytes`` / ``nbdgw_stream_data_budget_bytes`` (StreamExtents data in
  flight, and the most there may be), ``nbdgw_stream_data_waiting_streams``,
  ``nbdgw_stream_data_budget_waits_total``, ``nbdgw_limited_calls_total{limit}`` (calls refused
  or cut by each limit of gateway.security.limits);
- ``nbdgw_token_file_valid`` (0 once a reload of the token file failed closed, until it reads
  well again) and ``nbdgw_token_file_reload_errors_total``;
- ``nbdgw_build_info{version}`` and the client library's ``process_*`` / ``python_*``.

State (hosts, ledger) is read when scraped, from callables the gateway registers, so no code on
the NBD path has to remember to update a gauge.

Access log: one record per finished call on logger ``nbdgw.rpc`` with the fields ``rpc.method``,
``rpc.code``, ``peer``, ``duration_ms`` (and ``identity``, ``rpc.messages_sent``, ``rpc.error``
when known): DEBUG for health checks and reflection (the kubelet probes every few seconds) and
for CANCELLED calls (the client chose to end them), WARNING for codes that say the gateway or a
host failed, INFO otherwise. With
``--log-format json`` (:class:`JsonFormatter`) each record is one JSON object per line with
``ts``, ``level``, ``logger``, ``msg`` and those fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.api.framing import PreparedMessage
from gateway.config import LOG_FORMATS, LOG_LEVELS
from gateway.security.access import CURRENT_IDENTITY, written
from nbdcore.tools.snapshot_cmds import SEPARATOR as SNAPSHOT_SEPARATOR

log = logging.getLogger("nbdgw.observability")
access_log = logging.getLogger("nbdgw.rpc")

# Seconds. StreamExtents calls over big, fragmented disks last minutes: the top buckets say so.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)

# Codes that say the gateway or an NBD host failed (logged as WARNING); the others are the
# caller's business (a bad request, a missing export, a cancelled stream).
SERVER_FAULT_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
# Probes and API discovery: frequent and uninteresting in the access log.
QUIET_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_CODES_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


# --- metrics ----------------------------------------------------------------------------------


class _MethodSeries:
    """One method's bound series: ``labels()`` costs more than the increment itself, so each
    method resolves them once."""

    __slots__ = ("handled", "handled_by_code", "received", "seconds", "sent", "started")

    def __init__(self, metrics: Metrics, labels: tuple[str, str, str]) -> None:
        self.started = metrics.started.labels(*labels)
        self.received = metrics.msg_received.labels(*labels)
        self.sent = metrics.msg_sent.labels(*labels)
        self.seconds = metrics.handling_seconds.labels(*labels)
        self.handled = metrics.handled
        self.handled_by_code: dict[grpc.StatusCode, Any] = {}

    def handled_with(self, labels: tuple[str, str, str], code: grpc.StatusCode) -> Any:
        child = self.handled_by_code.get(code)
        if child is None:
            child = self.handled_by_code[code] = self.handled.labels(*labels, code.name)
        return child


@dataclass(frozen=True)
class HostSample:
    name: str
    up: bool
    connections: int


class _StateCollector(Collector):
    """Gauges read at scrape time from the gateway's own state."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "nbdgw_nbd_host_up", "Whether the NBD host answers (1) or not (0).", labels=["host"]
        )
        conns = GaugeMetricFamily(
            "nbdgw_nbd_connections",
            "NBD connections open to the host (in use or idle).",
            labels=["host"],
        )
        for sample in self.metrics.host_samples():
            up.add_metric([sample.name], 1.0 if sample.up else 0.0)
            conns.add_metric([sample.name], float(sample.connections))
        yield up
        yield conns
        entries = GaugeMetricFamily(
            "nbdgw_clear_ledger_entries",
            "Merged byte ranges in the clear ledger, by export (scopes loaded since start).",
            labels=["export"],
        )
        for export, count in sorted(self.metrics.ledger_entries().items()):
            entries.add_metric([export], float(count))
        yield entries
        limiter = self.metrics.limiter()
        if limiter is not None:  # gateway.security.limits.Limiter
            budget = limiter.budget
            yield GaugeMetricFamily(
                "nbdgw_stream_data_buffered_bytes",
                "StreamExtents data read from hosts and not yet taken by grpc (the budget used).",
                value=float(budget.used),
            )
            yield GaugeMetricFamily(
                "nbdgw_stream_data_budget_bytes",
                "The most StreamExtents data that may be in flight at once (buffered_data_mib).",
                value=float(budget.total),
            )
            yield GaugeMetricFamily(
                "nbdgw_stream_data_waiting_streams",
                "Streams waiting for data budget (others' slow readers hold it).",
                value=float(budget.waiting),
            )
            yield CounterMetricFamily(
                "nbdgw_stream_data_budget_waits",
                "Data messages that had to wait for budget before being read.",
                value=float(budget.waits),
            )
            limited = CounterMetricFamily(
                "nbdgw_limited_calls",
                "Calls refused, cut or cancelled by a limit (gateway.security.limits).",
                labels=["limit"],
            )
            for name, value in (
                ("streams", limiter.refused_streams),
                ("calls", limiter.refused_calls),
                ("unauthenticated", limiter.refused_unauthenticated),
                ("clear_rate", limiter.refused_clears),
                ("stall_timeout", limiter.stalled),
                ("request_timeout", limiter.request_timeouts),
                ("call_timeout", limiter.timed_out),
            ):
                limited.add_metric([name], float(value))
            yield limited
        tokens = self.metrics.tokens()
        if tokens is not None and hasattr(tokens, "reload_errors"):  # a TokenFile
            yield GaugeMetricFamily(
                "nbdgw_token_file_valid",
                "Whether the token file read well at its last reload (0: it failed closed).",
                value=1.0 if tokens.valid else 0.0,
            )
            yield CounterMetricFamily(
                "nbdgw_token_file_reload_errors",
                "Reloads of the token file that could not read every line (each failed closed).",
                value=float(tokens.reload_errors),
            )


class Metrics:
    """The gateway's metrics, in their own registry (``process``: add process_* and python_*)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = False) -> None:
        # The *_created series (counter creation times) double what a scrape carries and no
        # dashboard reads them; this is the client library's process-wide switch.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        call = ["grpc_type", "grpc_service", "grpc_method"]
        self.started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", call, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, whatever their status code.",
            [*call, "grpc_code"],
            registry=r,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its status (the last message of a stream).",
            call,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total", "Request messages received.", call, registry=r
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total", "Response messages sent.", call, registry=r
        )
        self.extents_streamed = Counter(
            "nbdgw_extents_streamed_total", "Extents sent by StreamExtents.", ["export"], registry=r
        )
        # The CSI SnapshotMetadata streams (gateway.api.csi), per method and export.
        self.csi_ranges_streamed = Counter(
            "nbdgw_csi_ranges_streamed_total",
            "BlockMetadata ranges sent by GetMetadataAllocated and GetMetadataDelta.",
            ["grpc_method", "export"],
            registry=r,
        )
        self.bytes_streamed = Counter(
            "nbdgw_bytes_streamed_total",
            "Bytes of the disk covered by StreamExtents messages sent (next_offset - offset).",
            ["export"],
            registry=r,
        )
        self.data_bytes_streamed = Counter(
            "nbdgw_data_bytes_streamed_total",
            "Disk data carried by StreamExtents messages (include_data).",
            ["export"],
            registry=r,
        )
        self.reconnects = Counter(
            "nbdgw_nbd_reconnects_total",
            "Times an NBD host came back up after being down.",
            ["host"],
            registry=r,
        )
        Info("nbdgw_build", "The nbdgw version.", registry=r).info({"version": __version__})
        self._methods: dict[tuple[str, str, str], _MethodSeries] = {}
        self._exports: dict[str, tuple[Any, Any, Any]] = {}
        self._hosts: Callable[[], Iterable[Any]] = tuple
        self._ledger: Callable[[], Any] = lambda: None
        self.tokens: Callable[[], Any] = lambda: None
        self.limiter: Callable[[], Any] = lambda: None
        self._host_up: dict[str, bool] = {}
        r.register(_StateCollector(self))
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    # --- state sources ------------------------------------------------------------------------

    def track_hosts(self, hosts: Callable[[], Iterable[Any]]) -> None:
        """Read NBD hosts (objects with ``name``, ``up`` and ``open_connections``, like
        gateway.hosts.pool.Host) from ``hosts()`` at each scrape."""
        self._hosts = hosts

    def track_ledger(self, ledger: Callable[[], Any]) -> None:
        """Read the clear ledger (gateway.ledger.Ledger, or None) from ``ledger()``."""
        self._ledger = ledger

    def track_tokens(self, tokens: Callable[[], Any]) -> None:
        """Read the bearer tokens (gateway.security.access.TokenFile, or None) from
        ``tokens()``: whether the file read well, and how many reloads failed."""
        self.tokens = tokens

    def track_limiter(self, limiter: Callable[[], Any]) -> None:
        """Read the limits' state (gateway.security.limits.Limiter) from ``limiter()``: the data
        budget in use, streams waiting for it, calls refused or cut by each limit."""
        self.limiter = limiter

    def host_samples(self) -> list[HostSample]:
        samples = []
        for host in list(self._hosts()):
            conns = int(getattr(host, "open_connections", 0))
            samples.append(HostSample(str(host.name), bool(host.up), conns))
        return sorted(samples, key=lambda s: s.name)

    def ledger_entries(self) -> dict[str, int]:
        ledger = self._ledger()
        if ledger is None:
            return {}
        # scope -> merged intervals (IntervalSet), published by the ledger's thread after each
        # commit: what is durably recorded, and what the ledger holds in memory.
        masks = getattr(ledger, "_masks", None)
        if not isinstance(masks, Mapping):
            return {}
        out: dict[str, int] = {}
        for scope, mask in list(masks.items()):  # a copy: the thread may add a scope meanwhile
            export = str(getattr(scope, "export", scope))
            out[export] = out.get(export, 0) + len(mask)
        return out

    def host_changed(self, name: str, up: bool) -> None:
        """A host's state changed (the gateway's callback): count comebacks."""
        was = self._host_up.get(name)
        self._host_up[name] = up
        if up and was is False:
            self.reconnects.labels(name).inc()
        elif not up:
            self.reconnects.labels(name)  # the series exists (at 0) once a host was down

    # --- streamed extents ---------------------------------------------------------------------

    def method_series(self, labels: tuple[str, str, str]) -> _MethodSeries:
        series = self._methods.get(labels)
        if series is None:
            series = self._methods[labels] = _MethodSeries(self, labels)
        return series

    def count_stream_message(self, export: str, message: Any) -> None:
        """A StreamExtentsResponse was sent. Reads of a snapshot (``EXPORT@SNAP``) count under
        their export: every backup takes a new snapshot, and a series per snapshot would grow
        the metrics without end (review L17)."""
        export = export.split(SNAPSHOT_SEPARATOR, 1)[0]
        series = self._exports.get(export)
        if series is None:
            series = self._exports[export] = (
                self.extents_streamed.labels(export),
                self.bytes_streamed.labels(export),
                self.data_bytes_streamed.labels(export),
            )
        extents, covered_bytes, data_bytes = series
        if isinstance(message, PreparedMessage):
            # Serialized by the service, which says what it holds: never parsed back.
            n, covered, data = message.extents, message.covered, message.data_bytes
        else:
            n = len(message.lengths)
            covered = message.next_offset - message.offset
            # Read once: each read of a bytes field copies it (up to 1 MiB per data message).
            data = len(message.data)
        if n:
            extents.inc(n)
        if covered > 0:
            covered_bytes.inc(covered)
        if data:
            data_bytes.inc(data)

    # --- exposition ---------------------------------------------------------------------------

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The metrics as the scraper asked for them (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


# --- the interceptor ----------------------------------------------------------------------------

if TYPE_CHECKING:  # grpc-stubs makes it generic; grpc itself does not
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor

STREAM_EXTENTS = "/nbdgw.v1.BitmapService/StreamExtents"


@functools.cache
def declared_type(method: str) -> str | None:
    """``unary``, ``server_stream``... as the proto declares ``/SERVICE/METHOD``, if the
    default descriptor pool knows it (every service the gateway serves is imported)."""
    service, name = split_method(method)
    try:
        found = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    except KeyError:
        return None
    return _TYPES[(found.client_streaming, found.server_streaming)]


_TYPES = {
    (False, False): "unary",
    (False, True): "server_stream",
    (True, False): "client_stream",
    (True, True): "bidi_stream",
}


def split_method(method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or method


def status_code(value: Any) -> grpc.StatusCode | None:
    """grpc.aio's ``context.code()`` as a StatusCode (it may give an int, or None)."""
    if value is None or isinstance(value, grpc.StatusCode):
        return value
    if isinstance(value, int):
        return _CODES_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


def _export_label(request: Any) -> str:
    name = str(getattr(request, "export", "") or "")
    return name.removeprefix("exports/").split("/", 1)[0] or "unknown"


class InFlight:
    """The calls running now, health and reflection aside (a health Watch lasts as long as
    its watcher), and when the last one ended: a graceful stop waits for them (gateway.drain),
    since a client whose call is running sends its next one the moment it ends."""

    __slots__ = ("count", "last_end")

    def __init__(self) -> None:
        self.count = 0
        self.last_end = float("-inf")  # time.monotonic()

    def start(self) -> None:
        self.count += 1

    def end(self) -> None:
        self.count -= 1
        self.last_end = time.monotonic()


class _Call:
    """One call being observed: labels, clock, message counts; ``finish`` records it."""

    __slots__ = (
        "context",
        "in_flight",
        "labels",
        "method",
        "metrics",
        "sent",
        "series",
        "start",
        "stream_export",
    )

    def __init__(
        self,
        metrics: Metrics | None,
        method: str,
        grpc_type: str,
        context: Any,
        in_flight: InFlight | None = None,
    ):
        self.metrics = metrics
        self.method = method
        self.context = context
        service, name = split_method(method)
        self.labels = (grpc_type, service, name)
        self.sent = 0
        self.stream_export: str | None = None
        self.series = metrics.method_series(self.labels) if metrics is not None else None
        self.start = time.perf_counter()
        if self.series is not None:
            self.series.started.inc()
        self.in_flight = None if method.startswith(QUIET_PREFIXES) else in_flight
        if self.in_flight is not None:
            self.in_flight.start()

    def received(self, n: int = 1) -> None:
        if self.series is not None:
            self.series.received.inc(n)

    def sent_message(self, message: Any) -> None:
        self.sent += 1
        if self.series is None or self.metrics is None:
            return
        self.series.sent.inc()
        if self.stream_export is not None:
            self.metrics.count_stream_message(self.stream_export, message)

    def finish(self, exc: BaseException | None) -> None:
        if self.in_flight is not None:
            self.in_flight.end()
            self.in_flight = None  # once, whatever path ends the call
        code = self._code(exc)
        elapsed = time.perf_counter() - self.start
        if self.series is not None:
            self.series.handled_with(self.labels, code).inc()
            self.series.seconds.observe(elapsed)
        self._log(code, elapsed, exc)

    def _code(self, exc: BaseException | None) -> grpc.StatusCode:
        try:
            code = status_code(self.context.code())
        except Exception:  # a context without code() (not grpc.aio's)
            code = None
        if code is not None:
            return code
        if exc is None:
            return grpc.StatusCode.OK
        if isinstance(exc, asyncio.CancelledError):
            return grpc.StatusCode.CANCELLED  # the client went away (or the server stopped)
        if type(exc).__name__ == "ExecuteBatchError":
            # grpc's failed context.write: the client went away while a message was sent.
            return grpc.StatusCode.CANCELLED
        return grpc.StatusCode.UNKNOWN  # what grpc answers for an unhandled exception

    def _log(self, code: grpc.StatusCode, elapsed: float, exc: BaseException | None) -> None:
        if self.method.startswith(QUIET_PREFIXES) and code == grpc.StatusCode.OK:
            level = logging.DEBUG
        elif code == grpc.StatusCode.CANCELLED:
            level = logging.DEBUG  # the client's choice (or it went away): nothing to act on
        elif code in SERVER_FAULT_CODES:
            level = logging.WARNING
        else:
            level = logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "rpc.method": self.method,
            "rpc.code": code.name,
            "peer": _peer(self.context),
            "duration_ms": round(elapsed * 1000, 3),
        }
        if self.labels[0] != "unary":
            fields["rpc.messages_sent"] = self.sent
        identity = _identity()
        if identity is not None:
            fields["identity"] = identity
        if code != grpc.StatusCode.OK:
            error = _details(self.context)
            if not error and exc is not None and not isinstance(exc, asyncio.CancelledError):
                error = f"{type(exc).__name__}: {exc}"
            if error:
                fields["rpc.error"] = error
        access_log.log(
            level,
            "%s %s %.1fms",
            self.method,
            code.name,
            elapsed * 1000,
            extra=fields,  # no traceback: grpc logs the servicer's exception itself
        )


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:
        return ""


def _details(context: Any) -> str:
    try:
        details = context.details()
    except Exception:
        return ""
    if isinstance(details, bytes):
        return details.decode(errors="replace")
    return str(details or "")


def _identity() -> str | None:
    """The caller, once gateway.security.access authenticated it (in this call's context)."""
    identity = CURRENT_IDENTITY.get()
    return None if identity is None else identity.name


class _CountingContext:
    """A servicer context whose ``write`` reports each message; everything else is the call's."""

    def __init__(self, context: Any, call: _Call) -> None:
        self._context = context
        self._call = call

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._call.sent_message(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class ObservabilityInterceptor(_Interceptor):
    """Counts, times and logs every call, streams included. Put it first in the server's
    interceptor list so that it also sees the calls later interceptors refuse."""

    def __init__(self, metrics: Metrics | None = None, in_flight: InFlight | None = None) -> None:
        self.metrics = metrics
        self.in_flight = in_flight

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:  # grpc answers UNIMPLEMENTED; no label for unknown names
            return handler
        wrapped: grpc.RpcMethodHandler[Any, Any] = self._wrap(details.method, handler)
        return wrapped

    def _wrap(self, method: str, handler: Any) -> Any:
        metrics = self.metrics
        kinds = (
            ("unary_unary", "unary", False, False),
            ("unary_stream", "server_stream", False, True),
            ("stream_unary", "client_stream", True, False),
            ("stream_stream", "bidi_stream", True, True),
        )
        for kind, grpc_type, streaming_request, streaming_response in kinds:
            inner = getattr(handler, kind)
            if inner is None:
                continue
            # The label is the method's declared type: gateway.security.access refuses calls
            # whose headers fail with a request-streaming handler (not to wait for a body).
            grpc_type = declared_type(method) or grpc_type
            if streaming_response:
                behaviour = _wrap_streaming(
                    metrics, method, grpc_type, inner, streaming_request, self.in_flight
                )
            else:
                behaviour = _wrap_unary(
                    metrics, method, grpc_type, inner, streaming_request, self.in_flight
                )
            factory = getattr(grpc, f"{kind}_rpc_method_handler")
            return factory(
                behaviour,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _counted_requests(call: _Call, requests: Any, method: str = "") -> Any:
    if not hasattr(requests, "__aiter__"):
        return requests

    async def counted() -> AsyncIterator[Any]:
        async for item in requests:
            call.received()
            # StreamExtents runs request-streaming (gateway.security.access.receiving).
            if method == STREAM_EXTENTS and call.stream_export is None:
                call.stream_export = _export_label(item)
            yield item

    return counted()


def _wrap_unary(
    metrics: Metrics | None,
    method: str,
    grpc_type: str,
    inner: Any,
    streaming_request: bool,
    in_flight: InFlight | None = None,
) -> Any:
    async def behaviour(request: Any, context: Any) -> Any:
        call = _Call(metrics, method, grpc_type, context, in_flight)
        if streaming_request:
            request = _counted_requests(call, request)
        else:
            call.received()
        try:
            response = inner(request, context)
            if inspect.isawaitable(response):
                response = await response
        except BaseException as exc:
            call.finish(exc)
            raise
        if response is not None:
            call.sent_message(response)
        call.finish(None)
        return response

    return behaviour


def _wrap_streaming(
    metrics: Metrics | None,
    method: str,
    grpc_type: str,
    inner: Any,
    streaming_request: bool,
    in_flight: InFlight | None = None,
) -> Any:
    def begin(request: Any, context: Any) -> tuple[_Call, Any]:
        call = _Call(metrics, method, grpc_type, context, in_flight)
        if streaming_request:
            request = _counted_requests(call, request, method)
        else:
            call.received()
            if method == STREAM_EXTENTS:
                call.stream_export = _export_label(request)
        return call, request

    if inspect.isasyncgenfunction(inner):
        # A yielding servicer is driven here, each message written with context.write, and
        # closed before the call ends. Left to grpc, a generator whose client went away is
        # closed later, by the garbage collector: its clean-up then asked grpc about a call
        # grpc had freed (context.peer(), .code()), which crashed the process (SIGSEGV).
        inner = written(inner)

    async def writer(request: Any, context: Any) -> None:
        call, request = begin(request, context)
        try:
            result = inner(request, _CountingContext(context, call))
            if inspect.isawaitable(result):
                await result
        except BaseException as exc:
            call.finish(exc)
            raise
        call.finish(None)

    return writer


# --- logging ------------------------------------------------------------------------------------

# Attributes every LogRecord has: not "extra" fields.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (RFC 3339, UTC, milliseconds), ``level``, ``logger``,
    ``msg``, then every ``extra`` field under its own name (``rpc.method``, ``peer``...), and
    ``exc`` (the traceback) when there is one. Values JSON cannot hold become strings."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic line, with the access log's fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = [
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RECORD_ATTRS and not k.startswith("_") and k not in _SHOWN_IN_MSG
        ]
        return f"{line} {' '.join(extra)}" if extra else line


# The access log's message already says these.
_SHOWN_IN_MSG = frozenset({"rpc.method", "rpc.code", "duration_ms"})


def configure_logging(
    fmt: str = "text", level: str | int = "warning", stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) as text or JSON lines, at ``level`` and
    above. Replaces the handlers of the root logger (one process, one log format)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(LOG_FORMATS)}")
    if isinstance(level, str):
        if level.lower() not in LOG_LEVELS:
            raise ValueError(f"log level {level!r}: expected one of {', '.join(LOG_LEVELS)}")
        level = getattr(logging, level.upper())
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


# --- the /metrics endpoint --------------------------------------------------------------------

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 10.0


class MetricsServer:
    """A plaintext HTTP/1.1 endpoint: ``GET /metrics`` (Prometheus text, or OpenMetrics when
    the scraper asks for it); one request per connection. Runs on the event loop, so the
    collectors read the gateway's state between two of its steps, never during one."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on (host, port); returns the bound port."""
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=1)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, headers, body = await asyncio.wait_for(
                self._answer(reader), timeout=REQUEST_TIMEOUT
            )
            head = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers)]
            head += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(head).encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a slow or vanished scraper: nothing to answer
        except Exception:
            log.exception("metrics endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _plain("431 Request Header Fields Too Large")
        if len(raw) > MAX_REQUEST_HEAD:
            return _plain("431 Request Header Fields Too Large")
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return _plain("400 Bad Request")
        verb, target, _ = parts
        headers = dict(_header_lines(lines[1:]))
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/metrics/"):
            return _plain("404 Not Found", "nbdgw: metrics are at /metrics\n")
        if verb != "GET":
            status, headers_out, body = _plain("405 Method Not Allowed")
            return status, [*headers_out, ("Allow", "GET")], body
        body, content_type = self.metrics.exposition(headers.get("accept"))
        return "200 OK", [("Content-Type", content_type)], body


def _header_lines(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            yield name.strip().lower(), value.strip()


def _plain(status: str, text: str = "") -> tuple[str, list[tuple[str, str]], bytes]:
    return status, [("Content-Type", "text/plain; charset=utf-8")], (text or status + "\n").encode()
