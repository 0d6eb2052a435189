"""``nbdgw backup --clear`` killed at random points and resumed, against a remote nbdcore host
(clears at the source) and a read-only qemu-nbd export (clears in the gateway's ledger): the
backup equals the source and the bitmap ends clean."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.backup import state_path
from tests.gateway.clear_support import NbdcoreHost, ReadOnlyQemu, dirty_runs
from tests.gateway.cli_support import (
    GatewayProcess,
    check_incremental,
    cli,
    dirty_map,
    granules,
    make_embedded_disk,
    make_qemu_disk,
    run_and_kill,
)


def backup_killed_twice_then_resumed(
    target: str, export: str, bitmap: str, out: Path, dirty: list[tuple[int, int]], seed: int
) -> dict[str, Any]:
    args = ["backup", export, "--bitmap", bitmap, str(out), "--clear", "--target", target]
    args += ["--save-every", "64k"]
    rng = random.Random(seed)
    first = rng.randrange(dirty[0][0] + 1, dirty[len(dirty) // 2][0] + 1)
    killed = run_and_kill(args, state_path(out), first)
    second = rng.randrange(killed["next_offset"] + 1, dirty[-1][0] + 1)
    run_and_kill([*args, "--resume"], state_path(out), second)
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    return dict(json.loads(state_path(out).read_text()))


@pytest.mark.parametrize("seed", [21, 22])
def test_backup_clear_resumed_at_the_source(tmp_path: Path, seed: int) -> None:
    disk = make_embedded_disk(tmp_path / "disk.raw", seed=seed)
    host = NbdcoreHost(disk.path, tmp_path / "host.sock").start()
    try:
        with GatewayProcess("--export", f"disk={host.uri}", data_dir=tmp_path / "gw") as gw:
            dirty = dirty_map(gw.target, "disk", "backup")
            assert dirty == granules(disk.dirty, disk.size)
            out = tmp_path / "inc.img"
            state = backup_killed_twice_then_resumed(gw.target, "disk", "backup", out, dirty, seed)
            check_incremental(out, bytes(disk.content), dirty)
            assert dirty_map(gw.target, "disk", "backup") == []
            assert state["complete"] and state["pending_clear"] == [] and state["generation"] == ""
    finally:
        host.stop()


@pytest.mark.parametrize("seed", [31])
def test_backup_clear_resumed_in_the_ledger(tmp_path: Path, seed: int) -> None:
    qdisk = make_qemu_disk(tmp_path)
    host = ReadOnlyQemu(qdisk.path, tmp_path / "q.sock").start()
    config = tmp_path / "gw.toml"
    config.write_text(f'[[exports]]\nname = "vm"\nuri = "{host.uri}"\ngeneration = "snap-7"\n')
    try:
        with GatewayProcess("--config", str(config), data_dir=tmp_path / "gw") as gw:
            dirty = dirty_map(gw.target, "vm", "b0")
            assert dirty == granules(qdisk.b0_writes, qdisk.size)
            out = tmp_path / "inc.img"
            state = backup_killed_twice_then_resumed(gw.target, "vm", "b0", out, dirty, seed)
            check_incremental(out, qdisk.raw.read_bytes(), dirty)
            assert dirty_map(gw.target, "vm", "b0") == []
            assert state["complete"] and state["generation"] == "snap-7"
            # The host's bitmap is untouched: the clears live in the gateway's ledger.
            assert asyncio.run(dirty_runs(host.uri, "qemu:dirty-bitmap:b0")) == dirty
    finally:
        host.stop()


def test_resume_refused_after_a_generation_change(tmp_path: Path) -> None:
    """The export now shows another point in time: what the interrupted run copied must not be
    acknowledged under the new generation."""
    import grpc

    from nbdgw.v1 import bitmap_service_pb2 as pb
    from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc

    qdisk = make_qemu_disk(tmp_path)
    host = ReadOnlyQemu(qdisk.path, tmp_path / "q.sock").start()
    config = tmp_path / "gw.toml"
    config.write_text(f'[[exports]]\nname = "vm"\nuri = "{host.uri}"\ngeneration = "snap-1"\n')
    try:
        with GatewayProcess("--config", str(config), data_dir=tmp_path / "gw") as gw:
            dirty = dirty_map(gw.target, "vm", "b0")
            out = tmp_path / "inc.img"
            args = ["backup", "vm", "--bitmap", "b0", str(out), "--clear", "--target", gw.target]
            args += ["--save-every", "64k"]
            killed = run_and_kill(args, state_path(out), dirty[len(dirty) // 2][0])
            assert killed["generation"] == "snap-1"
            with grpc.insecure_channel(gw.target) as channel:
                pb_grpc.BitmapServiceStub(channel).SetExportGeneration(
                    pb.SetExportGenerationRequest(export="vm", generation="snap-2")
                )
            resumed = cli(*args, "--resume")
            assert resumed.returncode == 1
            assert "generation" in resumed.stderr and "snap-2" in resumed.stderr
            # Nothing was cleared under the new generation.
            assert dirty_map(gw.target, "vm", "b0") == dirty
    finally:
        host.stop()


def test_backup_clear_stops_at_once_on_a_full_ledger(tmp_path: Path) -> None:
    """The ledger's interval cap answers RESOURCE_EXHAUSTED without RetryInfo: ``backup --clear``
    reports it in one line at once instead of retrying (it is not a rate limit), and the copy
    itself is complete and resumable."""
    qdisk = make_qemu_disk(tmp_path)
    host = ReadOnlyQemu(qdisk.path, tmp_path / "q.sock").start()
    config = tmp_path / "gw.toml"
    config.write_text(
        "ledger_max_intervals = 1\n"
        f'[[exports]]\nname = "vm"\nuri = "{host.uri}"\ngeneration = "g1"\n'
    )
    try:
        with GatewayProcess("--config", str(config), data_dir=tmp_path / "gw") as gw:
            dirty = dirty_map(gw.target, "vm", "b0")
            assert len(dirty) >= 2, "the fixture must have disjoint dirty runs"
            out = tmp_path / "inc.img"
            start = time.monotonic()
            proc = cli(
                "backup", "--target", gw.target, "vm", "--bitmap", "b0", "--clear", str(out),
                check=False,
            )  # fmt: skip
            elapsed = time.monotonic() - start
            assert proc.returncode == 1, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert lines and "RESOURCE_EXHAUSTED" in lines[-1], proc.stderr
            assert "Traceback" not in proc.stderr
            # Retrying 100 times with backoff took minutes; at once means well under that.
            assert elapsed < 60
            # One clear got in (one interval); the rest of the bitmap is still dirty.
            left = dirty_map(gw.target, "vm", "b0")
            assert left and left != dirty
    finally:
        host.stop()
