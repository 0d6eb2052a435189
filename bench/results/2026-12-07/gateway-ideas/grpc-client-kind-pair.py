import asyncio
import os
import statistics
import subprocess
import sys
import time

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
MS = 1 << 20
METHOD = "/bench.Bare/Stream"


def drain_aio(target):
    async def main():
        t, c = time.perf_counter(), time.process_time()
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 2 * MS)]
        ) as ch:
            n = 0
            async for m in ch.unary_stream(METHOD)(b""):
                n += len(m)
        return time.perf_counter() - t, time.process_time() - c, n

    return asyncio.run(main())


def drain_sync(target):
    t, c = time.perf_counter(), time.process_time()
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 2 * MS)]) as ch:
        n = 0
        for m in ch.unary_stream(METHOD)(b""):
            n += len(m)
    return time.perf_counter() - t, time.process_time() - c, n


path = sys.argv[1]
p = subprocess.Popen(
    [
        sys.executable,
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpc-transport-pair.py"),
        "server",
        "127.0.0.1:50779",
        path,
    ],
    stdout=subprocess.PIPE,
    text=True,
)
p.stdout.readline()


def scpu(p):
    with open(f"/proc/{p.pid}/stat") as stat:
        f = stat.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


kinds = {"aio": drain_aio, "sync": drain_sync}
res = {k: [] for k in kinds}
for r in range(int(sys.argv[2])):
    for k, fn in kinds.items() if r % 2 == 0 else reversed(kinds.items()):
        s0 = scpu(p)
        w, c, n = fn("127.0.0.1:50779")
        s1 = scpu(p)
        res[k].append((n / w / 2**30, c * 2**30 / n, (s1 - s0) * 2**30 / n))
for k, v in res.items():
    print(
        k,
        "GiB/s med",
        round(statistics.median(x[0] for x in v), 2),
        "client cpu/GiB med",
        round(statistics.median(x[1] for x in v), 2),
        sorted(round(x[1], 2) for x in v),
        "server",
        round(statistics.median(x[2] for x in v), 2),
    )
p.terminate()
