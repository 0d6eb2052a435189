"""The sans-I/O server fed arbitrary client bytes in every state: before the client flags, in
option haggling (plain, TLS offered, TLS required, after STARTTLS), in transmission (simple,
structured, extended headers, the clear extension) and after NBD_CMD_DISC.

Whatever the bytes, the server answers with well-framed replies or fails the connection with
ClientProtocolError (then CLOSED); EOF afterwards never raises. Strategies that build
mostly-valid options and requests come from tests/unit/test_server_fuzz.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdcore import wire
from nbdcore.constants import ClientFlag, Cmd, Opt
from nbdcore.server import ServerConnection, State
from tests.fuzz.support import FUZZ, tried
from tests.unit.test_server_fuzz import feed, options, requests
from tests.unit.test_server_support import (
    CTX_ALL,
    joined,
    new_conn,
    option_replies,
    parse_replies,
    start,
    transmission,
)


def _after_starttls() -> ServerConnection:
    conn = start(tls_available=True, tls_required=True)
    conn.receive_data(wire.encode_option(Opt.STARTTLS))
    joined(conn)
    assert conn.state is State.TLS_HANDSHAKE
    conn.tls_established()
    return conn


def _disconnecting() -> ServerConnection:
    conn = transmission(True, False, contexts=CTX_ALL)
    conn.receive_data(wire.encode_request(0, Cmd.DISC, 9, 0, 0, False))
    return conn


STATES: dict[str, tuple[Callable[[], ServerConnection], bool]] = {
    # name: (setup, extended headers in transmission)
    "client_flags": (new_conn, False),
    "options": (start, False),
    "options_old_client": (lambda: start(flags=ClientFlag.C_FIXED_NEWSTYLE), False),
    "options_tls_offered": (lambda: start(tls_available=True), False),
    "options_tls_required": (lambda: start(tls_available=True, tls_required=True), False),
    "options_after_starttls": (_after_starttls, False),
    "options_clear_extension": (lambda: start(clear_extension=True), False),
    "transmission_simple": (lambda: transmission(False, False), False),
    "transmission_structured": (lambda: transmission(True, False, contexts=CTX_ALL), False),
    "transmission_extended": (lambda: transmission(True, True, contexts=CTX_ALL), True),
    "disconnecting": (_disconnecting, False),
}


@pytest.mark.parametrize("state", sorted(STATES))
@FUZZ
@given(data=st.data())
def test_any_state(state: str, data: st.DataObject) -> None:
    tried(f"server.{state}")
    setup, extended = STATES[state]
    conn = setup()
    joined(conn)
    conn.events_received()
    before = conn.state
    pieces = st.one_of(
        st.binary(max_size=64),
        options(),
        requests(extended),
        st.builds(wire.CLIENT_FLAGS.pack, st.integers(0, 2**32 - 1)),
    )
    chunks = data.draw(st.lists(pieces, max_size=8))
    feed(conn, chunks)
    out = joined(conn)
    if before is State.OPTIONS and not conn.export:
        option_replies(out)  # every answer is a well-framed option reply
    if state in ("transmission_structured", "transmission_extended"):
        # Every answer is a well-framed chunk (simple replies carry READ data that only the
        # request says the length of, so they are not checked here).
        parse_replies(out)
