"""100 concurrent streams against a token-guarded gateway process on this 2-core machine, while
a flood of unauthenticated and wrong-token calls runs: every stream completes with exactly the
disk's extents (and data, for a fifth of them); every bad call is UNAUTHENTICATED. Timing is
bench/bench_security_load.py's business (same driver), not asserted here."""

from __future__ import annotations

from pathlib import Path

from bench.bench_security_load import make_disk, run_load, write_tokens
from tests.gateway.cli_support import GatewayProcess


async def test_100_streams_with_a_flood(tmp_path: Path) -> None:
    disk = make_disk(tmp_path / "disk.img")
    tokens = write_tokens(tmp_path / "tokens")
    gw = GatewayProcess(
        "--image", f"disk={disk}", "--token-file", str(tokens), data_dir=tmp_path / "gw"
    ).start()
    try:
        result = await run_load(gw.target, streams=100, flood_calls=400)
    finally:
        gw.stop()
    # run_load checked every stream's extents and data; all of them completed.
    assert len(result.results) == 100
    assert sum(r.data_bytes for r in result.results) == 20 * 4 * 1024 * 1024
    assert result.flood_codes == {"UNAUTHENTICATED": 400}
