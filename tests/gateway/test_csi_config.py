"""The CSI socket's configuration (flag, NBDGW_* variable, TOML key) and ``nbdgw serve`` with it:
Identity answers the configured driver name, the SNAPSHOT_METADATA_SERVICE capability, and a
Probe that follows the gateway's readiness (not ready while an NBD host is down)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import grpc
import pytest

from gateway.cli import build_parser
from gateway.cli.serve import build_config
from gateway.config import DEFAULT_CSI_DRIVER_NAME, ConfigError, load_file
from nbdgw.csi.v1 import csi_pb2 as cpb
from nbdgw.csi.v1 import csi_pb2_grpc as cpb_grpc
from tests.gateway.cli_support import GatewayProcess, make_embedded_disk, nbdgw


def parse(argv: list[str]):
    return build_parser().parse_args(["serve", "--export", "a=nbd://h/a", *argv])


def test_flags_environment_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = build_config(parse([]))
    assert config.csi_socket is None and config.csi_driver_name == DEFAULT_CSI_DRIVER_NAME
    assert config.csi_block_size == 0
    monkeypatch.setenv("NBDGW_CSI_SOCKET", "/run/csi/csi.sock")
    monkeypatch.setenv("NBDGW_CSI_DRIVER_NAME", "csi.example.com")
    monkeypatch.setenv("NBDGW_CSI_BLOCK_SIZE", "65536")
    config, _ = build_config(parse([]))
    assert (config.csi_socket, config.csi_driver_name, config.csi_block_size) == (
        "/run/csi/csi.sock", "csi.example.com", 65536
    )  # fmt: skip
    config, _ = build_config(parse(["--csi-socket", "/x.sock", "--csi-block-size", "0"]))
    assert config.csi_socket == "/x.sock" and config.csi_block_size == 0
    with pytest.raises(ConfigError, match="power of two"):
        build_config(parse(["--csi-block-size", "1000"]))
    toml = tmp_path / "gw.toml"
    toml.write_text(
        'csi_socket = "csi.sock"\ncsi_driver_name = "d.example"\ncsi_block_size = 512\n'
    )
    config = load_file(toml)
    assert config.csi_socket == str(tmp_path / "csi.sock")  # relative to the file
    assert (config.csi_driver_name, config.csi_block_size) == ("d.example", 512)
    toml.write_text("csi_block_size = 3\n")
    with pytest.raises(ConfigError, match="power of two"):
        load_file(toml)


def test_serve_answers_identity(tmp_path: Path) -> None:
    disk = make_embedded_disk(tmp_path / "disk.img")
    sock = tmp_path / "csi.sock"
    # A socket left by a killed run (bound, nobody accepting): replaced.
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(sock))
    args = ["--image", f"disk={disk.path}", "--csi-socket", str(sock)]
    args += ["--csi-driver-name", "csi.example.com"]
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        assert gw.target
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            identity = cpb_grpc.IdentityStub(channel)
            info = identity.GetPluginInfo(cpb.GetPluginInfoRequest(), timeout=10)
            assert info.name == "csi.example.com"
            caps = identity.GetPluginCapabilities(cpb.GetPluginCapabilitiesRequest(), timeout=10)
            assert [c.service.type for c in caps.capabilities] == [
                cpb.PluginCapability.Service.SNAPSHOT_METADATA_SERVICE
            ]
            assert identity.Probe(cpb.ProbeRequest(), timeout=10).ready.value is True

    # A socket a live process answers on, or a file that is no socket: never taken.
    for taken in ("live", "file"):
        other = tmp_path / f"{taken}.sock"
        with socket.socket(socket.AF_UNIX) as live:
            if taken == "live":
                live.bind(str(other))
                live.listen()
            else:
                other.write_text("not a socket")
            args = ["--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / taken)]
            proc = nbdgw("serve", *args, "--csi-socket", str(other))
            assert proc.returncode == 1 and "another process answers on it" in proc.stderr
            assert other.exists()

    # A host that is down: not ready (the sidecar keeps probing).
    args = ["--export", f"gone=nbd+unix:///x?socket={tmp_path / 'none.sock'}"]
    args += ["--csi-socket", str(sock)]
    with (
        GatewayProcess(*args, data_dir=tmp_path / "data2"),
        grpc.insecure_channel(f"unix:{sock}") as channel,
    ):
        identity = cpb_grpc.IdentityStub(channel)
        deadline = time.monotonic() + 10
        while identity.Probe(cpb.ProbeRequest(), timeout=10).ready.value:
            assert time.monotonic() < deadline, "Probe stayed ready with its host down"
            time.sleep(0.1)
        info = identity.GetPluginInfo(cpb.GetPluginInfoRequest(), timeout=10)
        assert info.name == DEFAULT_CSI_DRIVER_NAME
