"""Bare grpcio pair: one server streaming a file in 1 MiB messages; the draining client's
channel options vary, alternating. python chan-opts.py FILE ROUNDS"""

import asyncio
import json
import os
import statistics as st
import subprocess
import sys
import time

import grpc

MS = 1 << 20
METHOD = "/bench.Bare/Stream"


def server(addr, path):
    async def main():
        async def stream(req, ctx):
            with open(path, "rb", buffering=0) as f:  # noqa: ASYNC230
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


def drain(target, opts):
    async def main():
        t, c = time.perf_counter(), time.process_time()
        async with grpc.aio.insecure_channel(
            target, options=[("grpc.max_receive_message_length", 2 * MS), *opts]
        ) as ch:
            n = 0
            async for m in ch.unary_stream(METHOD)(b""):
                n += len(m)
        return time.perf_counter() - t, time.process_time() - c, n

    return asyncio.run(main())


if sys.argv[1] == "server":
    server(sys.argv[2], sys.argv[3])
    sys.exit()
path, rounds = sys.argv[1], int(sys.argv[2])
variants = json.loads(sys.argv[3])
addr = "127.0.0.1:50778"
p = subprocess.Popen(
    [sys.executable, __file__, "server", addr, path], stdout=subprocess.PIPE, text=True
)
p.stdout.readline()


def scpu():
    with open(f"/proc/{p.pid}/stat") as stat:
        f = stat.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


res = {k: [] for k in variants}
keys = list(variants)
for r in range(rounds):
    for k in keys if r % 2 == 0 else reversed(keys):
        s0 = scpu()
        w, c, n = drain(addr, [tuple(o) for o in variants[k]])
        s1 = scpu()
        res[k].append((n / w / 2**30, c * 2**30 / n, (s1 - s0) * 2**30 / n))
for k, v in res.items():
    print(
        k,
        "GiB/s med",
        round(st.median(x[0] for x in v), 3),
        [round(x[0], 2) for x in v],
        "client cpu/GiB med",
        round(st.median(x[1] for x in v), 3),
        "server cpu/GiB med",
        round(st.median(x[2] for x in v), 3),
        flush=True,
    )
p.terminate()
