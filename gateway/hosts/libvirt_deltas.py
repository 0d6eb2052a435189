"""What was written between two checkpoints of a libvirt domain's disk, kept by the gateway.

libvirt shows a disk's changes only as "since checkpoint C, up to now" (the bitmap of a pull
backup job started with ``<incremental>C</incremental>``); it has no way to read what changed
between C and a *later* checkpoint N, which is what CSI's GetMetadataDelta(C, N) asks. One
moment has exactly that answer: a job that starts incremental from C and creates N in the same
call (CreateSnapshot with ``since_checkpoint`` C and ``checkpoint_id`` N, the CSI driver's flow)
exports "since C", frozen at N's instant. The gateway reads it then and keeps it here, one
*link* C -> N per disk; GetMetadataDelta(A, B) is the union of the links of a path from A to B.

A link stays true when libvirt deletes a checkpoint (the writes between two instants do not
change), so paths may pass through checkpoints that are gone. A checkpoint is identified by its
name and creation time (:func:`instant_of`; libvirt's creation time is in whole seconds, and a
redefined checkpoint's is whatever its XML says: trusted as given). A name deleted and taken
again within the same second would have the same identity, so recording the link that ends at
a new checkpoint first removes every other link touching that identity: the checkpoint did not
exist before the job that created it, so they can only be about the old one.

A disk is its target name (``vda``) *and* its source (the image file, device or volume the
domain's XML names): another image plugged in at the same target must not inherit the links of
the old one, whose writes it never had (a delta from them would be wrong, silently). Links of a
target whose source has changed are used for nothing and pruned: a legitimate change (an
external snapshot, a block copy's pivot, the image moved or named another way) makes deltas
across it FAILED_PRECONDITION, never wrong. Links recorded before the source was kept have none
and are treated the same (one full backup per disk after the upgrade).

Each link is one file in a folder of the gateway's own (not libvirt's, which QEMU's user may
write): a JSON header line (the job that recorded it, the disk, the two instants, a CRC-32 of
the runs), then the runs as pairs of little-endian uint64 (offset, length), written to a
temporary file, fsync'd and renamed.
"""

from __future__ import annotations

import json
import os
import sys
import zlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.hosts.checkpoints import merged

if TYPE_CHECKING:
    from gateway.hosts.libvirt import Checkpoint

# A checkpoint as libvirt knows it at one time: (name, creation time in seconds).
Instant = tuple[str, int]

_SUFFIX = ".link"
_VERSION = 2


def instant_of(checkpoint: Checkpoint) -> Instant:
    return (checkpoint.name, checkpoint.created)


@dataclass(frozen=True)
class Link:
    """The writes to ``disk`` between checkpoint ``base`` and checkpoint ``target``, recorded
    by the backup job ``job``."""

    path: Path
    job: str
    disk: str
    source: str | None  # the disk's source when its job ran (None: recorded before it was kept)
    base: Instant
    target: Instant
    size: int
    runs: int  # how many (offset, length) pairs the file holds
    crc: int  # CRC-32 of those pairs as stored

    def read_runs(self) -> list[tuple[int, int]]:
        """The runs; ValueError when the file is not what its header says."""
        with open(self.path, "rb") as f:
            f.readline()
            raw = f.read()
        if len(raw) != 16 * self.runs or zlib.crc32(raw) != self.crc:
            raise ValueError(f"{self.path}: damaged ({len(raw) // 16} of {self.runs} runs)")
        pairs = array("Q")
        pairs.frombytes(raw)
        if sys.byteorder != "little":
            pairs.byteswap()
        runs = list(zip(pairs[0::2], pairs[1::2], strict=True))
        if any(off + length > self.size for off, length in runs):
            raise ValueError(f"{self.path}: a run past the disk's end ({self.size})")
        return runs


