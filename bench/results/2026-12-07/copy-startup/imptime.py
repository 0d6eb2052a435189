"""-X importtime of `nbdgw nbd copy nbd+unix:///?socket=/nonexistent null:` from two checkouts,
alternating: ``python imptime.py OLD NEW [ROUNDS]``; median (min-max) cumulative us of the
modules below, and the sum of the top-level imports (what the process spends importing,
site and encodings excluded). Modules imported through importlib.import_module (the command
modules) are not timed by -X importtime: their own imports show at the top level."""

import os
import re
import statistics
import subprocess
import sys

old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 11
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
WATCH = [
    "nbdcore.sync.copy",
    "nbdcore.client",
    "nbdcore.sync.client",
    "nbdcore.clear_ext",
    "nbdcore.wire",
    "nbdcore.uri",
    "nbdcore.tls",
    "nbdcore.session",
    "dataclasses",
    "json",
    "signal",
    "threading",
]
res: dict[tuple[str, str], list[int]] = {}
for r in range(rounds):
    for tree in (old, new) if r % 2 == 0 else (new, old):
        p = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "gateway",
                "nbd",
                "copy",
                "nbd+unix:///?socket=/nonexistent",
                "null:",
            ],
            cwd=tree,
            env=dict(env, PYTHONPATH=tree),
            capture_output=True,
            text=True,
        )
        total, mods = 0, {}
        for line in p.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$", line)
            if not m:
                continue
            if m.group(3) == " " and m.group(4) not in ("site", "encodings"):
                total += int(m.group(2))
            mods.setdefault(m.group(4), int(m.group(2)))
        res.setdefault(("TOTAL top-level imports", tree), []).append(total)
        for w in WATCH:
            res.setdefault((w, tree), []).append(mods.get(w, 0))


def fmt(xs: list[int]) -> str:
    return f"{statistics.median(xs) / 1e3:6.1f} ({min(xs) / 1e3:5.1f}-{max(xs) / 1e3:5.1f})"


print(f"old={old} new={new}; cumulative ms, median (min-max) of {rounds} alternating runs")
for w in ["TOTAL top-level imports", *WATCH]:
    print(f"{w:26} {fmt(res[(w, old)]):>22} -> {fmt(res[(w, new)]):>22}")
