"""The fixed cost of a whole copy: wall and CPU of `nbdgw nbd copy URI null:` and of
`nbdcopy URI null:` on a 1 MiB export (nbdkit memory 1M), in alternation.

    python fixed-cost.py URI [N]
"""

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

uri = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
sides = {
    "nbdgw nbd copy": [
        str(Path(sys.executable).with_name("nbdgw")),
        "nbd",
        "copy",
        "--no-progress",
        uri,
        "null:",
    ],
    "nbdcopy": ["nbdcopy", "--connections=2", "--threads=2", uri, "null:"],
}
res: dict[str, list[tuple[float, float]]] = {k: [] for k in sides}
for i in range(n):
    for name, cmd in list(sides.items())[:: 1 if i % 2 == 0 else -1]:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        if status:
            sys.exit(f"{cmd} failed")
        res[name].append((wall * 1000, (ru.ru_utime + ru.ru_stime) * 1000))
for name, xs in res.items():
    w = statistics.median(x[0] for x in xs)
    c = statistics.median(x[1] for x in xs)
    print(f"{name:16s} wall median {w:6.1f} ms, CPU median {c:6.1f} ms")
print("loadavg", Path("/proc/loadavg").read_text().strip())
