"""gateway/cli/render.py: exact pixel coverage, and SVG/HTML that parse and carry the numbers."""

from __future__ import annotations

import itertools
import re
import xml.etree.ElementTree as ET
from array import array

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.cli import render
from nbdcore.constants import NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO

SVG = "{http://www.w3.org/2000/svg}"
ALLOC, BITMAP = "base:allocation", "qemu:dirty-bitmap:b0"


def coverage_of(rows, start, length, width, contexts=(ALLOC, BITMAP), offset=0, tracks=None):
    """rows: (length, flags per context)."""
    if tracks is None:
        tracks = [t for i, c in enumerate(contexts) for t in render.tracks_for(c, i)]
    cov = render.Coverage(start, length, width, tracks)
    cov.add_rows(
        offset,
        array("Q", [r[0] for r in rows]),
        [array("Q", [r[1][c] for r in rows]) for c in range(len(contexts))],
    )
    return cov


# What each kind of track means, written out independently of render's masks (column 0 is
# base:allocation in these tests).
MEANING = {
    "allocated": lambda f, c: not f[c] & NBD_STATE_HOLE,
    "zero": lambda f, c: bool(f[c] & NBD_STATE_ZERO),
    "dirty": lambda f, c: bool(f[c] & NBD_STATE_DIRTY),
    "dirty-data": lambda f, c: bool(f[c] & NBD_STATE_DIRTY) and not f[0] & NBD_STATE_ZERO,
    "set": lambda f, c: f[c] != 0,
}


def brute_state(rows, track):
    state = []
    for n, flags in rows:
        state += [MEANING[track.kind](flags, track.column)] * n
    return state


def brute_runs(rows, start, length, track):
    """Maximal runs of set bytes inside [start, start + length)."""
    state = brute_state(rows, track)[start : start + length]
    return sum(1 for i, b in enumerate(state) if b and (i == 0 or not state[i - 1]))


def brute_force(rows, start, length, width, track, offset=0):
    """Per-pixel set-byte counts, one byte at a time."""
    state = brute_state(rows, track)
    bounds = [start + i * length // min(width, length) for i in range(min(width, length) + 1)]
    return [
        sum(1 for b in range(lo, hi) if 0 <= b - offset < len(state) and state[b - offset])
        for lo, hi in itertools.pairwise(bounds)
    ]


def test_known_map_fractions():
    # 1000 bytes in 4 pixels of 250: dirty [100, 400) covers 150/250 and 150/250.
    rows = [(100, (0, 0)), (300, (0, NBD_STATE_DIRTY)), (600, (NBD_STATE_HOLE | NBD_STATE_ZERO, 0))]
    cov = coverage_of(rows, 0, 1000, 4)
    labels = [t.label for t in cov.tracks]
    assert labels == ["allocated", "zero", "dirty"]
    assert cov.fractions(2) == [0.6, 0.6, 0.0, 0.0]  # dirty
    assert cov.fractions(0) == [1.0, 0.6, 0.0, 0.0]  # allocated: the first 400 bytes
    assert cov.fractions(1) == [0.0, 0.4, 1.0, 1.0]  # zero: the hole from 400
    assert cov.totals == [400, 600, 300]
    assert cov.runs == [1, 1, 1]
    assert cov.seen == 1000


def test_uneven_pixels_and_small_disks():
    assert render.pixel_bounds(0, 10, 3) == [0, 3, 6, 10]
    assert render.pixel_bounds(5, 3, 100) == [5, 6, 7, 8]  # never more pixels than bytes
    with pytest.raises(ValueError):
        render.pixel_bounds(0, 0, 10)
    cov = coverage_of([(10, (0, 1))], 0, 10, 3)
    assert cov.covered[2].tolist() == [3, 3, 4]
    assert cov.fractions(2) == [1.0, 1.0, 1.0]


def test_runs_merge_across_batches_and_clip_to_the_range():
    tracks = render.tracks_for(BITMAP, 0)
    cov = render.Coverage(100, 200, 10, tracks)
    # Two batches, the dirty run continuing across them, the first starting before the range.
    cov.add_rows(0, array("Q", [50, 100]), [array("Q", [0, 1])])  # dirty [50, 150)
    cov.add_rows(150, array("Q", [30, 70, 100]), [array("Q", [1, 0, 1])])  # [150,180) [250,350)
    assert cov.runs == [2]
    assert cov.totals == [(180 - 100) + (300 - 250)]
    assert cov.seen == 200
    assert cov.covered[0].tolist() == [20, 20, 20, 20, 0, 0, 0, 10, 20, 20]


@st.composite
def extent_maps(draw):
    rows = draw(
        st.lists(
            st.tuples(
                st.integers(1, 60),
                st.tuples(st.integers(0, 3), st.integers(0, 1), st.integers(0, 5)),
            ),
            min_size=1,
            max_size=25,
        )
    )
    size = sum(n for n, _ in rows)
    start = draw(st.integers(0, size - 1))
    length = draw(st.integers(1, size - start))
    width = draw(st.integers(1, 80))
    return rows, start, length, width


@settings(max_examples=300, deadline=None)
@given(extent_maps())
def test_coverage_matches_byte_by_byte_count(case):
    rows, start, length, width = case
    contexts = (ALLOC, BITMAP, "qemu:allocation-depth")
    cov = coverage_of(rows, start, length, width, contexts, tracks=render.tracks_for_all(contexts))
    assert [t.kind for t in cov.tracks] == ["allocated", "zero", "dirty", "dirty-data", "set"]
    assert cov.seen == length
    for t, track in enumerate(cov.tracks):
        expected = brute_force(rows, start, length, width, track)
        assert cov.covered[t].tolist() == expected
        assert cov.totals[t] == sum(expected)
        assert cov.runs[t] == brute_runs(rows, start, length, track)
        assert min(cov.fractions(t)) >= 0.0 and max(cov.fractions(t)) <= 1.0
    # Fed in several batches (as iter_extents yields them), or a run at a time: the same.
    tracks = render.tracks_for_all(contexts)
    split = render.Coverage(start, length, width, tracks)
    slow = render.Coverage(start, length, width, tracks)
    offset = 0
    for lo, hi in itertools.pairwise([0, *cuts(rows), len(rows)]):
        part = rows[lo:hi]
        split.add_rows(
            offset,
            array("Q", [r[0] for r in part]),
            [array("Q", [r[1][c] for r in part]) for c in range(len(contexts))],
        )
        for n, flags in part:
            for t, track in enumerate(tracks):
                if track.holds_row([[f] for f in flags], 0):
                    slow.add_run(t, offset, n)
            offset += n
    for other in (split, slow):
        assert other.covered == cov.covered
        assert other.totals == cov.totals
        assert other.runs == cov.runs


def cuts(rows):
    """Batch boundaries: every third row."""
    return list(range(3, len(rows), 3))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 10**15), st.integers(1, 4096), st.data())
