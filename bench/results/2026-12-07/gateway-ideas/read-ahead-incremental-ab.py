"""A/B of gateways with different environments in front of one qemu-nbd serving the incremental
fixture; `nbdgw backup --bitmap b0` into tmpfs through each in turn (alternating). From a
checkout with read-ahead-incremental.patch (NBDGW_AHEAD: data messages queued, default 1):
``PYTHONPATH=CHECKOUT python read-ahead-incremental-ab.py 6 "" "NBDGW_AHEAD=3"``."""

import os
import statistics
import sys
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.command_suites import compile_bytecode
from bench.cpu_budget import proc_cpu, run_measured
from bench.fixtures import Fixtures
from bench.gateway_suites import free_port, gateway_ready

fx = Fixtures("full")
qcow = fx.incremental_qcow2()
configs = [dict(kv.split("=", 1) for kv in c.split(",") if kv) for c in sys.argv[2:]]
rounds = int(sys.argv[1])
compile_bytecode()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri, q = st.enter_context(procs.qemu_nbd_process(qcow.file, "qcow2", work, bitmaps=["b0"]))
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
    out = st.enter_context(procs.tmpfs_dir(4 << 30))
    res = [[] for _ in configs]
    for r in range(rounds + 1):
        order = list(range(len(configs)))
        if r % 2:
            order.reverse()
        for i in order:
            target, p = gws[i]
            cmd = [
                sys.executable,
                "-m",
                "gateway",
                "backup",
                "--bitmap",
                "b0",
                "--no-progress",
                "--target",
                target,
                "disk",
                str(out / "i.img"),
            ]
            g0, q0 = proc_cpu(p.pid), proc_cpu(q.pid)
            w, c, _ = run_measured(cmd, procs.worker_env())
            g1, q1 = proc_cpu(p.pid), proc_cpu(q.pid)
            for f in out.glob("*"):
                f.unlink()
            if r:
                res[i].append((w, c, g1 - g0, q1 - q0))
    for c, rs in zip(sys.argv[2:], res, strict=True):
        med = [statistics.median(x[k] for x in rs) for k in range(4)]
        print(
            f"{c or 'default':24} s wall {med[0]:.3f} client {med[1]:.3f} gw {med[2]:.3f}"
            f" qemu {med[3]:.3f}  walls {sorted(round(x[0], 2) for x in rs)}"
        )
