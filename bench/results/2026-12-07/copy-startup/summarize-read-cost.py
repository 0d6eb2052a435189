"""Summary of read-cost-ab.sh output: ``python summarize-read-cost.py FILE...``; per checkout the
median and range of the per-READ CPU, and the median of the per-round differences new - old
(rounds pair the two runs that followed each other)."""

import re
import statistics
import sys

runs: list[tuple[str, float]] = []
for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            m = re.match(r"(\S+) per READ: ([\d.]+) us", line)
            if m:
                runs.append((m.group(1), float(m.group(2))))
trees = list(dict.fromkeys(t for t, _ in runs))
for t in trees:
    xs = [v for u, v in runs if u == t]
    print(
        f"{t:28} median {statistics.median(xs):6.1f} us ({min(xs):.1f}-{max(xs):.1f}), n={len(xs)}"
    )
old = trees[0]
diffs = [
    (b if u == old else a) - (a if u == old else b)
    for (u, a), (_, b) in zip(runs[::2], runs[1::2], strict=True)
]
print(
    f"new - old, median of {len(diffs)} pairs: {statistics.median(diffs):+.1f} us "
    f"({sum(d < 0 for d in diffs)} of {len(diffs)} pairs lower)"
)
