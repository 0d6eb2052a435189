"""``nbdgw serve`` as a subprocess: the sample setup, configuration from a file, flags and
environment, bad configuration, and SIGTERM in the middle of a stream (resumed on the next
instance)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.sample import SAMPLE_CLEAN_WRITE, SAMPLE_DIRTY_WRITES, SAMPLE_DIRTY_ZEROES
from nbdcore.storage.image import Image
from nbdgw.v1 import bitmap_service_pb2 as pb
from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
from tests.gateway.conftest import (
    MiB,
    QemuDisk,
    QemuNBD,
    Streamed,
    check_continuity,
    merged,
    rich,
    stream_all,
)

LISTENING = re.compile(r"gateway listening on (\S+)")


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, target: str, banner: str) -> None:
        self.proc = proc
        self.target = target
        self.banner = banner
        self.channel = grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
        self.stub = pb_grpc.BitmapServiceStub(self.channel)


@asynccontextmanager
async def serve(
    args: Sequence[str], cwd: Path, env: dict[str, str] | None = None
) -> AsyncIterator[Served]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        *args,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    banner = ""
    try:
        async with asyncio.timeout(30):
            while not (match := LISTENING.search(banner)):
                line = await proc.stdout.readline()
                if not line:
                    err = await proc.stderr.read()
                    raise AssertionError(f"nbdgw serve exited: {banner}{err.decode()}")
                banner += line.decode()
        # The rest of the banner follows at once.
        async with asyncio.timeout(5):
            while "StreamExtents" not in banner:
                banner += (await proc.stdout.readline()).decode()
        served = Served(proc, match.group(1), banner)
        try:
            yield served
        finally:
            await served.channel.close()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def health(served: Served, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(served.channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return resp.status


async def serving_within(served: Served, service: str, seconds: float = 30) -> int:
    """The health of ``service`` once it is SERVING, or as it still is after ``seconds``: the
    gateway serves at once and probes its hosts in the background, so readiness follows the
    first probe (a moment on a loaded machine)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while (status := await health(served, service)) != health_pb2.HealthCheckResponse.SERVING:
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    return status


async def test_sample_with_nothing_configured(tmp_path: Path) -> None:
    async with serve(["--listen", "127.0.0.1:0"], cwd=tmp_path) as served:
        data = tmp_path / "nbdgw-data"
        assert (data / "sample.img").stat().st_size == 64 * MiB
        assert (data / "nbd.sock").exists()
        assert "nbdgw bitmap map sample --context backup" in served.banner
        assert f"http://{served.target}/nbdgw.v1.BitmapService/StreamExtents" in served.banner
        assert await health(served, "") == health_pb2.HealthCheckResponse.SERVING
        assert (
            await serving_within(served, "nbdgw.v1.BitmapService")
            == health_pb2.HealthCheckResponse.SERVING
        )
        listed = await served.stub.ListExports(pb.ListExportsRequest())
        assert [e.name for e in listed.exports] == ["exports/sample"]
        got = await stream_all(
            served.stub, export="sample", context="backup", filter=pb.EXTENT_FILTER_SET
        )
        dirty = sorted([*SAMPLE_DIRTY_WRITES, SAMPLE_DIRTY_ZEROES])
        # Whole 64 KiB granules: the 4 KiB write dirties one granule.
        expected = [(o, max(n, 65536), 1, 0) for o, n in dirty]
        assert merged(got.rows) == expected
        assert SAMPLE_CLEAN_WRITE[0] not in [r[0] for r in got.rows]
        served.proc.send_signal(signal.SIGTERM)
        assert await served.proc.wait() == 0
    # A second start reuses the sample as it is (with what was cleared or written since).
    before = (tmp_path / "nbdgw-data" / "sample.img").stat().st_mtime_ns
    async with serve(["--listen", "127.0.0.1:0"], cwd=tmp_path) as served:
        assert (tmp_path / "nbdgw-data" / "sample.img").stat().st_mtime_ns == before
        await served.stub.ClearRange(
            pb.ClearRangeRequest(
                export="sample", bitmap="backup", offset=0, length=MiB, unconditional=True
            )
        )
    async with serve(["--listen", "127.0.0.1:0"], cwd=tmp_path) as served:
        got = await stream_all(
            served.stub, export="sample", context="backup", filter=pb.EXTENT_FILTER_SET
        )
        assert got.rows[0][0] == SAMPLE_DIRTY_WRITES[1][0]  # the clear persisted


