"""The nbdinfo --map formatter and the argument parsers of the gateway commands, without a
gateway: extents split across messages in any way print exactly as nbdinfo prints the map."""

from __future__ import annotations

import argparse
import io
import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.cli.common import MapPrinter, extent_description, full_context_name, parse_size
from nbdgw.v1 import bitmap_service_pb2 as pb

CONTEXTS = ["base:allocation", "qemu:dirty-bitmap:b0", "qemu:allocation-depth", "x-vendor:thing"]


def reference(context: str, rows: list[tuple[int, int, int]], *, json_output: bool) -> str:
    """nbdinfo's output for these rows, written the slow and obvious way."""
    merged: list[list[int]] = []
    for off, length, flags in rows:
        if merged and merged[-1][0] + merged[-1][1] == off and merged[-1][2] == flags:
            merged[-1][1] += length
        else:
            merged.append([off, length, flags])
    if not json_output:
        out = ""
        for off, length, flags in merged:
            descr = extent_description(context, flags)
            out += f"{off:10d}  {length:10d}  {flags:3d}" + (f"  {descr}" if descr else "") + "\n"
        return out
    items = []
    for off, length, flags in merged:
        item = f'{{ "offset": {off}, "length": {length}, "type": {flags}'
        descr = extent_description(context, flags)
        items.append(item + (f', "description": "{descr}"}}' if descr else "}"))
    return "[\n" + ",\n".join(items) + "\n]\n"


extents = st.lists(
    st.tuples(
        st.integers(0, 3),  # gap before (0: contiguous, as with EXTENT_FILTER_ALL)
        st.integers(1, 1 << 40),
        st.sampled_from([0, 1, 2, 3, 7]),
    ),
    max_size=60,
)


@given(
    context=st.sampled_from(CONTEXTS),
    rows=extents,
    cuts=st.lists(st.integers(0, 60), max_size=6),
    json_output=st.booleans(),
)
def test_printer_equals_reference_however_split(
    context: str, rows: list[tuple[int, int, int]], cuts: list[int], json_output: bool
) -> None:
    absolute = []
    pos = 4096
    for gap, length, flags in rows:
        pos += gap * 512
        absolute.append((pos, length, flags))
        pos += length
    # Split the rows into messages at the cut points, as the gateway may.
    bounds = sorted({0, len(rows), *(c for c in cuts if c <= len(rows))})
    out = io.StringIO()
    printer = MapPrinter(context, out, json_output=json_output)
    printer.begin()
    covered = 4096  # each message starts where the previous one's coverage ended
    for lo, hi in itertools.pairwise(bounds):
        msg = pb.StreamExtentsResponse(offset=covered)
        prev_end = covered
        for off, length, flags in absolute[lo:hi]:
            msg.offset_deltas.append(off - prev_end)
            msg.lengths.append(length)
            msg.flags.append(flags)
            prev_end = off + length
        covered = prev_end
        printer.add_message(msg)
    printer.end()
    assert out.getvalue() == reference(context, absolute, json_output=json_output)
    if json_output:
        json.loads(out.getvalue())


def test_descriptions_are_nbdinfos() -> None:
    assert [extent_description("base:allocation", f) for f in range(5)] == [
        "data",
        "hole",
        "zero",
        "hole,zero",
        None,
    ]
    assert extent_description("qemu:dirty-bitmap:x", 1) == "dirty"
    assert extent_description("qemu:dirty-bitmap:x", 2) is None
    assert extent_description("qemu:allocation-depth", 3) == "backing depth 3"
    assert extent_description("other:ns", 0) is None


def test_empty_map_is_nbdinfos() -> None:
    for json_output, expected in ((True, "[\n\n]\n"), (False, "")):
        out = io.StringIO()
        printer = MapPrinter("base:allocation", out, json_output=json_output)
        printer.begin()
        printer.end()
        assert out.getvalue() == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [("0", 0), ("4096", 4096), ("64k", 65536), ("64K", 65536), ("1M", 1 << 20), ("2GiB", 2 << 30),
     ("1t", 1 << 40), (" 3 ", 3)],
)  # fmt: skip
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5M", "12x", "k", "16E", "0x10"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_short_bitmap_names() -> None:
    assert full_context_name("backup") == "qemu:dirty-bitmap:backup"
    assert full_context_name("base:allocation") == "base:allocation"
