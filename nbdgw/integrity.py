"""The stream digest of StreamExtents: what a request's ``digest`` asks the gateway for, defined
here once for the gateway and every Python client (the library checks a stream's digest with
it, ``nbdgw backup`` records it, ``nbdgw verify`` recomputes it from files), with the names
a request may use for it and for compression, and their check (:func:`check_request`).

The strong digest (:class:`RangeDigest`) must give the same answer for a stream cut into
messages in any way, for a resumed stream, for a stream that carries no data (the gateway
reads and hashes, the client compares with a stored copy) and for a file on disk, where zero
extents are holes. So it is defined over the content, in fixed blocks:

- The range ``[start, end)`` is cut at multiples of :data:`DIGEST_BLOCK` (1 MiB) into blocks
  ``[lo, hi)``. A block's content is the bytes the stream delivered in it; every other byte
  (zero and hole extents, extents a filter left out) counts as zero.
- A block whose content is all zeros adds nothing, so a sparse disk costs nothing to hash. For
  the others, in order, ``chain = H(chain || lo || hi || H(content))`` (``lo`` and ``hi`` as
  big-endian u64), starting from ``H("nbdgw-digest-v1" 0x00 algorithm)``.
- The digest is the last ``chain``.

Its state between blocks is one hash value, which a resume token can carry; a stream resumed
inside a block hashes that block's first part again (the gateway reads it from the host once
more, without sending it).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from typing import Any, Protocol

DIGEST_BLOCK = 1 << 20
DIGEST_VERSION = b"nbdgw-digest-v1"


def _blake3() -> Any:
    import blake3  # only for streams that ask for it

    return blake3.blake3()


# Request names -> hash constructors. blake3 is the faster (about twice sha256 on one core
# here); sha256 is for whoever must use a FIPS algorithm.
DIGESTS: dict[str, Callable[[], Any]] = {"sha256": hashlib.sha256, "blake3": _blake3}
DIGEST_SIZE = 32  # both

# The one compression a request may ask for (``compression``), and a message may carry
# (``data_compression``), and its levels (``compression_level``; 20-22, zstd's "ultra", need
# far more memory per stream).
COMPRESSION_ZSTD = "zstd"
COMPRESSIONS = (COMPRESSION_ZSTD,)
ZSTD_LEVELS = range(1, 20)
DEFAULT_ZSTD_LEVEL = 3  # zstd's own default

_ZEROS = bytes(DIGEST_BLOCK)
_ZEROS_VIEW = memoryview(_ZEROS)
_RECORD = struct.Struct(">QQ")


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` (at most one block) is all zero bytes, at memcmp speed."""
    return _ZEROS.startswith(data)


class _Hash(Protocol):
    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def digest(self) -> bytes: ...
    def copy(self) -> _Hash: ...


