"""2 GiB of 1 MiB pwrites into /tmp: ``python writes.py MODE`` where MODE holds ``fadv``
(POSIX_FADV_DONTNEED after each write), ``fsync`` (every 32 MiB and at the end) or ``end``
(one fsync at the end): what the disk under /tmp costs a backup."""

import os
import resource
import sys
import time

mode = sys.argv[1]
path = "/tmp/speed/wr.img"
fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, 2 << 30)
buf = os.urandom(1 << 20)
start = time.perf_counter()
unsynced = 0
for i in range(2048):
    offset = i << 20
    os.pwrite(fd, buf, offset)
    if "fadv" in mode:
        os.posix_fadvise(fd, offset, 1 << 20, os.POSIX_FADV_DONTNEED)
    unsynced += 1 << 20
    if "fsync" in mode and unsynced >= 32 << 20:
        os.fsync(fd)
        unsynced = 0
if "fsync" in mode or "end" in mode:
    os.fsync(fd)
usage = resource.getrusage(resource.RUSAGE_SELF)
wall = time.perf_counter() - start
print(f"{mode} wall {wall:.2f} user {usage.ru_utime:.2f} sys {usage.ru_stime:.2f}")
os.unlink(path)
