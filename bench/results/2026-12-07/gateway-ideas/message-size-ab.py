"""A/B of gateways with different environments in front of one qemu-nbd (the 2 GiB data.raw),
StreamExtents include_data streams drained by bench.workers stream-extents --library, alternating.
Run from a checkout with message-size.patch applied (NBDGW_MSG: data bytes per message,
NBDGW_READ: bytes per NBD READ):
  PYTHONPATH=CHECKOUT python message-size-ab.py 5 "" "NBDGW_MSG=983040,NBDGW_READ=983040"
Prints per config the medians of wall, client, gateway and qemu-nbd CPU seconds per GiB."""

import os
import statistics
import sys
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.cpu_budget import proc_cpu, run_measured
from bench.fixtures import Fixtures
from bench.gateway_suites import free_port, gateway_ready

fx = Fixtures("full")
data = fx.data_raw()
configs = [dict(kv.split("=", 1) for kv in c.split(",") if kv) for c in sys.argv[2:]]
rounds = int(sys.argv[1])
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri, q = st.enter_context(procs.qemu_nbd_process(data.file, "raw", work))
    gws = []
    for i, c in enumerate(configs):
        target = f"127.0.0.1:{free_port()}"
        env = {**procs.worker_env(), **c}
        cmd = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--listen",
            target,
            "--export",
            f"disk={uri}",
            "--data-dir",
            str(work / f"g{i}"),
        ]
        p = st.enter_context(
            procs.background(cmd, gateway_ready(target), log=work / f"g{i}.log", env=env)
        )
        gws.append((target, p))
    client = [
        sys.executable,
        "-m",
        "bench.workers",
        "stream-extents",
        "--context",
        "base:allocation",
        "--include-data",
        "--library",
        *os.environ.get("AB_CLIENT_ARGS", "").split(),  # e.g. "--digest blake3"
    ]
    res = [[] for _ in configs]
    for r in range(rounds + 1):
        order = list(range(len(configs)))
        if r % 2:
            order.reverse()
        for i in order:
            target, p = gws[i]
            g0, q0 = proc_cpu(p.pid), proc_cpu(q.pid)
            w, c, out = run_measured([*client[:4], target, *client[4:]], procs.worker_env())
            if r:
                res[i].append(
                    (w / 2, c / 2, (proc_cpu(p.pid) - g0) / 2, (proc_cpu(q.pid) - q0) / 2)
                )
    for c, rs in zip(sys.argv[2:], res, strict=True):
        med = [statistics.median(x[k] for x in rs) for k in range(4)]
        every = sorted(round(x[2], 2) for x in rs)
        print(
            f"{c or 'default':40} s/GiB wall {med[0]:.2f} client {med[1]:.2f} gw {med[2]:.2f}"
            f" qemu {med[3]:.2f}   gw all {every}"
        )
