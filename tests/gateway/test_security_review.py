"""Findings of the security and reliability review (issue 15, part 2), each with the test that
failed before its fix: per-export health behind the API's own access checks, token files that
fail closed, names checked whole (NUL, a trailing newline), errors that do not echo what they
were sent, and modes that do not depend on the umask."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import ConfigError, GatewayConfig
from gateway.security.access import Policy, TokenFile
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import snapshot_service_pb2 as spb
from nbdgw.v1 import snapshot_service_pb2_grpc as spb_grpc
from tests.gateway.conftest import call_error
from tests.gateway.security_support import bearer, fails
from tests.gateway.test_service_embedded import make_image

ALICE = "alice-token-0123456789"
BOB = "bob-token-9876543210"
CAROL = "carol-token-abcdefghij"
POLICY = {
    "identities": {
        "alice": {"exports": ["disk"], "operations": ["list", "extents"]},
        "bob": {"exports": ["*"], "operations": ["*"]},
        "carol": {"exports": ["*"], "operations": ["*"]},
    }
}
SERVING = health_pb2.HealthCheckResponse.SERVING


def guarded_config(tmp_path: Path, **extra: Any) -> GatewayConfig:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {ALICE}\nbob {BOB}\ncarol {CAROL}\n")
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    config.add_image_export("secret-vm", make_image(tmp_path / "secret.img"))
    config.tokens = TokenFile(tokens, interval=0)
    config.policy = Policy.from_table(POLICY)
    for name, value in extra.items():
        setattr(config, name, value)
    return config


# --- per-export health --------------------------------------------------------------------------


async def health_code(stub: Any, service: str, token: str | None = None) -> Any:
    metadata = bearer(token) if token else None
    try:
        resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), metadata=metadata)
    except grpc.aio.AioRpcError as err:
        return err.code()
    return resp.status


async def test_per_export_health_needs_the_access_of_get_export(
    tmp_path: Path, start_gateway: Any
) -> None:
    """Without credentials an existing and a missing export got different answers (SERVING,
    NOT_FOUND), which the API itself hides; now the same checks as GetExport apply."""
    run = await start_gateway(guarded_config(tmp_path, health_listen="127.0.0.1:0"))
    health = health_pb2_grpc.HealthStub(run.channel)
    # The overall statuses stay open (the kubelet sends no credentials).
    assert await health_code(health, "") == SERVING
    assert await health_code(health, "nbdgw.v1.BitmapService") == SERVING
    # No token: the same answer for an export that exists and one that does not.
    for name in ("exports/disk", "exports/no-such-export"):
        assert await health_code(health, name) == grpc.StatusCode.UNAUTHENTICATED, name
    # alice may see "disk" only: another's export and a missing one look the same to her.
    assert await health_code(health, "exports/disk", ALICE) == SERVING
    for name in ("exports/secret-vm", "exports/no-such-export"):
        assert await health_code(health, name, ALICE) == grpc.StatusCode.PERMISSION_DENIED, name
        f = await fails(run.stub.GetExport(pb.GetExportRequest(name=name), metadata=bearer(ALICE)))
        assert f.code == grpc.StatusCode.PERMISSION_DENIED  # as GetExport answers
    assert await health_code(health, "exports/secret-vm", BOB) == SERVING
    assert await health_code(health, "exports/no-such-export", BOB) == grpc.StatusCode.NOT_FOUND
    # Watch too.
    watch = health.Watch(health_pb2.HealthCheckRequest(service="exports/disk"))
    f = await fails(watch)
    assert f.code == grpc.StatusCode.UNAUTHENTICATED
    # The plaintext health port has only the overall statuses.
    port = run.gateway.listening.health_port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as plain:
        probe = health_pb2_grpc.HealthStub(plain)
        assert await health_code(probe, "") == SERVING
        assert await health_code(probe, "nbdgw.v1.BitmapService") == SERVING
        for name in ("exports/disk", "exports/no-such-export"):
            assert await health_code(probe, name, BOB) == grpc.StatusCode.NOT_FOUND, name


# --- token files fail closed ----------------------------------------------------------------


async def test_token_file_reload_fails_closed(tmp_path: Path, start_gateway: Any) -> None:
    """A rewrite with one bad line, an emptied or a deleted file kept every previous token
    valid. Now only the tokens the new file still lists (on good lines) stay valid, the error is
    logged, and the metrics show it."""
    run = await start_gateway(guarded_config(tmp_path))
    tokens = tmp_path / "tokens"
    request = pb.ListExportsRequest()

    async def code(token: str) -> grpc.StatusCode:
        try:
            await run.stub.ListExports(request, metadata=bearer(token))
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    def metric(name: str) -> float:
        text = run.gateway.metrics.exposition()[0].decode()
        values = [ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")]
        assert values, f"no {name} in the metrics"
        return float(values[0])

    assert await code(ALICE) == await code(BOB) == await code(CAROL) == grpc.StatusCode.OK
    assert metric("nbdgw_token_file_valid") == 1
    # Carol revoked, by a rewrite that also has a bad line.
    tokens.write_text(f"alice {ALICE}\nbob {BOB} trailing-garbage\n")
    assert await code(CAROL) == grpc.StatusCode.UNAUTHENTICATED
    assert await code(BOB) == grpc.StatusCode.UNAUTHENTICATED  # its line cannot be read
    assert await code(ALICE) == grpc.StatusCode.OK
    assert metric("nbdgw_token_file_valid") == 0
    assert metric("nbdgw_token_file_reload_errors_total") >= 1
    tokens.write_text("")
    assert await code(ALICE) == grpc.StatusCode.UNAUTHENTICATED
    tokens.write_text(f"alice {ALICE}\n")
    assert await code(ALICE) == grpc.StatusCode.OK
    assert metric("nbdgw_token_file_valid") == 1
    tokens.unlink()
    assert await code(ALICE) == grpc.StatusCode.UNAUTHENTICATED
    assert metric("nbdgw_token_file_valid") == 0
    tokens.write_text(f"bob {BOB}\n")
    assert await code(BOB) == grpc.StatusCode.OK
    assert await code(ALICE) == grpc.StatusCode.UNAUTHENTICATED


def test_token_file_reload_logs_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"alice {ALICE}\nbob {BOB}\n")
    tokens = TokenFile(path, interval=0)
    path.write_text(f"alice {ALICE}\nbob\tshort\n")
    assert tokens.lookup(ALICE) == "alice" and tokens.lookup(BOB) is None
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert errors and "line 2" in errors[0].getMessage(), caplog.text
    assert tokens.reload_errors == 1 and not tokens.valid


# --- names ------------------------------------------------------------------------------------


async def test_nul_in_a_context_name_is_invalid_argument(
    tmp_path: Path, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    run = await start_gateway(config)
    for bad in ("qemu:dirty-bitmap:back\0up", "back\0up", "base:allocation\0"):
        err = await call_error(
            run.stub.StreamExtents(pb.StreamExtentsRequest(export="disk", context=bad))
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.message)
        assert err.fields() == {"context"}
        err = await call_error(
            run.stub.ClearRange(pb.ClearRangeRequest(export="disk", bitmap=bad, length=65536))
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT, (bad, err.message)
    assert "Traceback" not in caplog.text and "unexpected failure" not in caplog.text


async def test_names_with_a_trailing_newline_are_refused(
    tmp_path: Path, start_gateway: Any
) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    with pytest.raises(ConfigError):
        config.add_image_export("disk\n", make_image(tmp_path / "disk.img"))
    config.add_image_export("disk", tmp_path / "disk.img")
    run = await start_gateway(config)
    stub = spb_grpc.SnapshotServiceStub(run.channel)
    for bad in ("snap\n", "snap\r\n"):
        err = await call_error(
            stub.CreateSnapshot(spb.CreateSnapshotRequest(parent="disk", snapshot_id=bad))
        )
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    snapshots = tmp_path / "disk.img.nbdgw" / "snapshots"
    assert not snapshots.exists() or list(snapshots.iterdir()) == []
    listed = await run.stub.ListExports(pb.ListExportsRequest())
    assert [e.name for e in listed.exports] == ["exports/disk"]


async def test_errors_do_not_echo_long_names(tmp_path: Path, start_gateway: Any) -> None:
    """A 10 KB export name made a 30 KB trailer, and the client got RESOURCE_EXHAUSTED
    (its metadata limit) instead of NOT_FOUND."""
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    run = await start_gateway(config)
    long = "x" * 10_000
    calls = [
        run.stub.GetExport(pb.GetExportRequest(name=long)),
        run.stub.ListBitmaps(pb.ListBitmapsRequest(parent=long)),
        run.stub.StreamExtents(pb.StreamExtentsRequest(export=long, context="backup")),
        run.stub.StreamExtents(pb.StreamExtentsRequest(export="disk", context="y" * 10_000)),
        run.stub.ClearRange(pb.ClearRangeRequest(export=long, bitmap="backup", length=65536)),
    ]
    for call in calls:
        err = await call_error(call)
        assert err.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        size = sum(len(k) + len(v) for k, v in err.trailers.items())
        assert len(err.message) < 1000 and size < 4000, (len(err.message), size)


# --- modes whatever the umask -----------------------------------------------------------------


@pytest.fixture
def umask_000() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


async def test_data_folder_and_socket_modes_with_umask_000(
    tmp_path: Path, start_gateway: Any, umask_000: None
) -> None:
    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    run = await start_gateway(config)
    sock = os.stat(run.gateway.listening.nbd_socket)
    assert stat.S_IMODE(sock.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(config.data_dir).st_mode) == 0o700


# --- cancellations ----------------------------------------------------------------------------


async def test_client_cancellations_are_cancelled_not_internal(
    tmp_path: Path, start_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Clients that cancel data streams at random points (89 of 1,500 were INTERNAL, logged
    as 'unexpected failure' with a traceback): each is CANCELLED in the metrics, logged below
    WARNING, and the gateway serves on."""
    import asyncio
    import random

    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    run = await start_gateway(config)
    rng = random.Random(15)
    request = pb.StreamExtentsRequest(
        export="disk", context="base:allocation", filter=pb.EXTENT_FILTER_ALL, include_data=True,
    )  # fmt: skip

    async def cancel_after(n: int, pause: float) -> None:
        call = run.stub.StreamExtents(request)
        got = 0
        while got < n:
            await call.read()
            got += 1
        await asyncio.sleep(pause)
        call.cancel()

    cancels = 800
    for _ in range(0, cancels, 40):
        await asyncio.gather(
            *(cancel_after(rng.randrange(0, 3), rng.choice((0, 0, 0.001))) for _i in range(40))
        )
    await asyncio.sleep(0.5)  # the last calls finish on the server
    text = run.gateway.metrics.exposition()[0].decode()
    handled: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("grpc_server_handled_total{") and 'grpc_method="StreamExtents"' in line:
            code = line.split('grpc_code="')[1].split('"')[0]
            handled[code] = handled.get(code, 0) + float(line.split()[-1])
    assert set(handled) <= {"OK", "CANCELLED"}, handled
    assert handled.get("CANCELLED", 0) > cancels / 2, handled
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud[:5]]
    stream = run.stub.StreamExtents(pb.StreamExtentsRequest(export="disk", context="backup"))
    assert [m async for m in stream]  # still serving


