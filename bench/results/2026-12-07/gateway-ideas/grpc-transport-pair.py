import asyncio
import os
import subprocess
import sys
import time

import grpc

MS = 1 << 20
METHOD = "/bench.Bare/Stream"


def server(addr, path):
    async def main():
        async def stream(req, ctx):
            with open(path, "rb", buffering=0) as f:  # noqa: ASYNC230 - a benchmark's file
                while True:
                    b = f.read(MS)
                    if not b:
                        return
                    yield b

        h = grpc.method_handlers_generic_handler(
            "bench.Bare", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
        )
        s = grpc.aio.server(options=[("grpc.max_send_message_length", 2 * MS)])
        s.add_generic_rpc_handlers((h,))
        s.add_insecure_port(addr)
        await s.start()
        print("ready", flush=True)
        await s.wait_for_termination()

    asyncio.run(main())


def drain(target):
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


if sys.argv[1] == "server":
    server(sys.argv[2], sys.argv[3])
    sys.exit()
path = sys.argv[1]
kinds = {
    "tcp": ("127.0.0.1:50777", "127.0.0.1:50777"),
    "unix": ("unix:/tmp/nbdgw-pair.sock", "unix:/tmp/nbdgw-pair.sock"),
}
procs = {}
for k, (a, _t) in kinds.items():
    p = subprocess.Popen(
        [sys.executable, __file__, "server", a, path], stdout=subprocess.PIPE, text=True
    )
    p.stdout.readline()
    procs[k] = p


def scpu(p):
    with open(f"/proc/{p.pid}/stat") as stat:
        f = stat.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


res = {k: [] for k in kinds}
for r in range(int(sys.argv[2])):
    for k, (_a, t) in kinds.items() if r % 2 == 0 else reversed(kinds.items()):
        s0 = scpu(procs[k])
        w, c, n = drain(t)
        s1 = scpu(procs[k])
        res[k].append((n / w / 2**30, c * 2**30 / n, (s1 - s0) * 2**30 / n))
for k, v in res.items():
    v.sort()
    print(
        k,
        "GiB/s",
        [round(x[0], 2) for x in v],
        "client cpu/GiB",
        sorted(round(x[1], 2) for x in v),
        "server cpu/GiB",
        sorted(round(x[2], 2) for x in v),
    )
for p in procs.values():
    p.terminate()
