"""Construction cost of the per-request objects in the checkout on sys.path[0] (run it with
PYTHONPATH=TREE): ns per Reply (as the core builds one for a READ) and per _Request, best of 9
timeit repeats of 200k, in one process (``python construct.py``)."""

import timeit

from nbdcore.client import Reply, _Request
from nbdcore.constants import Cmd

m = memoryview(bytearray(16))
cmd = Cmd.READ
n = 200_000
for name, stmt in [
    ("Reply(cookie, READ, None, data)", lambda: Reply(5, cmd, None, m)),
    ("_Request(cookie, READ, 0, off, len)", lambda: _Request(5, cmd, 0, 4096, 65536)),
    ("(empty lambda, the loop's own cost)", lambda: None),
]:
    best = min(timeit.repeat(stmt, number=n, repeat=9)) / n * 1e9
    print(f"{name:40} {best:7.0f} ns")