async def test_config_file_flags_and_environment(tmp_path: Path, qemu_disk: QemuDisk) -> None:
    from tests.peers import tool

    host = QemuNBD(tool("qemu-nbd"), qemu_disk, tmp_path / "q.sock").start()
    try:
        image = tmp_path / "img.raw"
        Image.create(image, 4 * MiB).close()
        (tmp_path / "gw.toml").write_text(
            "grace_period = 2.0\n"
            "[[exports]]\n"
            'name = "fromfile"\n'
            f'uri = "{host.uri}"\n'
            'description = "qemu disk"\n'
            "[[exports]]\n"
            'name = "local"\n'
            'image = "img.raw"\n'
        )
        env = {
            "NBDGW_CONFIG": str(tmp_path / "gw.toml"),
            "NBDGW_LISTEN": "127.0.0.1:0",
            "NBDGW_EXPORTS": f"fromenv={host.uri}",
            "NBDGW_DATA_DIR": str(tmp_path / "d"),
        }
        async with serve(["--export", f"fromflag={host.uri}"], cwd=tmp_path, env=env) as served:
            listed = await served.stub.ListExports(pb.ListExportsRequest())
            # --export replaces $NBDGW_EXPORTS (flags win over the environment).
            assert [e.name for e in listed.exports] == [
                "exports/fromfile",
                "exports/local",
                "exports/fromflag",
            ]
            by_name = {e.name: e for e in listed.exports}
            assert by_name["exports/fromfile"].description == "qemu disk"
            assert by_name["exports/fromfile"].size_bytes == qemu_disk.size
            assert by_name["exports/local"].size_bytes == 4 * MiB
            assert by_name["exports/local"].host == "embedded"
            assert (tmp_path / "d" / "nbd.sock").exists()
            assert not (tmp_path / "nbdgw-data").exists()  # no sample when configured
        async with serve([], cwd=tmp_path, env=env) as served:
            listed = await served.stub.ListExports(pb.ListExportsRequest())
            assert "exports/fromenv" in [e.name for e in listed.exports]
    finally:
        host.stop()


@pytest.mark.parametrize(
    ("args", "toml", "needle"),
    [
        # One of each kind; test_serve_config.py covers the parsing itself in-process.
        (["--export", "a=http://x"], None, "scheme"),
        (["--listen", "nowhere"], None, "HOST:PORT"),
        ([], "listen = 5\nbogus = 1\n", "bogus"),
    ],
)
async def test_bad_configuration(
    tmp_path: Path, args: list[str], toml: str | None, needle: str
) -> None:
    if toml is not None:
        (tmp_path / "gw.toml").write_text(toml)
        args = [*args, "--config", str(tmp_path / "gw.toml")]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "serve",
        "--listen",
        "127.0.0.1:0",
        *args,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, (out, err)
    text = err.decode()
    assert needle in text
    assert "Traceback" not in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "nbdgw-data").exists()


async def test_sigterm_mid_stream_resumes_on_next_instance(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    image = Image.create(path, 32 * MiB)
    try:
        image.add_bitmap("backup")
        pattern = bytes(range(256)) * 4096  # 1 MiB
        for off in range(0, 24 * MiB, MiB):
            image.write(pattern, off)
    finally:
        image.close()
    args = ["--listen", "127.0.0.1:0", "--image", f"big={path}", "--grace-period", "10"]
    fields = dict(export="big", context="backup", filter=pb.EXTENT_FILTER_SET, include_data=True)
    got: list[pb.StreamExtentsResponse] = []
    async with serve(args, cwd=tmp_path) as served:
        call = served.stub.StreamExtents(pb.StreamExtentsRequest(**fields))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for msg in call:
                got.append(msg)
                if len(got) == 2:
                    served.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.05)  # a slow reader
        err = rich(info.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE
        assert err.info.reason == "GATEWAY_SHUTTING_DOWN"
        err.detail(error_details_pb2.RetryInfo)
        assert int(err.info.metadata["resume_offset"]) == got[-1].next_offset
        assert err.info.metadata["resume_token"] == got[-1].resume_token
        assert 0 < got[-1].next_offset < 24 * MiB
        async with asyncio.timeout(15):
            assert await served.proc.wait() == 0
    async with serve(args, cwd=tmp_path) as served:
        rest = await stream_all(served.stub, resume_token=got[-1].resume_token, **fields)
    both = [*got, *rest.messages]
    check_continuity(both, 0)
    joined = Streamed(both)
    assert merged(joined.rows) == [(0, 24 * MiB, 1, pb.ALLOCATION_DATA)]
    assert b"".join(joined.data[o] for o in sorted(joined.data)) == pattern * 24


async def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async with serve(["--listen", "127.0.0.1:0"], cwd=tmp_path) as served:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--listen",
            served.target,
            "--data-dir",
            str(tmp_path / "second"),
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        assert f"cannot listen on {served.target}" in err.decode()
        assert "Traceback" not in err.decode() and b"listening" not in out
        # The first one is unaffected.
        listed = await served.stub.ListExports(pb.ListExportsRequest())
        assert [e.name for e in listed.exports] == ["exports/sample"]