# --- unauthenticated calls ----------------------------------------------------------------------


async def test_unauthenticated_calls_are_bounded_and_timed_out(
    tmp_path: Path, start_gateway: Any
) -> None:
    """Token-less Health.Watch streams were held open without limit (10,000 grew the gateway
    by ~50 MB), and so were calls sent as headers without a body. Now token-less calls are
    bounded per connection and in total, and end after ``unauthenticated_timeout``; a call
    whose credentials are missing or wrong is refused on its headers, body or not."""
    import asyncio

    from gateway.security.limits import Limits

    limits = Limits(
        max_unauthenticated=6, max_unauthenticated_per_connection=4, unauthenticated_timeout=2.0
    )
    run = await start_gateway(guarded_config(tmp_path, limits=limits))
    request = health_pb2.HealthCheckRequest(service="")

    async def watching(channel: grpc.aio.Channel) -> Any:
        call = health_pb2_grpc.HealthStub(channel).Watch(request)
        first = await call.read()
        assert first.status == SERVING
        return call

    async def refused(channel: grpc.aio.Channel) -> Any:
        call = health_pb2_grpc.HealthStub(channel).Watch(request)
        f = await fails(call)
        return f.code

    # Two connections (channels to one target share one unless told not to).
    own = [("grpc.use_local_subchannel_pool", 1)]
    one = grpc.aio.insecure_channel(run.target, options=own)
    two = grpc.aio.insecure_channel(run.target, options=own)
    try:
        held = [await watching(one) for _ in range(4)]
        assert await refused(one) == grpc.StatusCode.RESOURCE_EXHAUSTED  # per connection
        held += [await watching(two) for _ in range(2)]
        assert await refused(two) == grpc.StatusCode.RESOURCE_EXHAUSTED  # in total
        # An authenticated caller is not held back by them.
        ok = await run.stub.ListExports(pb.ListExportsRequest(), metadata=bearer(BOB))
        assert len(ok.exports) == 2
        # They end on their own, soon (DEADLINE_EXCEEDED), and free their slots.
        for call in held:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
                    pass
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await watching(one)).cancel()
        # Headers and no body: refused at once, not held until a body that never comes.
        never: asyncio.Event = asyncio.Event()

        async def no_body() -> Any:
            await never.wait()
            yield b""  # pragma: no cover

        method = "/nbdgw.v1.BitmapService/StreamExtents"
        for metadata in (None, bearer("wrong-token-0000")):
            call = one.stream_stream(method)(no_body(), metadata=metadata)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(call.read(), 30)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await one.close()
        await two.close()


