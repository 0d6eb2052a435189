"""An incremental backup (bitmap b0 of the bench fixture incremental-10pct.qcow2) against nbdcopy
of a qcow2 holding only the dirty granules (built by hand here; now the fixture
incremental-10pct-sparse.qcow2), nbdcopy of the whole disk and nbdinfo --map, alternating:
``python incremental-like-for-like.py ROUNDS SPARSE.qcow2`` from the repository root."""

import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.command_suites import compile_bytecode, nbdgw_cmd
from bench.fixtures import Fixtures
from bench.gateway_suites import gateway

fx = Fixtures("full")
qcow = fx.incremental_qcow2()
compile_bytecode()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri = st.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=["b0"]))
    work2 = st.enter_context(procs.tempdir())
    suri = st.enter_context(procs.qemu_nbd(sys.argv[2], "qcow2", work2))
    target, gw = st.enter_context(gateway(uri, work))
    out = st.enter_context(procs.tmpfs_dir(4 << 30))
    ours = nbdgw_cmd(
        "backup",
        "--bitmap",
        "b0",
        "--no-progress",
        "--target",
        target,
        "disk",
        str(out / "inc.img"),
    )
    sides = {
        "ours": ours,
        "nbdcopy sparse": ["nbdcopy", suri, str(out / "sp.img")],
        "nbdcopy full": ["nbdcopy", uri, str(out / "full.img")],
        "nbdinfo map": ["nbdinfo", "--map", suri],
    }
    res = {k: [] for k in sides}
    for r in range(int(sys.argv[1]) + 1):
        for k, cmd in list(sides.items()) if r % 2 else list(sides.items())[::-1]:
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            w = time.perf_counter() - t
            for p in out.glob("*"):
                p.unlink()
            if r:
                res[k].append(w)
    for k, v in res.items():
        print(f"{k:16} median {statistics.median(v):.3f} s  {sorted(round(x, 3) for x in v)}")
