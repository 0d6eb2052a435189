"""perf record the gateway's process during one 2 GiB StreamExtents include_data from qemu-nbd
(after one warm-up stream): ``python perf-stream.py OUT.perf`` from the repository root."""

import os
import subprocess
import sys
import time
from contextlib import ExitStack

sys.path.insert(0, os.getcwd())
from bench import procs
from bench.fixtures import Fixtures
from bench.gateway_suites import gateway

out = sys.argv[1]
data = Fixtures("full").data_raw()
with ExitStack() as st:
    work = st.enter_context(procs.tempdir())
    uri = st.enter_context(procs.qemu_nbd(data.file, "raw", work))
    target, gw = st.enter_context(gateway(uri, work))
    client = [sys.executable, "-m", "bench.workers", "stream-extents", target,
              "--context", "base:allocation", "--include-data", "--library"]  # fmt: skip
    subprocess.run(client, check=True, env=procs.worker_env(), stdout=subprocess.DEVNULL)
    perf = subprocess.Popen(
        ["perf", "record", "-F", "999", "-g", "-o", out, "-p", str(gw.pid)],
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    r = subprocess.run(client, check=True, env=procs.worker_env(), capture_output=True, text=True)
    print(r.stdout.strip())
    perf.send_signal(2)
    perf.wait()
