"""``python -m bench.compression``: what zstd buys and costs on StreamExtents data, measured on a
realistic disk, not random bytes.

The disk is an ext4 image of this machine's installed Debian system (``/etc``, ``/usr/bin``,
``/usr/sbin``, ``/usr/share``, ``/usr/include``, ``/usr/libexec``, the shared libraries in
``/usr/lib/x86_64-linux-gnu`` and ``/var/lib/dpkg``), made by ``mke2fs -d`` from hard links
(no data copied), cached under ``.cache/bench/rootfs.img``. Only its allocated ranges are read
(``SEEK_DATA``), as the gateway sends only DATA extents, in 1 MiB pieces: one message's data,
which the gateway compresses as one zstd frame (gateway.integrity.Compressor).

For each level it prints the ratio (data bytes / compressed bytes, messages that do not shrink
counted raw, as the gateway sends them) and the CPU seconds per GiB of data to compress and
to decompress (``time.process_time``, one thread: the figure does not depend on how busy the
other cores are). The raw JSON goes to ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zstandard

from gateway.integrity import Compressor

ROOT = Path(__file__).resolve().parent.parent
IMAGE = ROOT / ".cache" / "bench" / "rootfs.img"
IMAGE_SIZE = 4 << 30
SOURCES = [
    "/etc",
    "/usr/bin",
    "/usr/sbin",
    "/usr/share",
    "/usr/include",
    "/usr/libexec",
    "/usr/lib/x86_64-linux-gnu",
    "/var/lib/dpkg",
]
MESSAGE = 1 << 20
GiB = 1 << 30


def build_image(path: Path) -> None:
    """An ext4 image of the installed system, from a staging tree of hard links."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="nbdgw-rootfs-", dir=path.parent))
    tmp = path.with_suffix(".tmp")
    try:
        for src in SOURCES:
            if not os.path.isdir(src):
                continue
            dest = staging / src.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            # -l: hard links, no data copied; files that cannot be linked are skipped.
            subprocess.run(["cp", "-al", src, str(dest)], check=False, stderr=subprocess.DEVNULL)
        tmp.unlink(missing_ok=True)
        subprocess.run(
            ["mke2fs", "-q", "-t", "ext4", "-d", str(staging), str(tmp), f"{IMAGE_SIZE >> 20}M"],
            check=True,
        )
        tmp.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def allocated(fd: int, size: int) -> list[tuple[int, int]]:
    ranges, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        ranges.append((start, end))
        pos = end
    return ranges


def measure(path: Path, levels: list[int], limit: int) -> dict[str, Any]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pieces = [
            (pos, min(MESSAGE, end - pos))
            for start, end in allocated(fd, size)
            for pos in range(start, end, MESSAGE)
        ]
        allocated_bytes = sum(n for _, n in pieces)
        # An even sample of the whole disk, not its first files.
        stride = max(1, -(-allocated_bytes // limit))
        messages = [os.pread(fd, n, pos) for pos, n in pieces[::stride]]
        total = sum(map(len, messages))
    finally:
        os.close(fd)
    results = []
    decompressor = zstandard.ZstdDecompressor()
    for level in levels:
        compressor = Compressor(level)
        sent = raw_messages = 0
        frames = []
        cpu = time.process_time()
        for data in messages:
            frame = compressor.compress(data)
            if frame is None:
                raw_messages += 1
                sent += len(data)
            else:
                frames.append(frame)
                sent += len(frame)
        compress_cpu = time.process_time() - cpu
        cpu = time.process_time()
        for frame in frames:
            decompressor.decompress(frame)
        decompress_cpu = time.process_time() - cpu
        results.append(
            {
                "level": level,
                "data_bytes": total,
                "sent_bytes": sent,
                "ratio": total / sent,
                "messages": len(messages),
                "raw_messages": raw_messages,
                "compress_cpu_s_per_gib": compress_cpu / (total / GiB),
                "decompress_cpu_s_per_gib": decompress_cpu / (total / GiB),
            }
        )
    return {
        "image": str(path),
        "image_size": size,
        "allocated_bytes": allocated_bytes,
        "sample": f"every {stride}th MiB of the allocated data",
        "sources": SOURCES,
        "message_size": MESSAGE,
        "zstandard": zstandard.__version__,
        "zstd": zstandard.ZSTD_VERSION,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load": os.getloadavg()[0],
        "levels": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compression", description=__doc__)
    p.add_argument("--image", type=Path, default=IMAGE, help="a disk image (built if missing)")
    p.add_argument("--levels", default="1,3,6,9", help="zstd levels (default 1,3,6,9)")
    p.add_argument(
        "--limit", type=int, default=256 << 20, help="bytes of data to sample (default 256 MiB)"
    )
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args(argv)
    if not args.image.exists():
        print(f"building {args.image} from the installed system ...", file=sys.stderr)
        build_image(args.image)
    out = measure(args.image, [int(x) for x in args.levels.split(",")], args.limit)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(
        f"{out['image']}: {out['image_size'] >> 20} MiB image,"
        f" {out['allocated_bytes'] >> 20} MiB allocated, {out['sample']}, load {out['load']:.1f}"
    )
    print("level  data MiB  sent MiB  ratio  raw msgs  compress s/GiB  decompress s/GiB")
    for r in out["levels"]:
        print(
            f"{r['level']:>5}  {r['data_bytes'] >> 20:>8}  {r['sent_bytes'] >> 20:>8}"
            f"  {r['ratio']:5.2f}  {r['raw_messages']:>8}  {r['compress_cpu_s_per_gib']:14.2f}"
            f"  {r['decompress_cpu_s_per_gib']:16.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
