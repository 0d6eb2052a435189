"""Like ab.py, with the CPU time (user+sys) of each start from wait4: less sensitive than wall
time to the other engineers' load. ``python ab-ru.py OLD NEW ROUNDS``."""

import os
import shutil
import statistics
import subprocess
import sys
import time

old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3])
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
for tree in (old, new):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "compileall",
            "-q",
            *(os.path.join(tree, d) for d in ("gateway", "nbdcore", "nbdgw")),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
URI = "nbd+unix:///disk?socket=/tmp/startup-run/nbd.sock"
T = ["--target", "127.0.0.1:50671"]
OUT = "/tmp/startup-run/out-ru"
commands = {
    "--version": ["--version"],
    "nbd copy --help": ["nbd", "copy", "--help"],
    "backup --help": ["backup", "--help"],
    "export list --help": ["export", "list", "--help"],
    "export list (real)": ["export", "list", *T],
    "nbd copy URI null: (16M)": ["nbd", "copy", URI, "null:"],
    "backup --full (16M, 4M data)": [
        "backup",
        "disk",
        OUT + "/b.img",
        "--full",
        "--no-progress",
        *T,
    ],
}
res = {}
for name, args in commands.items():
    for r in range(rounds):
        for tree in (old, new) if r % 2 == 0 else (new, old):
            shutil.rmtree(OUT, ignore_errors=True)
            os.makedirs(OUT)
            t = time.perf_counter()
            p = subprocess.Popen(
                [sys.executable, "-m", "gateway", *args],
                cwd=tree,
                env=dict(env, PYTHONPATH=tree),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _, st, ru = os.wait4(p.pid, 0)
            assert st == 0, (name, tree)
            res.setdefault((name, tree), []).append(
                (time.perf_counter() - t, ru.ru_utime + ru.ru_stime)
            )
print(
    f"{'command':30} {'wall old':>9} {'wall new':>9} {'ratio':>6} {'cpu old':>8}"
    f" {'cpu new':>8} {'ratio':>6}  (ms, median of {rounds}, alternating)"
)
for name in commands:
    a, b = res[(name, old)], res[(name, new)]
    wa, wb = (statistics.median(x[0] for x in v) * 1e3 for v in (a, b))
    ca, cb = (statistics.median(x[1] for x in v) * 1e3 for v in (a, b))
    print(f"{name:30} {wa:9.1f} {wb:9.1f} {wb / wa:6.2f} {ca:8.1f} {cb:8.1f} {cb / ca:6.2f}")
