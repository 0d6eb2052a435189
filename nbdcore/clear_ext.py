"""Wire codecs of the nbdgw clear extension (docs/extension-clear.md), sans I/O.

A client that has copied a range of a dirty bitmap tells the server so with
``NBD_CMD_X_NBDGW_CLEAR``; the server clears the granules of that bitmap lying wholly inside the
range, atomically with respect to writes, and answers with one
``NBD_REPLY_TYPE_X_NBDGW_CLEARED`` chunk listing exactly the byte runs it cleared.

Conditional clears (feature ``NBD_X_NBDGW_CLEAR_F_SINCE``, asked for in the option's data):
``NBD_CMD_X_NBDGW_POSITION`` returns, for each negotiated dirty bitmap, the current *position*
of its write history (history id, sequence); a clear that carries a position clears only the
granules not written after it and lists the others in an ``NBD_REPLY_TYPE_X_NBDGW_KEPT`` chunk.
A reader that takes a position before it reads can then never clear a write it did not see.

Nothing here is sent unless both sides agreed to it with ``NBD_OPT_X_NBDGW_CLEAR`` during the
handshake: a server without the extension answers the option with NBD_REP_ERR_UNSUP (as the spec
requires for every unknown option), and a client that did not get an ACK never sends the command.

Every number lives here, beside the codecs, so that the rest of nbdcore needs none of them
unless it speaks the extension.
"""

from __future__ import annotations

import struct
from itertools import pairwise
from typing import Final

from nbdcore._record import Frozen
from nbdcore.constants import Cmd, Opt, ReplyType
from nbdcore.wire import WireError

__all__ = [
    "CLEARED_HEADER",
    "CLEARED_RUN",
    "CLEAR_PAYLOAD",
    "CLEAR_SINCE_PAYLOAD",
    "NBD_CMD_X_NBDGW_CLEAR",
    "NBD_CMD_X_NBDGW_POSITION",
    "NBD_OPT_X_NBDGW_CLEAR",
    "NBD_REPLY_TYPE_X_NBDGW_CLEARED",
    "NBD_REPLY_TYPE_X_NBDGW_KEPT",
    "NBD_REPLY_TYPE_X_NBDGW_POSITION",
    "NBD_X_NBDGW_CLEAR_F_SINCE",
    "POSITION_CHUNK",
    "ClearRequest",
    "Cleared",
    "Position",
    "check_cleared",
    "check_disjoint",
    "decode_clear_payload",
    "decode_cleared",
    "decode_features",
    "decode_position",
    "encode_clear_payload",
    "encode_cleared",
    "encode_features",
    "encode_position",
]

# The spec assigns options below 16, commands below 16 and reply types below 16; these sit far
# above (the option reads "NBG\x01", the command and chunk type "NG"), so that a future
# spec number cannot collide with them on a connection that negotiated the extension. Reply type
# 0x4E47 has bit 15 clear: it is a success chunk.
NBD_OPT_X_NBDGW_CLEAR: Final = int(Opt.X_NBDGW_CLEAR)  # 0x4E424701
NBD_CMD_X_NBDGW_CLEAR: Final = int(Cmd.X_NBDGW_CLEAR)  # 0x4E47
NBD_REPLY_TYPE_X_NBDGW_CLEARED: Final = int(ReplyType.X_NBDGW_CLEARED)  # 0x4E47
NBD_CMD_X_NBDGW_POSITION: Final = int(Cmd.X_NBDGW_POSITION)  # 0x4E48
NBD_REPLY_TYPE_X_NBDGW_KEPT: Final = int(ReplyType.X_NBDGW_KEPT)  # 0x4E48
NBD_REPLY_TYPE_X_NBDGW_POSITION: Final = int(ReplyType.X_NBDGW_POSITION)  # 0x4E49

# The option's data: empty (the plain extension) or a u32 of feature bits, all of which the
# server must implement to acknowledge; servers before features answer any data with
# NBD_REP_ERR_INVALID, and the client asks again without.
FEATURES: Final = struct.Struct(">I")
NBD_X_NBDGW_CLEAR_F_SINCE: Final = 1 << 0  # positions and conditional clears
KNOWN_FEATURES: Final = NBD_X_NBDGW_CLEAR_F_SINCE

