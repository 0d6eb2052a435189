"""The gateway's metrics, logs and environment variables, end to end: real RPCs against the
embedded host and against nbdkit (stopped and restarted), /metrics scraped over HTTP, JSON logs
of an ``nbdgw serve`` subprocess configured by environment variables only, an environment
variable for every flag, and the generated docs."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli import build_parser
from gateway.cli.common import positive_seconds
from gateway.cli.serve import build_config
from gateway.config import _TOP_KEYS, ConfigError, GatewayConfig, load_tokens
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import MiB, call_error, stream_all
from tests.gateway.test_serve_cmd import serve
from tests.gateway.test_service_embedded import make_image
from tests.peers import tool, wait_listening

ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def get(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


BITMAP_SERVICE = {"grpc_type": "unary", "grpc_service": "nbdgw.v1.BitmapService"}
STREAM = {"grpc_type": "server_stream", "grpc_service": "nbdgw.v1.BitmapService"}


async def test_metrics_after_real_calls(tmp_path: Path, start_gateway) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    config.metrics_listen = "127.0.0.1:0"
    gw = await start_gateway(config)
    port = gw.gateway.listening.metrics_port
    assert port

    before = await scrape(port)
    assert get(before, "nbdgw_nbd_host_up", host="embedded") == 1
    assert get(before, "grpc_server_started_total", **BITMAP_SERVICE, grpc_method="GetExport") in (
        None,
        0,
    )
    assert any(name.startswith("process_") for name, _ in before)

    await gw.stub.ListExports(pb.ListExportsRequest())
    await gw.stub.GetExport(pb.GetExportRequest(name="exports/disk"))
    err = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="exports/nope")))
    assert err.code == grpc.StatusCode.NOT_FOUND
    streamed = await stream_all(
        gw.stub, export="exports/disk", context="backup", max_extents_per_message=2
    )
    rows = streamed.rows
    dirty = await stream_all(
        gw.stub,
        export="exports/disk",
        context="backup",
        filter=pb.EXTENT_FILTER_SET,
        include_data=True,
    )
    data_bytes = sum(len(m.data) for m in dirty.messages)
    assert data_bytes > 0
    cleared = await gw.stub.ClearRange(
        pb.ClearRangeRequest(
            export="exports/disk", bitmap="backup", offset=0, length=1 * MiB, unconditional=True
        )
    )
    assert cleared.cleared_bytes > 0

    after = await scrape(port)
    handled = "grpc_server_handled_total"
    assert get(after, handled, **BITMAP_SERVICE, grpc_method="ListExports", grpc_code="OK") == 1
    assert get(after, handled, **BITMAP_SERVICE, grpc_method="GetExport", grpc_code="OK") == 1
    assert (
        get(after, handled, **BITMAP_SERVICE, grpc_method="GetExport", grpc_code="NOT_FOUND") == 1
    )
    assert get(after, handled, **BITMAP_SERVICE, grpc_method="ClearRange", grpc_code="OK") == 1
    assert get(after, handled, **STREAM, grpc_method="StreamExtents", grpc_code="OK") == 2
    sent = get(after, "grpc_server_msg_sent_total", **STREAM, grpc_method="StreamExtents")
    assert sent == len(streamed.messages) + len(dirty.messages)
    assert (
        get(after, "grpc_server_handling_seconds_count", **STREAM, grpc_method="StreamExtents") == 2
    )
    size = streamed.messages[-1].range_end
    assert get(after, "nbdgw_extents_streamed_total", export="disk") == len(rows) + len(dirty.rows)
    # Both streams covered the whole disk.
    assert get(after, "nbdgw_bytes_streamed_total", export="disk") == 2 * size
    assert get(after, "nbdgw_data_bytes_streamed_total", export="disk") == data_bytes
    # The unknown export left no series of its own.
    assert not any(dict(labels).get("export") == "nope" for _, labels in after)
    assert get(after, "nbdgw_nbd_connections", host="embedded") >= 1  # pooled, idle


@pytest.fixture
def nbdkit_host(tmp_path: Path) -> Iterator[Any]:
    """An nbdkit on a unix socket that the test can stop and start again."""
    sock = tmp_path / "nbdkit.sock"
    procs: list[subprocess.Popen[bytes]] = []

    class Host:
        uri = f"nbd+unix:///?socket={sock}"

        def start(self) -> None:
            sock.unlink(missing_ok=True)  # left by the previous nbdkit
            proc = subprocess.Popen(
                [tool("nbdkit"), "-f", "-U", str(sock), "memory", "8M"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            wait_listening(proc, sock=sock, timeout=15)

        def stop(self) -> None:
            proc = procs[-1]
            proc.terminate()
            proc.wait()

    host = Host()
    host.start()
    yield host
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


async def wait_for(port: int, name: str, want: float, **labels: str) -> Samples:
    async with asyncio.timeout(30):
        while True:
            samples = await scrape(port)
            if get(samples, name, **labels) == want:
                return samples
            await asyncio.sleep(0.05)


async def test_host_state_and_reconnects(nbdkit_host, tmp_path: Path, start_gateway) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_uri_export("mem", nbdkit_host.uri)
    config.metrics_listen = "127.0.0.1:0"
    gw = await start_gateway(config)
    port = gw.gateway.listening.metrics_port
    (host,) = gw.gateway.hosts
    samples = await scrape(port)
    assert get(samples, "nbdgw_nbd_host_up", host=host) == 1
    assert get(samples, "nbdgw_nbd_reconnects_total", host=host) is None

    nbdkit_host.stop()
    err = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="exports/mem")))
    assert err.code == grpc.StatusCode.UNAVAILABLE
    samples = await wait_for(port, "nbdgw_nbd_host_up", 0, host=host)
    assert get(samples, "nbdgw_nbd_reconnects_total", host=host) == 0
    handled = "grpc_server_handled_total"
    assert get(samples, handled, **BITMAP_SERVICE, grpc_method="GetExport", grpc_code="UNAVAILABLE")

    nbdkit_host.start()
    samples = await wait_for(port, "nbdgw_nbd_host_up", 1, host=host)
    assert get(samples, "nbdgw_nbd_reconnects_total", host=host) == 1
    await gw.stub.GetExport(pb.GetExportRequest(name="exports/mem"))


async def test_json_logs_of_a_gateway_configured_by_environment(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img")
    env = {
        "NBDGW_LISTEN": "127.0.0.1:0",
        "NBDGW_DATA_DIR": str(tmp_path / "data"),
        "NBDGW_IMAGES": f"disk={image}",
        "NBDGW_LOG_FORMAT": "json",
        "NBDGW_LOG_LEVEL": "info",
        "NBDGW_METRICS_LISTEN": "127.0.0.1:0",
        "NBDGW_NO_REFLECTION": "true",
    }
    async with serve([], tmp_path, env) as served:
        assert "exports: disk" in served.banner
        metrics_port = int(served.banner.split("metrics on http://127.0.0.1:")[1].split("/")[0])
        await served.stub.GetExport(pb.GetExportRequest(name="exports/disk"))
        err = await call_error(served.stub.GetExport(pb.GetExportRequest(name="exports/nope")))
        assert err.code == grpc.StatusCode.NOT_FOUND
        await stream_all(served.stub, export="exports/disk", context="backup")
        samples = await scrape(metrics_port)
        assert get(samples, "nbdgw_nbd_host_up", host="embedded") == 1
        # Reflection is off (NBDGW_NO_REFLECTION): its service is not there.
        reflect = served.channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
        )
        # No request message: the server answers UNIMPLEMENTED on the headers, and a message sent
        # after that answer fails on the client's side (INTERNAL, 'Failed execute_batch').
        call = reflect(iter(()))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        served.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await served.proc.wait()
    assert served.proc.returncode == 0
    assert served.proc.stderr is not None
    lines = (await served.proc.stderr.read()).decode().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"ts", "level", "logger", "msg"} <= record.keys()
    access = [r for r in records if r["logger"] == "nbdgw.rpc"]
    by_code = {(r["rpc.method"].rsplit("/", 1)[1], r["rpc.code"]): r for r in access}
    ok = by_code[("GetExport", "OK")]
    assert ok["level"] == "info"
    assert ok["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(ok["duration_ms"], float) and ok["duration_ms"] >= 0
    missing = by_code[("GetExport", "NOT_FOUND")]
    assert "nope" in missing["rpc.error"]
    stream = by_code[("StreamExtents", "OK")]
    assert stream["rpc.messages_sent"] >= 1


# --- every setting has an environment variable ----------------------------------------------


def serve_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def env_name(action: argparse.Action) -> str:
    helps = action.help or ""
    found = [w.strip("($),;:") for w in helps.split() if w.strip("($").startswith("NBDGW_")]
    assert found, f"{action.option_strings[0]} names no NBDGW_* variable in its help"
    return found[0]


def serve_options() -> list[argparse.Action]:
    return [
        a
        for a in serve_parser()._actions
        if a.option_strings
        and not isinstance(a, argparse._HelpAction)
        and a.help is not argparse.SUPPRESS  # an old spelling, hidden (docs/cli.md)
    ]


def sample_value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return "yes"
    if action.choices:
        return str(list(action.choices)[-1])
    if action.type in (int, float, positive_seconds):
        return "7"
    return "/some/where"


def test_every_serve_flag_has_an_environment_variable(monkeypatch) -> None:
    options = serve_options()
    assert len(options) >= 20
    names = [env_name(a) for a in options]
    assert len(set(names)) == len(names), "two flags share a variable"
    for action, name in zip(options, names, strict=True):
        if isinstance(action, argparse._AppendAction):
            continue  # lists (NBDGW_EXPORTS, NBDGW_IMAGES) are read when the flag is absent
        monkeypatch.delenv(name, raising=False)
        plain = serve_parser().parse_args([])
        monkeypatch.setenv(name, sample_value(action))
        with_env = serve_parser().parse_args([])
        monkeypatch.delenv(name)
        assert getattr(with_env, action.dest) != getattr(plain, action.dest), name


def test_environment_applies_and_flags_win(tmp_path: Path, monkeypatch) -> None:
    image = make_image(tmp_path / "disk.img")
    config_file = tmp_path / "gw.toml"
    config_file.write_text('log_format = "json"\nlog_level = "error"\nmetrics_listen = "[::1]:1"\n')
    env = {
        "NBDGW_CONFIG": str(config_file),
        "NBDGW_IMAGES": f"a={image} 'b={image}'",
        "NBDGW_METRICS_LISTEN": "127.0.0.1:9099",
        "NBDGW_LOG_LEVEL": "debug",
        "NBDGW_NO_REFLECTION": "on",
        "NBDGW_NO_TLS_VERIFY": "0",
        "NBDGW_GRACE_PERIOD": "2.5",
    }
    for key, val in env.items():
        monkeypatch.setenv(key, val)
    config, sample = build_config(serve_parser().parse_args([]))
    assert not sample and list(config.exports) == ["a", "b"]
    assert config.metrics_listen == "127.0.0.1:9099"  # environment over file
    assert config.log_format == "json"  # file over default
    assert config.log_level == "debug"
    assert config.reflection is False
    assert config.grace_period == 2.5
    args = serve_parser().parse_args(["--log-level", "warning", "--metrics-listen", "0.0.0.0:1"])
    config, _ = build_config(args)
    assert config.log_level == "warning" and config.metrics_listen == "0.0.0.0:1"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("NBDGW_NO_REFLECTION", "perhaps", "NBDGW_NO_REFLECTION"),
        ("NBDGW_LOG_FORMAT", "xml", "log format"),
        ("NBDGW_LOG_LEVEL", "loud", "log level"),
        ("NBDGW_METRICS_LISTEN", "nowhere", "listen address"),
    ],
)
def test_bad_environment_is_a_clear_error(
    tmp_path: Path, monkeypatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv("NBDGW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        build_config(serve_parser().parse_args([]))


# --- the docs ---------------------------------------------------------------------------------


def test_generated_docs_are_current_and_complete() -> None:
    check = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("NBDGW_")},
    )
    assert check.returncode == 0, check.stderr
    cli = (ROOT / "docs" / "cli.md").read_text()
    configuration = (ROOT / "docs" / "configuration.md").read_text()
    for action in serve_options():
        assert action.option_strings[-1] in cli
        assert env_name(action) in configuration
    for key in _TOP_KEYS:
        assert f"{key}" in configuration, f"TOML key {key} is not documented"
    api = (ROOT / "docs" / "api.md").read_text()
    for method in pb.DESCRIPTOR.services_by_name["BitmapService"].methods:
        assert f"### BitmapService.{method.name}" in api
    for message in pb.DESCRIPTOR.message_types_by_name:
        assert f"### {message}" in api


async def test_clear_ledger_entries(tmp_path: Path, qemu_nbd, start_gateway) -> None:
    """A read-only qemu-nbd export clears into the ledger; the gauge counts its rows."""
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_uri_export("qd", qemu_nbd.uri)
    config.metrics_listen = "127.0.0.1:0"
    gw = await start_gateway(config)
    port = gw.gateway.listening.metrics_port
    assert get(await scrape(port), "nbdgw_clear_ledger_entries", export="qd") is None
    await gw.stub.SetExportGeneration(pb.SetExportGenerationRequest(export="qd", generation="g1"))
    for offset in (0, 4 * MiB, 8 * MiB):
        resp = await gw.stub.ClearRange(
            pb.ClearRangeRequest(
                export="qd", bitmap="b0", offset=offset, length=64 * 1024, generation="g1"
            )
        )
        assert resp.clear_mode == pb.CLEAR_MODE_LEDGER_MASK
    samples = await scrape(port)
    assert get(samples, "nbdgw_clear_ledger_entries", export="qd") == 3
    assert (
        get(
            samples,
            "grpc_server_handled_total",
            **BITMAP_SERVICE,
            grpc_method="ClearRange",
            grpc_code="OK",
        )
        == 3
    )


async def test_refused_calls_are_counted_and_identity_logged(
    tmp_path: Path, start_gateway, caplog
) -> None:
    """The observability interceptor runs before access control: refused calls are counted
    with their code; allowed ones are logged with the caller's identity."""
    tokens = tmp_path / "tokens"
    tokens.write_text("backup s3cret-token-1\n")
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    config.tokens = load_tokens(tokens)
    config.metrics_listen = "127.0.0.1:0"
    gw = await start_gateway(config)
    port = gw.gateway.listening.metrics_port
    caplog.set_level(logging.INFO, logger="nbdgw.rpc")

    err = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="exports/disk")))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED
    auth = (("authorization", "Bearer s3cret-token-1"),)
    await gw.stub.GetExport(pb.GetExportRequest(name="exports/disk"), metadata=auth)

    samples = await scrape(port)
    handled = "grpc_server_handled_total"
    labels = {**BITMAP_SERVICE, "grpc_method": "GetExport"}
    assert get(samples, handled, **labels, grpc_code="UNAUTHENTICATED") == 1
    assert get(samples, handled, **labels, grpc_code="OK") == 1
    records = [r for r in caplog.records if r.name == "nbdgw.rpc"]
    by_code = {r.__dict__["rpc.code"]: r for r in records}
    assert by_code["OK"].__dict__["identity"] == "backup"
    assert "identity" not in by_code["UNAUTHENTICATED"].__dict__
    assert "s3cret" not in " ".join(str(r.__dict__) for r in records)  # never the token


