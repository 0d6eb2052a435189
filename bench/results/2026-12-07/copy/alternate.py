"""Whole commands in alternation on one fresh qemu-nbd 7.2: the wall time, the user and sys CPU
of each command (wait4), and the CPU and minor faults of qemu-nbd meanwhile (/proc/PID/stat
fields 14+15 and 10). A warm-up of each side, then PAIRS rounds, the order reversed every
other round.

    PAIRS=7 python alternate.py '{"ours": [".venv/bin/nbdgw", "nbd", "copy", "--no-progress",
        "{uri}", "null:"], "nbdcopy": ["nbdcopy", "--connections=2", "--threads=2",
        "--requests=64", "--request-size=262144", "{uri}", "null:"]}'

DATA (default .cache/bench/full/data.raw, the bench's 2 GiB all-data image) is served
read-only as export "disk" on a unix socket, as bench.procs.qemu_nbd does.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = os.environ.get("DATA", ".cache/bench/full/data.raw")
PAIRS = int(os.environ.get("PAIRS", "5"))
TICK = os.sysconf("SC_CLK_TCK")


def qcpu(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK  # fields 14, 15


def qflt(pid):
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # field 10


def run(cmd, qpid):
    q0 = qcpu(qpid)
    f0 = qflt(qpid)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    err = p.stderr.read()
    p.stderr.close()
    if status != 0:
        sys.exit(f"{cmd} failed: {err.decode()}")
    return dict(
        wall=wall,
        user=ru.ru_utime,
        sys=ru.ru_stime,
        qemu=qcpu(qpid) - q0,
        qemu_minflt=qflt(qpid) - f0,
    )


def main():
    sides = json.loads(sys.argv[1])  # name -> command with {uri}
    with tempfile.TemporaryDirectory() as d:
        sock = f"{d}/q.sock"
        q = subprocess.Popen(
            ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-x", "disk", "-k", sock, "-r", DATA]
        )
        while not os.path.exists(sock):
            time.sleep(0.05)
        time.sleep(0.2)
        uri = f"nbd+unix:///disk?socket={sock}"
        res = {n: [] for n in sides}
        try:
            for c in sides.values():  # warm-up
                run([a.format(uri=uri) for a in c], q.pid)
            for i in range(PAIRS):
                order = list(sides.items()) if i % 2 == 0 else list(sides.items())[::-1]
                for n, c in order:
                    r = run([a.format(uri=uri) for a in c], q.pid)
                    res[n].append(r)
                    print(
                        f"{i} {n:20s} wall {r['wall']:.3f} user {r['user']:.3f} sys {r['sys']:.3f}"
                        f" qemu {r['qemu']:.2f} qemu-minflt {r['qemu_minflt']}",
                        flush=True,
                    )
        finally:
            q.terminate()
            q.wait()
    names = list(sides)
    for n in names:
        m = {
            k: statistics.median(r[k] for r in res[n])
            for k in ("wall", "user", "sys", "qemu", "qemu_minflt")
        }
        print(f"median {n:20s} " + " ".join(f"{k} {v:.3f}" for k, v in m.items()))
    if len(names) == 2:
        a, b = names
        ratios = [rb["wall"] / ra["wall"] for ra, rb in zip(res[a], res[b], strict=True)]
        print(
            f"speed ratio {a} / {b} per pair: "
            + " ".join(f"{x:.2f}" for x in ratios)
            + f"  median {statistics.median(ratios):.2f}"
        )
    print("loadavg", Path("/proc/loadavg").read_text().strip())


main()
