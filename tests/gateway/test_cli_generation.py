"""``nbdgw export generation``, ``nbdgw bitmap clear --generation`` and ``nbdgw bitmap remaining``
against a read-only
qemu-nbd export cleared through the gateway's ledger (review H4): a clear must name the
generation it copied from, and a new generation starts with nothing masked. Errors speak the
CLI's words (its commands and flags), not the API's."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig
from tests.gateway.cli_support import assert_one_line_error, cli
from tests.gateway.conftest import QemuNBD, nbdinfo_map

B0 = "qemu:dirty-bitmap:b0"


def host_dirty(uri: str) -> list[tuple[int, int]]:
    return [(o, n) for o, n, flags, _ in nbdinfo_map(uri, B0) if flags & 1]


async def test_generation_clear_and_remaining(
    tmp_path: Path, qemu_nbd: QemuNBD, start_gateway: Any
) -> None:
    cfg = GatewayConfig(data_dir=tmp_path / "gw")
    cfg.add_uri_export("qd", qemu_nbd.uri)
    gw = await start_gateway(cfg)
    t = ("--target", gw.target)

    async def run(*args: str) -> Any:
        return await asyncio.to_thread(cli, *args, *t)

    dirty = host_dirty(qemu_nbd.uri)
    assert dirty
    first_offset, first_length = dirty[0]

    proc = await run("bitmap", "remaining", "qd", "--bitmap", "b0", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [(r["offset"], r["length"]) for r in out["ranges"]] == dirty
    assert out["dirtyBytes"] == sum(n for _, n in dirty)

    # No generation yet: the ledger cannot clear; the CLI says which command sets one (not
    # the API's SetExportGeneration) and the configuration key, one line with its reason.
    clear = (
        "bitmap",
        "clear",
        "qd",
        "--bitmap",
        "b0",
        "--offset",
        str(first_offset),
        "--length",
        "4096",
    )
    line = assert_one_line_error(await run(*clear, "--generation", "g1"), 1)
    assert line.startswith("nbdgw bitmap clear: FAILED_PRECONDITION: "), line
    assert "call 'nbdgw export generation'" in line and "'generation = NAME'" in line
    assert "SetExportGeneration" not in line and line.endswith("]")
    # A bad generation names the command's argument, not the request field.
    line = assert_one_line_error(await run("export", "generation", "qd", "x" * 1000), 1)
    assert line.startswith("nbdgw export generation: INVALID_ARGUMENT: "), line
    assert line.endswith(": invalid request: NAME: longer than 256 bytes [INVALID_FIELD]"), line

    proc = await run("export", "generation", "qd", "g1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "export qd: generation none -> 'g1'"

    # Without --generation the ledger refuses, naming the current generation and the flag.
    line = assert_one_line_error(await run(*clear), 1)
    assert "name the generation the range was copied from in --generation" in line, line
    assert "'g1'" in line and "[GENERATION_MISMATCH]" in line
    # Another generation: refused too.
    line = assert_one_line_error(await run(*clear, "--generation", "g0"), 1)
    assert "'g1'" in line
    proc = await run("bitmap", "remaining", "qd", "--bitmap", "b0", "--json")
    assert [(r["offset"], r["length"]) for r in json.loads(proc.stdout)["ranges"]] == dirty

    proc = await run(*clear, "--generation", "g1", "--json")
    assert proc.returncode == 0, proc.stderr
    resp = json.loads(proc.stdout)
    assert resp["generation"] == "g1" and int(resp["clearedBytes"]) == 4096

    proc = await run("bitmap", "remaining", "qd", "--bitmap", "b0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    want = [(first_offset + 4096, first_length - 4096), *dirty[1:]]
    want = [(o, n) for o, n in want if n]
    assert lines[0].startswith(f"{sum(n for _, n in want)} bytes still dirty in {len(want)} range")
    assert [tuple(int(x) for x in line.split()) for line in lines[1:]] == want

    # A new generation (and the old name again later) starts with nothing masked.
    proc = await run("export", "generation", "qd", "g2", "--json")
    assert json.loads(proc.stdout)["previousGeneration"] == "g1"
    await run("export", "generation", "qd", "g1")
    proc = await run("bitmap", "remaining", "qd", "--bitmap", "b0", "--json")
    assert [(r["offset"], r["length"]) for r in json.loads(proc.stdout)["ranges"]] == dirty
    assert host_dirty(qemu_nbd.uri) == dirty  # the source itself never changed


def test_generation_needs_a_name() -> None:
    assert_one_line_error(cli("export", "generation", "qd"), 2)
