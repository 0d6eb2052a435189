"""What the asyncio and the blocking clients share above the protocol core, without I/O: the
export's attributes once NBD_OPT_GO succeeded, and the checks and shaping of a BLOCK_STATUS
call (which contexts, the server-side filter, the answer by context name)."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence
from typing import Final, TypeAlias

from nbdcore._record import Frozen
from nbdcore.client import ClientConnection, ExportReady, Reply
from nbdcore.constants import TransmissionFlag
from nbdcore.exceptions import UsageError
from nbdcore.wire import BlockSize

# A string: array is not subscriptable at run time before Python 3.12.
StatusAnswer: TypeAlias = "dict[str, tuple[array[int], array[int]]]"


class StatusRequest(Frozen):
    """A checked BLOCK_STATUS call: ``send`` queues it on the connection (returns the cookie),
    ``answer`` turns the reply into context name -> (lengths, flags)."""

    __slots__ = ("answer", "send")
    send: Final[Callable[[], int]]
    answer: Final[Callable[[Reply], StatusAnswer]]

    def __init__(self, send: Callable[[], int], answer: Callable[[Reply], StatusAnswer]) -> None:
        self.send = send
        self.answer = answer


class ClientSession:
    """One connection in transmission phase: the attributes both client layers expose."""

    _conn: ClientConnection
    export_name: str
    description: str | None
    size: int
    flags: TransmissionFlag
    block_size: BlockSize | None
    meta_contexts: dict[str, int]

    def __init__(self) -> None:
        self._conn = ClientConnection()
        self.export_name = ""
        self.description = None
        self.size = 0
        self.flags = TransmissionFlag(0)
        self.block_size = None
        self.meta_contexts = {}
        self._ids_to_names: dict[int, str] = {}

    def _entered(self, ready: ExportReady, export: str) -> None:
        """NBD_OPT_GO (or EXPORT_NAME) succeeded: take the export's description."""
        self.export_name = ready.name if ready.name is not None else export
        self.description = ready.description or None
        self.size = ready.size
        self.flags = ready.flags
        self.block_size = ready.block_size
        self.meta_contexts = dict(self._conn.meta_contexts)
        self._ids_to_names = {cid: name for name, cid in self.meta_contexts.items()}

    @property
    def structured_replies(self) -> bool:
        return self._conn.structured_replies or self._conn.extended_headers

    @property
    def extended_headers(self) -> bool:
        return self._conn.extended_headers

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TransmissionFlag.READ_ONLY)

    @property
    def can_multi_conn(self) -> bool:
        return bool(self.flags & TransmissionFlag.CAN_MULTI_CONN)

    @property
    def max_payload(self) -> int:
        """Largest READ/WRITE this client sends in one request (larger ones are split)."""
        return self._conn.max_payload

    def _status_request(
        self, offset: int, length: int, contexts: Sequence[str] | None, req_one: bool
    ) -> StatusRequest:
        """Check a block_status call and shape it: ``contexts`` restricts the answer (with
        the server-side filter when the server offers BLOCK_STATUS_PAYLOAD)."""
        if not self.meta_contexts:
            if not self.structured_replies:
                raise UsageError(
                    "block status is unavailable: the server does not support structured replies"
                )
            raise UsageError("block status is unavailable: no metadata context was negotiated")
        ids: list[int] | None = None
        if contexts is not None:
            unknown = [c for c in contexts if c not in self.meta_contexts]
            if unknown:
                raise UsageError(f"contexts {unknown} were not negotiated")
            ids = [self.meta_contexts[c] for c in dict.fromkeys(contexts)]
            if len(ids) == len(self.meta_contexts):
                ids = None
        if not self.extended_headers:
            # The length is only a hint: clip what a 32-bit request cannot say.
            limit = 0xFFFFFFFF - 0xFFFFFFFF % self._conn.min_block
            length = min(length, limit)
        use_filter = ids is not None and bool(self.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD)
        conn = self._conn
        names = self._ids_to_names
        wanted = None if ids is None else set(ids)

        def send() -> int:
            return conn.send_block_status(
                offset, length, req_one=req_one, context_ids=ids if use_filter else None
            )

        def answer(reply: Reply) -> StatusAnswer:
            assert reply.extents is not None
            return {
                names[cid]: (r.lengths, r.flags)
                for cid, r in reply.extents.items()
                if wanted is None or cid in wanted
            }

        return StatusRequest(send, answer)
