"""Start-up A/B of `nbdgw nbd copy` from two checkouts (after ../startup/ab-ru.py):
``python ab.py OLD NEW [ROUNDS]``. Each checkout compiled to bytecode and first on sys.path
(PYTHONPATH); the sides alternate and swap order every round. Wall time and CPU (user+sys, from
wait4) of each start: median and range (min-max) in ms. Needs nothing running: the copy's socket
does not exist, so it runs from start to the refused connection (exit 1)."""

import os
import statistics
import subprocess
import sys
import time

old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 24
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
for tree in (old, new):
    dirs = [os.path.join(tree, d) for d in ("gateway", "nbdcore", "nbdgw")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], env=env, check=True)
commands = {
    "nbd copy NONEXISTENT null:": (["nbd", "copy", "nbd+unix:///?socket=/nonexistent", "null:"], 1),
    "nbd copy --help": (["nbd", "copy", "--help"], 0),
    "python -c pass": (None, 0),
}
res: dict[tuple[str, str], list[tuple[float, float]]] = {}
for name, (args, want) in commands.items():
    for r in range(rounds):
        for tree in (old, new) if r % 2 == 0 else (new, old):
            argv = (
                [sys.executable, "-m", "gateway", *args] if args else [sys.executable, "-c", "pass"]
            )
            t = time.perf_counter()
            p = subprocess.Popen(
                argv,
                cwd=tree,
                env=dict(env, PYTHONPATH=tree),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _, st, ru = os.wait4(p.pid, 0)
            wall = time.perf_counter() - t
            assert os.waitstatus_to_exitcode(st) == want, (name, tree, st)
            res.setdefault((name, tree), []).append((wall, ru.ru_utime + ru.ru_stime))


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:6.1f} ({min(xs) * 1e3:5.1f}-{max(xs) * 1e3:5.1f})"


print(f"old={old} new={new}; ms, median (min-max) of {rounds} alternating runs each")
heads = "".join(f" {h:>20}" for h in ("wall old", "wall new", "cpu old", "cpu new"))
print(f"{'command':28}{heads} new/old (wall, cpu)")
for name in commands:
    a, b = res[(name, old)], res[(name, new)]
    wa, wb = [x[0] for x in a], [x[0] for x in b]
    ca, cb = [x[1] for x in a], [x[1] for x in b]
    rw = statistics.median(wb) / statistics.median(wa)
    rc = statistics.median(cb) / statistics.median(ca)
    print(f"{name:28} {fmt(wa):>20} {fmt(wb):>20} {fmt(ca):>20} {fmt(cb):>20} {rw:.3f} {rc:.3f}")
