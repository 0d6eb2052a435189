"""A picture of a disk's extent map: where it is dirty, allocated and zero, as SVG or HTML.

Pure functions, no I/O: feed extents (as ``nbdcore.extents.ExtentBatch`` rows: an offset, a
column of lengths and one column of flags per metadata context) into a :class:`Coverage`, then
render the resulting :class:`Picture`.

The range is cut into ``width`` pixels at integer byte boundaries; each pixel keeps the exact
number of its bytes for which each track holds, so a pixel's shade is the fraction of its bytes
that are dirty (or allocated, or zero), not whether any of them is. A track is one row of a lane:
``base:allocation`` has two (allocated = HOLE clear, zero = ZERO set), a dirty bitmap one, or two
when ``base:allocation`` is drawn too: dirty, and "dirty data" (dirty and not reading as zeroes:
what an incremental backup must copy; dirty-but-zero ranges need no data, as in ovirt-imageio).
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, repeat
from operator import and_, eq, gt, mul, ne
from xml.sax.saxutils import escape, quoteattr

from nbdcore.constants import (
    CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_DIRTY_BITMAP_PREFIX,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
)

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE: dict[str, tuple[str, str]] = {
    # kind: (colour, legend text)
    "dirty": ("#D55E00", "dirty (changed since the bitmap was created or cleared)"),
    "allocated": ("#0072B2", "allocated (not a hole)"),
    "zero": ("#009E73", "reads as zeroes"),
    "dirty-data": ("#882255", "dirty data (dirty and not zero: what a backup copies)"),
    "set": ("#CC79A7", "flags set (other context)"),
}
EMPTY_FILL = "#F3F3F3"
# A pixel with any byte set gets at least this opacity, so one dirty granule in a terabyte disk
# still shows; above it the opacity grows linearly with the fraction.
MIN_OPACITY = 0.15
LEVELS = 100  # opacity steps; adjacent pixels on the same step are drawn as one rectangle
ALL_FLAGS = (1 << 64) - 1  # extended headers carry 64-bit status values


@dataclass(frozen=True, slots=True)
class Track:
    """The bytes of one context whose flags satisfy ``(flags & mask) == value`` (or ``!=``
    when ``negate``), and, when ``also`` is given, the conditions of other contexts too."""

    label: str
    kind: str  # a PALETTE key
    column: int  # index of the context in the flag columns (the lane it is drawn in)
    mask: int
    value: int
    negate: bool = False
    also: tuple[Track, ...] = ()

    def holds(self, flags: int) -> bool:
        """Whether this track's own condition holds for ``flags`` of its context."""
        return ((flags & self.mask) == self.value) != self.negate

    def holds_row(self, flags: Sequence[Sequence[int]], i: int) -> bool:
        """Whether every condition holds for row ``i`` of the flag columns ``flags``."""
        if not self.holds(flags[self.column][i]):
            return False
        return all(other.holds(flags[other.column][i]) for other in self.also)


def _selection(track: Track, flags: Sequence[Sequence[int]]) -> bytes:
    """1 for each row where every condition of ``track`` holds, else 0 (C-level iteration)."""
    columns = [
        bytes(
            map(
                ne if c.negate else eq,
                map(and_, flags[c.column], repeat(c.mask)),
                repeat(c.value),
            )
        )
        for c in (track, *track.also)
    ]
    sel = columns[0]
    for other in columns[1:]:
        sel = bytes(map(and_, sel, other))
    return sel


def tracks_for(context: str, column: int) -> list[Track]:
    """The tracks that show ``context``'s flags (the ``column``-th flag column)."""
    if context == CONTEXT_BASE_ALLOCATION:
        return [
            Track("allocated", "allocated", column, NBD_STATE_HOLE, 0),
            Track("zero", "zero", column, NBD_STATE_ZERO, NBD_STATE_ZERO),
        ]
    if context.startswith(CONTEXT_QEMU_DIRTY_BITMAP_PREFIX):
        return [Track("dirty", "dirty", column, NBD_STATE_DIRTY, NBD_STATE_DIRTY)]
    # Unknown meaning (qemu:allocation-depth, other namespaces): show where flags are nonzero.
    return [Track("flags != 0", "set", column, ALL_FLAGS, 0, negate=True)]


