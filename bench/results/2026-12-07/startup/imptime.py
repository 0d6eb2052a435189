"""Import time of nbdgw commands from two checkouts: ``python imptime.py OLD NEW [ROUNDS]``:
the sum of the top-level imports' cumulative times (-X importtime), median of ROUNDS
alternating runs, and the median cumulative time of chosen modules."""

import os
import re
import shutil
import statistics
import subprocess
import sys

old, new = sys.argv[1], sys.argv[2]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 7
env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
URI = "nbd+unix:///disk?socket=/tmp/startup-run/nbd.sock"
T = ["--target", "127.0.0.1:50671"]
OUT = "/tmp/startup-run/out-imp"
ONLY = sys.argv[4].split(",") if len(sys.argv) > 4 else None
commands = {
    "--version": ["--version"],
    "nbd copy --help": ["nbd", "copy", "--help"],
    "backup --help": ["backup", "--help"],
    "export list --help": ["export", "list", "--help"],
    "export list (real)": ["export", "list", *T],
    "nbd copy URI null:": ["nbd", "copy", URI, "null:"],
    "backup --full": ["backup", "disk", OUT + "/b.img", "--full", "--no-progress", *T],
}
if ONLY:
    commands = {k: v for k, v in commands.items() if any(o in k for o in ONLY)}
WATCH = [
    "grpc",
    "asyncio",
    "google.protobuf.json_format",
    "crc32c",
    "nbdgw._models",
    "nbdgw._core",
    "nbdcore.storage",
    "gateway.integrity",
    "gateway.cli.common",
]
res = {}
for name, args in commands.items():
    for r in range(rounds):
        for tree in (old, new) if r % 2 == 0 else (new, old):
            shutil.rmtree(OUT, ignore_errors=True)
            os.makedirs(OUT)
            p = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "gateway", *args],
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
                mods[m.group(4)] = int(m.group(2))
            d = res.setdefault((name, tree), {"total": []})
            d["total"].append(total)
            for w in WATCH:
                d.setdefault(w, []).append(mods.get(w, 0))
for name in commands:
    a, b = res[(name, old)], res[(name, new)]
    print(
        f"{name:22} imports {statistics.median(a['total']) / 1000:6.1f}"
        f" -> {statistics.median(b['total']) / 1000:6.1f} ms"
    )
    for w in WATCH:
        x, y = statistics.median(a[w]) / 1000, statistics.median(b[w]) / 1000
        if x or y:
            print(f"    {w:30} {x:6.1f} -> {y:6.1f}")
