"""``python -m bench [--quick] [--only NAME...] [--json FILE]``: run the benchmarks, print the
table (ours, reference, ratio, target) and write it as JSON."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import harness
from bench.fixtures import Fixtures
from bench.procs import ROOT

DEFAULT_JSON = ROOT / "bench" / "results" / "latest.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure nbdgw side by side with nbdcopy, nbdinfo and qemu-nbd.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small fixtures and 3 rounds: checks the harness works (about a minute), not numbers",
    )
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        default=[],
        help="run only these benchmarks (a prefix such as 'client' selects a group)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        metavar="FILE",
        help=f"where to write the results (default {DEFAULT_JSON.relative_to(ROOT)})",
    )
    p.add_argument("--repeat", type=int, help="rounds per benchmark (default 5, --quick 3)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached fixtures")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    p.add_argument(
        "--show",
        action="store_true",
        help="run nothing: print the results saved in the --json file (text and Markdown)",
    )
    p.add_argument(
        "--request-size",
        type=int,
        default=512 << 10,
        help="client-read, one connection: bytes per request (default 512 KiB)",
    )
    p.add_argument(
        "--in-flight",
        type=int,
        default=4,
        help="client-read, one connection: requests in flight (default 4)",
    )
    p.add_argument(
        "--max-extents",
        type=int,
        default=0,
        help="gateway-extents: max_extents_per_message (default 0: the gateway's default)",
    )
    p.add_argument(
        "--fixtures-dir", type=Path, help="fixture cache (default .cache/bench)", default=None
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.show:
        return show(args.json)
    mode = "quick" if args.quick else "full"
    repeat = args.repeat if args.repeat is not None else (3 if args.quick else 5)
    if repeat < 1:
        print("bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    fx = Fixtures(mode, root=args.fixtures_dir, rebuild=args.rebuild)
    opts = {
        "request_size": args.request_size,
        "in_flight": args.in_flight,
        "max_extents": args.max_extents,
    }

    from bench.suites import all_benchmarks

    benchmarks = all_benchmarks(fx, opts)
    if args.list:
        for b in benchmarks:
            print(f"{b.name:18} {b.title}")
        return 0
    try:
        chosen = harness.select(benchmarks, args.only)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    return execute(chosen, repeat, mode, command, args.json, markdown=args.markdown)


def show(json_path: Path) -> int:
    try:
        run = harness.from_json(json_path.read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        print(f"bench: cannot read {json_path}: {exc}", file=sys.stderr)
        return 2
    print(f"{run.command}: {run.mode} mode, median of {run.repeat}, {run.started}")
    print(", ".join(f"{k} {v}" for k, v in run.machine.items()))
    print(harness.format_text(run.rows))
    print()
    print(harness.format_markdown(run.rows))
    return 0


def execute(
    chosen: Sequence[harness.Benchmark],
    repeat: int,
    mode: str,
    command: str,
    json_path: Path,
    *,
    markdown: bool = False,
) -> int:
    run = harness.Run(
        started=harness.now(),
        finished=None,
        mode=mode,
        repeat=repeat,
        machine=harness.machine_info(),
        command=command,
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for bench in chosen:
        print(f"== {bench.name}: {bench.title}", file=sys.stderr, flush=True)
        rows = harness.run_benchmark(bench, repeat)
        print(harness.format_text(rows), file=sys.stderr, flush=True)
        run.rows += rows
        # Written after every benchmark: a run cut short still leaves what it measured.
        json_path.write_text(harness.to_json(run))
    run.finished = harness.now()
    json_path.write_text(harness.to_json(run))
    print(f"\nnbdgw benchmarks, {mode} mode, median of {repeat} (± spread: (max-min)/median)")
    print(harness.format_text(run.rows))
    if markdown:
        print()
        print(harness.format_markdown(run.rows))
    print(f"\nresults: {json_path}")
    return 1 if any(r.status == "error" for r in run.rows) else 0
