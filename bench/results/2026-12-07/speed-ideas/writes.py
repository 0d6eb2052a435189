import os, sys, time, resource
mode = sys.argv[1]
fd = os.open("/tmp/speed/wr.img", os.O_RDWR|os.O_CREAT|os.O_TRUNC, 0o644)
os.ftruncate(fd, 2<<30)
buf = os.urandom(1<<20)
t=time.perf_counter(); unsynced=0
for i in range(2048):
    off=i<<20
    os.pwrite(fd, buf, off)
    if "fadv" in mode: os.posix_fadvise(fd, off, 1<<20, os.POSIX_FADV_DONTNEED)
    if "sfr" in mode: os.sync_file_range(fd, off, 1<<20, os.SYNC_FILE_RANGE_WRITE) if hasattr(os,"sync_file_range") else None
    unsynced+=1<<20
    if "fsync" in mode and unsynced >= 32<<20:
        os.fsync(fd); unsynced=0
os.fsync(fd) if "fsync" in mode or "end" in mode else None
r=resource.getrusage(resource.RUSAGE_SELF)
print(mode, f"wall {time.perf_counter()-t:.2f} user {r.ru_utime:.2f} sys {r.ru_stime:.2f}")
os.unlink("/tmp/speed/wr.img")
