"""Constants of the NBD protocol, named as in the spec (doc/proto.md, NetworkBlockDevice/nbd).

Extended headers come from the ``extension-ext-header`` branch, which qemu >= 8.2 and
libnbd >= 1.18 implement. Nothing in this module has behaviour: it is the one place where wire
numbers live, so the rest of the code can say ``NBD_OPT_GO`` instead of ``7``.
"""

from __future__ import annotations

import enum
from typing import Final

# --- Magics -------------------------------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC": first 8 bytes sent by every server
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT": newstyle greeting and every option request
CLISERV_MAGIC: Final = 0x00420281861253  # oldstyle greeting (unsupported, detected)
NBD_REP_MAGIC: Final = 0x0003E889045565A9  # every option reply

NBD_REQUEST_MAGIC: Final = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC: Final = 0x21E41C71
NBD_SIMPLE_REPLY_MAGIC: Final = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
NBD_EXTENDED_REPLY_MAGIC: Final = 0x6E8A278C

NBD_DEFAULT_PORT: Final = 10809


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (16 bits, in the newstyle greeting)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits, the client's reply to the greeting)."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (16 bits), sent with the export size."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12  # extended headers only


class Opt(enum.IntEnum):
    """Option numbers (NBD_OPT_*)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11
    # nbdgw extension (docs/extension-clear.md): negotiated by both sides, never
    # sent to a peer that did not advertise it. The number sits in the experimental range.
    X_NBDGW_CLEAR = 0x4E42_4701
    # nbdgw extension (docs/extension-snapshot.md): snapshot management in the handshake.
    X_NBDGW_SNAPSHOT = 0x4E42_4702


NBD_REP_FLAG_ERROR: Final = 1 << 31


class Rep(enum.IntEnum):
    """Option reply types (NBD_REP_*); errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    # nbdgw extension (docs/extension-snapshot.md): the JSON result of NBD_OPT_X_NBDGW_SNAPSHOT.
    X_NBDGW_SNAPSHOT = 0x4E42_4702
    ERR_UNSUP = NBD_REP_FLAG_ERROR + 1
    ERR_POLICY = NBD_REP_FLAG_ERROR + 2
    ERR_INVALID = NBD_REP_FLAG_ERROR + 3
    ERR_PLATFORM = NBD_REP_FLAG_ERROR + 4
    ERR_TLS_REQD = NBD_REP_FLAG_ERROR + 5
    ERR_UNKNOWN = NBD_REP_FLAG_ERROR + 6
    ERR_SHUTDOWN = NBD_REP_FLAG_ERROR + 7
    ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR + 8
    ERR_TOO_BIG = NBD_REP_FLAG_ERROR + 9
    ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR + 10


class Info(enum.IntEnum):
    """NBD_INFO_* types carried in NBD_REP_INFO and requested by INFO/GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(enum.IntEnum):
    """Transmission commands (NBD_CMD_*)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8
    # nbdgw extension (docs/extension-clear.md): only valid after NBD_OPT_X_NBDGW_CLEAR.
    X_NBDGW_CLEAR = 0x4E47
    # nbdgw extension: only after NBD_OPT_X_NBDGW_CLEAR with NBD_X_NBDGW_CLEAR_F_SINCE.
    X_NBDGW_POSITION = 0x4E48


class CmdFlag(enum.IntFlag):
    """Command flags (NBD_CMD_FLAG_*)."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # extended headers only


NBD_REPLY_FLAG_DONE: Final = 1 << 0


class ReplyType(enum.IntEnum):
    """Structured reply chunk types (NBD_REPLY_TYPE_*); bit 15 marks errors."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    # nbdgw extension (docs/extension-clear.md): only after NBD_OPT_X_NBDGW_CLEAR.
    X_NBDGW_CLEARED = 0x4E47
    # nbdgw extension: only after NBD_OPT_X_NBDGW_CLEAR with NBD_X_NBDGW_CLEAR_F_SINCE.
    X_NBDGW_KEPT = 0x4E48
    X_NBDGW_POSITION = 0x4E49
    ERROR = 0x8001
    ERROR_OFFSET = 0x8002


NBD_REPLY_TYPE_ERROR_BIT: Final = 1 << 15


class Errno(enum.IntEnum):
    """Error values on the wire. They are the Linux numbers, but the spec fixes them, so a
    server on another OS must still send these."""

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108

    @classmethod
    def from_wire(cls, value: int) -> Errno:
        """The spec says an unknown error value is to be treated as EINVAL."""
        try:
            return cls(value)
        except ValueError:
            return cls.EINVAL


# --- Metadata contexts ----------------------------------------------------------------------

CONTEXT_BASE_ALLOCATION: Final = "base:allocation"
CONTEXT_QEMU_DIRTY_BITMAP_PREFIX: Final = "qemu:dirty-bitmap:"
CONTEXT_QEMU_ALLOCATION_DEPTH: Final = "qemu:allocation-depth"

NBD_STATE_HOLE: Final = 1 << 0  # base:allocation
NBD_STATE_ZERO: Final = 1 << 1  # base:allocation
NBD_STATE_DIRTY: Final = 1 << 0  # qemu:dirty-bitmap:NAME

# --- Sizes and limits -------------------------------------------------------------------------

NBD_MAX_STRING: Final = 4096  # names, queries, messages MUST be at most this many bytes
NBD_MAX_ERROR_MESSAGE: Final = 4096
DEFAULT_MIN_BLOCK: Final = 1
DEFAULT_PREFERRED_BLOCK: Final = 4096
# Without NBD_INFO_BLOCK_SIZE a server accepts payloads up to 32 MiB; portable clients stay there.
DEFAULT_MAX_PAYLOAD: Final = 32 * 1024 * 1024
# A block-status chunk SHOULD NOT hold more than 2**20 extents.
MAX_EXTENTS_PER_CHUNK: Final = 1 << 20
