"""``nbdgw serve`` wiring of the security options: --limit and $NBDGW_LIMITS, the policy inline
in the TOML file or from --policy-file, and a real gateway process whose API port refuses
unauthenticated calls (reflection included) while its plaintext health port answers anyone."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from gateway.cli import build_parser
from gateway.cli.serve import build_config
from gateway.config import ConfigError, load_file
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.cli_support import GatewayProcess
from tests.gateway.security_support import bearer, fails
from tests.gateway.test_service_embedded import make_image

ALICE = "alice-token-0123456789"
ROOT = "root-token-0123456789"


def parse(*argv: str):  # type: ignore[no-untyped-def]
    return build_parser().parse_args(["serve", "--image", "d=/nonexistent", *argv])


def test_limit_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config, _ = build_config(parse("--limit", "max_streams=5", "--limit", "clear_rate=2.5"))
    assert config.limits.max_streams == 5 and config.limits.clear_rate == 2.5
    assert config.limits.max_streams_per_identity == 64  # the rest keep their defaults
    for bad, why in (
        ("colour=1", "NAME one of"),
        ("max_streams", "NAME=VALUE"),
        ("max_streams=many", "not a number"),
        ("max_streams=0", "at least 1"),
        ("stall_timeout=-1", ">= 0"),
    ):
        with pytest.raises(ConfigError, match=why):
            build_config(parse("--limit", bad))
    monkeypatch.setenv("NBDGW_LIMITS", "max_streams_per_identity=3 stall_timeout=9")
    config, _ = build_config(parse())
    assert config.limits.max_streams_per_identity == 3 and config.limits.stall_timeout == 9


def test_policy_inline_or_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "gw.toml").write_text(
        '[policy.identities.alice]\nexports = ["vm-*"]\noperations = ["list", "extents"]\n'
    )
    policy = load_file(tmp_path / "gw.toml").policy
    assert policy is not None
    assert policy.allows("alice", "extents", "vm-1") and not policy.allows("alice", "clear", "vm-1")
    (tmp_path / "p.toml").write_text("[identities.bob]\n")
    (tmp_path / "both.toml").write_text('policy_file = "p.toml"\n[policy.identities.a]\n')
    with pytest.raises(ConfigError, match="not both"):
        load_file(tmp_path / "both.toml")
    (tmp_path / "bad.toml").write_text('[policy.identities.a]\noperations = ["write"]\n')
    with pytest.raises(ConfigError, match="unknown operation"):
        load_file(tmp_path / "bad.toml")
    config, _ = build_config(parse("--policy-file", str(tmp_path / "p.toml")))
    assert config.policy is not None and config.policy.allows("bob", "clear", "x")


async def test_serve_process_guards_its_api_port(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"alice {ALICE}\nroot {ROOT}\n")
    (tmp_path / "policy.toml").write_text(
        '[identities.alice]\nexports = ["disk"]\noperations = ["list"]\n[identities.root]\n'
    )
    disk = make_image(tmp_path / "disk.img")
    hidden = make_image(tmp_path / "hidden.img")
    gw = GatewayProcess(
        "--image", f"disk={disk}", "--image", f"hidden={hidden}",
        "--token-file", str(tmp_path / "tokens"), "--policy-file", str(tmp_path / "policy.toml"),
        "--health-listen", "127.0.0.1:0", "--limit", "max_streams=8",
        data_dir=tmp_path / "gw",
    ).start()  # fmt: skip
    try:
        assert gw.proc is not None
        async with grpc.aio.insecure_channel(gw.target) as channel:
            stub = pb_grpc.BitmapServiceStub(channel)
            f = await fails(stub.ListExports(pb.ListExportsRequest()))
            assert f.code == grpc.StatusCode.UNAUTHENTICATED
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                # No request message: the server refuses on the headers, and a message sent
                # after that answer fails on the client's side (INTERNAL, 'Failed execute_batch').
                async for _ in refl.ServerReflectionInfo(iter(())):
                    pass
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            listed = await stub.ListExports(pb.ListExportsRequest(), metadata=bearer(ALICE))
            assert [e.name for e in listed.exports] == ["exports/disk"]
            f = await fails(
                stub.GetExport(pb.GetExportRequest(name="hidden"), metadata=bearer(ALICE))
            )
            assert f.code == grpc.StatusCode.PERMISSION_DENIED and f.reason == "PERMISSION_DENIED"
            listed = await stub.ListExports(pb.ListExportsRequest(), metadata=bearer(ROOT))
            assert len(listed.exports) == 2
            # Health on the API port needs no token either (the kubelet's probes).
            health = health_pb2_grpc.HealthStub(channel)
            resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        gw.stop()
