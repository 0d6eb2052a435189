"""Start-up of three nbdgw commands from two checkouts, alternating, on one interpreter:
``python startup-ab.py OLD_CHECKOUT NEW_CHECKOUT [ROUNDS]`` (each checkout compiled to bytecode
first, its modules first on sys.path through PYTHONPATH; median wall time of ROUNDS starts)."""

import os
import statistics
import subprocess
import sys
import time

old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 12
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
py = sys.executable
for tree in (old, new):
    dirs = [os.path.join(tree, d) for d in ("gateway", "nbdcore", "nbdgw")]
    subprocess.run([py, "-m", "compileall", "-q", *dirs], env=env, stdout=subprocess.DEVNULL)
commands = {
    "nbdgw --version": ["--version"],
    "nbdgw nbd copy --help": ["nbd", "copy", "--help"],
    "nbdgw export list --help": ["export", "list", "--help"],
}
times: dict[tuple[str, str], list[float]] = {}
for name, args in commands.items():
    for _ in range(rounds):
        for tree in (old, new):
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
for (name, tree), v in times.items():
    print(f"{name:28} {tree:20} {statistics.median(v) * 1000:6.1f} ms")
print(f"{'python -c pass':28} {'':20} {statistics.median(base) * 1000:6.1f} ms")
