"""A/B of `nbdgw backup --full` with different environments (one checkout with a switch),
one gateway in front of qemu-nbd: ``python backup-env-ab.py ROUNDS "" "VAR=1"``."""

import os
import statistics
import sys
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.command_suites import compile_bytecode
from bench.cpu_budget import proc_cpu, run_measured
from bench.fixtures import Fixtures
from bench.gateway_suites import gateway

fx = Fixtures("full")
data = fx.data_raw()
configs = [dict(kv.split("=", 1) for kv in c.split(",") if kv) for c in sys.argv[2:]]
rounds = int(sys.argv[1])
compile_bytecode()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri, q = st.enter_context(procs.qemu_nbd_process(data.file, "raw", work))
    target, gw = st.enter_context(gateway(uri, work))
    out = st.enter_context(procs.tmpfs_dir(2 * data.size + (1 << 30)))
    res = [[] for _ in configs]
    for r in range(rounds + 1):
        order = list(range(len(configs)))
        if r % 2:
            order.reverse()
        for i in order:
            env = {**procs.worker_env(), **configs[i]}
            cmd = [
                sys.executable,
                "-m",
                "gateway",
                "backup",
                "--full",
                "--no-progress",
                "--target",
                target,
                "disk",
                str(out / "b.img"),
            ]
            g0, q0 = proc_cpu(gw.pid), proc_cpu(q.pid)
            w, c, _ = run_measured(cmd, env)
            g1, q1 = proc_cpu(gw.pid), proc_cpu(q.pid)
            for p in out.glob("*"):
                p.unlink()
            if r:
                res[i].append((w / 2, c / 2, (g1 - g0) / 2, (q1 - q0) / 2))
    for c, rs in zip(sys.argv[2:], res, strict=True):
        med = [statistics.median(x[k] for x in rs) for k in range(4)]
        print(
            f"{c or 'default':30} s/GiB wall {med[0]:.2f} client {med[1]:.2f}"
            f" gw {med[2]:.2f} qemu {med[3]:.2f}  walls {sorted(round(x[0], 2) for x in rs)}"
        )
