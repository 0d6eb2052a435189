"""Gateways from two checkouts in front of one qemu-nbd, the same `nbdgw backup` client (this
checkout's) against each in turn, alternating order every round:
``python gateway-trees-ab.py ROUNDS full|incremental TREE_A TREE_B`` from the repository root.
Prints per tree the medians of wall, client, gateway and qemu-nbd CPU seconds per backup.
Each gateway runs with PYTHONSAFEPATH=1 and PYTHONPATH=TREE: without PYTHONSAFEPATH, ``python -m``
puts the working directory first on sys.path, and every side would run this checkout's code."""

import os
import statistics
import subprocess
import sys
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.cpu_budget import proc_cpu, run_measured
from bench.fixtures import Fixtures
from bench.gateway_suites import free_port, gateway_ready

rounds, kind, trees = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
fx = Fixtures("full")
env0 = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
for t in [os.getcwd(), *trees]:
    dirs = (os.path.join(t, d) for d in ("gateway", "nbdcore", "nbdgw"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], env=env0, check=True)
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    if kind == "full":
        img = fx.data_raw()
        uri, q = st.enter_context(procs.qemu_nbd_process(img.file, "raw", work))
        what = ["--full"]
    else:
        img = fx.incremental_qcow2()
        uri, q = st.enter_context(procs.qemu_nbd_process(img.file, "qcow2", work, bitmaps=["b0"]))
        what = ["--bitmap", "b0"]
    gws = {}
    for i, t in enumerate(trees):
        target = f"127.0.0.1:{free_port()}"
        cmd = [sys.executable, "-m", "gateway", "serve", "--listen", target,
               "--export", f"disk={uri}", "--data-dir", str(work / f"g{i}")]  # fmt: skip
        env = dict(env0, PYTHONPATH=t, PYTHONSAFEPATH="1")
        p = st.enter_context(
            procs.background(cmd, gateway_ready(target), log=work / f"g{i}.log", env=env)
        )
        gws[t] = (target, p.proc.pid)
        code = subprocess.run(
            [sys.executable, "-c", "import nbdcore.aio.client as c; print(c.__file__)"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert code.startswith(t), (code, t)
    out = st.enter_context(procs.tmpfs_dir(2 * img.size + (1 << 30)))
    res = {t: [] for t in trees}
    for r in range(rounds + 1):
        for t in trees if r % 2 else trees[::-1]:
            target, pid = gws[t]
            cmd = [sys.executable, "-m", "gateway", "backup", *what, "--no-progress",
                   "--target", target, "disk", str(out / "b.img")]  # fmt: skip
            g0, q0 = proc_cpu(pid), proc_cpu(q.pid)
            w, c, _ = run_measured(cmd, dict(env0, PYTHONPATH=os.getcwd(), PYTHONSAFEPATH="1"))
            g1, q1 = proc_cpu(pid), proc_cpu(q.pid)
            for f in out.glob("*"):
                f.unlink()
            if r:  # round 0 warms both up
                res[t].append((w, c, g1 - g0, q1 - q0))
    for t, rs in res.items():
        med = [statistics.median(x[k] for x in rs) for k in range(4)]
        print(
            f"{kind:11} {t:18} s wall {med[0]:.3f} client {med[1]:.3f} gw {med[2]:.3f}"
            f" qemu {med[3]:.3f}  walls {sorted(round(x[0], 2) for x in rs)}"
        )
