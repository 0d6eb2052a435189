"""Where the CPU goes when a disk's bytes move (issue 17): ``python -m bench.cpu_budget
[--rounds N] [--json FILE] [--quick]``.

Each pipeline moves the same 2 GiB all-data raw image (the bench fixture) and is run in turn,
round after round (alternating, as the benchmarks do). For each run: the wall time, and the CPU
seconds (user + system) of every process that takes part: the command itself (its rusage), and
the long-running ones (qemu-nbd, the gateway, a bare grpcio server) from /proc/PID/stat before
and after. The figures are per GiB moved; their sum over the machine's cores is a floor under
the wall time no scheduling can beat, which is what the speed targets of issue 17 meet on a
2-core machine: three processes (qemu-nbd, the gateway, the client) each copying every byte at
least once, where nbdcopy has two.

Pipelines (copies go to tmpfs, as the commands benchmarks):
- ``nbdcopy URI FILE`` and ``nbdgw backup --full`` through a gateway in front of qemu-nbd;
- ``nbdcopy URI null:`` and ``nbdgw nbd copy URI null:``;
- StreamExtents include_data received by the Python client library (bench.workers
  stream-extents --library: nbdgw.AsyncClient, every CRC32C checked) from a gateway in front of
  qemu-nbd, and from a gateway's embedded host serving a copy of the file;
- a bare grpcio server streaming the file, drained by a raw client (the issue's baseline).

Nothing here is a test; figures for the record are taken on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import procs
from bench.command_suites import compile_bytecode, nbdgw_cmd
from bench.fixtures import Fixtures
from bench.gateway_suites import DATA_MESSAGE, bare_grpc_server, gateway
from bench.harness import machine_info, now

GiB = 1 << 30
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime (fields 14, 15)


def run_measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Runs ``cmd``; (wall seconds, its CPU seconds from rusage, its stdout)."""
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"nbdgw-cpu-budget-{os.getpid()}.out"
    with out.open("wb") as f:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.stderr is not None
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    text = out.read_text()
    out.unlink()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {err[-800:]}")
    return wall, usage.ru_utime + usage.ru_stime, text


