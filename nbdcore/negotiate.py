"""The client's option strategy, sans I/O: which options to send, in which order, and what each
refusal means. Shared by the asyncio and the blocking clients.

Each strategy is a generator over a :class:`~nbdcore.client.ClientConnection` in NEGOTIATING
state. It queues an option on the connection and yields :data:`NEXT_EVENT`; the I/O layer writes
``conn.data_to_send()``, reads until the connection produces its option event and sends that
event in. :data:`START_TLS` asks the I/O layer to wrap the socket in TLS (then call
``conn.tls_established()``) and send None. The generator's return value is its result.
"""

from __future__ import annotations

import enum
from collections.abc import Generator, Sequence
from typing import Final

from nbdcore import clear_ext
from nbdcore.client import (
    ClientConnection,
    Event,
    ExportReady,
    OptionAcked,
    OptionFailed,
)
from nbdcore.constants import Rep
from nbdcore.exceptions import HandshakeError, ServerProtocolError


class Step(enum.Enum):
    NEXT_EVENT = "next event"
    START_TLS = "start TLS"


NEXT_EVENT: Final = Step.NEXT_EVENT
START_TLS: Final = Step.START_TLS

Strategy = Generator[Step, Event | None, "ExportReady | None"]


def start(conn: ClientConnection, *, tls: bool, extended: bool, structured: bool) -> Strategy:
    """After the greeting: STARTTLS when asked (a refusal is fatal: a client that wants TLS
    must not carry on in plain text), then the reply format, best first: extended headers,
    else structured replies. Optional features fail softly, except NBD_REP_ERR_TLS_REQD."""
    if tls:
        conn.send_starttls()
        ev = yield NEXT_EVENT
        if isinstance(ev, OptionFailed):
            raise HandshakeError(f"the server refused TLS: {ev.error()}")
        yield START_TLS
    if extended and structured:  # as libnbd: no structured replies means neither
        conn.send_extended_headers()
        _soft((yield NEXT_EVENT))
    if structured and not conn.extended_headers:  # (extended implies structured)
        conn.send_structured_reply()
        _soft((yield NEXT_EVENT))
    return None


def select_export(
    conn: ClientConnection,
    export: str,
    queries: Sequence[str],
    *,
    clear_extension: bool = False,
) -> Strategy:
    """NBD_OPT_X_NBDGW_CLEAR when asked, with conditional clears (F_SINCE), asked again
    without them when the server refuses the data (a server older than the feature); any
    other refusal means "without". Then SET_META_CONTEXT when there are queries, then GO,
    falling back to EXPORT_NAME on a server older than GO."""
    structured = conn.structured_replies or conn.extended_headers
    if clear_extension and structured:
        conn.send_x_nbdgw_clear(clear_ext.NBD_X_NBDGW_CLEAR_F_SINCE)
        ev = yield NEXT_EVENT
        if isinstance(ev, OptionFailed) and ev.code == Rep.ERR_INVALID:
            conn.send_x_nbdgw_clear()
            yield NEXT_EVENT
    if queries and structured:
        conn.send_set_meta_context(export, list(queries))
        ev = yield NEXT_EVENT
        # A server without metadata contexts (ERR_UNSUP) still serves data: connect, and let
        # block status say that nothing was negotiated. Anything else is an error.
        if isinstance(ev, OptionFailed) and ev.code != Rep.ERR_UNSUP:
            raise ev.error()
    conn.send_go(export)
    ev = yield NEXT_EVENT
    if isinstance(ev, OptionFailed) and ev.code == Rep.ERR_UNSUP and not conn.extended_headers:
        # A server older than NBD_OPT_GO (nbd-server before 3.13...): the spec's fallback.
        conn.send_export_name(export)
        ev = yield NEXT_EVENT
    if isinstance(ev, OptionFailed):
        raise ev.error()
    if not isinstance(ev, ExportReady):
        raise ServerProtocolError(f"unexpected answer to NBD_OPT_GO: {ev}")
    return ev


def _soft(ev: Event | None) -> None:
    """Failures of optional features mean "not supported": anything but TLS_REQD."""
    if isinstance(ev, OptionFailed) and ev.code == Rep.ERR_TLS_REQD:
        raise ev.error()
    if ev is not None and not isinstance(ev, OptionAcked | OptionFailed):
        raise ServerProtocolError(f"unexpected answer to a reply-format option: {ev}")
