"""CPU per 64 KiB READ of the asyncio NBD client against qemu-nbd -r serving data.raw: 16
``pread_into`` calls gathered (a Task each) against one ``pread_many_into`` batch of the same 16
READs, alternating in one process, 10 repetitions of 3,200 READs each:
``python read-cost-ab.py .cache/bench/full/data.raw`` from the repository root."""

import asyncio
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
from nbdcore.aio.client import NBDClient

K64, STRIDE, BATCH, BATCHES = 65536, 655360, 16, 200


async def main(uri: str) -> None:
    c = await NBDClient.connect(uri)
    buf = memoryview(bytearray(BATCH * K64))
    views = [buf[i * K64 : (i + 1) * K64] for i in range(BATCH)]
    res: dict[str, list[float]] = {"gather": [], "batch": []}
    for rep in range(10):
        for kind in ("gather", "batch") if rep % 2 else ("batch", "gather"):
            cpu = time.process_time()
            for b in range(BATCHES):
                base = (b * BATCH * STRIDE) % (c.size - BATCH * STRIDE)
                if kind == "gather":
                    await asyncio.gather(
                        *(c.pread_into(views[i], base + i * STRIDE) for i in range(BATCH))
                    )
                else:
                    await c.pread_many_into([(views[i], base + i * STRIDE) for i in range(BATCH)])
            res[kind].append((time.process_time() - cpu) / (BATCHES * BATCH) * 1e6)
    for kind, v in res.items():
        v.sort()
        print(f"{kind:6} per READ: min {v[0]:.1f} median {v[len(v) // 2]:.1f} us CPU")
    await c.close()


d = tempfile.mkdtemp()
sock = os.path.join(d, "s")
p = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", sock, "-x", "", sys.argv[1]])
while not os.path.exists(sock):
    time.sleep(0.05)
time.sleep(0.3)
try:
    asyncio.run(main(f"nbd+unix:///?socket={sock}"))
finally:
    p.terminate()