class RangeDigest:
    """The digest of a range as a stream delivers it (see the module docstring).

    Feed every delivered piece of data in increasing order with :meth:`update` (gaps are
    zeros), then call :meth:`finish` with the end of the range. :attr:`state` is what a resume
    needs: the chain before the current block and where that block starts.
    """

    __slots__ = ("_block", "_chain", "_end", "_lo", "_new", "_pos", "algorithm")

    def __init__(self, algorithm: str, start: int, *, chain: bytes | None = None) -> None:
        if algorithm not in DIGESTS:
            raise ValueError(f"unknown digest {algorithm!r} (known: {', '.join(DIGESTS)})")
        self.algorithm = algorithm
        self._new = DIGESTS[algorithm]
        if chain is None:
            chain = self._hash(DIGEST_VERSION + b"\0" + algorithm.encode())
        elif len(chain) != DIGEST_SIZE:
            raise ValueError(f"a {algorithm} chain value has {DIGEST_SIZE} bytes, not {len(chain)}")
        self._chain = chain
        self._lo = start  # start of the current block (clipped to the range)
        self._end = (start // DIGEST_BLOCK + 1) * DIGEST_BLOCK  # its end, unclipped
        self._pos = start  # every byte before this is accounted for
        self._block: _Hash | None = None  # the current block's hash, once it holds a non-zero

    def _hash(self, data: bytes) -> bytes:
        h = self._new()
        h.update(data)
        return bytes(h.digest())

    @property
    def state(self) -> tuple[bytes, int]:
        """``(chain, block_start)``: resume with ``RangeDigest(alg, block_start, chain=chain)``
        and feed the delivered data of ``[block_start, position)`` again."""
        return self._chain, self._lo

    @property
    def position(self) -> int:
        return self._pos

    def update(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Add delivered ``data`` found at ``offset`` (at or after everything added so far)."""
        if offset < self._pos:
            raise ValueError(f"data at {offset} goes back before {self._pos}")
        view = memoryview(data)
        while view:
            if offset >= self._end:
                self._close(self._end)
                self._lo = offset // DIGEST_BLOCK * DIGEST_BLOCK
                self._end = self._lo + DIGEST_BLOCK
            piece = view[: self._end - offset]
            block = self._block
            if block is None:
                if not is_zero(piece):
                    block = self._block = self._new()
                    self._zeros(block, offset - self._lo)
                    block.update(piece)
            else:
                self._zeros(block, offset - self._pos)
                block.update(piece)
            offset += len(piece)
            self._pos = offset
            view = view[len(piece) :]

    def copy(self) -> RangeDigest:
        """An independent copy, hashing state included (to continue from here again later)."""
        other = RangeDigest.__new__(RangeDigest)
        other.algorithm, other._new = self.algorithm, self._new
        other._chain, other._lo = self._chain, self._lo
        other._end, other._pos = self._end, self._pos
        other._block = None if self._block is None else self._block.copy()
        return other

    def finish(self, end: int) -> bytes:
        """The digest of the range that ends at ``end``. Afterwards :attr:`state` is the
        state at ``end`` (the last block is in the chain), so a resume there adds nothing."""
        if end < self._pos:
            raise ValueError(f"the range ends at {end}, before data at {self._pos}")
        self._close(min(end, self._end))
        self._lo = self._pos = end
        self._end = (end // DIGEST_BLOCK + 1) * DIGEST_BLOCK
        return self._chain

    def _close(self, hi: int) -> None:
        block, self._block = self._block, None
        if block is not None:
            self._zeros(block, hi - self._pos)
            self._chain = self._hash(self._chain + _RECORD.pack(self._lo, hi) + block.digest())
        self._pos = max(self._pos, hi)

    @staticmethod
    def _zeros(block: _Hash, n: int) -> None:
        while n > 0:
            k = min(n, DIGEST_BLOCK)
            block.update(_ZEROS_VIEW[:k])
            n -= k


def check_request(digest: str, compression: str, level: int) -> list[tuple[str, str]]:
    """The field violations of a StreamExtentsRequest's integrity fields: (field, why) pairs,
    which the gateway answers as INVALID_ARGUMENT and the Python client raises before sending."""
    violations = []
    if digest and digest not in DIGESTS:
        violations.append(("digest", f"unknown digest {digest!r} (known: {', '.join(DIGESTS)})"))
    if compression and compression not in COMPRESSIONS:
        violations.append(
            ("compression", f"unknown compression {compression!r} (known: {COMPRESSION_ZSTD})")
        )
    if level and not compression:
        # Most likely a forgotten compression="zstd": refused rather than sent uncompressed.
        violations.append(
            (
                "compression_level",
                f"compression_level {level} without compression: it is the level of"
                f' compression="{COMPRESSION_ZSTD}"',
            )
        )
    elif level and level not in ZSTD_LEVELS:
        violations.append(
            (
                "compression_level",
                f"must be {ZSTD_LEVELS.start} to {ZSTD_LEVELS.stop - 1} (0: {DEFAULT_ZSTD_LEVEL})",
            )
        )
    return violations
