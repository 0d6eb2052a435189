"""`nbdgw backup` from two checkouts in turn (PYTHONPATH), one gateway (this checkout's) in front
of qemu-nbd: ``python abtrees.py ROUNDS full|incremental OLD NEW`` from the repository root.
Each client runs with PYTHONSAFEPATH=1 and PYTHONPATH=TREE. (Until 2026-12-07 15:40 it set
PYTHONPATH only: ``python -m`` puts the working directory first on sys.path, so both sides ran
the repository root's code, and the trees comparison it printed at 13:19 compared main with
itself; see backup-inline-write.txt.)"""

import os
import statistics
import subprocess
import sys
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.cpu_budget import proc_cpu, run_measured
from bench.fixtures import Fixtures
from bench.gateway_suites import gateway

rounds, kind, trees = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
fx = Fixtures("full")
env0 = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
for t in trees:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            *(os.path.join(t, d) for d in ("gateway", "nbdcore", "nbdgw")),
        ],
        env=env0,
        stdout=subprocess.DEVNULL,
    )
for t in trees:
    code = subprocess.run(
        [sys.executable, "-c", "import gateway.cli.backup as b; print(b.__file__)"],
        env=dict(env0, PYTHONPATH=t, PYTHONSAFEPATH="1"), capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip
    assert code.startswith(t), (code, t)  # each side runs its own tree's code
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
    target, gw = st.enter_context(gateway(uri, work))
    out = st.enter_context(procs.tmpfs_dir(2 * img.size + (1 << 30)))
    res = {t: [] for t in trees}
    for r in range(rounds + 1):
        for t in trees if r % 2 else trees[::-1]:
            cmd = [
                sys.executable,
                "-m",
                "gateway",
                "backup",
                *what,
                "--no-progress",
                "--target",
                target,
                "disk",
                str(out / "b.img"),
            ]
            g0, q0 = proc_cpu(gw.pid), proc_cpu(q.pid)
            w, c, _ = run_measured(cmd, dict(env0, PYTHONPATH=t, PYTHONSAFEPATH="1"))
            g1, q1 = proc_cpu(gw.pid), proc_cpu(q.pid)
            for f in out.glob("*"):
                f.unlink()
            if r:
                res[t].append((w, c, g1 - g0, q1 - q0))
    for t, rs in res.items():
        med = [statistics.median(x[k] for x in rs) for k in range(4)]
        print(
            f"{kind:11} {t:14} s wall {med[0]:.3f} client {med[1]:.3f} gw {med[2]:.3f}"
            f" qemu {med[3]:.3f}  walls {sorted(round(x[0], 2) for x in rs)}"
        )
