"""Smoke-test a running gateway: gRPC health SERVING, then ListExports and ListBitmaps.

    python deploy/smoke.py HOST:PORT [--timeout 60] [--token TOKEN] [--expect-context CTX]
    python deploy/smoke.py HOST:PORT --health-only [--service NAME] [--expect-not-ready]

Used by scripts/container-check against the container's published port; works as well against
a Kubernetes Service through `kubectl port-forward`. Exits 0 when every check passes, 1 with a
one-line reason otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READINESS = "nbdgw.v1.BitmapService"  # the gateway's readiness: NOT_SERVING when NBD is down
SERVING = health_pb2.HealthCheckResponse.SERVING


def status_of(channel: grpc.Channel, service: str) -> str:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
    except grpc.RpcError as exc:  # not listening yet, or the service not registered yet
        return f"{exc.code().name}: {exc.details()}"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def wait_health(channel: grpc.Channel, service: str, deadline: float, *, serving: bool) -> None:
    """Poll until ``service`` is SERVING (or, with ``serving=False``, answers anything else)."""
    shown = service or "(server)"
    status = "no answer"
    while time.monotonic() < deadline:
        status = status_of(channel, service)
        if (status == "SERVING") == serving:
            print(f"health {shown!r}: {status}")
            return
        time.sleep(0.5)
    want = "SERVING" if serving else "not SERVING"
    raise SystemExit(f"smoke: health {shown!r} not {want} in time (last: {status})")


def check_api(channel: grpc.Channel, token: str | None, expect: list[str]) -> None:
    # Imported here so that --health-only needs only grpcio-health-checking.
    from nbdgw.v1 import bitmap_service_pb2 as pb
    from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stub = pb_grpc.BitmapServiceStub(channel)
    try:
        exports = stub.ListExports(pb.ListExportsRequest(), timeout=10, metadata=metadata)
        if not exports.exports:
            raise SystemExit("smoke: ListExports returned no export")
        for export in exports.exports:
            print(f"export {export.name}: {export.size_bytes} bytes, host {export.host}")
        first = exports.exports[0].name
        bitmaps = stub.ListBitmaps(
            pb.ListBitmapsRequest(parent=first), timeout=10, metadata=metadata
        )
    except grpc.RpcError as exc:
        raise SystemExit(f"smoke: {exc.code().name}: {exc.details()}") from None
    contexts = [b.context for b in bitmaps.bitmaps]
    print(f"bitmaps of {first}: {', '.join(contexts) or '(none)'}")
    if not contexts:
        raise SystemExit(f"smoke: ListBitmaps({first}) returned no context")
    missing = [c for c in expect if c not in contexts]
    if missing:
        raise SystemExit(f"smoke: {first} lacks {', '.join(missing)}")


def poke(channel: grpc.Channel, token: str | None) -> None:
    """ListBitmaps on every export, errors ignored: traffic that reaches the NBD hosts."""
    from nbdgw.v1 import bitmap_service_pb2 as pb
    from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    stub = pb_grpc.BitmapServiceStub(channel)
    try:
        exports = stub.ListExports(pb.ListExportsRequest(), timeout=10, metadata=metadata)
        for export in exports.exports:
            try:
                stub.ListBitmaps(
                    pb.ListBitmapsRequest(parent=export.name), timeout=10, metadata=metadata
                )
            except grpc.RpcError as exc:
                print(f"ListBitmaps({export.name}): {exc.code().name}: {exc.details()}")
    except grpc.RpcError as exc:
        print(f"ListExports: {exc.code().name}: {exc.details()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="HOST:PORT of the gateway")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for health")
    parser.add_argument("--token", help="bearer token for the API calls")
    parser.add_argument("--health-only", action="store_true", help="skip the API calls")
    parser.add_argument(
        "--service",
        action="append",
        help='health service to wait for (repeatable; default: "" then ' + READINESS + ")",
    )
    parser.add_argument(
        "--expect-not-ready",
        action="store_true",
        help=f"wait for {READINESS} to be anything but SERVING (an NBD host is down)",
    )
    parser.add_argument(
        "--expect-context",
        action="append",
        default=[],
        metavar="CONTEXT",
        help="ListBitmaps of the first export must include CONTEXT (repeatable)",
    )
    args = parser.parse_args()

    deadline = time.monotonic() + args.timeout
    with grpc.insecure_channel(args.target) as channel:
        if args.expect_not_ready:
            wait_health(channel, "", deadline, serving=True)
            try:
                wait_health(channel, READINESS, time.monotonic() + 5, serving=False)
            except SystemExit:
                # The gateway may only notice a dead host when it next uses it.
                print("note: readiness still SERVING after 5 s without traffic; calling the API")
                poke(channel, args.token)
                wait_health(channel, READINESS, deadline, serving=False)
            return 0
        for service in args.service if args.service is not None else ["", READINESS]:
            wait_health(channel, service, deadline, serving=True)
        if not args.health_only:
            check_api(channel, args.token, args.expect_context)
    print("smoke: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
