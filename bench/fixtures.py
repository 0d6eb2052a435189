"""Fixtures, built once and cached under ``.cache/bench/{full,quick}/``.

A fixture is complete when its metadata file (``NAME.json``) exists: it is written last, after
the image was built under a temporary name and renamed, so an interrupted build is redone and a
finished one is never rebuilt. ``--rebuild`` (or deleting the folder) forces a rebuild.

Bitmaps with many extents: every other 64 KiB granule dirty, so a bitmap of N dirty granules has
exactly 2N extents (dirty, clean, dirty, ... ending clean). qemu's are made by pipelined
WRITE_ZEROES through a writable qemu-nbd (``_libnbd_dirty.py``): on unallocated qcow2 clusters
they dirty the bitmap but allocate nothing, as ``qemu-io write -z`` does, 20 times faster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.harness import NotAvailable

GRANULE = 65536
BITMAP = "b0"
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    data_bytes: int  # the all-data raw image
    qcow2_dirty: int  # dirty granules of the qcow2 bitmap (2x extents)
    big_dirty: int  # dirty granules of the big bitmap (gateway RSS)
    image_dirty: int  # dirty granules of the nbdcore Image bitmap


FULL = Sizes(data_bytes=2 * GiB, qcow2_dirty=524_288, big_dirty=5_242_880, image_dirty=524_288)
QUICK = Sizes(data_bytes=64 * MiB, qcow2_dirty=8_192, big_dirty=65_536, image_dirty=8_192)


@dataclass(frozen=True)
class Fixture:
    name: str
    path: str
    size: int  # virtual size in bytes
    extents: int  # extents of the bitmap (0 for a data image)
    bitmap: str | None
    build_seconds: float

    @property
    def file(self) -> Path:
        return Path(self.path)


class Fixtures:
    def __init__(self, mode: str, *, root: Path | None = None, rebuild: bool = False):
        self.mode = mode
        self.sizes = QUICK if mode == "quick" else FULL
        self.dir = (root or procs.ROOT / ".cache" / "bench") / mode
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rebuild = rebuild
        self._seen: set[str] = set()

    def _cached(self, name: str) -> Fixture | None:
        meta = self.dir / f"{name}.json"
        if self.rebuild and name not in self._seen:
            self._seen.add(name)
            meta.unlink(missing_ok=True)
            return None
        if not meta.exists():
            return None
        fx = Fixture(**json.loads(meta.read_text()))
        return fx if Path(fx.path).exists() else None

    def _store(self, fx: Fixture) -> Fixture:
        meta = self.dir / f"{fx.name}.json"
        tmp = meta.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(fx), indent=2))
        tmp.rename(meta)
        return fx

    def _log(self, text: str) -> None:
        print(f"[fixture] {text}", file=sys.stderr, flush=True)

    # --- the all-data raw image ----------------------------------------------------------------

    def data_raw(self) -> Fixture:
        name = "data.raw"
        if fx := self._cached(name):
            return fx
        size = self.sizes.data_bytes
        self._log(f"writing {name}: {size >> 20} MiB of data")
        start = time.monotonic()
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        # Random bytes, each MiB made distinct by its index: fully allocated, no zero blocks to
        # be detected as holes, cheap to write.
        block = bytearray(os.urandom(MiB))
        with open(tmp, "wb") as f:
            for i in range(size // MiB):
                block[:8] = i.to_bytes(8, "little")
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        tmp.rename(final)
        return self._store(
            Fixture(name, str(final), size, 0, None, round(time.monotonic() - start, 1))
        )

    # --- qcow2 images with a fragmented bitmap ---------------------------------------------------

    def bitmap_qcow2(self, *, big: bool = False) -> Fixture:
        dirty = self.sizes.big_dirty if big else self.sizes.qcow2_dirty
        name = f"bitmap-{2 * dirty}.qcow2"
        if fx := self._cached(name):
            return fx
        size = 2 * dirty * GRANULE
        self._log(f"building {name}: {2 * dirty:,} extents over {size >> 30} GiB (qemu-nbd)")
        start = time.monotonic()
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        tmp.unlink(missing_ok=True)
        qemu_img = procs.tool("qemu-img")
        fmt = ["-f", "qcow2"]
        subprocess.run([qemu_img, "create", "-q", *fmt, str(tmp), str(size)], check=True)
        subprocess.run(
            [qemu_img, "bitmap", "--add", "--granularity", str(GRANULE), *fmt, str(tmp), BITMAP],
            check=True,
        )
        if not Path(procs.SYSTEM_PYTHON).exists():
            raise NotAvailable("python3-libnbd (system python) is needed to build bitmaps")
        with procs.tempdir() as work, procs.qemu_nbd(tmp, "qcow2", work, read_only=False) as uri:
            env = dict(os.environ, PYTHONPATH=procs.LIBNBD_PYTHONPATH)
            script = Path(__file__).with_name("_libnbd_dirty.py")
            subprocess.run(
                [procs.SYSTEM_PYTHON, str(script), uri, str(GRANULE), str(dirty)],
                check=True,
                env=env,
            )
        # qemu-nbd stored the bitmap on SIGTERM; a bitmap still "in-use" would be refused by -B.
        info = json.loads(procs.output([qemu_img, "info", "--output=json", *fmt, str(tmp)]))
        bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        flags = [b.get("flags", []) for b in bitmaps if b.get("name") == BITMAP]
        if not flags or "in-use" in flags[0]:
            raise RuntimeError(f"{name}: bitmap {BITMAP} not stored cleanly: {bitmaps}")
        tmp.rename(final)
        return self._store(
            Fixture(name, str(final), size, 2 * dirty, BITMAP, round(time.monotonic() - start, 1))
        )

    # --- the all-data image as qcow2, 10% of it dirty in a fragmented bitmap ------------------

    INCREMENTAL_EVERY = 10  # one granule in ten is written (and so dirty)
    INCREMENTAL_PATTERN = 0xA7

    def incremental_qcow2(self) -> Fixture:
        """``data.raw`` as qcow2 with bitmap ``b0``, then one 64 KiB granule in ten written
        (qemu-io, pattern 0xA7): an incremental backup moves 10% of the disk, in 64 KiB
        pieces between clean ones."""
        name = "incremental-10pct.qcow2"
        if fx := self._cached(name):
            return fx
        data = self.data_raw()
        self._log(f"building {name} from {data.name}")
        start = time.monotonic()
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        tmp.unlink(missing_ok=True)
        qemu_img, fmt = procs.tool("qemu-img"), ["-f", "qcow2"]
        subprocess.run(
            [qemu_img, "convert", "-q", "-f", "raw", "-O", "qcow2", data.path, str(tmp)],
            check=True,
        )
        subprocess.run(
            [qemu_img, "bitmap", "--add", "--granularity", str(GRANULE), *fmt, str(tmp), BITMAP],
            check=True,
        )
        granules = self._write_incremental_granules(tmp, data.size)
        tmp.rename(final)
        return self._store(
            Fixture(
                name,
                str(final),
                data.size,
                len(granules),  # dirty granules (extents of the merged dirty map)
                BITMAP,
                round(time.monotonic() - start, 1),
            )
        )

    def _write_incremental_granules(self, qcow2: Path, size: int) -> range:
        """Write one 64 KiB granule in ten of ``qcow2`` (one qemu-io, pattern 0xA7); returns
        the granules written."""
        granules = range(0, size // GRANULE, self.INCREMENTAL_EVERY)
        cmds = []
        for g in granules:
            cmds += ["-c", f"write -q -P {self.INCREMENTAL_PATTERN} {g * GRANULE} {GRANULE}"]
        subprocess.run([procs.tool("qemu-io"), "-f", "qcow2", *cmds, str(qcow2)], check=True)
        return granules

    def incremental_sparse_qcow2(self) -> Fixture:
        """A qcow2 image of ``data.raw``'s size holding only the granules ``incremental_qcow2``
        dirties (same offsets, same pattern), the rest unallocated: what a copy of just the
        changed data reads. nbdcopy cannot be told which ranges to copy; from this image it
        copies exactly those (it skips holes), in the same 64 KiB pieces."""
        name = "incremental-10pct-sparse.qcow2"
        if fx := self._cached(name):
            return fx
        data = self.data_raw()
        self._log(f"building {name}")
        start = time.monotonic()
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        tmp.unlink(missing_ok=True)
        subprocess.run(
            [procs.tool("qemu-img"), "create", "-q", "-f", "qcow2", str(tmp), str(data.size)],
            check=True,
        )
        granules = self._write_incremental_granules(tmp, data.size)
        tmp.rename(final)
        return self._store(
            Fixture(
                name,
                str(final),
                data.size,
                len(granules),  # allocated granules, each its own extent
                None,
                round(time.monotonic() - start, 1),
            )
        )

    # --- an nbdcore Image with a fragmented bitmap -----------------------------------------------

    def bitmap_image(self) -> Fixture:
        try:
            from nbdcore.storage import Image  # type: ignore[attr-defined]
        except ImportError as exc:
            raise NotAvailable(f"nbdcore.storage.Image has not landed ({exc})") from None
        dirty = self.sizes.image_dirty
        name = f"image-{2 * dirty}"
        if fx := self._cached(name):
            return fx
        size = 2 * dirty * GRANULE
        self._log(f"building {name}: {2 * dirty:,} extents over {size >> 30} GiB (nbdcore)")
        start = time.monotonic()
        final = self.dir / name
        tmp = self.dir / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        # The image file and whatever the store keeps beside it live in one folder, renamed as a
        # whole when complete.
        image = Image.create(tmp / "disk.raw", size)
        try:
            bitmap = image.add_bitmap(BITMAP, granularity=GRANULE)
            for i in range(dirty):
                bitmap.mark_dirty(2 * i * GRANULE, GRANULE)
        finally:
            image.close()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        return self._store(
            Fixture(
                name,
                str(final / "disk.raw"),
                size,
                2 * dirty,
                BITMAP,
                round(time.monotonic() - start, 1),
            )
        )

    def describe(self) -> dict[str, Any]:
        out = {}
        for meta in sorted(self.dir.glob("*.json")):
            out[meta.stem] = json.loads(meta.read_text())
        return out
