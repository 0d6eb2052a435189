"""gateway.observability on its own: the interceptor over a real grpc.aio server (unary and
streaming calls, every way a call can end), the JSON log formatter, and the /metrics endpoint
over a real socket."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import observability
from gateway.observability import (
    JsonFormatter,
    Metrics,
    MetricsServer,
    ObservabilityInterceptor,
    configure_logging,
)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, parsed back: (name, labels) -> value."""
    text = metrics.exposition()[0].decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


# --- a small service behind the interceptor -----------------------------------------------------


async def _ok(request: bytes, context: Any) -> bytes:
    return b"pong:" + request


async def _not_found(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    raise AssertionError("unreachable")


async def _crash(request: bytes, context: Any) -> bytes:
    raise RuntimeError("servicer bug")


async def _set_code(request: bytes, context: Any) -> bytes:
    context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
    context.set_details("not now")
    return b""


async def _write_stream(request: bytes, context: Any) -> None:
    for _ in range(int(request)):
        await context.write(b"x")


async def _yield_then_fail(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(int(request)):
        yield b"y"
    await context.abort(grpc.StatusCode.UNAVAILABLE, "host lost")


async def _slow_stream(request: bytes, context: Any) -> None:
    await context.write(b"first")
    await asyncio.sleep(60)


def _ident(b: bytes) -> bytes:
    return b


HANDLERS = {
    "Ok": grpc.unary_unary_rpc_method_handler(_ok, _ident, _ident),
    "NotFound": grpc.unary_unary_rpc_method_handler(_not_found, _ident, _ident),
    "Crash": grpc.unary_unary_rpc_method_handler(_crash, _ident, _ident),
    "SetCode": grpc.unary_unary_rpc_method_handler(_set_code, _ident, _ident),
    "Write": grpc.unary_stream_rpc_method_handler(_write_stream, _ident, _ident),
    "Yield": grpc.unary_stream_rpc_method_handler(_yield_then_fail, _ident, _ident),
    "Slow": grpc.unary_stream_rpc_method_handler(_slow_stream, _ident, _ident),
}


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_records() -> Iterator[Records]:
    handler = Records()
    logger = logging.getLogger("nbdgw.rpc")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, grpc.aio.Channel]]:
    metrics = Metrics()
    server = grpc.aio.server(interceptors=[ObservabilityInterceptor(metrics)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.v1.Test", HANDLERS),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield metrics, channel
    await channel.close()
    await server.stop(0)


async def _unary(channel: grpc.aio.Channel, method: str, body: bytes = b"") -> Any:
    call = channel.unary_unary(f"/t.v1.Test/{method}")
    try:
        return await call(body)
    except grpc.aio.AioRpcError as err:
        return err.code()


async def _stream(channel: grpc.aio.Channel, method: str, body: bytes) -> tuple[list[bytes], Any]:
    got: list[bytes] = []
    try:
        async for item in channel.unary_stream(f"/t.v1.Test/{method}")(body):
            got.append(item)
    except grpc.aio.AioRpcError as err:
        return got, err.code()
    return got, grpc.StatusCode.OK


async def test_unary_calls_counted_by_code(served, access_records: Records) -> None:
    metrics, channel = served
    assert await _unary(channel, "Ok", b"a") == b"pong:a"
    assert await _unary(channel, "Ok", b"b") == b"pong:b"
    assert await _unary(channel, "NotFound") == grpc.StatusCode.NOT_FOUND
    assert await _unary(channel, "Crash") == grpc.StatusCode.UNKNOWN
    assert await _unary(channel, "SetCode") == grpc.StatusCode.FAILED_PRECONDITION

    labels = {"grpc_type": "unary", "grpc_service": "t.v1.Test"}
    handled = "grpc_server_handled_total"
    assert value(metrics, handled, **labels, grpc_method="Ok", grpc_code="OK") == 2
    assert value(metrics, handled, **labels, grpc_method="NotFound", grpc_code="NOT_FOUND") == 1
    assert value(metrics, handled, **labels, grpc_method="Crash", grpc_code="UNKNOWN") == 1
    assert (
        value(metrics, handled, **labels, grpc_method="SetCode", grpc_code="FAILED_PRECONDITION")
        == 1
    )
    assert value(metrics, handled, **labels, grpc_method="Ok", grpc_code="UNKNOWN") is None
    assert value(metrics, "grpc_server_started_total", **labels, grpc_method="Ok") == 2
    assert value(metrics, "grpc_server_msg_received_total", **labels, grpc_method="Ok") == 2
    assert value(metrics, "grpc_server_msg_sent_total", **labels, grpc_method="Ok") == 2
    assert value(metrics, "grpc_server_msg_sent_total", **labels, grpc_method="NotFound") == 0
    count = value(metrics, "grpc_server_handling_seconds_count", **labels, grpc_method="Ok")
    inf = value(
        metrics, "grpc_server_handling_seconds_bucket", **labels, grpc_method="Ok", le="+Inf"
    )
    assert count == inf == 2

    by_method = {r.__dict__["rpc.method"]: r for r in access_records.records}
    crash = by_method["/t.v1.Test/Crash"]
    assert crash.levelno == logging.WARNING
    assert crash.__dict__["rpc.code"] == "UNKNOWN"
    assert "servicer bug" in crash.__dict__["rpc.error"]
    not_found = by_method["/t.v1.Test/NotFound"]
    assert not_found.levelno == logging.INFO
    assert not_found.__dict__["rpc.error"] == "no such thing"
    assert not_found.__dict__["peer"].startswith("ipv4:127.0.0.1:")
    assert by_method["/t.v1.Test/Ok"].__dict__["duration_ms"] >= 0


async def test_streams_counted_per_message(served, access_records: Records) -> None:
    metrics, channel = served
    got, code = await _stream(channel, "Write", b"5")
    assert (len(got), code) == (5, grpc.StatusCode.OK)
    got, code = await _stream(channel, "Yield", b"3")
    assert (len(got), code) == (3, grpc.StatusCode.UNAVAILABLE)

    labels = {"grpc_type": "server_stream", "grpc_service": "t.v1.Test"}
    assert value(metrics, "grpc_server_msg_sent_total", **labels, grpc_method="Write") == 5
    assert value(metrics, "grpc_server_msg_sent_total", **labels, grpc_method="Yield") == 3
    handled = "grpc_server_handled_total"
    assert value(metrics, handled, **labels, grpc_method="Write", grpc_code="OK") == 1
    assert value(metrics, handled, **labels, grpc_method="Yield", grpc_code="UNAVAILABLE") == 1
    records = {r.__dict__["rpc.method"]: r for r in access_records.records}
    assert records["/t.v1.Test/Write"].__dict__["rpc.messages_sent"] == 5
    yielded = records["/t.v1.Test/Yield"]
    assert yielded.__dict__["rpc.messages_sent"] == 3
    assert yielded.levelno == logging.WARNING


async def test_cancelled_stream_is_counted(served) -> None:
    metrics, channel = served
    call = channel.unary_stream("/t.v1.Test/Slow")(b"")
    assert await call.read() == b"first"
    call.cancel()
    labels = {"grpc_type": "server_stream", "grpc_service": "t.v1.Test", "grpc_method": "Slow"}
    for _ in range(200):  # the server learns of the cancellation asynchronously
        if value(metrics, "grpc_server_handled_total", **labels, grpc_code="CANCELLED"):
            break
        await asyncio.sleep(0.01)
    assert value(metrics, "grpc_server_handled_total", **labels, grpc_code="CANCELLED") == 1
    assert value(metrics, "grpc_server_msg_sent_total", **labels) == 1


async def test_unknown_method_adds_no_series(served) -> None:
    metrics, channel = served
    code = await _unary(channel, "Nope")
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert not any("Nope" in str(labels) for _, labels in samples(metrics))


# --- state gauges ---------------------------------------------------------------------------------


class FakeHost:
    def __init__(self, name: str, up: bool, open_: int) -> None:
        self.name, self.up, self.open_connections = name, up, open_


class FakeScope:
    def __init__(self, export: str) -> None:
        self.export = export


class FakeLedger:
    def __init__(self) -> None:
        self._masks = {FakeScope("a"): [1, 2, 3], FakeScope("a"): [1, 2], FakeScope("b"): [0] * 7}


def test_state_read_at_scrape_time() -> None:
    metrics = Metrics()
    hosts = [FakeHost("h1", True, 2), FakeHost("h2", False, 0)]
    metrics.track_hosts(lambda: hosts)
    ledger = FakeLedger()
    metrics.track_ledger(lambda: ledger)
    assert value(metrics, "nbdgw_nbd_host_up", host="h1") == 1
    assert value(metrics, "nbdgw_nbd_host_up", host="h2") == 0
    assert value(metrics, "nbdgw_nbd_connections", host="h1") == 2
    assert value(metrics, "nbdgw_clear_ledger_entries", export="a") == 5
    assert value(metrics, "nbdgw_clear_ledger_entries", export="b") == 7
    hosts[1].up = True
    assert value(metrics, "nbdgw_nbd_host_up", host="h2") == 1


def test_reconnects_count_comebacks_only() -> None:
    metrics = Metrics()
    metrics.host_changed("h", True)  # first report: no comeback
    assert value(metrics, "nbdgw_nbd_reconnects_total", host="h") is None
    metrics.host_changed("h", False)
    assert value(metrics, "nbdgw_nbd_reconnects_total", host="h") == 0
    metrics.host_changed("h", True)
    metrics.host_changed("h", False)
    metrics.host_changed("h", True)
    assert value(metrics, "nbdgw_nbd_reconnects_total", host="h") == 2


def test_snapshot_reads_count_under_their_export() -> None:
    """Every backup reads a new snapshot export (``vm@<id>``): its messages count under ``vm``,
    and no series per snapshot is ever made (review L17)."""
    from nbdgw.v1 import bitmap_service_pb2 as pb

    metrics = Metrics()
    for snap in ("vm@s1", "vm@s2", "vm"):
        message = pb.StreamExtentsResponse(offset=0, next_offset=4096, data=b"x" * 10)
        message.lengths.extend([4096])
        metrics.count_stream_message(snap, message)
    assert value(metrics, "nbdgw_extents_streamed_total", export="vm") == 3
    assert value(metrics, "nbdgw_bytes_streamed_total", export="vm") == 3 * 4096
    assert value(metrics, "nbdgw_data_bytes_streamed_total", export="vm") == 30
    text = metrics.exposition()[0].decode()
    assert "vm@" not in text


def test_metrics_are_per_instance() -> None:
    a, b = Metrics(), Metrics()
    a.extents_streamed.labels("x").inc(5)
    assert value(a, "nbdgw_extents_streamed_total", export="x") == 5
    assert value(b, "nbdgw_extents_streamed_total", export="x") is None


# --- logs ---------------------------------------------------------------------------------------


def test_json_lines(tmp_path) -> None:
    stream = io.StringIO()
    handler = configure_logging("json", "info", stream=stream)
    try:
        log = logging.getLogger("nbdgw.test")
        log.debug("hidden")
        log.info("hello %s", "world", extra={"rpc.method": "/a.B/C", "duration_ms": 1.5})
        try:
            raise ValueError("bad\nvalue")
        except ValueError:
            log.exception("it failed")
        log.warning("odd value", extra={"peer": object(), "path": tmp_path})
    finally:
        logging.getLogger().removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # one line per record, even with a multi-line traceback
    first, second, third = (json.loads(line) for line in lines)
    assert first["msg"] == "hello world"
    assert first["level"] == "info" and first["logger"] == "nbdgw.test"
    assert first["rpc.method"] == "/a.B/C" and first["duration_ms"] == 1.5
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "error"
    assert "ValueError: bad" in second["exc"]
    assert third["path"] == str(tmp_path) and third["peer"].startswith("<object")


def test_text_lines_carry_fields() -> None:
    stream = io.StringIO()
    handler = configure_logging("text", "debug", stream=stream)
    try:
        logging.getLogger("nbdgw.rpc").info(
            "/a.B/C OK 1.0ms", extra={"rpc.method": "/a.B/C", "peer": "ipv4:1.2.3.4:5"}
        )
    finally:
        logging.getLogger().removeHandler(handler)
    line = stream.getvalue().strip()
    assert line.endswith("nbdgw.rpc: /a.B/C OK 1.0ms peer=ipv4:1.2.3.4:5")


def test_bad_log_settings() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")
    with pytest.raises(ValueError, match="log level"):
        configure_logging("json", "loud")


def test_formatter_alone() -> None:
    record = logging.makeLogRecord({"name": "x", "levelname": "INFO", "msg": "m", "args": ()})
    data = json.loads(JsonFormatter().format(record))
    assert set(data) == {"ts", "level", "logger", "msg"}


# --- the endpoint -----------------------------------------------------------------------------


async def _http(port: int, request: bytes) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return lines[0], headers, body


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[Metrics, int]]:
    metrics = Metrics()
    server = MetricsServer(metrics)
    port = await server.start("127.0.0.1", 0)
    yield metrics, port
    await server.close()


async def test_endpoint_serves_metrics(endpoint) -> None:
    metrics, port = endpoint
    metrics.extents_streamed.labels("disk").inc(42)
    status, headers, body = await _http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) == len(body)
    assert 'nbdgw_extents_streamed_total{export="disk"} 42.0' in body.decode()


async def test_endpoint_openmetrics(endpoint) -> None:
    _, port = endpoint
    request = b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text\r\n\r\n"
    status, headers, body = await _http(port, request)
    assert status == "HTTP/1.1 200 OK"
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


@pytest.mark.parametrize(
    ("request_bytes", "expected"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "404"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "405"),
        (b"HELLO\r\n\r\n", "400"),
        (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"a" * 9000 + b"\r\n\r\n", "431"),
    ],
)
async def test_endpoint_refuses(endpoint, request_bytes: bytes, expected: str) -> None:
    _, port = endpoint
    status, _, _ = await _http(port, request_bytes)
    assert status.split(" ")[1] == expected


async def test_endpoint_drops_silent_clients(endpoint, monkeypatch) -> None:
    monkeypatch.setattr(observability, "REQUEST_TIMEOUT", 0.2)
    _, port = endpoint
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metr")  # and nothing more
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), timeout=10) == b""  # closed, no answer
    writer.close()
    status, _, _ = await _http(port, b"GET /metrics HTTP/1.1\r\n\r\n")  # still serving
    assert status == "HTTP/1.1 200 OK"