# --- hosts that stall -------------------------------------------------------------------------


async def test_a_host_stalling_at_the_greeting_does_not_delay_the_start(
    tmp_path: Path, start_gateway: Any
) -> None:
    """A host that accepts and never greets delayed the start of every export by the connect
    timeout. Now the gateway serves at once, probes hosts in the background, and readiness
    names the stalled one while the others serve."""
    import asyncio

    accepted: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append((reader, writer))  # never a greeting

    sock = tmp_path / "stall.sock"
    stalled = await asyncio.start_unix_server(stall, path=str(sock))
    try:
        config = GatewayConfig(data_dir=tmp_path / "data")
        config.add_image_export("disk", make_image(tmp_path / "disk.img"))
        config.add_uri_export("stuck", f"nbd+unix:///x?socket={sock}")
        run = await start_gateway(config, wait_hosts=False)  # its connect timeout: 5 s
        # start() returned before the gateway's first connection got (or gave up on) a
        # greeting: before, it gave up after the connect timeout, and only then started.
        for _ in range(100):
            if accepted:
                break
            await asyncio.sleep(0.02)
        assert accepted and not any(r.at_eof() for r, _ in accepted)
        health = health_pb2_grpc.HealthStub(run.channel)
        for _ in range(200):
            if await health_code(health, "exports/disk") == SERVING:
                break
            await asyncio.sleep(0.05)
        assert await health_code(health, "exports/disk") == SERVING
        assert await health_code(health, "exports/stuck") != SERVING
        assert await health_code(health, "nbdgw.v1.BitmapService") != SERVING
        got = await run.stub.GetExport(pb.GetExportRequest(name="disk"))
        assert got.size_bytes > 0
    finally:
        stalled.close()
        for _, w in accepted:
            w.close()


async def test_a_second_gateway_never_takes_a_live_embedded_socket(
    tmp_path: Path, start_gateway: Any
) -> None:
    """The embedded host unlinked whatever was at DATA/nbd.sock: a second gateway on the same
    data folder silently took the first one's socket. Now only a stale socket is replaced."""
    from gateway.server import Gateway

    config = GatewayConfig(data_dir=tmp_path / "data")
    config.add_image_export("disk", make_image(tmp_path / "disk.img"))
    run = await start_gateway(config)
    other = GatewayConfig(data_dir=tmp_path / "data", listen="127.0.0.1:0")
    other.add_image_export("other", make_image(tmp_path / "other.img"))
    with pytest.raises(OSError, match="in use"):
        await Gateway(other).start()
    got = await run.stub.GetExport(pb.GetExportRequest(name="disk"))  # still its own socket
    assert got.size_bytes > 0 and got.state == pb.EXPORT_STATE_AVAILABLE
    from nbdcore.aio.client import NBDClient

    client = await NBDClient.connect(f"nbd+unix:///disk?socket={run.gateway.listening.nbd_socket}")
    assert client.size == got.size_bytes
    await client.close()
