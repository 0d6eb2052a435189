"""CPU of the interpreter's teardown after `nbdgw nbd copy URI null:`: the command's CPU from
wait4 less what the process had used when main() returned.

    python teardown.py URI [N]
"""

import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import resource, sys
from gateway.cli import main
rc = main(sys.argv[1:])
r = resource.getrusage(resource.RUSAGE_SELF)
print(r.ru_utime + r.ru_stime, file=sys.stderr)
sys.exit(rc)
"""
uri = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 8
xs = []
for _ in range(n):
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, "nbd", "copy", "--no-progress", uri, "null:"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    err = p.stderr.read()
    _, _, ru = os.wait4(p.pid, 0)
    at_end = float(err.strip().splitlines()[-1])
    xs.append((ru.ru_utime + ru.ru_stime - at_end) * 1000)
print(
    "teardown CPU ms per run:",
    " ".join(f"{x:.1f}" for x in xs),
    f"median {statistics.median(xs):.1f}",
)
print("loadavg", Path("/proc/loadavg").read_text().strip())
