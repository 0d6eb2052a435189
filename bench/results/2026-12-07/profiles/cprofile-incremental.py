"""The gateway under cProfile during RUNS incremental backups (`nbdgw backup --bitmap b0` of
incremental-10pct.qcow2 into tmpfs); the profile is written to OUT when the gateway stops:
``python cprofile-incremental.py OUT RUNS`` from the repository root."""

import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.command_suites import nbdgw_cmd
from bench.fixtures import BITMAP, Fixtures
from bench.gateway_suites import free_port, gateway_ready

out_file, runs = sys.argv[1], int(sys.argv[2])
qcow = Fixtures("full").incremental_qcow2()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri = st.enter_context(procs.qemu_nbd(qcow.file, "qcow2", work, bitmaps=[BITMAP]))
    target = f"127.0.0.1:{free_port()}"
    argv = ["nbdgw", "serve", "--listen", target, "--export", f"disk={uri}",
            "--data-dir", str(work / "g")]  # fmt: skip
    code = (
        f"import cProfile, sys; sys.argv = {argv!r}\n"
        f"from gateway.cli import main\ncProfile.run('main()', {out_file!r})"
    )
    g = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL)
    while not gateway_ready(target)():
        time.sleep(0.1)
    out = st.enter_context(procs.tmpfs_dir(3 * qcow.size))
    cmd = nbdgw_cmd("backup", "--bitmap", BITMAP, "--target", target, "disk", str(out / "i.img"))
    for _ in range(runs):
        t = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for f in out.iterdir():
            f.unlink()
        print("wall", round(time.time() - t, 3))
    g.send_signal(signal.SIGTERM)
    g.wait(30)
