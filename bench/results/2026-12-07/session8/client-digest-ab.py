"""What the Python client's digest check costs: the 2 GiB data.raw behind `qemu-nbd -r`, one
gateway; a client drains StreamExtents with data and a blake3 digest (the gateway hashes in
both), checking the digest itself or not (`stream_extents(check_digest=...)`), in alternating
order; per run, the client's CPU and wall time. ``python client-digest-ab.py ROUNDS`` from the
repository root."""

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


def client(target: str, check: bool) -> None:
    import asyncio

    import nbdgw
    from nbdgw.v1 import bitmap_service_pb2 as pb

    async def main() -> None:
        req = pb.StreamExtentsRequest(
            export="disk", context="base:allocation", include_data=True, digest="blake3"
        )
        async with nbdgw.AsyncClient(target) as c:
            last = None
            async for batch in c.stream_extents(req, check_digest=check):
                last = batch
            assert last is not None and last.digest

    asyncio.run(main())


if sys.argv[1] == "client":
    client(sys.argv[2], sys.argv[3] == "check")
    sys.exit()

rounds = int(sys.argv[1])
fx = Fixtures("full").data_raw()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri, _ = st.enter_context(procs.qemu_nbd_process(fx.file, "raw", work))
    target = f"127.0.0.1:{free_port()}"
    g = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--listen", target, "--export",
         f"disk={uri}", "--data-dir", str(work / "g")], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    st.callback(g.wait)
    st.callback(g.terminate)
    while not gateway_ready(target)():
        time.sleep(0.1)
    res: dict[str, list[tuple[float, float]]] = {"no-check": [], "check": []}
    for r in range(rounds + 1):
        for k in ("no-check", "check") if r % 2 == 0 else ("check", "no-check"):
            t = time.perf_counter()
            p = subprocess.Popen([sys.executable, __file__, "client", target, k])
            _, status, ru = os.wait4(p.pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            wall, cpu = time.perf_counter() - t, ru.ru_utime + ru.ru_stime
            if r:
                res[k].append((wall, cpu))
                print(k, f"wall {wall:.2f} client cpu {cpu:.2f}", flush=True)
    for k, v in res.items():
        print(f"# {k:8} per 2 GiB, medians: wall {statistics.median(x[0] for x in v):.2f} s,"
              f" client CPU {statistics.median(x[1] for x in v):.2f} s")  # fmt: skip