def test_pixel_of_agrees_with_bounds(length, width, data):
    start = data.draw(st.integers(0, 2**62))
    cov = render.Coverage(start, length, width, [])
    offset = start + data.draw(st.integers(0, length - 1))
    p = cov.pixel_of(offset)
    assert cov.bounds[p] <= offset < cov.bounds[p + 1]


def test_tracks_by_context():
    assert [t.kind for t in render.tracks_for(ALLOC, 0)] == ["allocated", "zero"]
    (dirty,) = render.tracks_for(BITMAP, 1)
    assert dirty.holds(NBD_STATE_DIRTY) and not dirty.holds(0) and dirty.column == 1
    (depth,) = render.tracks_for("qemu:allocation-depth", 2)
    assert depth.holds(2) and not depth.holds(0)
    allocated, zero = render.tracks_for(ALLOC, 0)
    assert allocated.holds(NBD_STATE_ZERO) and not allocated.holds(NBD_STATE_HOLE)
    assert zero.holds(NBD_STATE_HOLE | NBD_STATE_ZERO) and not zero.holds(0)


def test_formatting():
    assert render.human_size(0) == "0 B"
    assert render.human_size(1023) == "1023 B"
    assert render.human_size(64 << 10) == "64 KiB"
    assert render.human_size(3 << 29) == "1.5 GiB"
    assert render.human_size((1 << 20) - 1) == "1 MiB"  # not "1024 KiB"
    assert render.percent(0, 10) == "0%"
    assert render.percent(10, 10) == "100%"
    assert render.percent(1, 1 << 40) == "<0.01%"
    assert render.percent((1 << 40) - 1, 1 << 40) == ">99.99%"
    assert render.percent(1, 3) == "33.33%"
    assert render.opacity_level(0) == 0
    assert render.opacity_level(1e-12) == 1  # one byte in a huge pixel still shows
    assert render.opacity_level(0.9999) == render.LEVELS - 1  # not full never looks full
    assert render.opacity_level(1.0) == render.LEVELS
    assert render.axis_ticks(0, 1 << 30) == [i << 27 for i in range(9)]
    assert render.axis_ticks(100, 1) == [100, 101]


def _picture(contexts=(ALLOC, BITMAP)):
    rows = [
        (1 << 20, (0, NBD_STATE_DIRTY)),
        (1 << 20, (NBD_STATE_HOLE | NBD_STATE_ZERO, 0)),
        (1 << 19, (NBD_STATE_ZERO, NBD_STATE_DIRTY)),
        (3 << 19, (NBD_STATE_HOLE | NBD_STATE_ZERO, 0)),
    ]
    cov = coverage_of(rows, 0, 4 << 20, 8, contexts)
    return render.picture_from(
        cov, contexts, title='disk <&> "x"', export_size=4 << 20, notes=["nbd+unix:///d?socket=/s"]
    )