def tracks_for_all(contexts: Sequence[str]) -> list[Track]:
    """The tracks of every context, plus "dirty data" in each bitmap's lane when
    ``base:allocation`` is among the contexts."""
    tracks = [t for i, c in enumerate(contexts) for t in tracks_for(c, i)]
    if CONTEXT_BASE_ALLOCATION not in contexts:
        return tracks
    alloc = contexts.index(CONTEXT_BASE_ALLOCATION)
    not_zero = Track("not zero", "zero", alloc, NBD_STATE_ZERO, 0)
    out: list[Track] = []
    for track in tracks:
        out.append(track)
        if track.kind == "dirty":
            out.append(
                Track(
                    "dirty data",
                    "dirty-data",
                    track.column,
                    track.mask,
                    track.value,
                    also=(not_zero,),
                )
            )
    return out


def pixel_bounds(start: int, length: int, width: int) -> list[int]:
    """The ``n + 1`` byte offsets that cut ``[start, start + length)`` into ``n = min(width,
    length)`` pixels of ``length // n`` or ``length // n + 1`` bytes."""
    if length <= 0 or width <= 0:
        raise ValueError("length and width must be positive")
    n = min(width, length)
    return [start + i * length // n for i in range(n + 1)]


class Coverage:
    """Exact per-pixel byte counts of several tracks over ``[start, start + length)``."""

    def __init__(self, start: int, length: int, width: int, tracks: Sequence[Track]) -> None:
        self.start = start
        self.length = length
        self.end = start + length
        self.bounds = pixel_bounds(start, length, width)
        self.width = len(self.bounds) - 1
        self.tracks = list(tracks)
        self.covered = [array("Q", bytes(8 * self.width)) for _ in self.tracks]
        self.totals = [0] * len(self.tracks)
        self.runs = [0] * len(self.tracks)  # maximal runs of set bytes (extents)
        self._run_end = [-1] * len(self.tracks)  # where each track's current run ends
        self.seen = 0  # bytes fed, for a completeness check

    def pixel_of(self, offset: int) -> int:
        """The pixel holding byte ``offset`` (``start <= offset < end``)."""
        # bounds[i] = start + floor(i * length / n) <= offset  <=>  i < (offset - start + 1) * n /
        # length, so the last such i is ceil((offset - start + 1) * n / length) - 1.
        rel = offset - self.start
        return -((-(rel + 1) * self.width) // self.length) - 1

    def add_run(self, track: int, offset: int, length: int) -> None:
        """Count ``[offset, offset + length)`` (clipped to the range) as set in ``track``."""
        lo = max(offset, self.start)
        hi = min(offset + length, self.end)
        if lo >= hi:
            return
        if lo != self._run_end[track]:
            self.runs[track] += 1
        self._run_end[track] = hi
        self.totals[track] += hi - lo
        covered = self.covered[track]
        bounds = self.bounds
        p = self.pixel_of(lo)
        while lo < hi:
            stop = min(hi, bounds[p + 1])
            covered[p] += stop - lo
            lo = stop
            p += 1

    def add_rows(self, offset: int, lengths: Sequence[int], flags: Sequence[Sequence[int]]) -> None:
        """Feed consecutive extents from ``offset`` (one ExtentBatch: ``flags[c][i]`` are the
        flags of extent ``i`` in context ``c``). Batches must come in increasing offsets.

        Column-wise, so that a million-extent bitmap costs C-level iteration, not a Python call
        per extent: per track, a 0/1 selection of the rows and the prefix sums of the selected
        lengths; a pixel's count is then the difference of that cumulative function at its two
        edges (found by bisection), whatever the number of extents inside it.
        """
        n = len(lengths)
        if n == 0:
            return
        ends = array("Q", accumulate(lengths, initial=offset))  # ends[i] = start of row i
        lo, hi = max(offset, self.start), min(ends[n], self.end)
        if lo >= hi:
            return
        self.seen += hi - lo
        first = bisect_right(ends, lo) - 1  # the rows meeting [lo, hi)
        last = bisect_right(ends, hi - 1) - 1
        bounds = self.bounds
        for t, track in enumerate(self.tracks):
            sel = _selection(track, flags)
            cum = array("Q", accumulate(map(mul, lengths, sel), initial=0))

            def local(x: int, sel: bytes = sel, cum: array[int] = cum) -> int:
                """Selected bytes in [offset, x), for offset <= x <= the batch's end."""
                i = bisect_right(ends, x) - 1
                if i >= n:
                    return cum[n]
                return cum[i] + (x - ends[i]) * sel[i]

            covered = self.covered[t]
            p = self.pixel_of(lo)
            edge = lo
            below = local(lo)
            while edge < hi:
                nxt = min(hi, bounds[p + 1])
                upto = local(nxt)
                covered[p] += upto - below
                below, edge = upto, nxt
                p += 1
            self.totals[t] += below - local(lo)
            # Runs: rising edges among the rows in range; the first row continues a run only
            # when the previous batch ended set exactly where this one starts.
            rises = sum(map(gt, sel[first + 1 : last + 1], sel[first:last]))
            if sel[first] and self._run_end[t] != lo:
                rises += 1
            self.runs[t] += rises
            self._run_end[t] = hi if sel[last] else -1

    def fractions(self, track: int) -> list[float]:
        """Per pixel, the fraction of its bytes set in ``track`` (exact counts, one division)."""
        b = self.bounds
        return [c / (b[i + 1] - b[i]) for i, c in enumerate(self.covered[track])]


@dataclass(slots=True)
class TrackPicture:
    label: str
    kind: str
    fractions: list[float]
    total: int  # bytes set
    runs: int  # extents


@dataclass(slots=True)
class Lane:
    context: str
    tracks: list[TrackPicture]


@dataclass(slots=True)
class Picture:
    title: str
    start: int
    length: int
    export_size: int
    lanes: list[Lane]
    notes: list[str] = field(default_factory=list)  # lines shown under the title


def picture_from(
    coverage: Coverage,
    contexts: Sequence[str],
    *,
    title: str,
    export_size: int,
    notes: Sequence[str] = (),
) -> Picture:
    """Group a coverage's tracks into one lane per context, in ``contexts`` order."""
    lanes = [Lane(name, []) for name in contexts]
    for t, track in enumerate(coverage.tracks):
        lanes[track.column].tracks.append(
            TrackPicture(
                track.label,
                track.kind,
                coverage.fractions(t),
                coverage.totals[t],
                coverage.runs[t],
            )
        )
    return Picture(title, coverage.start, coverage.length, export_size, lanes, list(notes))


# --- Formatting ------------------------------------------------------------------------------

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(n: int) -> str:
    """``n`` bytes in binary units with at most 3 significant digits: 1.5 GiB, 64 KiB, 0 B."""
    if n < 1024:
        return f"{n} B"
    exp = min(int(math.log(n, 1024)), len(_UNITS) - 1)
    value = n / 1024**exp
    if value >= 1023.5 and exp + 1 < len(_UNITS):  # would print as "1024 KiB"
        exp += 1
        value = n / 1024**exp
    text = f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return f"{text} {_UNITS[exp]}"


def percent(part: int, whole: int) -> str:
    """A percentage that never rounds something to 0% or 100% when it is not exactly that."""
    if whole <= 0 or part <= 0:
        return "0%"
    if part >= whole:
        return "100%"
    p = 100 * part / whole
    if p < 0.01:
        return "<0.01%"
    if p > 99.99:
        return ">99.99%"
    return f"{p:.2f}%"


def opacity_level(fraction: float) -> int:
    """0 for an empty pixel, LEVELS for a full one, else the nearest of 1..LEVELS-1: any set
    byte shows, and a pixel that is not wholly set never looks wholly set."""
    if fraction <= 0:
        return 0
    if fraction >= 1:
        return LEVELS
    return min(LEVELS - 1, max(1, round(fraction * LEVELS)))


def axis_ticks(start: int, length: int, max_ticks: int = 8) -> list[int]:
    """Offsets on a power-of-two step (at least 1 byte) inside ``[start, start + length]``."""
    step = 1 << max(0, math.ceil(math.log2(max(1, length / max_ticks))))
    first = -(-start // step) * step
    return list(range(first, start + length + 1, step))


def summary(track: TrackPicture, length: int) -> str:
    extents = "extent" if track.runs == 1 else "extents"
    return (
        f"{track.label}: {human_size(track.total)} ({percent(track.total, length)}) "
        f"in {track.runs} {extents}"
    )


# --- SVG -------------------------------------------------------------------------------------

LEFT = 90  # track labels
RIGHT = 24
TOP = 58
TRACK_H = 22
TRACK_GAP = 3
LANE_HEAD = 20
LANE_GAP = 14
MIN_CANVAS = 800
FONT = "font-family:DejaVu Sans,Helvetica,Arial,sans-serif"


def _runs_of_levels(fractions: Sequence[float]) -> list[tuple[int, int, int]]:
    """(first pixel, pixel count, level) for each run of equal nonzero opacity levels."""
    out: list[tuple[int, int, int]] = []
    i, n = 0, len(fractions)
    while i < n:
        level = opacity_level(fractions[i])
        j = i + 1
        while j < n and opacity_level(fractions[j]) == level:
            j += 1
        if level:
            out.append((i, j - i, level))
        i = j
    return out


def _level_text(level: int) -> str:
    if level == LEVELS:
        return "all"
    return f"about {level * 100 // LEVELS}%"


def render_svg(picture: Picture) -> str:
    """A standalone SVG document (no scripts, no external references)."""
    width = max((len(t.fractions) for lane in picture.lanes for t in lane.tracks), default=1)
    bounds = pixel_bounds(picture.start, picture.length, width)
    # Room for the title, notes and legend even when the plot is narrow.
    total_w = max(LEFT + width + RIGHT, MIN_CANVAS)
    out: list[str] = []
    y = TOP
    body: list[str] = []
    for lane in picture.lanes:
        body.append(
            f'<text x="{LEFT}" y="{y + 14}" style="{FONT};font-size:13px;font-weight:bold">'
            f"{escape(lane.context)}</text>"
        )
        y += LANE_HEAD
        for track in lane.tracks:
            colour = PALETTE[track.kind][0]
            body.append(
                f'<g class="track" data-context={quoteattr(lane.context)} '
                f"data-track={quoteattr(track.label)}>"
            )
            body.append(
                f'<text x="{LEFT - 8}" y="{y + 15}" text-anchor="end" '
                f'style="{FONT};font-size:12px">{escape(track.label)}</text>'
            )
            body.append(
                f'<rect x="{LEFT}" y="{y}" width="{width}" height="{TRACK_H}" '
                f'fill="{EMPTY_FILL}" stroke="#BBBBBB" stroke-width="0.5"/>'
            )
            for first, count, level in _runs_of_levels(track.fractions):
                lo, hi = bounds[first], bounds[first + count]
                opacity = MIN_OPACITY + (1 - MIN_OPACITY) * level / LEVELS
                body.append(
                    f'<rect x="{LEFT + first}" y="{y}" width="{count}" height="{TRACK_H}" '
                    f'fill="{colour}" fill-opacity="{opacity:.3f}">'
                    f"<title>{lo:#x}-{hi:#x} ({human_size(hi - lo)}): "
                    f"{_level_text(level)} {escape(track.label)}</title></rect>"
                )
            body.append("</g>")
            body.append(
                f'<text x="{LEFT}" y="{y + TRACK_H + 13}" style="{FONT};font-size:11px;'
                f'fill:#444444">{escape(summary(track, picture.length))}</text>'
            )
            y += TRACK_H + TRACK_GAP + 14
        y += LANE_GAP
    # Axis: offsets under the lanes.
    axis_y = y
    body.append(
        f'<line x1="{LEFT}" y1="{axis_y}" x2="{LEFT + width}" y2="{axis_y}" stroke="#444444"/>'
    )
    scale = width / picture.length
    last_label_x = -1e9
    ticks = axis_ticks(picture.start, picture.length)
    for tick in ticks:
        x = LEFT + (tick - picture.start) * scale
        body.append(
            f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" stroke="#444444"/>'
        )
        if x - last_label_x >= 60:
            anchor = "end" if x > LEFT + width - 30 else ("start" if x < LEFT + 30 else "middle")
            body.append(
                f'<text x="{x:.1f}" y="{axis_y + 18}" text-anchor="{anchor}" '
                f'style="{FONT};font-size:11px">{escape(human_size(tick))}</text>'
            )
            last_label_x = x
    end = picture.start + picture.length
    if not ticks or ticks[-1] != end:
        x = LEFT + width
        body.append(f'<line x1="{x}" y1="{axis_y}" x2="{x}" y2="{axis_y + 5}" stroke="#444444"/>')
        if x - last_label_x >= 60:
            body.append(
                f'<text x="{x}" y="{axis_y + 18}" text-anchor="end" '
                f'style="{FONT};font-size:11px">{escape(human_size(end))}</text>'
            )
    caption_x, caption_anchor = (LEFT + width / 2, "middle") if width >= 500 else (LEFT, "start")
    body.append(
        f'<text x="{caption_x:.1f}" y="{axis_y + 34}" text-anchor="{caption_anchor}" '
        f'style="{FONT};font-size:11px;fill:#444444">offset (bytes; 1 pixel = '
        f"{escape(human_size(picture.length // width))}"
        f"{'' if picture.length % width == 0 else ' or a byte more'})</text>"
    )
    # Legend: one swatch per kind shown, then the shade scale.
    y = axis_y + 52
    body.append('<g class="legend">')
    kinds = [t.kind for lane in picture.lanes for t in lane.tracks]
    x = LEFT
    for kind in dict.fromkeys(kinds):
        colour, text = PALETTE[kind]
        body.append(
            f'<rect x="{x}" y="{y}" width="14" height="14" fill="{colour}"/>'
            f'<text x="{x + 20}" y="{y + 12}" style="{FONT};font-size:12px">{escape(text)}</text>'
        )
        y += 20
    y += 4
    ramp = 200
    for i in range(10):
        opacity = MIN_OPACITY + (1 - MIN_OPACITY) * (i + 1) / 10
        body.append(
            f'<rect x="{LEFT + i * ramp / 10:.0f}" y="{y}" width="{ramp / 10:.0f}" height="12" '
            f'fill="#444444" fill-opacity="{opacity:.3f}"/>'
        )
    body.append(
        f'<text x="{LEFT + ramp + 8}" y="{y + 11}" style="{FONT};font-size:11px">shade = '
        f"fraction of the pixel's bytes in that state (any nonzero share shows)</text>"
    )
    body.append("</g>")
    total_h = y + 24
    out.append(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
        f'viewBox="0 0 {total_w} {total_h}" role="img">'
    )
    out.append(f"<title>{escape(picture.title)}</title>")
    out.append(f'<rect width="{total_w}" height="{total_h}" fill="#FFFFFF"/>')
    out.append(
        f'<text x="{LEFT}" y="22" style="{FONT};font-size:16px;font-weight:bold">'
        f"{escape(picture.title)}</text>"
    )
    sub = [
        f"range {human_size(picture.start)}-{human_size(end)} of {human_size(picture.export_size)}"
        f" ({picture.export_size} bytes)",
        *picture.notes,
    ]
    out.append(
        f'<text x="{LEFT}" y="40" style="{FONT};font-size:11px;fill:#444444">'
        f"{escape(' | '.join(sub))}</text>"
    )
    out.extend(body)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def render_html(picture: Picture) -> str:
    """A self-contained HTML page: the SVG inline, then a table of the same numbers."""
    rows = []
    for lane in picture.lanes:
        for track in lane.tracks:
            rows.append(
                "<tr>"
                f"<td>{escape(lane.context)}</td><td>{escape(track.label)}</td>"
                f'<td class="n">{track.total}</td><td class="n">{human_size(track.total)}</td>'
                f'<td class="n">{percent(track.total, picture.length)}</td>'
                f'<td class="n">{track.runs}</td></tr>'
            )
    svg = render_svg(picture)
    notes = "".join(f"<li>{escape(n)}</li>" for n in picture.notes)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(picture.title)}</title>"
        "<style>body{font-family:DejaVu Sans,Helvetica,Arial,sans-serif;margin:1.5em;"
        "color:#222}table{border-collapse:collapse;margin-top:1em}td,th{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:left}td.n{text-align:right;font-variant-numeric:"
        "tabular-nums}svg{max-width:100%;height:auto}</style></head><body>\n"
        f"<h1>{escape(picture.title)}</h1>\n"
        f"<ul><li>range {picture.start}-{picture.start + picture.length} of "
        f"{picture.export_size} bytes ({human_size(picture.export_size)})</li>{notes}</ul>\n"
        f"{svg}"
        "<table><thead><tr><th>context</th><th>state</th><th>bytes</th><th>size</th>"
        "<th>share of range</th><th>extents</th></tr></thead><tbody>\n"
        + "\n".join(rows)
        + "\n</tbody></table>\n</body></html>\n"
    )
