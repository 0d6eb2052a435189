"""Codecs of the nbdgw clear extension (nbdcore.clear_ext): bytes in, values out."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdcore import clear_ext as cx
from nbdcore.constants import Cmd, Opt, ReplyType
from nbdcore.wire import WireError


def test_numbers_stay_clear_of_the_spec() -> None:
    assert cx.NBD_OPT_X_NBDGW_CLEAR == 0x4E424701
    assert cx.NBD_OPT_X_NBDGW_CLEAR not in {int(o) for o in Opt if o != Opt.X_NBDGW_CLEAR}
    assert cx.NBD_CMD_X_NBDGW_CLEAR == Cmd.X_NBDGW_CLEAR == 0x4E47
    assert cx.NBD_CMD_X_NBDGW_CLEAR not in {int(c) for c in Cmd if c != Cmd.X_NBDGW_CLEAR}
    assert cx.NBD_REPLY_TYPE_X_NBDGW_CLEARED == ReplyType.X_NBDGW_CLEARED
    others = {int(t) for t in ReplyType if t != ReplyType.X_NBDGW_CLEARED}
    assert cx.NBD_REPLY_TYPE_X_NBDGW_CLEARED not in others
    # bit 15 clear: a success chunk, not an error chunk
    assert not cx.NBD_REPLY_TYPE_X_NBDGW_CLEARED & 0x8000
    assert cx.NBD_CMD_X_NBDGW_CLEAR < 1 << 16


def test_payload_layout() -> None:
    raw = cx.encode_clear_payload(0x10000, 3)
    assert raw == bytes.fromhex("000000000001000000000003")
    assert cx.decode_clear_payload(raw) == cx.ClearRequest(0x10000, 3)


@pytest.mark.parametrize("raw", [b"", bytes(11), bytes(13), bytes(12)])
def test_bad_payloads(raw: bytes) -> None:
    with pytest.raises(WireError):
        cx.decode_clear_payload(raw)  # wrong size, or length 0


def test_encode_refuses_empty_range() -> None:
    with pytest.raises(ValueError):
        cx.encode_clear_payload(0, 1)


def test_cleared_layout() -> None:
    raw = cx.encode_cleared(2, 65536, [(65536, 131072)])
    assert raw == bytes.fromhex("0000000200000000000100000000000100000000000100000000000000020000")
    got = cx.decode_cleared(raw)
    assert got == cx.Cleared(2, 65536, ((65536, 131072),))
    assert got.cleared_bytes == 131072
    assert cx.decode_cleared(cx.encode_cleared(0, 512, [])).runs == ()


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=20),
)
def test_cleared_round_trip(cid: int, gran: int, runs: list[tuple[int, int]]) -> None:
    got = cx.decode_cleared(cx.encode_cleared(cid, gran, runs))
    assert (got.context_id, got.granularity, list(got.runs)) == (cid, gran, runs)


@given(st.binary(max_size=80))
def test_decode_cleared_never_crashes(raw: bytes) -> None:
    try:
        got = cx.decode_cleared(raw)
    except WireError:
        return
    assert len(raw) == 16 + 16 * len(got.runs)


@pytest.mark.parametrize(
    "runs",
    [
        [(0, 65536)],  # before the request
        [(65536, 0)],  # empty
        [(65536, 65536), (65536, 65536)],  # overlap
        [(131072, 65536), (65536, 65536)],  # out of order
        [(65536, 196608)],  # past the request end
        [(65536 + 512, 65536)],  # not granule aligned
    ],
)
def test_check_refuses_impossible_replies(runs: list[tuple[int, int]]) -> None:
    # request [1000, 1000 + 200000) of a 1 MiB export at 64 KiB granules
    with pytest.raises(WireError):
        cx.check_cleared(cx.Cleared(1, 65536, tuple(runs)), 1000, 200000, 1 << 20)


def test_check_accepts_whole_granules_and_a_short_tail() -> None:
    cx.check_cleared(cx.Cleared(1, 65536, ((65536, 131072),)), 1000, 200000, 1 << 20)
    size = 3 * 65536 + 100  # the last granule is 100 bytes
    cx.check_cleared(cx.Cleared(1, 65536, ((65536, 2 * 65536 + 100),)), 1, size - 1, size)
    with pytest.raises(WireError):
        cx.check_cleared(cx.Cleared(1, 3000, ()), 0, 1, 10)  # granularity not a power of 2