class Pipeline:
    """One way of moving the bytes: the command and the background processes it uses."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        others: dict[str, int],
        *,
        cleanup: Callable[[], None] = lambda: None,
        check: Callable[[str], None] = lambda out: None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.others = others  # process name -> pid (qemu-nbd, gateway, bare server)
        self.cleanup = cleanup
        self.check = check
        self.env = env
        self.runs: list[dict[str, float]] = []

    def run(self, size: int) -> None:
        before = {k: proc_cpu(pid) for k, pid in self.others.items()}
        try:
            wall, own, out = run_measured(self.cmd, self.env)
            after = {k: proc_cpu(pid) for k, pid in self.others.items()}
            self.check(out)
        finally:
            self.cleanup()
        gib = size / GiB
        sample = {"wall_s": wall, "command_cpu_s_per_gib": own / gib}
        for k in self.others:
            sample[f"{k}_cpu_s_per_gib"] = (after[k] - before[k]) / gib
        sample["total_cpu_s_per_gib"] = own / gib + sum(
            (after[k] - before[k]) / gib for k in self.others
        )
        sample["gib_s"] = gib / wall
        self.runs.append(sample)

    def summary(self, cores: int) -> dict[str, Any]:
        keys = self.runs[0].keys()
        med = {k: statistics.median(r[k] for r in self.runs) for k in keys}
        floor = med["total_cpu_s_per_gib"] / cores  # seconds per GiB, every core busy
        return {
            "pipeline": self.name,
            "command": " ".join(self.cmd),
            "rounds": len(self.runs),
            "median": med,
            "cpu_floor_s_per_gib": floor,
            "cpu_ceiling_gib_s": 1 / floor if floor else None,
            "runs": self.runs,
        }


def _expect_bytes(size: int) -> Callable[[str], None]:
    def check(out: str) -> None:
        got = json.loads(out.strip().splitlines()[-1])["bytes"]
        if got != size:
            raise RuntimeError(f"the stream carried {got} bytes of {size}")

    return check


def _removes(path: Path) -> Callable[[], None]:
    def cleanup() -> None:
        for p in path.parent.glob(path.name + "*"):
            p.unlink()

    return cleanup


def pipelines(stack: ExitStack, fx: Fixtures) -> tuple[list[Pipeline], int]:
    data = fx.data_raw()
    size = data.size
    compile_bytecode()
    work = stack.enter_context(procs.tempdir())
    out = stack.enter_context(procs.tmpfs_dir(2 * size))
    uri, qemu_proc = stack.enter_context(procs.qemu_nbd_process(data.file, "raw", work))
    qemu = qemu_proc.pid
    target, gw = stack.enter_context(gateway(uri, work))
    copy = work / "embedded.raw"
    shutil.copyfile(data.file, copy)
    embedded_target, embedded = stack.enter_context(gateway(uri, work, image=copy))
    bare_target, bare = stack.enter_context(bare_grpc_server(["--file", data.file], work))
    nbdcopy = procs.tool("nbdcopy")
    file_ = out / "copy.raw"
    stream = [sys.executable, "-m", "bench.workers", "stream-extents"]
    both = ["--context", "base:allocation", "--include-data", "--library"]
    env = procs.worker_env()
    return [
        Pipeline(
            "nbdcopy URI FILE (tmpfs)",
            [nbdcopy, uri, str(file_)],
            {"qemu-nbd": qemu},
            cleanup=_removes(file_),
        ),
        Pipeline(
            "nbdgw backup --full (tmpfs)",
            nbdgw_cmd("backup", "--full", "--no-progress", "--target", target, "disk", str(file_)),
            {"gateway": gw.pid, "qemu-nbd": qemu},
            cleanup=_removes(file_),
        ),
        Pipeline("nbdcopy URI null:", [nbdcopy, uri, "null:"], {"qemu-nbd": qemu}),
        Pipeline(
            "nbdgw nbd copy URI null:",
            nbdgw_cmd("nbd", "copy", "--no-progress", uri, "null:"),
            {"qemu-nbd": qemu},
        ),
        Pipeline(
            "StreamExtents include_data, gateway in front of qemu-nbd",
            [*stream, target, *both],
            {"gateway": gw.pid, "qemu-nbd": qemu},
            check=_expect_bytes(size),
            env=env,
        ),
        Pipeline(
            "StreamExtents include_data, gateway's embedded host",
            [*stream, embedded_target, *both],
            {"gateway": embedded.pid},
            check=_expect_bytes(size),
            env=env,
        ),
        Pipeline(
            "bare grpcio server streaming the file",
            [
                sys.executable,
                "-m",
                "bench.workers",
                "bare-grpc-drain",
                bare_target,
                "--message-size",
                str(DATA_MESSAGE),
            ],
            {"bare server": bare.pid},
            check=_expect_bytes(size),
            env=env,
        ),
    ], size


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'pipeline':58} {'GiB/s':>6} {'CPU s/GiB by process':48} {'total':>6} {'ceiling':>8}"
    ]
    for r in results:
        m = r["median"]
        parts = [f"command {m['command_cpu_s_per_gib']:.2f}"]
        parts += [
            f"{k.removesuffix('_cpu_s_per_gib')} {v:.2f}"
            for k, v in m.items()
            if k.endswith("_cpu_s_per_gib")
            and k not in ("command_cpu_s_per_gib",)
            and not k.startswith("total")
        ]
        ceiling = r["cpu_ceiling_gib_s"]
        lines.append(
            f"{r['pipeline']:58} {m['gib_s']:6.2f} {', '.join(parts):48}"
            f" {m['total_cpu_s_per_gib']:6.2f} {ceiling:8.2f}"
        )
    lines.append(
        "total: CPU seconds per GiB of every process taking part; ceiling: GiB/s if that CPU"
        f" were spread over all {os.cpu_count()} cores with no idle time (medians)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small fixtures, 2 rounds")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    fx = Fixtures("quick" if args.quick else "full")
    rounds = 2 if args.quick else args.rounds
    started = now()
    with ExitStack() as stack:
        pipes, size = pipelines(stack, fx)
        for p_ in pipes:  # a warm-up call each: page cache, bytecode, connections
            p_.run(size)
            p_.runs.clear()
        for r in range(rounds):
            order = pipes[r % len(pipes) :] + pipes[: r % len(pipes)]
            for p_ in order:
                p_.run(size)
    cores = os.cpu_count() or 1
    results = [p_.summary(cores) for p_ in pipes]
    print(table(results))
    if args.json:
        doc = {"started": started, "machine": machine_info(), "results": results}
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