# Request payload: effect length (u64, not 0), metadata context id (u32).
CLEAR_PAYLOAD: Final = struct.Struct(">QI")
# A conditional clear (F_SINCE): the same, then the position: history id (u64), sequence (u64).
CLEAR_SINCE_PAYLOAD: Final = struct.Struct(">QIQQ")
# A position chunk: context id (u32), history id (u64), sequence (u64).
POSITION_CHUNK: Final = struct.Struct(">IQQ")
# Reply chunk: context id (u32), granularity in bytes (u64), run count (u32), then the runs.
CLEARED_HEADER: Final = struct.Struct(">IQI")
CLEARED_RUN: Final = struct.Struct(">QQ")  # offset, length

# A reply lists the runs cleared by one request; the server merges adjacent runs, so a request
# clears one run, but a client accepts up to this many (bounds what a hostile server can make
# it buffer: 16 + 16 * 65536 bytes).
MAX_CLEARED_RUNS: Final = 65536
MAX_CLEARED_CHUNK: Final = CLEARED_HEADER.size + CLEARED_RUN.size * MAX_CLEARED_RUNS


class Position(Frozen):
    """A point in the write history of one bitmap (an NBD_REPLY_TYPE_X_NBDGW_POSITION chunk)."""

    __slots__ = ("context_id", "history_id", "sequence")
    context_id: Final[int]
    history_id: Final[int]
    sequence: Final[int]

    def __init__(self, context_id: int, history_id: int, sequence: int) -> None:
        self.context_id = context_id
        self.history_id = history_id
        self.sequence = sequence


class ClearRequest(Frozen):
    """The decoded payload of NBD_CMD_X_NBDGW_CLEAR; ``since`` is the position (history id,
    sequence) of a conditional clear."""

    __slots__ = ("context_id", "length", "since")
    length: Final[int]
    context_id: Final[int]
    since: Final[tuple[int, int] | None]

    def __init__(self, length: int, context_id: int, since: tuple[int, int] | None = None) -> None:
        self.length = length
        self.context_id = context_id
        self.since = since


class Cleared(Frozen):
    """The decoded NBD_REPLY_TYPE_X_NBDGW_CLEARED chunk."""

    __slots__ = ("context_id", "granularity", "runs")
    context_id: Final[int]
    granularity: Final[int]
    runs: Final[tuple[tuple[int, int], ...]]

    def __init__(
        self, context_id: int, granularity: int, runs: tuple[tuple[int, int], ...]
    ) -> None:
        self.context_id = context_id
        self.granularity = granularity
        self.runs = runs

    @property
    def cleared_bytes(self) -> int:
        return sum(n for _, n in self.runs)


def encode_features(features: int) -> bytes:
    """The option's data: nothing for the plain extension, else the feature bits."""
    return FEATURES.pack(features) if features else b""


def decode_features(data: bytes | bytearray | memoryview) -> int:
    if not data:
        return 0
    if len(data) != FEATURES.size:
        raise WireError(f"NBD_OPT_X_NBDGW_CLEAR data of {len(data)} bytes (must be 0 or 4)")
    (features,) = FEATURES.unpack(data)
    if features & ~KNOWN_FEATURES:
        raise WireError(f"unknown NBD_OPT_X_NBDGW_CLEAR features {features & ~KNOWN_FEATURES:#x}")
    return int(features)


def encode_clear_payload(
    length: int, context_id: int, since: tuple[int, int] | None = None
) -> bytes:
    if length <= 0:
        raise ValueError(f"clear length must be positive, not {length}")
    if since is not None:
        return CLEAR_SINCE_PAYLOAD.pack(length, context_id, *since)
    return CLEAR_PAYLOAD.pack(length, context_id)


