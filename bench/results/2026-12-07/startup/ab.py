"""Start-up A/B of nbdgw commands from two checkouts, alternating (after bench/results/2026-12-07/
startup-ab.py): ``python ab.py OLD NEW [ROUNDS]``; each checkout compiled to bytecode, first on
sys.path through PYTHONPATH; median wall time of ROUNDS starts each, sides alternate and swap
order every round. Needs the gateway at 127.0.0.1:50671 and qemu-nbd on
/tmp/startup-run/nbd.sock."""

import os
import shutil
import statistics
import subprocess
import sys
import time

old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 12
only = sys.argv[4].split(",") if len(sys.argv) > 4 else None
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
py = sys.executable
for tree in (old, new):
    dirs = [os.path.join(tree, d) for d in ("gateway", "nbdcore", "nbdgw")]
    subprocess.run([py, "-m", "compileall", "-q", *dirs], env=env, stdout=subprocess.DEVNULL)
URI = "nbd+unix:///disk?socket=/tmp/startup-run/nbd.sock"
T = ["--target", "127.0.0.1:50671"]
OUT = "/tmp/startup-run/out"
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
if only:
    commands = {k: v for k, v in commands.items() if any(o in k for o in only)}
times: dict[tuple[str, str], list[float]] = {}
for name, args in commands.items():
    for r in range(rounds):
        for tree in (old, new) if r % 2 == 0 else (new, old):
            shutil.rmtree(OUT, ignore_errors=True)
            os.makedirs(OUT)
            e = dict(env, PYTHONPATH=tree)
            t = time.perf_counter()
            subprocess.run(
                [py, "-m", "gateway", *args],
                cwd=tree,
                env=e,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=True,
            )
            times.setdefault((name, tree), []).append(time.perf_counter() - t)
base = []
for _ in range(rounds):
    t = time.perf_counter()
    subprocess.run([py, "-c", "pass"], env=env, check=True)
    base.append(time.perf_counter() - t)
print(
    f"{'command':30} {'old ms':>8} {'new ms':>8} {'new/old':>8}   (median of {rounds}, alternating)"
)
for name in commands:
    a = statistics.median(times[(name, old)]) * 1000
    b = statistics.median(times[(name, new)]) * 1000
    print(f"{name:30} {a:8.1f} {b:8.1f} {b / a:8.2f}")
print(f"{'python -c pass':30} {statistics.median(base) * 1000:8.1f}")
