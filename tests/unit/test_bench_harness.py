"""The benchmark harness's own logic: statistics, ratios and targets, selection, reports, JSON,
the fixture cache, on tiny runs. No timing is asserted: figures here are made-up numbers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench import cli, harness, procs, suites
from bench.fixtures import Fixtures, Sizes
from bench.harness import GIB_S, MIB, Benchmark, NotAvailable, Row, Stats, Target
from tests.peers import missing, tool


def fake(name: str, sides: dict[str, list[float]], rows: list[Row], metric=GIB_S) -> Benchmark:
    """A benchmark whose sides return the given figures in turn (warmup takes the first)."""

    @contextmanager
    def setup() -> Iterator[dict]:
        yield {side: iter(values).__next__ for side, values in sides.items()}

    return Benchmark(name=name, title=f"{name} title", metric=metric, setup=setup, rows=rows)


def test_stats_median_and_spread() -> None:
    s = Stats.of([3.0, 1.0, 2.0, 2.0])
    assert s.median == 2.0
    assert (s.min, s.max) == (1.0, 3.0)
    assert s.spread_pct == pytest.approx(100.0)
    assert Stats.of([0.0, 0.0]).spread_pct == 0.0
    with pytest.raises(ValueError):
        Stats.of([])


def test_target_ops() -> None:
    assert Target(">=", 1.2).holds(1.2)
    assert not Target(">=", 1.2).holds(1.19)
    assert Target("<", 150, on="value").holds(149.9)
    assert not Target("<", 150, on="value").holds(150)
    assert str(Target(">=", 0.8)) == "ratio >= 0.8"


def test_rounds_interleave_and_skip_warmup() -> None:
    calls: list[str] = []

    def side(name: str, value: float):
        def fn() -> float:
            calls.append(name)
            return value

        return fn

    stats = harness.run_rounds({"a": side("a", 1.0), "b": side("b", 2.0)}, 2)
    # warmup a, b, then two rounds: both sides see the same stretch of machine noise, and
    # the order alternates (a, b then b, a) so that neither always runs first
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert stats["a"].samples == [1.0, 1.0]


def test_ratio_target_and_report_rows() -> None:
    bench = fake(
        "client-read",
        {"ours": [9.0, 3.0, 2.0, 4.0], "ref": [9.0, 2.0, 1.0, 2.0]},
        [Row("ours / ref", "ours", "ref", Target(">=", 1.2)), Row("alone", "ours")],
    )
    rows = harness.run_benchmark(bench, 3)
    assert [r.status for r in rows] == ["ok", "ok"]
    first, alone = rows
    assert first.ours is not None and first.ours.median == 3.0  # warmup's 9.0 not counted
    assert first.reference is not None and first.reference.median == 2.0
    assert first.ratio == pytest.approx(1.5)
    assert first.met is True
    assert alone.ratio is None and alone.met is None
    text = harness.format_text(rows)
    assert "1.50x" in text and "MET" in text and "report" in text


def test_lower_is_better_ratio_and_absolute_target() -> None:
    bench = fake(
        "gateway-rss",
        {"ours": [0, 200.0], "ref": [0, 100.0]},
        [
            Row("rss", "ours", target=Target("<", 150, on="value")),
            Row("vs", "ours", "ref"),
        ],
        metric=MIB,
    )
    rss, vs = harness.run_benchmark(bench, 1)
    assert rss.met is False
    assert vs.ratio == pytest.approx(0.5)  # ours uses twice the memory: worse, so below 1


def test_not_available_and_errors_do_not_stop_the_run() -> None:
    @contextmanager
    def missing() -> Iterator[dict]:
        raise NotAvailable("nbdcore.aio.server has not landed")
        yield {}

    @contextmanager
    def broken() -> Iterator[dict]:
        yield {"ours": lambda: 1 / 0}

    rows = [Row("x", "ours", target=Target(">=", 1))]
    na = harness.run_benchmark(Benchmark("a", "", GIB_S, missing, rows), 1)
    err = harness.run_benchmark(Benchmark("b", "", GIB_S, broken, rows), 1)
    assert na[0].status == "not available" and "has not landed" in (na[0].reason or "")
    assert err[0].status == "error" and "ZeroDivisionError" in (err[0].reason or "")
    assert "not available: nbdcore.aio.server" in harness.format_text(na)


def test_a_missing_side_still_measures_the_others() -> None:
    calls = []

    @contextmanager
    def setup() -> Iterator[dict]:
        yield {
            "ours": NotAvailable("gateway serve has not landed"),
            "ref": lambda: calls.append(1) or 2.0,
            "other": lambda: 4.0,
        }

    rows = [Row("ours / ref", "ours", "ref", Target(">=", 1)), Row("other / ref", "other", "ref")]
    missing, other = harness.run_benchmark(Benchmark("g", "", GIB_S, setup, rows), 2)
    assert len(calls) == 3  # warmup + 2 rounds
    assert missing.status == "not available" and missing.reason == "gateway serve has not landed"
    assert missing.reference is not None and missing.reference.median == 2.0
    assert other.status == "ok" and other.ratio == pytest.approx(2.0)


def test_select_by_name_and_prefix() -> None:
    names = ("client-read", "client-extents", "client-extents-qemu10", "server-read")
    benches = [fake(n, {}, []) for n in names]
    assert [b.name for b in harness.select(benches, ["client"])] == list(names[:3])
    # An exact name selects only itself, even when it prefixes another name.
    assert [b.name for b in harness.select(benches, ["client-extents"])] == ["client-extents"]
    assert [b.name for b in harness.select(benches, ["server-read"])] == ["server-read"]
    assert len(harness.select(benches, [])) == 4
    with pytest.raises(ValueError, match="unknown benchmark gateway"):
        harness.select(benches, ["gateway"])


def test_execute_writes_json_that_reads_back(tmp_path: Path, capsys) -> None:
    bench = fake(
        "client-extents",
        {"ours": [1.0, 5.0, 6.0], "ref": [1.0, 2.0, 3.0]},
        [Row("ours / ref", "ours", "ref", Target(">=", 2.0))],
        metric=harness.MEXT_S,
    )
    out = tmp_path / "r" / "latest.json"
    code = cli.execute([bench], 2, "quick", "python -m bench --quick", out, markdown=True)
    assert code == 0
    run = harness.from_json(out.read_text())
    assert run.mode == "quick" and run.repeat == 2 and run.finished
    (row,) = run.rows
    assert row.ours is not None and row.ours.samples == [5.0, 6.0]
    assert row.ratio == pytest.approx(5.5 / 2.5)
    assert row.met is True and row.target == "ratio >= 2"
    assert row.load is not None and len(row.load) == 2
    printed = capsys.readouterr().out
    assert "| client-extents |" in printed  # the Markdown table
    assert json.loads(out.read_text())["machine"]["cpus"] == os.cpu_count()
    assert cli.main(["--show", "--json", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "python -m bench --quick: quick mode, median of 2" in shown and "2.20x" in shown
    out.write_text("{not json")
    assert cli.main(["--show", "--json", str(out)]) == 2


def test_cli_lists_and_rejects_unknown(tmp_path: Path, capsys) -> None:
    # Nothing runs here: each call stops at argument checks.
    base = ["--quick", "--fixtures-dir", str(tmp_path), "--json", str(tmp_path / "r.json")]
    assert cli.main([*base, "--list"]) == 0
    names = capsys.readouterr().out
    for name in ("client-read", "client-extents", "server-read", "server-extents"):
        assert name in names
    assert cli.main([*base, "--only", "no-such-bench"]) == 2
    assert cli.main([*base, "--repeat", "0"]) == 2
    assert not (tmp_path / "r.json").exists()


def test_fixture_cache_builds_once(tmp_path: Path) -> None:
    fx = Fixtures("quick", root=tmp_path)
    fx.sizes = Sizes(data_bytes=2 << 20, qcow2_dirty=4, big_dirty=4, image_dirty=4)
    first = fx.data_raw()
    assert first.file.stat().st_size == 2 << 20
    mtime = first.file.stat().st_mtime_ns
    assert fx.data_raw() == first and first.file.stat().st_mtime_ns == mtime
    # A fixture whose metadata is missing (an interrupted build) is built again.
    os.truncate(first.file, 0)
    (tmp_path / "quick" / "data.raw.json").unlink()
    assert fx.data_raw().file.stat().st_size == 2 << 20
    # --rebuild rebuilds even a complete one, once per run.
    os.truncate(first.file, 0)
    assert Fixtures("quick", root=tmp_path, rebuild=False).data_raw().file.stat().st_size == 0
    fx2 = Fixtures("quick", root=tmp_path, rebuild=True)
    fx2.sizes = fx.sizes
    assert fx2.data_raw().file.stat().st_size == 2 << 20


def test_bitmap_fixture_has_the_promised_extents(tmp_path: Path) -> None:
    tool("qemu-nbd")
    nbdinfo = tool("nbdinfo")
    if not Path(procs.SYSTEM_PYTHON).exists():
        missing(f"system python with python3-libnbd ({procs.SYSTEM_PYTHON})")
    fx = Fixtures("quick", root=tmp_path)
    fx.sizes = Sizes(data_bytes=1 << 20, qcow2_dirty=5, big_dirty=5, image_dirty=5)
    qcow = fx.bitmap_qcow2()
    assert qcow.extents == 10
    with procs.tempdir() as work, procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=["b0"]) as uri:
        lines = procs.output([nbdinfo, "--map=qemu:dirty-bitmap:b0", uri]).splitlines()
    assert len(lines) == 10
    # offset, length, flags, name: dirty and clean alternate, one granule each
    assert [line.split()[2] for line in lines] == ["1", "0"] * 5
    assert all(int(line.split()[1]) == 65536 for line in lines)


def test_tiny_real_sides(tmp_path: Path) -> None:
    """The client-read and extents workers and the nbdcopy side, on a 1 MiB image: what they
    report is checked, not how fast."""
    tool("qemu-nbd")
    tool("nbdcopy")
    image = tmp_path / "tiny.raw"
    image.write_bytes(os.urandom(1 << 20))
    with procs.tempdir() as work, procs.qemu_nbd(image, "raw", work) as uri:
        r = procs.run_worker("client-read", uri, "--request-size", "65536", "--in-flight", "3")
        assert r["bytes"] == 1 << 20 and r["seconds"] > 0
        r = procs.run_worker("client-read-sync", uri, "--request-size", "65536", "--block-status")
        assert r["bytes"] == 1 << 20 and r["seconds"] > 0
        r = procs.run_worker("client-copy", uri, "--connections", "2", "--request-size", "65536")
        assert r["bytes"] == 1 << 20 and r["connections"] == 2
        r = procs.run_worker("extents", uri, "--context", "base:allocation")
        assert r["bytes"] == 1 << 20 and r["extents"] >= 1
        with pytest.raises(RuntimeError, match="expected 999"):
            procs.run_worker("extents", uri, "--context", "base:allocation", "--expect", "999")
        assert suites.nbdcopy_side(uri, 1 << 20)() > 0
    with pytest.raises(RuntimeError, match="worker client-read exited"):
        procs.run_worker("client-read", procs.unix_uri(tmp_path / "no.sock"))
    with pytest.raises(RuntimeError, match="exited 1"):
        procs.timed(["false"])
