"""Issue 17: can ANY gateway built on grpcio meet `backup --full >= 0.8x nbdcopy URI FILE` on
this 2-core machine? A bound, measured: the same 2 GiB data.raw copied into tmpfs by

- nbdcopy:     `nbdcopy URI FILE` from `qemu-nbd -r` (the issue's reference);
- bare-file:   a bare grpcio server streaming the FILE itself (no NBD, no qemu-nbd, no protobuf,
               no checksums, no state) in 1 MiB messages, drained by a minimal grpc.aio client
               that os.pwrite()s each message into tmpfs: the least work any gRPC byte stream
               into a file can do here;
- bare-relay:  the same, the server relaying the bytes from the same qemu-nbd through the
               asyncio NBD client (bench.workers bare-grpc-server --nbd): the least work a
               gateway in front of qemu-nbd can do;
- nbdgw:       `nbdgw backup --full` through the real gateway in front of the same qemu-nbd.

Every side is a whole process (start and exit included, as the issue times commands), in
alternating order each round after a warm-up round. Per run: wall seconds, the command's CPU
(wait4), the server's (gateway or bare server) and qemu-nbd's (/proc/PID/stat).
``python ceiling.py ROUNDS`` from the repository root."""

import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.fixtures import Fixtures
from bench.gateway_suites import free_port, gateway_ready

MESSAGE = 1 << 20

DRAIN = r"""
import asyncio, os, sys, grpc
async def main(target, out):
    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)
    limit = 2 << 20
    opts = [("grpc.max_receive_message_length", limit)]
    async with grpc.aio.insecure_channel(target, options=opts) as ch:
        off = 0
        async for msg in ch.unary_stream("/bench.Bare/Stream", None, None)(b""):
            os.pwrite(fd, msg, off)
            off += len(msg)
    os.fsync(fd)
    os.close(fd)
asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def run(argv: list[str]) -> tuple[float, float]:
    t = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, ru = os.wait4(p.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, argv
    return time.perf_counter() - t, ru.ru_utime + ru.ru_stime


def bare_server(st: ExitStack, work: Path, name: str, *source: str) -> tuple[str, int]:
    port_file = work / f"{name}.port"
    p = subprocess.Popen(
        [sys.executable, "-m", "bench.workers", "bare-grpc-server", *source,
         "--message-size", str(MESSAGE), "--port-file", str(port_file)],
    )  # fmt: skip
    st.callback(p.wait)
    st.callback(p.terminate)
    while not port_file.exists():
        time.sleep(0.05)
    return f"127.0.0.1:{port_file.read_text()}", p.pid


rounds = int(sys.argv[1])
fx = Fixtures("full").data_raw()
size = fx.size
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri, qemu = st.enter_context(procs.qemu_nbd_process(fx.file, "raw", work))
    qpid = qemu.proc.pid
    target = f"127.0.0.1:{free_port()}"
    g = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", target, "--export",
         f"disk={uri}", "--data-dir", str(work / "g")], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    st.callback(g.wait)
    st.callback(g.terminate)
    while not gateway_ready(target)():
        time.sleep(0.1)
    file_target, file_pid = bare_server(st, work, "file", "--file", str(fx.file))
    relay_target, relay_pid = bare_server(st, work, "relay", "--nbd", uri)
    out = st.enter_context(procs.tmpfs_dir(size + (64 << 20)))
    dest = out / "copy.img"
    drain = [sys.executable, "-c", DRAIN]
    sides = {
        "nbdcopy": (["nbdcopy", uri, str(dest)], None),
        "bare-file": ([*drain, file_target, str(dest)], file_pid),
        "bare-relay": ([*drain, relay_target, str(dest)], relay_pid),
        "nbdgw": (
            [str(Path(sys.executable).with_name("nbdgw")), "backup", "--full", "--target",
             target, "disk", str(dest)],
            g.pid,
        ),
    }  # fmt: skip
    res: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in sides}
    keys = list(sides)
    for r in range(rounds + 1):
        for k in keys if r % 2 == 0 else reversed(keys):
            for p in out.iterdir():
                p.unlink()
            argv, server = sides[k]
            s0 = cpu_of(server) if server else 0.0
            q0 = cpu_of(qpid)
            wall, cpu = run(argv)
            s1 = cpu_of(server) if server else 0.0
            q1 = cpu_of(qpid)
            assert dest.stat().st_size == size, (k, dest.stat().st_size)
            if r:  # round 0 warms up
                res[k].append((wall, cpu, s1 - s0, q1 - q0))
                print(f"{k:10} wall {wall:.2f} command {cpu:.2f} server {s1 - s0:.2f}"
                      f" qemu-nbd {q1 - q0:.2f}", flush=True)  # fmt: skip
    ref = statistics.median(x[0] for x in res["nbdcopy"])
    for k, v in res.items():
        med = [statistics.median(x[i] for x in v) for i in range(4)]
        print(f"# {k:10} medians per 2 GiB: wall {med[0]:.2f} s ({ref / med[0]:.2f}x nbdcopy),"
              f" command {med[1]:.2f}, server {med[2]:.2f}, qemu-nbd {med[3]:.2f};"
              f" walls {sorted(round(x[0], 2) for x in v)}")  # fmt: skip
