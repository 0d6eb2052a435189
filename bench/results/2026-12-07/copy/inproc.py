"""copy_export configurations in one process, in turn, against a running qemu-nbd: wall time,
our user and sys CPU (getrusage), qemu-nbd's CPU and minor faults (/proc/PID/stat).

    python inproc.py URI QEMU_NBD_PID '{"name": {copy_export keyword arguments}, ...}' ROUNDS

The first round is a warm-up; medians of the others are printed.
"""

import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from nbdcore.sync.copy import NullSink, copy_export

uri = sys.argv[1]
qpid = int(sys.argv[2])
configs = json.loads(sys.argv[3])
reps = int(sys.argv[4])
TICK = os.sysconf("SC_CLK_TCK")


def qcpu():
    f = Path(f"/proc/{qpid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


def qflt():
    f = Path(f"/proc/{qpid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[7])


res = {k: [] for k in configs}
for i in range(reps + 1):
    for name, kw in configs.items():
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        q0 = qcpu()
        f0 = qflt()
        t0 = time.perf_counter()
        copy_export(uri, NullSink(), **kw)
        t = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        if i:
            res[name].append(
                (t, r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime, qcpu() - q0, qflt() - f0)
            )
for name, xs in res.items():
    m = [statistics.median(x[j] for x in xs) for j in range(5)]
    print(
        f"{name:22s} wall {m[0]:.3f} user {m[1]:.3f} sys {m[2]:.3f} qemu {m[3]:.3f}"
        f" total-cpu {m[1] + m[2] + m[3]:.3f} qemu-minflt {m[4]:.0f}"
    )
print("loadavg", Path("/proc/loadavg").read_text().strip())
