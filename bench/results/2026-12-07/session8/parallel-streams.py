"""Issue 17's idea "several streams over disjoint ranges in backup", measured with a prototype
before building it: the 2 GiB data.raw behind `qemu-nbd -r`, one gateway in front of it, and a
client that writes every data row of StreamExtents (filter ALL, include_data, CRC32C checked by
the client library) into a file in tmpfs with os.pwrite, as `nbdgw backup --full` does without
its state. Variants, in alternating order each round:

- one:        one stream over the whole disk;
- two-tasks:  two streams over the two halves, at once, in one client process (one event loop);
- two-procs:  two client processes, one half each (what a second stream could buy at most
              if the client were not one thread);
- nbdcopy:    `nbdcopy URI FILE` into the same tmpfs, for reference.

Per run: wall seconds, the clients' CPU (wait4), the gateway's and qemu-nbd's (/proc/PID/stat).
``python parallel-streams.py ROUNDS`` from the repository root."""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.fixtures import Fixtures
from bench.gateway_suites import free_port, gateway_ready


def client(target: str, out: str, ranges: list[tuple[int, int]]) -> None:
    import nbdgw
    from gateway.cli.common import iter_rows
    from nbdgw.v1 import bitmap_service_pb2 as pb

    fd = os.open(out, os.O_WRONLY | os.O_CREAT, 0o644)

    async def one(c: nbdgw.AsyncClient, offset: int, length: int) -> None:
        req = pb.StreamExtentsRequest(
            export="disk", context="base:allocation", offset=offset, length=length,
            filter=pb.EXTENT_FILTER_ALL, include_data=True,
        )  # fmt: skip
        async for batch in c.stream_extents(req):
            data, pos = batch.data, 0
            for o, n, _f, kind in iter_rows(batch.raw):
                if kind == pb.ALLOCATION_DATA:
                    os.pwrite(fd, data[pos : pos + n], o)
                    pos += n

    async def main() -> None:
        async with nbdgw.AsyncClient(target) as c:
            await asyncio.gather(*(one(c, o, n) for o, n in ranges))

    asyncio.run(main())
    os.close(fd)


if sys.argv[1] == "client":
    rs = [tuple(map(int, r.split(":"))) for r in sys.argv[4:]]
    client(sys.argv[2], sys.argv[3], rs)  # type: ignore[arg-type]
    sys.exit()

rounds = int(sys.argv[1])
fx = Fixtures("full").data_raw()
size = fx.size
half = size // 2


def cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / os.sysconf("SC_CLK_TCK")


def run(argvs: list[list[str]]) -> tuple[float, float]:
    t = time.perf_counter()
    ps = [subprocess.Popen(a) for a in argvs]
    cpu = 0.0
    for p in ps:
        _, status, ru = os.wait4(p.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, argvs
        cpu += ru.ru_utime + ru.ru_stime
    return time.perf_counter() - t, cpu


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
    out = st.enter_context(procs.tmpfs_dir(size + (64 << 20)))
    dest = str(out / "copy.img")
    me = [sys.executable, __file__, "client", target, dest]
    variants = {
        "one": [[*me, f"0:{size}"]],
        "two-tasks": [[*me, f"0:{half}", f"{half}:{size - half}"]],
        "two-procs": [[*me, f"0:{half}"], [*me, f"{half}:{size - half}"]],
        "nbdcopy": [["nbdcopy", uri, dest]],
    }
    res: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in variants}
    keys = list(variants)
    for r in range(rounds + 1):
        for k in keys if r % 2 == 0 else reversed(keys):
            if os.path.exists(dest):
                os.unlink(dest)
            g0, q0 = cpu_of(g.pid), cpu_of(qpid)
            wall, cpu = run(variants[k])
            g1, q1 = cpu_of(g.pid), cpu_of(qpid)
            assert os.path.getsize(dest) == size
            if r:  # round 0 warms up
                res[k].append((wall, cpu, g1 - g0, q1 - q0))
                print(
                    k,
                    f"wall {wall:.2f} client {cpu:.2f} gateway {g1 - g0:.2f} qemu {q1 - q0:.2f}",
                    flush=True,
                )
    for k, v in res.items():
        med = [statistics.median(x[i] for x in v) for i in range(4)]
        walls = sorted(round(x[0], 2) for x in v)
        print(f"# {k:9} medians per 2 GiB: wall {med[0]:.2f} s, client {med[1]:.2f}, "
              f"gateway {med[2]:.2f}, qemu-nbd {med[3]:.2f}; walls {walls}")  # fmt: skip
