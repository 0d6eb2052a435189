"""The one exception tree of nbdcore.

::

    NBDError                      root of everything nbdcore raises on purpose
    ├── UsageError                local: the caller misused the API (bad range, closed
    │                             connection, a feature the export does not offer)
    ├── ProtocolError             a peer broke the protocol; ``side`` says which one
    │   ├── ServerProtocolError   the server did (bad magic, bad chunk, unknown cookie...)
    │   └── ClientProtocolError   the client did (seen by our server)
    ├── HandshakeError            negotiation could not reach transmission
    │   ├── UnsupportedServerError oldstyle or non-fixed-newstyle server
    │   └── OptionError           the server answered an option with NBD_REP_ERR_*;
    │                             ``code`` holds the reply type, ``message`` its text
    ├── RequestError              a command failed with an errno (``errno`` holds it)
    ├── ConnectionLostError       EOF or a socket error in the middle of something
    ├── NBDTimeoutError           no answer in time (also a ``TimeoutError``)
    └── URIError                  an NBD URI could not be parsed (also a ``ValueError``)

Remote errors never surface as ``struct.error``, ``IndexError`` or ``UnicodeDecodeError``:
parsers convert them to ProtocolError at the boundary.
"""

from __future__ import annotations

from typing import Literal

from nbdcore.constants import Errno, Rep

Side = Literal["client", "server"]


class NBDError(Exception):
    """Root of every error nbdcore raises on purpose."""


class UsageError(NBDError):
    """The caller misused the API: a local mistake, not the peer's."""


class ProtocolError(NBDError):
    """A peer broke the NBD protocol. ``side`` is the side that broke it."""

    side: Side = "server"

    def __init__(self, message: str) -> None:
        super().__init__(f"{self.side} protocol violation: {message}")
        self.detail = message

    def __reduce__(self) -> tuple[type[ProtocolError], tuple[str]]:
        # Pickle (multiprocessing, a process pool) rebuilds an exception from its args, which
        # here hold the formatted text, not what __init__ takes.
        return type(self), (self.detail,)


class ServerProtocolError(ProtocolError):
    side: Side = "server"


class ClientProtocolError(ProtocolError):
    side: Side = "client"


class HandshakeError(NBDError):
    """Negotiation failed before transmission."""


class UnsupportedServerError(HandshakeError):
    """The server speaks a dialect nbdcore does not (oldstyle, non-fixed newstyle)."""


class OptionError(HandshakeError):
    """The server answered an option with an error reply (NBD_REP_ERR_*)."""

    def __init__(self, option: int, code: int, message: str = "") -> None:
        try:
            name = Rep(code).name
        except ValueError:
            name = f"ERR_{code & ~(1 << 31)}"
        text = f"option {option_name(option)} failed: {name}"
        if message:
            text += f": {message}"
        super().__init__(text)
        self.option = option
        self.code = code
        self.server_message = message

    def __reduce__(self) -> tuple[type[OptionError], tuple[int, int, str]]:
        return type(self), (self.option, self.code, self.server_message)


class RequestError(NBDError):
    """A transmission command failed; ``errno`` is the NBD error value."""

    def __init__(self, errno: int, message: str = "", offset: int | None = None) -> None:
        self.errno = Errno.from_wire(errno)
        self.raw_errno = errno
        self.server_message = message
        self.offset = offset
        text = f"request failed: {self.errno.name}"
        if offset is not None:
            text += f" at offset {offset}"
        if message:
            text += f": {message}"
        super().__init__(text)

    def __reduce__(self) -> tuple[type[RequestError], tuple[int, str, int | None]]:
        return type(self), (self.raw_errno, self.server_message, self.offset)


class ConnectionLostError(NBDError):
    """The connection ended (EOF, reset) while something was still expected."""


class NBDTimeoutError(NBDError, TimeoutError):
    """No answer within the configured time."""


class URIError(NBDError, ValueError):
    """An NBD URI could not be parsed or names an unsupported feature."""


def option_name(option: int) -> str:
    from nbdcore.constants import Opt

    try:
        return "NBD_OPT_" + Opt(option).name
    except ValueError:
        return f"option {option}"


def os_reason(exc: OSError) -> str:
    """What an OSError means, without its ``[Errno N]`` (asyncio's "Connect call failed
    (host, port)" becomes the errno's own words, "Connection refused")."""
    import os

    return os.strerror(exc.errno) if exc.errno else str(exc)
