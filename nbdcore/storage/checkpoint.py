"""Checkpoint chains: named points in time of a disk, each a dirty bitmap that records the
writes from its instant until the next checkpoint's.

One notion for every kind of host. The chain lives in the disk's own bitmap names,
``nbdgw-ckpt-SEQ-ID`` (SEQ orders the chain), so it needs no file of its own and survives
restarts: the bitmaps of an nbdcore :class:`Image` (this module) or a running QEMU's persistent
bitmaps (gateway.hosts.qmp_monitor). Only the newest checkpoint records. "Changed since C" is
the OR of C and every later checkpoint; "changed between A and B" the OR of A up to, not
including, B (all frozen once B exists).

- A checkpoint starts with a snapshot (``Image.create_snapshot(checkpoint=...)``), at its
  instant: the new bitmap is added (clean, recording) and the previous one stops recording.
  A view ``since:C`` of the snapshot is a fork whose bits are that OR at the instant; releasing
  the snapshot merges a view back nowhere (the chain still holds those writes).
- Deleting a checkpoint merges its bitmap into its older neighbour (which records again when the
  newest is deleted), then removes it; the oldest is simply removed. "Since" any remaining
  checkpoint loses nothing.

Crash safety (nbdcore images; the rule: in doubt, dirty): a snapshot that starts a checkpoint
names it in its ``meta.json``, which is durable before the bitmaps change; opening the image
rolls the start forward (adds the bitmap, stops the previous one), which is exact since nothing
wrote in between. A delete merges durably before it re-enables or removes anything: a crash in
between leaves the bits in both bitmaps (more dirty, never less), and deleting again finishes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from nbdcore.storage.bitmap import DirtyBitmap
from nbdcore.storage.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointOrderError,
    NoSuchCheckpointError,
)

if TYPE_CHECKING:
    from nbdcore.storage.image import Image

# A checkpoint's bitmap: its place in the chain, then its id.
CHECKPOINT_BITMAP: Final = "nbdgw-ckpt-{seq:06d}-{id}"
CHECKPOINT_RE: Final = re.compile(r"^nbdgw-ckpt-(?P<seq>\d{6})-(?P<id>.+)$")
SINCE_PREFIX: Final = "since:"  # a snapshot's view of "changed since checkpoint C": since:C
BETWEEN_PREFIX: Final = "between:"  # a view of "written between A and B": between:A:B
# A snapshot id's rules (nbdcore.storage.snapshot), so that either can name the other.
ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


@dataclass(frozen=True)
class Link:
    """One checkpoint of a chain."""

    seq: int
    id: str
    bitmap: str
    granularity: int
    recording: bool
    dirty_bytes: int = 0


@dataclass
class Plan:
    """What a snapshot does to the chain: the views it forks (name -> source bitmaps, and their
    granularity) and the checkpoint it starts (new bitmap, the one that stops recording)."""

    views: dict[str, list[str]] = field(default_factory=dict)
    granularity: dict[str, int] = field(default_factory=dict)
    started: tuple[str, str | None] | None = None


def checkpoint_id(bitmap: str) -> str:
    """The id of a checkpoint bitmap's name ("" for another bitmap)."""
    m = CHECKPOINT_RE.match(bitmap)
    return m["id"] if m else ""


RESERVED_PREFIX: Final = "nbdgw-"  # checkpoints' bitmaps, and any scratch bitmap of ours


def reserved_bitmap(name: str) -> str | None:
    """Why ``name`` cannot be added or removed as a bitmap of one's own (None: it can): the
    checkpoint chain's bitmaps (and the gateway's scratch ones) and snapshots' views. Added,
    such a name passes for a checkpoint or a view; removed, a checkpoint's writes are lost to
    every "since" view of an older one."""
    if name.startswith(RESERVED_PREFIX):
        return (
            f"bitmap names starting with {RESERVED_PREFIX!r} are the gateway's (checkpoints:"
            " CreateSnapshot checkpoint_id, DeleteCheckpoint)"
        )
    if name.startswith((SINCE_PREFIX, BETWEEN_PREFIX)):
        return f"names starting with {SINCE_PREFIX!r} or {BETWEEN_PREFIX!r} are snapshots' views"
    return None


def between_view(base: str, target: str) -> str:
    """The name of a snapshot's view of what was written between ``base`` and ``target``."""
    return f"{BETWEEN_PREFIX}{base}:{target}"