async def test_metrics_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    import socket

    from gateway.server import Gateway

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = GatewayConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0")
        config.add_image_export("disk", make_image(tmp_path / "disk.img"))
        config.metrics_listen = f"127.0.0.1:{port}"
        gateway = Gateway(config)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port} \\(metrics\\)"):
            await gateway.start()
        assert gateway.server is None  # the API port was never opened
        assert gateway.nbd_server is None and not gateway.images  # backends closed


def test_client_connection_options_have_environment_variables(monkeypatch) -> None:
    """The gateway-connection options of the client commands (export list, bitmap map...)."""

    def exports_parser() -> argparse.ArgumentParser:
        sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
        group = next(
            a for a in sub.choices["export"]._actions if isinstance(a, argparse._SubParsersAction)
        )
        return group.choices["list"]

    group = next(g for g in exports_parser()._action_groups if g.title == "gateway connection")
    assert len(group._group_actions) >= 7
    for action in group._group_actions:
        name = env_name(action)
        monkeypatch.delenv(name, raising=False)
        plain = exports_parser().parse_args([])
        monkeypatch.setenv(name, sample_value(action))
        assert getattr(exports_parser().parse_args([]), action.dest) != getattr(
            plain, action.dest
        ), name
        monkeypatch.delenv(name)
