"""A client that goes away while a yielding servicer's message waits on flow control: the
gateway's observability wrapper used to leave the generator to the garbage collector, whose
clean-up then asked grpc about the freed call and crashed the process (SIGSEGV: found by a
review; the CSI GetMetadata* streams yield their messages). Run in a child process, so that a
crash is this test's failure, not the test run's."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.cli_support import make_embedded_disk
from tests.peers import ROOT

SCRIPT = textwrap.dedent(
    """
    import asyncio, gc, json, grpc
    from gateway.observability import InFlight, ObservabilityInterceptor

    BIG = b"x" * (1 << 20)

    async def yielding(request, context):
        for _ in range(10000):
            yield BIG

    async def writing(request, context):
        for _ in range(10000):
            await context.write(BIG)

    async def main():
        calls = InFlight()
        server = grpc.aio.server(interceptors=[ObservabilityInterceptor(None, calls)])
        handlers = {
            "Yield": grpc.unary_stream_rpc_method_handler(yielding),
            "Write": grpc.unary_stream_rpc_method_handler(writing),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        counts = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for method in ("Yield", "Write"):
                call = channel.unary_stream(f"/t.S/{method}")(b"")
                await call.read()
                await asyncio.sleep(0.3)  # the server now waits on flow control
                running = calls.count
                call.cancel()
                await asyncio.sleep(0.5)
                gc.collect()
                await asyncio.sleep(0.2)
                counts[method] = [running, calls.count]
            # Still serving.
            more = channel.unary_stream("/t.S/Yield")(b"")
            assert len(await more.read()) == len(BIG)
            more.cancel()
        await server.stop(0)
        print(json.dumps(counts))

    asyncio.run(main())
    """
)


def test_a_client_going_away_mid_stream_is_survived_and_counted() -> None:
    for _ in range(3):  # the crash came 3 runs in 3; once is enough to show it
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
        counts = proc.stdout.strip().splitlines()[-1]
        # Each call counted while it ran, and not any more once its client went away.
        assert counts == '{"Yield": [1, 0], "Write": [1, 0]}', counts


async def test_the_gateway_counts_its_running_calls(tmp_path: Path, start_gateway: Any) -> None:
    """What a graceful stop waits for (gateway.drain): the API port's calls while they run,
    health checks not (a Watch lasts as long as its watcher)."""
    disk = make_embedded_disk(tmp_path / "disk.img")
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_image_export("disk", disk.path)
    run = await start_gateway(cfg)
    health = health_pb2_grpc.HealthStub(run.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    await watch.read()
    request = pb.StreamExtentsRequest(
        export="disk", context="base:allocation", include_data=True, max_extents_per_message=1
    )
    stream = run.stub.StreamExtents(request)
    await stream.read()  # running, its next messages waiting for this reader
    assert run.gateway.in_flight.count == 1
    stream.cancel()
    watch.cancel()
    for _ in range(100):
        if run.gateway.in_flight.count == 0:
            break
        await asyncio.sleep(0.05)
    assert run.gateway.in_flight.count == 0
