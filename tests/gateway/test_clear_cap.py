"""The ledger's cap on intervals per scope (review M12): a clear that would leave more than
``max_intervals`` disjoint ranges is refused whole (nothing recorded, in memory or on disk), a
clear that joins ranges still passes, and through the gateway the refusal is RESOURCE_EXHAUSTED
with its ErrorInfo reason and a QuotaFailure naming the bitmap."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2

from gateway import errors
from gateway.config import ConfigError, GatewayConfig, load_file
from gateway.ledger import Ledger, Scope, ScopeFullError
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import QemuNBD, call_error

S = Scope("disk", "qemu:dirty-bitmap:b0", "g1")
K = 4096


def rows(path: Path) -> list[tuple[int, int]]:
    db = sqlite3.connect(path)
    try:
        return sorted(db.execute("SELECT start, stop FROM clears"))
    finally:
        db.close()


async def test_a_clear_past_the_cap_is_refused_whole(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    ledger = await Ledger.open(path, max_intervals=3)
    try:
        await ledger.set_generation("disk", "g1")
        for i in range(3):
            await ledger.record_clear(S, 10 * i * K, K)
        before = list(await ledger.mask(S))
        with pytest.raises(ScopeFullError) as info:
            await ledger.record_clear(S, 100 * K, K, export_size=1 << 30)
        assert (info.value.limit, info.value.intervals, info.value.scope) == (3, 3, S)
        assert list(await ledger.mask(S)) == before
        assert ledger.export_size("disk", "g1") is None  # not even the size was written
        # Joining two ranges (fewer intervals) and growing one (as many) still pass.
        await ledger.record_clear(S, K, 9 * K)
        await ledger.record_clear(S, 20 * K, 2 * K)
        assert list(await ledger.mask(S)) == [(0, 11 * K), (20 * K, 22 * K)]
        # Now there is room for one more.
        await ledger.record_clear(S, 100 * K, K)
        # Another scope has its own count.
        await ledger.record_clear(Scope("disk", "qemu:dirty-bitmap:b1", "g1"), 0, K)
    finally:
        await ledger.aclose()
    assert (100 * K, 101 * K) in rows(path)
    reopened = await Ledger.open(path, max_intervals=3)
    try:
        assert list(await reopened.mask(S)) == [(0, 11 * K), (20 * K, 22 * K), (100 * K, 101 * K)]
        with pytest.raises(ScopeFullError):
            await reopened.record_clear(S, 200 * K, K)
    finally:
        await reopened.aclose()
    assert (200 * K, 201 * K) not in rows(path)


async def test_refusals_inside_one_group_commit_touch_nothing_else(tmp_path: Path) -> None:
    """Many concurrent clears share transactions: the ones past the cap fail alone."""
    path = tmp_path / "ledger.sqlite"
    ledger = await Ledger.open(path, max_intervals=10)
    try:
        await ledger.set_generation("disk", "g1")
        results = await asyncio.gather(
            *(ledger.record_clear(S, 2 * i * K, K) for i in range(40)), return_exceptions=True
        )
        ok = [i for i, r in enumerate(results) if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 10 and len(refused) == 30
        assert all(isinstance(r, ScopeFullError) for r in refused)
        want = [(2 * i * K, (2 * i + 1) * K) for i in ok]
        assert list(await ledger.mask(S)) == want
    finally:
        await ledger.aclose()
    assert rows(path) == want


def test_the_one_mapping_says_resource_exhausted() -> None:
    err = errors.from_exception(ScopeFullError(S, 5, 5), export="disk")
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "RESOURCE_EXHAUSTED"
    assert err.metadata["limit"] == "5" and err.metadata["generation"] == "g1"
    (quota,) = err.details
    assert isinstance(quota, error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "exports/disk/bitmaps/qemu:dirty-bitmap:b0"


def test_setting_from_toml(tmp_path: Path) -> None:
    assert GatewayConfig().ledger_max_intervals == 1_000_000
    conf = tmp_path / "gw.toml"
    conf.write_text("ledger_max_intervals = 12\n")
    assert load_file(conf).ledger_max_intervals == 12
    conf.write_text("ledger_max_intervals = 0\n")
    with pytest.raises(ConfigError, match="at least 1"):
        load_file(conf)


async def test_clear_range_past_the_cap_through_the_gateway(
    tmp_path: Path, qemu_nbd: QemuNBD, start_gateway: Any
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.ledger_max_intervals = 2
    cfg.add_uri_export("qd", qemu_nbd.uri)
    gw = await start_gateway(cfg)
    stub = gw.stub
    await stub.SetExportGeneration(pb.SetExportGenerationRequest(export="qd", generation="g1"))

    def clear(offset: int, length: int = K) -> Any:
        request = pb.ClearRangeRequest(
            export="qd", bitmap="b0", offset=offset, length=length, generation="g1"
        )
        return stub.ClearRange(request)

    await clear(0)
    await clear(8 * K)
    err = await call_error(clear(16 * K))
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.info.reason == "RESOURCE_EXHAUSTED"
    assert err.info.metadata["limit"] == "2"
    quota = err.detail(error_details_pb2.QuotaFailure)
    assert quota.violations[0].subject == "exports/qd/bitmaps/qemu:dirty-bitmap:b0"
    # Joining the two ranges is still accepted.
    resp = await clear(K, 7 * K)
    assert resp.cleared_bytes == 7 * K
    await clear(16 * K)