class Links:
    """The links of one libvirt host (its disks), in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(
        self,
        job: str,
        disk: str,
        source: str,
        base: Instant,
        target: Instant,
        size: int,
        runs: Sequence[tuple[int, int]],
    ) -> Link:
        """Keep the link ``base`` -> ``target`` that job ``job`` saw, ``target`` being the
        checkpoint that job created: every other link touching ``target``'s identity is about
        an older checkpoint of the same name and second, and goes."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for old in self.links(disk):
            if old.job != job and target in (old.base, old.target):
                old.path.unlink(missing_ok=True)
        pairs = array("Q", (v for run in runs for v in run))
        if sys.byteorder != "little":
            pairs.byteswap()
        raw = pairs.tobytes()
        crc = zlib.crc32(raw)
        header = {
            "version": _VERSION,
            "job": job,
            "disk": disk,
            "source": source,
            "base": list(base),
            "target": list(target),
            "size": size,
            "runs": len(runs),
            "crc": crc,
        }
        path = self.folder / f"{job}.{disk.encode().hex()}{_SUFFIX}"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)
        return Link(path, job, disk, source, base, target, size, len(runs), crc)

    def links(self, disk: str | None = None, source: str | None = None) -> list[Link]:
        """The links kept (of ``disk``, and with ``source`` of the disk whose source it is);
        files that are not links are left out."""
        found = []
        try:
            paths = sorted(self.folder.glob(f"*{_SUFFIX}"))
        except OSError:
            return []
        for path in paths:
            try:
                with open(path, "rb") as f:
                    head = json.loads(f.readline())
                if head.get("version") != _VERSION:
                    continue
                link = Link(
                    path,
                    str(head["job"]),
                    str(head["disk"]),
                    None if head.get("source") is None else str(head["source"]),
                    (str(head["base"][0]), int(head["base"][1])),
                    (str(head["target"][0]), int(head["target"][1])),
                    int(head["size"]),
                    int(head["runs"]),
                    int(head["crc"]),
                )
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                continue
            if disk is not None and link.disk != disk:
                continue
            if source is not None and link.source != source:
                continue
            found.append(link)
        return found

    def path(self, disk: str, source: str, base: Instant, target: Instant) -> list[Link] | None:
        """Links of ``disk`` (whose source is ``source``) that lead from ``base`` to
        ``target``, one after the other (the fewest), or None when the links kept do not join
        them."""
        by_base: dict[Instant, list[Link]] = {}
        for link in self.links(disk, source):
            by_base.setdefault(link.base, []).append(link)
        came: dict[Instant, Link] = {}
        frontier = [base]
        seen = {base}
        while frontier and target not in seen:
            step = []
            for at in frontier:
                for link in by_base.get(at, ()):
                    if link.target not in seen:
                        seen.add(link.target)
                        came[link.target] = link
                        step.append(link.target)
            frontier = step
        if target not in came:
            return None
        path = []
        at = target
        while at != base:
            path.append(came[at])
            at = came[at].base
        return path[::-1]

    def prune(self, disk: str, source: str, chain: Iterable[Instant]) -> int:
        """Remove the links of ``disk`` that no path between two of the checkpoints ``chain``
        (the ones libvirt has now) can use: those of another source, those no current
        checkpoint reaches, and those that lead to none; and temporary files a crash left.
        Returns how many links were removed."""
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        links = self.links(disk)
        ours = [k for k in links if k.source == source]
        now = set(chain)
        reach = _closure(now, [(k.base, k.target) for k in ours])  # from a current one
        back = _closure(now, [(k.target, k.base) for k in ours])  # to a current one
        removed = 0
        for link in links:
            if link not in ours or link.base not in reach or link.target not in back:
                link.path.unlink(missing_ok=True)
                removed += 1
        return removed


def _closure(start: set[Instant], steps: list[tuple[Instant, Instant]]) -> set[Instant]:
    """``start`` and every instant reached from it through ``steps`` (from, to)."""
    found = set(start)
    grew = True
    while grew:
        grew = False
        for a, b in steps:
            if a in found and b not in found:
                found.add(b)
                grew = True
    return found


def union(path: Iterable[Link]) -> list[tuple[int, int]]:
    """The sorted, merged union of the runs of ``path``'s links (ValueError: a damaged one)."""
    return list(merged(sorted(run for link in path for run in link.read_runs())))
