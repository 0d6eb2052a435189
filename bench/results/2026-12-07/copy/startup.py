"""Start-up CPU of `python -m gateway nbd copy ...`, two checkouts in alternation.

    python startup.py BASE_CHECKOUT BRANCH_CHECKOUT [N]

Each checkout is run with its own directory as the working directory (so `-m gateway` imports
its code) and its modules compiled to bytecode first. Prints the median and quartiles of the
CPU (user + sys, from wait4) of each command over N alternating runs.
"""

import os
import statistics
import subprocess
import sys
from pathlib import Path

base, branch = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 40
refused = "nbd+unix:///disk?socket=/nonexistent/none.sock"
commands = {
    "python -c pass": ["-c", "pass"],
    "nbd copy --help": ["-m", "gateway", "nbd", "copy", "--help"],
    "nbd copy REFUSED null: (imports, parse, connect)": [
        "-m",
        "gateway",
        "nbd",
        "copy",
        refused,
        "null:",
    ],
}
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
for d in (base, branch):
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "nbdcore", "gateway"],
        cwd=d,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
sides = {"main": base, "branch": branch}
for name, args in commands.items():
    res: dict[str, list[float]] = {s: [] for s in sides}
    for i in range(n):
        for s, d in list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]:
            p = subprocess.Popen(
                [sys.executable, *args], cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            _, _, ru = os.wait4(p.pid, 0)
            res[s].append((ru.ru_utime + ru.ru_stime) * 1000)
    for s, xs in res.items():
        q = statistics.quantiles(xs, n=4)
        print(
            f"{name:50s} {s:7s} CPU ms median {statistics.median(xs):6.1f}"
            f" (quartiles {q[0]:.1f}-{q[2]:.1f})"
        )
print("loadavg", Path("/proc/loadavg").read_text().strip())
