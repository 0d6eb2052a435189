"""Who gets in and what they may do: bearer tokens from a token file, a per-identity policy
(exports x operations), denials that reveal nothing about other exports, health open while the
rest of the API port is closed, token rotation without a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gateway.config import GatewayConfig
from gateway.security.access import (
    AccessConfigError,
    AccessInterceptor,
    Authenticator,
    Policy,
    TokenFile,
    parse_tokens,
)
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.security_support import bearer, fails, guard  # noqa: F401
from tests.gateway.test_service_embedded import make_image

ALICE = "alice-token-0123456789"
BOB = "bob-token-9876543210"
POLICY = {
    "identities": {
        # alice sees "disk" only, and may list and read extents, but not data nor clear.
        "alice": {"exports": ["disk"], "operations": ["list", "extents"]},
        "bob": {"exports": ["*"], "operations": ["*"]},
    }
}


def two_exports(tmp_path: Path) -> GatewayConfig:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    config.add_image_export("secret-vm", make_image(tmp_path / "secret.img"))
    return config


@pytest.fixture
async def gw(tmp_path: Path, guard: Any) -> Any:  # noqa: F811
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# identity token\nalice {ALICE}\nbob {BOB}\n")
    interceptor = AccessInterceptor(
        Authenticator(TokenFile(tokens, interval=0)), Policy.from_table(POLICY)
    )
    return await guard(two_exports(tmp_path), interceptor)


async def test_tokens_missing_wrong_malformed(gw: Any) -> None:
    stub = gw.stub()
    cases = [
        (None, "missing bearer token"),
        (bearer("not-a-token-at-all"), "wrong bearer token"),
        (bearer(ALICE[:-1]), "wrong bearer token"),
        ((("authorization", f"Basic {ALICE}"),), "malformed"),
        ((("authorization", "Bearer "),), "malformed"),
    ]
    for metadata, why in cases:
        for call in (
            stub.ListExports(pb.ListExportsRequest(), metadata=metadata),
            stub.GetExport(pb.GetExportRequest(name="disk"), metadata=metadata),
            stub.StreamExtents(
                pb.StreamExtentsRequest(export="disk", context="backup"), metadata=metadata
            ),
            stub.ClearRange(
                pb.ClearRangeRequest(
                    export="disk", bitmap="backup", offset=0, length=65536, unconditional=True
                ),
                metadata=metadata,
            ),
        ):
            f = await fails(call)
            assert f.code == grpc.StatusCode.UNAUTHENTICATED, (why, f)
            assert f.reason == "UNAUTHENTICATED"
            assert why in f.message
            assert ALICE not in f.message and "secret" not in f.message
    assert gw.interceptor.denied == len(cases) * 4


async def test_policy_exports_and_operations(gw: Any) -> None:
    stub = gw.stub()
    alice, bob = bearer(ALICE), bearer(BOB)
    # ListExports shows each identity its own exports, and nothing else.
    listed = await stub.ListExports(pb.ListExportsRequest(), metadata=alice)
    assert [e.name for e in listed.exports] == ["exports/disk"]
    assert listed.next_page_token == ""
    listed = await stub.ListExports(pb.ListExportsRequest(), metadata=bob)
    assert [e.name for e in listed.exports] == ["exports/disk", "exports/secret-vm"]
    # Pages are over the visible exports.
    page = await stub.ListExports(pb.ListExportsRequest(page_size=1), metadata=bob)
    assert [e.name for e in page.exports] == ["exports/disk"]
    rest = await stub.ListExports(
        pb.ListExportsRequest(page_size=1, page_token=page.next_page_token), metadata=bob
    )
    assert [e.name for e in rest.exports] == ["exports/secret-vm"] and not rest.next_page_token
    # bob's page token is not alice's.
    f = await fails(
        stub.ListExports(
            pb.ListExportsRequest(page_size=1, page_token=page.next_page_token), metadata=alice
        )
    )
    assert f.code == grpc.StatusCode.INVALID_ARGUMENT

    # alice: the export she may see, read extents only.
    export = await stub.GetExport(pb.GetExportRequest(name="exports/disk"), metadata=alice)
    assert export.name == "exports/disk"
    bitmaps = await stub.ListBitmaps(pb.ListBitmapsRequest(parent="disk"), metadata=alice)
    assert any(b.context == "qemu:dirty-bitmap:backup" for b in bitmaps.bitmaps)
    msgs = [
        m
        async for m in stub.StreamExtents(
            pb.StreamExtentsRequest(export="disk", context="backup"), metadata=alice
        )
    ]
    assert msgs and msgs[-1].next_offset == msgs[-1].range_end

    # Another identity's export and an export that does not exist: the same denial, naming
    # only what was asked.
    denials = []
    for name in ("secret-vm", "no-such-export"):
        f = await fails(stub.GetExport(pb.GetExportRequest(name=name), metadata=alice))
        denials.append(f)
        assert f.code == grpc.StatusCode.PERMISSION_DENIED
        assert f.reason == "PERMISSION_DENIED"
        assert f.message == f"identity 'alice' may not list export {name!r}"
        f = await fails(
            stub.StreamExtents(
                pb.StreamExtentsRequest(export=f"exports/{name}", context="backup"),
                metadata=alice,
            )
        )
        assert f.code == grpc.StatusCode.PERMISSION_DENIED
        assert f.message == f"identity 'alice' may not extents export {name!r}"
    assert denials[0].metadata == denials[1].metadata

    # Operations alice lacks, on her own export.
    f = await fails(
        stub.StreamExtents(
            pb.StreamExtentsRequest(export="disk", context="backup", include_data=True),
            metadata=alice,
        )
    )
    assert f.code == grpc.StatusCode.PERMISSION_DENIED and "may not data" in f.message
    f = await fails(
        stub.ClearRange(
            pb.ClearRangeRequest(
                export="disk", bitmap="backup", offset=0, length=65536, unconditional=True
            ),
            metadata=alice,
        )
    )
    assert f.code == grpc.StatusCode.PERMISSION_DENIED and "may not clear" in f.message
    assert all("secret" not in d.message for d in denials[1:])

    # bob may do all of it, on both.
    resp = await stub.ClearRange(
        pb.ClearRangeRequest(
            export="secret-vm", bitmap="backup", offset=0, length=65536, unconditional=True
        ),
        metadata=bob,
    )
    assert resp.cleared_bytes == 65536
    f = await fails(stub.GetExport(pb.GetExportRequest(name="no-such-export"), metadata=bob))
    assert f.code == grpc.StatusCode.NOT_FOUND  # bob may look: the servicer answers


async def test_health_open_reflection_and_api_closed(gw: Any) -> None:
    channel = gw.channel()
    health = health_pb2_grpc.HealthStub(channel)
    resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        # No request message: the server refuses on the headers, and a message sent
        # after that answer fails on the client's side (INTERNAL, 'Failed execute_batch').
        async for _ in refl.ServerReflectionInfo(iter(())):
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    names = [
        s.name
        async for r in refl.ServerReflectionInfo(iter([request]), metadata=bearer(ALICE))
        for s in r.list_services_response.service
    ]
    assert "nbdgw.v1.BitmapService" in names


async def test_token_file_rotation(tmp_path: Path, gw: Any) -> None:
    stub = gw.stub()
    carol = "carol-token-abcdefghij"
    tokens = tmp_path / "tokens"
    # Rotate: alice's token replaced, carol added (no policy rule: the "*" rule is absent, so
    # carol is authenticated but may do nothing).
    tokens.write_text(f"alice {ALICE}-v2\nbob {BOB}\ncarol {carol}\n")
    f = await fails(stub.ListExports(pb.ListExportsRequest(), metadata=bearer(ALICE)))
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    listed = await stub.ListExports(pb.ListExportsRequest(), metadata=bearer(f"{ALICE}-v2"))
    assert [e.name for e in listed.exports] == ["exports/disk"]
    f = await fails(stub.GetExport(pb.GetExportRequest(name="disk"), metadata=bearer(carol)))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    f = await fails(stub.ListExports(pb.ListExportsRequest(), metadata=bearer(carol)))
    assert f.code == grpc.StatusCode.PERMISSION_DENIED
    assert f.message == "identity 'carol' may not list exports"
    # A broken rewrite fails closed: what it no longer lists is revoked, what its good lines
    # still list stays (test_security_review has the rest).
    tokens.write_text(f"alice short\nbob {BOB}\n")
    f = await fails(stub.ListExports(pb.ListExportsRequest(), metadata=bearer(f"{ALICE}-v2")))
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    listed = await stub.ListExports(pb.ListExportsRequest(), metadata=bearer(BOB))
    assert len(listed.exports) == 2


def test_token_and_policy_files_checked(tmp_path: Path) -> None:
    assert parse_tokens("just-one-token-here\n") == parse_tokens("default just-one-token-here")
    for text, why in (
        ("", "no token"),
        ("a b c", "expected 'IDENTITY TOKEN'"),
        ("a short", "shorter than 8"),
        ("a 0123456789\nb 0123456789", "given twice"),
    ):
        with pytest.raises(AccessConfigError, match=why):
            parse_tokens(text)
    for table, why in (
        ({"identities": {"x": {"operations": ["read"]}}}, "unknown operation"),
        ({"identities": {"x": {"exports": "disk"}}}, "list of glob"),
        ({"identities": {"x": {"colour": 1}}}, "unknown key"),
        ({"people": {}}, "unknown key"),
    ):
        with pytest.raises(AccessConfigError, match=why):
            Policy.from_table(table)
    path = tmp_path / "policy.toml"
    path.write_text('[identities.ops]\nexports = ["vm-*"]\noperations = ["list"]\n')
    policy = Policy.load(path)
    assert policy.allows("ops", "list", "vm-1") and not policy.allows("ops", "list", "db-1")
    assert not policy.allows("ops", "clear", "vm-1") and not policy.allows("nobody", "list", None)
    # Snapshot exports (EXPORT@SNAPSHOT) follow their export.
    assert policy.allows("ops", "list", "vm-1@daily")
    assert not policy.allows("ops", "list", "db@vm-1")
    with pytest.raises(AccessConfigError, match="missing"):
        TokenFile(tmp_path / "missing")