def test_svg_is_well_formed_with_lanes_legend_and_numbers():
    svg = render.render_svg(_picture())
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    tracks = root.findall(f".//{SVG}g[@class='track']")
    assert [(g.get("data-context"), g.get("data-track")) for g in tracks] == [
        (ALLOC, "allocated"),
        (ALLOC, "zero"),
        (BITMAP, "dirty"),
    ]
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert ALLOC in texts and BITMAP in texts
    assert 'disk <&> "x"' in texts  # escaped in the file, intact once parsed
    assert "dirty: 1.5 MiB (37.50%) in 2 extents" in texts
    assert "allocated: 1.5 MiB (37.50%) in 2 extents" in texts
    assert "zero: 3 MiB (75.00%) in 1 extent" in texts
    legend = root.find(f".//{SVG}g[@class='legend']")
    assert legend is not None
    legend_text = " ".join("".join(t.itertext()) for t in legend.iter(f"{SVG}text"))
    for kind in ("dirty", "allocated", "zero"):
        assert render.PALETTE[kind][1] in legend_text
    # The dirty track: pixels of 512 KiB; [0, 1M) and [2M, 2.5M) fully dirty, as 2 rectangles.
    dirty = tracks[2]
    rects = [r for r in dirty.iter(f"{SVG}rect") if r.get("fill") == render.PALETTE["dirty"][0]]
    left = render.LEFT
    assert [(int(r.get("x")) - left, int(r.get("width"))) for r in rects] == [(0, 2), (4, 1)]
    assert all(float(r.get("fill-opacity")) == 1.0 for r in rects)
    # Offsets on the axis (8 pixels leave room for the first label only).
    assert "0 B" in texts


def test_axis_labels_offsets_across_the_width():
    rows = [(1 << 30, (0, 0))]
    cov = coverage_of(rows, 0, 1 << 30, 1024)
    root = ET.fromstring(
        render.render_svg(render.picture_from(cov, (ALLOC, BITMAP), title="t", export_size=1 << 30))
    )
    texts = ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]
    assert [f"{i * 128} MiB" if i else "0 B" for i in range(8)] == [
        t for t in texts if re.fullmatch(r"\d+ (B|MiB)", t)
    ]
    assert "1 GiB" in texts
    assert "offset (bytes; 1 pixel = 1 MiB)" in texts


def test_partial_pixels_are_shaded_by_fraction():
    # One pixel of 1000 bytes, 250 dirty: opacity between MIN and full, level 25.
    cov = coverage_of([(250, (0, 1)), (750, (0, 0))], 0, 1000, 1)
    pic = render.picture_from(cov, (ALLOC, BITMAP), title="t", export_size=1000)
    root = ET.fromstring(render.render_svg(pic))
    dirty = root.findall(f".//{SVG}g[@class='track']")[2]
    (rect,) = [r for r in dirty.iter(f"{SVG}rect") if r.get("fill") == render.PALETTE["dirty"][0]]
    expected = render.MIN_OPACITY + (1 - render.MIN_OPACITY) * 25 / render.LEVELS
    assert float(rect.get("fill-opacity")) == pytest.approx(expected, abs=1e-3)
    assert "about 25% dirty" in "".join(rect.itertext())


def test_html_is_self_contained_and_tabulates_exact_bytes():
    html = render.render_html(_picture())
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    svg = html[html.index("<svg") : html.index("</svg>") + len("</svg>")]
    ET.fromstring(svg)
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td class=\"n\">(\d+)</td>", html)
    assert rows == [
        (ALLOC, "allocated", str(3 << 19)),
        (ALLOC, "zero", str(3 << 20)),
        (BITMAP, "dirty", str(3 << 19)),
    ]
    assert "disk &lt;&amp;&gt;" in html


def test_hostile_context_names_stay_text():
    name = 'qemu:dirty-bitmap:a"<b>&c'
    svg = render.render_svg(_picture((ALLOC, name)))
    root = ET.fromstring(svg)
    contexts = [g.get("data-context") for g in root.findall(f".//{SVG}g[@class='track']")]
    assert contexts[-1] == name


def test_dirty_data_only_with_allocation():
    assert [t.label for t in render.tracks_for_all([BITMAP])] == ["dirty"]
    tracks = render.tracks_for_all([BITMAP, "qemu:dirty-bitmap:b1", ALLOC])
    assert [(t.label, t.column) for t in tracks] == [
        ("dirty", 0),
        ("dirty data", 0),
        ("dirty", 1),
        ("dirty data", 1),
        ("allocated", 2),
        ("zero", 2),
    ]
    # Dirty and zero (a write-zeroes): dirty, not dirty data. Dirty over a hole that reads as
    # data (no ZERO flag): dirty data.
    rows = [(10, (NBD_STATE_DIRTY, 0, NBD_STATE_ZERO)), (10, (NBD_STATE_DIRTY, 1, NBD_STATE_HOLE))]
    contexts = (BITMAP, "qemu:dirty-bitmap:b1", ALLOC)
    cov = coverage_of(rows, 0, 20, 2, contexts, tracks=tracks)
    assert cov.totals == [20, 10, 10, 10, 10, 10]
    assert cov.covered[1].tolist() == [0, 10]