def decode_clear_payload(
    payload: bytes | bytearray | memoryview, *, since: bool = False
) -> ClearRequest:
    """Decode a request payload: 12 bytes, or 28 (a conditional clear) when ``since`` (the
    feature was negotiated)."""
    sizes = (CLEAR_PAYLOAD.size, CLEAR_SINCE_PAYLOAD.size) if since else (CLEAR_PAYLOAD.size,)
    if len(payload) not in sizes:
        must = " or ".join(map(str, sizes))
        raise WireError(f"NBD_CMD_X_NBDGW_CLEAR payload of {len(payload)} bytes (must be {must})")
    if len(payload) == CLEAR_SINCE_PAYLOAD.size:
        length, cid, history_id, sequence = CLEAR_SINCE_PAYLOAD.unpack(payload)
        request = ClearRequest(length, cid, (history_id, sequence))
    else:
        length, cid = CLEAR_PAYLOAD.unpack(payload)
        request = ClearRequest(length, cid)
    if length == 0:
        raise WireError("NBD_CMD_X_NBDGW_CLEAR of length 0")
    return request


def encode_position(context_id: int, history_id: int, sequence: int) -> bytes:
    return POSITION_CHUNK.pack(context_id, history_id, sequence)


def decode_position(payload: bytes | bytearray | memoryview) -> Position:
    if len(payload) != POSITION_CHUNK.size:
        raise WireError(f"position chunk of {len(payload)} bytes (must be {POSITION_CHUNK.size})")
    return Position(*POSITION_CHUNK.unpack(payload))


def encode_cleared(context_id: int, granularity: int, runs: list[tuple[int, int]]) -> bytes:
    """The payload of a NBD_REPLY_TYPE_X_NBDGW_CLEARED chunk."""
    if len(runs) > MAX_CLEARED_RUNS:
        raise ValueError(f"{len(runs)} cleared runs in one reply (at most {MAX_CLEARED_RUNS})")
    head = CLEARED_HEADER.pack(context_id, granularity, len(runs))
    return head + b"".join(CLEARED_RUN.pack(o, n) for o, n in runs)


def decode_cleared(payload: bytes | bytearray | memoryview) -> Cleared:
    """Decode the chunk; the counts must agree with its length (WireError otherwise)."""
    data = memoryview(payload)
    if len(data) < CLEARED_HEADER.size or (len(data) - CLEARED_HEADER.size) % CLEARED_RUN.size:
        raise WireError(f"cleared chunk of {len(data)} bytes is not 16 + 16n")
    cid, granularity, count = CLEARED_HEADER.unpack_from(data, 0)
    if count != (len(data) - CLEARED_HEADER.size) // CLEARED_RUN.size:
        raise WireError(f"cleared chunk says {count} runs but carries {len(data) - 16} bytes")
    runs = tuple(CLEARED_RUN.iter_unpack(data[CLEARED_HEADER.size :]))
    return Cleared(cid, granularity, runs)


def check_cleared(cleared: Cleared, offset: int, length: int, export_size: int) -> None:
    """Raise WireError unless the reply is possible for a request to clear
    ``[offset, offset + length)``: runs not empty, in order, disjoint, inside the request, and
    made of whole granules (the last granule of the export may be short).

    This is what lets a client promise its caller that nothing outside the range was cleared.
    """
    g = cleared.granularity
    if g <= 0 or g & (g - 1):
        raise WireError(f"cleared chunk with granularity {g} (not a power of two)")
    end = offset + length
    prev = offset
    for start, n in cleared.runs:
        stop = start + n
        if n == 0:
            raise WireError("cleared run of length 0")
        if start < prev:
            raise WireError(f"cleared run at {start} overlaps or precedes the previous one")
        if stop > end:
            raise WireError(f"cleared run [{start}, {stop}) runs past the request end {end}")
        if start % g or (stop % g and stop != export_size):
            raise WireError(f"cleared run [{start}, {stop}) is not whole {g}-byte granules")
        prev = stop


def check_disjoint(cleared: Cleared, kept: Cleared) -> None:
    """Raise WireError unless the runs of a conditional clear's two chunks never overlap (a
    granule is either cleared or kept)."""
    runs = sorted([*cleared.runs, *kept.runs])
    for (a, n), (b, _) in pairwise(runs):
        if a + n > b:
            raise WireError(f"cleared and kept runs overlap at {b}")
