"""perf record (OUT ending in .perf) or py-spy (any other OUT) the gateway's process during RUNS
incremental backups (`nbdgw backup --bitmap b0` of incremental-10pct.qcow2 into tmpfs):
``python profile-incremental.py OUT RUNS`` from the repository root."""

import os
import subprocess
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.command_suites import nbdgw_cmd
from bench.fixtures import BITMAP, Fixtures
from bench.gateway_suites import gateway

out_file, runs = sys.argv[1], int(sys.argv[2])
qcow = Fixtures("full").incremental_qcow2()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri = st.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=[BITMAP]))
    target, gw = st.enter_context(gateway(uri, work))
    out = st.enter_context(procs.tmpfs_dir(3 * qcow.size))
    cmd = nbdgw_cmd("backup", "--bitmap", BITMAP, "--target", target, "disk", str(out / "i.img"))

    def one() -> float:
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for f in out.iterdir():
            f.unlink()
        return time.time() - t

    one()
    if out_file.endswith(".perf"):
        rec = ["perf", "record", "-F", "1999", "-g", "-o", out_file, "-p", str(gw.pid)]
    else:
        rec = [".venv/bin/py-spy", "record", "-r", "500", "-f", "raw", "-o", out_file,
               "-p", str(gw.pid)]  # fmt: skip
    prof = subprocess.Popen(rec, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    print("walls", [round(one(), 3) for _ in range(runs)])
    prof.send_signal(2)
    prof.wait()
