"""What was written between two checkpoints of a libvirt domain's disk, kept by the gateway.

libvirt shows a disk's changes only as "since checkpoint C, up to now" (the bitmap of a pull
backup job started with ``<incremental>C</incremental>``); it has no way to read what changed
between C and a *later* checkpoint N, which is what CSI's GetMetadataDelta(C, N) asks. One
moment has exactly that answer: a job that starts incremental from C and creates N in the same
call (CreateSnapshot with ``since_checkpoint`` C and ``checkpoint_id`` N, the CSI driver's flow)
exports "since C", frozen at N's instant. The gateway reads it then and keeps it here, one
*link* C -> N per disk; GetMetadataDelta(A, B) is the union of the links of a path from A to B.

A link stays true when libvirt deletes a checkpoint (the writes between two instants do not
change), so paths may pass through checkpoints that are gone. What identifies a checkpoint is
its name *and* its creation time: a name deleted and taken again later is another instant, and
a link to the old one must not stand for the new one (it would miss the writes in between).

Each link is one file in the host's folder: a JSON header line, then the runs as pairs of
little-endian uint64 (offset, length), written to a temporary file, fsync'd and renamed.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

# A checkpoint as libvirt knows it at one time: (name, creation time in seconds).
Instant = tuple[str, int]

_SUFFIX = ".link"
_VERSION = 1


@dataclass(frozen=True)
class Link:
    """The writes to ``disk`` between checkpoint ``base`` and checkpoint ``target``."""

    path: Path
    disk: str
    base: Instant
    target: Instant
    granularity: int
    size: int
    runs: int  # how many (offset, length) pairs the file holds

    def read_runs(self) -> list[tuple[int, int]]:
        with open(self.path, "rb") as f:
            f.readline()
            pairs = array("Q")
            pairs.frombytes(f.read())
        if sys.byteorder != "little":
            pairs.byteswap()
        if len(pairs) != 2 * self.runs:
            raise ValueError(f"{self.path}: {len(pairs) // 2} runs, the header says {self.runs}")
        return list(zip(pairs[0::2], pairs[1::2], strict=True))


class Links:
    """The links of one libvirt host (its disks), in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def record(
        self,
        disk: str,
        base: Instant,
        target: Instant,
        granularity: int,
        size: int,
        runs: Sequence[tuple[int, int]],
    ) -> Link:
        self.folder.mkdir(parents=True, exist_ok=True)
        header = {
            "version": _VERSION,
            "disk": disk,
            "base": list(base),
            "target": list(target),
            "granularity": granularity,
            "size": size,
            "runs": len(runs),
        }
        pairs = array("Q", (v for run in runs for v in run))
        if sys.byteorder != "little":
            pairs.byteswap()
        path = self.folder / f"{secrets.token_hex(8)}{_SUFFIX}"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(header).encode() + b"\n")
            f.write(pairs.tobytes())
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself
        finally:
            os.close(fd)
        return Link(path, disk, base, target, granularity, size, len(runs))

    def links(self, disk: str | None = None) -> list[Link]:
        """The links kept (of ``disk``); unreadable files are left out."""
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
                    str(head["disk"]),
                    (str(head["base"][0]), int(head["base"][1])),
                    (str(head["target"][0]), int(head["target"][1])),
                    int(head["granularity"]),
                    int(head["size"]),
                    int(head["runs"]),
                )
            except (OSError, ValueError, KeyError, IndexError, TypeError):
                continue
            if disk is None or link.disk == disk:
                found.append(link)
        return found

    def path(self, disk: str, base: Instant, target: Instant) -> list[Link] | None:
        """Links of ``disk`` that lead from ``base`` to ``target``, one after the other (the
        fewest), or None when the links kept do not join them."""
        by_base: dict[Instant, list[Link]] = {}
        for link in self.links(disk):
            by_base.setdefault(link.base, []).append(link)
        came: dict[Instant, Link] = {}
        frontier = [base]
        seen = {base}
        while frontier:
            step = []
            for at in frontier:
                for link in by_base.get(at, ()):
                    if link.target in seen:
                        continue
                    seen.add(link.target)
                    came[link.target] = link
                    step.append(link.target)
            frontier = step
            if target in seen:
                break
        if target not in came:
            return None
        path = []
        at = target
        while at != base:
            link = came[at]
            path.append(link)
            at = link.base
        return path[::-1]

    def prune(self, disk: str, chain: Iterable[Instant]) -> int:
        """Remove the links of ``disk`` that no path between two of the checkpoints ``chain``
        (the ones libvirt has now) can use: those no current checkpoint reaches, and those that
        lead to none. Returns how many were removed."""
        links = self.links(disk)
        now = set(chain)
        reach = _closure(now, [(k.base, k.target) for k in links])  # from a current one
        back = _closure(now, [(k.target, k.base) for k in links])  # to a current one
        removed = 0
        for link in links:
            if link.base not in reach or link.target not in back:
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


def union(ranges: Iterable[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The sorted, merged union of runs."""
    allruns = sorted(r for runs in ranges for r in runs)
    out: list[tuple[int, int]] = []
    for off, length in allruns:
        if out and off <= out[-1][0] + out[-1][1]:
            end = max(out[-1][0] + out[-1][1], off + length)
            out[-1] = (out[-1][0], end - out[-1][0])
        else:
            out.append((off, length))
    return out
