"""Issue 15, part 1: a clear on a live, writable export never clears a write it did not see.

A writer writes 4 KiB blocks to the export while a consumer streams the dirty extents with
data, stores them and clears each message's ranges with the message's ``clear_token``;
thousands of clears later, no granule may be clean in the host's bitmap while the copy of it
is stale. Against the gateway's embedded host and a remote ``nbdgw nbd serve`` host, each for
``NBDGW_CLEAR_RACE_SECONDS`` (12 by default; ``scripts/fuzz --long`` runs it for minutes).

With unconditional clears (what ClearRange did before) the same loop loses writes in every
run: ``test_unconditional_clears_lose_writes`` keeps the race honest by showing it."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from nbdcore.storage import Image
from tests.gateway.clear_race import RaceResult, run_race
from tests.gateway.clear_support import G, NbdcoreHost
from tests.gateway.cli_support import GatewayProcess

SIZE = 8 << 20
SECONDS = float(os.environ.get("NBDGW_CLEAR_RACE_SECONDS", "12"))
MIN_CLEARS = 1500


def make_disk(path: Path) -> bytes:
    """Random data, all of it dirty in bitmap ``b0``."""
    content = random.Random(7).randbytes(SIZE)
    image = Image.create(path, SIZE)
    try:
        image.add_bitmap("b0", granularity=G)
        image.write(content, 0)
        image.flush()
    finally:
        image.close()
    return content


def check(result: RaceResult) -> None:
    print(
        f"rounds={result.rounds} clears={result.clears} writes={result.writes}"
        f" cleared={result.cleared_bytes} kept={result.kept_bytes}"
        f" stale_and_clean={len(result.stale_clean)}"
    )
    assert result.clears >= MIN_CLEARS
    # The writes did race the clears: some clears kept granules written after their read.
    assert result.kept_bytes > 0
    assert result.stale_clean == [], f"writes lost in granules {result.stale_clean[:20]}"


def test_embedded_host(tmp_path: Path) -> None:
    initial = make_disk(tmp_path / "disk.raw")
    with GatewayProcess("--image", f"disk={tmp_path / 'disk.raw'}", data_dir=tmp_path / "gw") as gw:
        result = run_race(
            gw.target,
            "disk",
            "b0",
            gw.nbd_uri("disk"),
            initial,
            seconds=SECONDS,
            min_clears=MIN_CLEARS,
        )
    check(result)


def test_remote_host(tmp_path: Path) -> None:
    initial = make_disk(tmp_path / "disk.raw")
    host = NbdcoreHost(tmp_path / "disk.raw", tmp_path / "host.sock").start()
    try:
        with GatewayProcess("--export", f"disk={host.uri}", data_dir=tmp_path / "gw") as gw:
            result = run_race(
                gw.target,
                "disk",
                "b0",
                host.uri,
                initial,
                seconds=SECONDS,
                min_clears=MIN_CLEARS,
                seed=16,
            )
    finally:
        host.stop()
    check(result)


@pytest.mark.parametrize("seconds", [6.0])
def test_unconditional_clears_lose_writes(tmp_path: Path, seconds: float) -> None:
    """The same race with the opt-out flag (the old behaviour): writes are lost. This is why
    a clear of a live writable export needs a token."""
    initial = make_disk(tmp_path / "disk.raw")
    with GatewayProcess("--image", f"disk={tmp_path / 'disk.raw'}", data_dir=tmp_path / "gw") as gw:
        result = run_race(
            gw.target,
            "disk",
            "b0",
            gw.nbd_uri("disk"),
            initial,
            seconds=seconds,
            min_clears=300,
            unconditional=True,
            store_delay=0.01,  # a wider window: the loss shows in every run
        )
    print(f"unconditional: clears={result.clears} stale_and_clean={len(result.stale_clean)}")
    assert result.stale_clean, "the race did not happen: the test above would prove nothing"