def validate_id(checkpoint: str) -> None:
    if not ID_RE.fullmatch(checkpoint):
        raise CheckpointError(
            f"checkpoint id {checkpoint[:80]!r}: 1-63 letters, digits, '.', '_', '-', starting"
            " with a letter or digit"
        )


def chain_of(bitmaps: Iterable[tuple[str, int, bool, int]]) -> list[Link]:
    """The chain, oldest first, from (name, granularity, recording, dirty bytes) of a disk's
    bitmaps; other bitmaps are not part of it."""
    links = []
    for name, granularity, recording, dirty in bitmaps:
        m = CHECKPOINT_RE.match(name)
        if m:
            links.append(Link(int(m["seq"]), m["id"], name, granularity, recording, dirty))
    return sorted(links, key=lambda c: c.seq)


def _index(chain: Sequence[Link], checkpoint: str) -> int:
    for i, c in enumerate(chain):
        if c.id == checkpoint:
            return i
    raise NoSuchCheckpointError(checkpoint)


def plan(chain: Sequence[Link], checkpoint: str, since: str) -> Plan:
    """Check a snapshot's ``checkpoint`` (to start) and ``since`` (to view) against the chain."""
    result = Plan()
    if since:
        at = _index(chain, since)
        name = SINCE_PREFIX + since
        result.views[name] = [c.bitmap for c in chain[at:]]
        result.granularity[name] = chain[at].granularity
    if checkpoint:
        validate_id(checkpoint)
        if any(c.id == checkpoint for c in chain):
            raise CheckpointExistsError(checkpoint)
        seq = chain[-1].seq + 1 if chain else 1
        active = [c.bitmap for c in chain if c.recording]
        result.started = (
            CHECKPOINT_BITMAP.format(seq=seq, id=checkpoint),
            active[-1] if active else None,
        )
    return result


def between(chain: Sequence[Link], base: str, target: str) -> list[Link]:
    """The checkpoints whose OR is "changed between ``base`` and ``target``"."""
    a, b = _index(chain, base), _index(chain, target)
    if a > b:
        raise order_error(base, target)
    return list(chain[a:b])


def order_error(base: str, target: str) -> CheckpointOrderError:
    """The refusal of a delta asked from the newer checkpoint to the older."""
    return CheckpointOrderError(
        f"checkpoint {base!r} is newer than {target!r}: ask from the older to the newer"
    )


def neighbour(chain: Sequence[Link], checkpoint: str) -> tuple[Link, Link | None]:
    """The checkpoint to delete and its older neighbour, which takes its interval (None for the
    oldest)."""
    i = _index(chain, checkpoint)
    return chain[i], chain[i - 1] if i else None


# --- nbdcore images ------------------------------------------------------------------------


def chain(image: Image) -> list[Link]:
    return chain_of(
        (b.name, b.granularity, b.enabled, b.dirty_bytes()) for b in image.bitmaps.values()
    )


def merged(image: Image, sources: Sequence[str], granularity: int) -> DirtyBitmap:
    """An in-memory bitmap holding the OR of ``sources`` (granularity ``granularity``)."""
    out = DirtyBitmap("merged", image.size, granularity, enabled=False)
    for name in sources:
        out.merge_from(image.bitmap(name))
    return out


def delta(image: Image, base: str, target: str) -> tuple[int, list[tuple[int, int]]]:
    """The granularity and the (offset, length) runs written between checkpoints ``base`` and
    ``target`` of ``image``."""
    links = chain(image)
    sources = between(links, base, target)
    granularity = links[_index(links, base)].granularity
    bitmap = merged(image, [c.bitmap for c in sources], granularity)
    return granularity, [(off, n) for off, n, flags in bitmap.extents(0, image.size) if flags]


def delete(image: Image, checkpoint: str) -> str | None:
    """Delete a checkpoint of ``image``; returns the id of the neighbour that took its
    interval (None when it was the oldest)."""
    victim, into = neighbour(chain(image), checkpoint)
    if into is not None:
        image.merge_bitmap(victim.bitmap, into.bitmap)
        image.sync_bitmaps()  # the merge is durable before the victim goes
        if victim.recording:
            image.enable_bitmap(into.bitmap)
    image.remove_bitmap(victim.bitmap)
    return into.id if into is not None else None
