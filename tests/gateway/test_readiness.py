"""Readiness follows a dead NBD host with no RPC made: a gateway in front of a real read-only
qemu-nbd and the embedded host; qemu-nbd killed -> its export and the service go NOT_SERVING,
the embedded export stays SERVING; qemu-nbd restarted on the same socket -> SERVING again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.cli import build_parser
from gateway.cli.serve import build_config
from gateway.config import ConfigError, GatewayConfig, load_file
from gateway.server import SERVICE_NAME
from nbdcore.storage.image import Image
from tests.gateway.conftest import MiB, QemuNBD, stream_all, wait_health

pytestmark = pytest.mark.interop

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def config_for(qemu: QemuNBD, tmp_path: Path, interval: float) -> GatewayConfig:
    config = GatewayConfig()
    config.add_uri_export("vm", qemu.uri)
    image = Image.create(tmp_path / "local.img", 4 * MiB)
    image.close()
    config.add_image_export("local", tmp_path / "local.img")
    config.host_check_interval = interval
    return config


async def status(channel, service: str) -> int:  # type: ignore[no-untyped-def]
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(resp.status)


async def kill_and_restart(gw, qemu: QemuNBD) -> None:  # type: ignore[no-untyped-def]
    qemu.stop(signal.SIGKILL)  # no NBD_CMD_DISC, no goodbye: the host just vanishes
    await wait_health(gw.channel, "exports/vm", NOT_SERVING)
    await wait_health(gw.channel, SERVICE_NAME, NOT_SERVING)
    assert await status(gw.channel, "exports/local") == SERVING
    assert not gw.gateway.pools["vm"].host.up
    qemu.start()
    await wait_health(gw.channel, "exports/vm", SERVING)
    await wait_health(gw.channel, SERVICE_NAME, SERVING)
    assert await status(gw.channel, "exports/local") == SERVING


async def test_idle_host_death_flips_readiness(
    qemu_nbd: QemuNBD, tmp_path: Path, start_gateway
) -> None:
    """No traffic at all: the periodic liveness check notices."""
    gw = await start_gateway(config_for(qemu_nbd, tmp_path, interval=0.2))
    assert await status(gw.channel, "exports/vm") == SERVING
    assert await status(gw.channel, SERVICE_NAME) == SERVING
    await kill_and_restart(gw, qemu_nbd)


async def test_pooled_connection_eof_flips_readiness(
    qemu_nbd: QemuNBD, tmp_path: Path, start_gateway
) -> None:
    """An idle pooled connection the host closes triggers a probe at once (the periodic check
    is too far away to be the cause here)."""
    gw = await start_gateway(config_for(qemu_nbd, tmp_path, interval=600))
    got = await stream_all(gw.stub, export="vm", context="base:allocation")
    assert got.rows  # the call left an idle connection in the pool
    # Probes close their connections: what stays open is the pooled one.
    assert gw.gateway.pools["vm"].host.open_connections >= 1
    await kill_and_restart(gw, qemu_nbd)


def test_host_check_interval_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(argv: list[str]):  # type: ignore[no-untyped-def]
        return build_parser().parse_args(["serve", *argv])

    assert build_config(parse([]))[0].host_check_interval == 5.0
    toml = tmp_path / "gw.toml"
    toml.write_text("host_check_interval = 2.5\n")
    assert build_config(parse(["--config", str(toml)]))[0].host_check_interval == 2.5
    monkeypatch.setenv("NBDGW_HOST_CHECK_INTERVAL", "0")  # the environment beats the file
    assert build_config(parse(["--config", str(toml)]))[0].host_check_interval == 0.0
    config, _ = build_config(parse(["--host-check-interval", "7"]))  # the flag beats both
    assert config.host_check_interval == 7.0
    with pytest.raises(ConfigError, match="host check interval"):
        build_config(parse(["--host-check-interval", "-1"]))
    toml.write_text("host_check_interval = -1\n")
    with pytest.raises(ConfigError, match="host check interval"):
        load_file(toml)
