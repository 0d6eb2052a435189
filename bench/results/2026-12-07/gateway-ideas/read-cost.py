"""CPU per 64 KiB READ of the asyncio NBD client: 16 READs gathered per batch (as a gateway
stream of fragmented dirty data does), 200 batches, best of 5, against qemu-nbd -r serving
data.raw: ``python read-cost.py .cache/bench/full/data.raw`` from the repository root."""

import asyncio
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.getcwd())
from nbdcore.aio.client import NBDClient

K64, STRIDE, BATCH = 65536, 655360, 16


async def main(uri: str, batches: int) -> None:
    c = await NBDClient.connect(uri)
    buf = memoryview(bytearray(BATCH * K64))
    best = None
    for _ in range(5):
        cpu = time.process_time()
        for b in range(batches):
            base = (b * BATCH * STRIDE) % (c.size - BATCH * STRIDE)
            await asyncio.gather(
                *(c.pread_into(buf[i * K64 : (i + 1) * K64], base + i * STRIDE) for i in range(16))
            )
        per = (time.process_time() - cpu) / (batches * BATCH) * 1e6
        best = per if best is None else min(best, per)
    print(f"per READ: {best:.1f} us CPU (best of 5)")
    await c.close()


d = tempfile.mkdtemp()
sock = os.path.join(d, "s")
p = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", sock, "-x", "", sys.argv[1]])
while not os.path.exists(sock):
    time.sleep(0.05)
time.sleep(0.3)
try:
    asyncio.run(main(f"nbd+unix:///?socket={sock}", 200))
finally:
    p.terminate()
