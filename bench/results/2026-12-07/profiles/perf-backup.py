"""perf record `nbdgw backup --full` (the client's process) and then `nbdcopy URI FILE`, each
of the 2 GiB data.raw into tmpfs after a warm-up run: ``python perf-backup.py`` from the
repository root; writes /tmp/ours.perf and /tmp/nbdcopy.perf."""

import os
import subprocess
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.command_suites import nbdcopy_cmd, nbdgw_cmd
from bench.fixtures import Fixtures
from bench.gateway_suites import gateway

data = Fixtures("full").data_raw()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri = st.enter_context(procs.qemu_nbd(data.file, "raw", work))
    target, _ = st.enter_context(gateway(uri, work))
    out = st.enter_context(procs.tmpfs_dir(2 * data.size))
    ours = nbdgw_cmd("backup", "--full", "--target", target, "disk", str(out / "b.raw"))
    for name, cmd in (("ours", ours), ("nbdcopy", nbdcopy_cmd(uri, str(out / "n.raw")))):
        subprocess.run(cmd, check=True, env=procs.worker_env(), stdout=subprocess.DEVNULL)
        for f in out.iterdir():
            f.unlink()
        t = time.time()
        subprocess.run(
            ["perf", "record", "-F", "999", "-g", "-o", f"/tmp/{name}.perf", "--", *cmd],
            check=True, env=procs.worker_env(), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        print(name, "wall", round(time.time() - t, 3))
        for f in out.iterdir():
            f.unlink()
