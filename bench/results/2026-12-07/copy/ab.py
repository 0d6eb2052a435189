import json
import os
import statistics
import subprocess
import sys

cmds = json.loads(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 30
res = {k: [] for k in cmds}
for i in range(n):
    for k, c in cmds.items() if i % 2 == 0 else reversed(cmds.items()):
        p = subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, st, ru = os.wait4(p.pid, 0)
        res[k].append((ru.ru_utime + ru.ru_stime) * 1000)
for k, xs in res.items():
    print(
        f"{k:40s} cpu median {statistics.median(xs):6.1f} ms"
        f"  p25 {statistics.quantiles(xs, n=4)[0]:6.1f}"
    )
