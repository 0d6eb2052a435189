"""NBD URIs, as libnbd and qemu write them (doc/uri.md in the NBD repository).

::

    nbd://HOST[:PORT]/EXPORT            TCP, plain text
    nbds://HOST[:PORT]/EXPORT           TCP, TLS required
    nbd+unix:///EXPORT?socket=PATH      Unix socket
    nbds+unix:///EXPORT?socket=PATH     Unix socket, TLS required

The export name is the path without its leading ``/`` (percent-decoded; empty means the default
export). Query parameters other than ``socket`` are kept in ``tls_options`` when they are TLS
settings libnbd knows (``tls-certificates``, ``tls-verify-peer``, ``tls-hostname``,
``tls-psk-file``, ``tls-username``); anything else is an error rather than silently ignored.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from nbdcore._record import Frozen
from nbdcore.constants import NBD_DEFAULT_PORT
from nbdcore.exceptions import URIError

SCHEMES: Final = ("nbd", "nbds", "nbd+unix", "nbds+unix")
TLS_OPTIONS: Final = (
    "tls-certificates",
    "tls-verify-peer",
    "tls-hostname",
    "tls-psk-file",
    "tls-username",
)


class NBDURI(Frozen):
    __slots__ = ("export", "host", "port", "scheme", "socket", "tls_options")
    scheme: Final[str]
    host: Final[str | None]
    port: Final[int | None]
    socket: Final[str | None]
    export: Final[str]
    tls_options: Final[dict[str, str]]

    def __init__(
        self,
        scheme: str,
        host: str | None = None,
        port: int | None = None,
        socket: str | None = None,
        export: str = "",
        tls_options: dict[str, str] | None = None,
    ) -> None:
        self.scheme = scheme
        self.host = host
        self.port = port
        self.socket = socket
        self.export = export
        self.tls_options = {} if tls_options is None else tls_options

    def replace(self, **changes: Any) -> NBDURI:
        """A copy with ``changes`` (field=value), as ``dataclasses.replace``."""
        fields = {name: getattr(self, name) for name in self._field_names}
        return NBDURI(**(fields | changes))

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("nbds")

    @property
    def is_unix(self) -> bool:
        return self.scheme.endswith("+unix")

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) for TCP URIs."""
        if self.is_unix or self.host is None:
            raise URIError(f"{self} is not a TCP URI")
        return self.host, self.port if self.port is not None else NBD_DEFAULT_PORT

    @classmethod
    def parse(cls, text: str) -> NBDURI:
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise URIError(f"invalid NBD URI {text!r}: {exc}") from None
        scheme = parts.scheme.lower()
        if scheme not in SCHEMES:
            raise URIError(
                f"unsupported NBD URI scheme {parts.scheme!r} in {text!r} "
                f"(expected one of {', '.join(SCHEMES)})"
            )
        if parts.fragment:
            raise URIError(f"NBD URI {text!r} has a fragment")
        if parts.username is not None or parts.password is not None:
            raise URIError(f"NBD URI {text!r}: user names are not supported")
        path = parts.path
        if path and not path.startswith("/"):
            raise URIError(f"NBD URI {text!r}: the export must follow a '/'")
        try:
            export = unquote(path[1:], errors="strict") if path else ""
        except UnicodeDecodeError:
            raise URIError(f"NBD URI {text!r}: the export name is not UTF-8") from None
        try:
            query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        except (ValueError, UnicodeDecodeError) as exc:
            raise URIError(f"NBD URI {text!r}: bad query: {exc}") from None
        socket: str | None = None
        tls_options: dict[str, str] = {}
        for key, value in query:
            if key == "socket":
                socket = value
            elif key in TLS_OPTIONS:
                tls_options[key] = value
            else:
                raise URIError(f"NBD URI {text!r}: unknown query parameter {key!r}")
        if tls_options and not scheme.startswith("nbds"):
            # libnbd ignores them on nbd://, which hides mistakes: refuse instead.
            raise URIError(f"NBD URI {text!r}: TLS parameters on a plain-text scheme")
        if "tls-verify-peer" in tls_options:
            _parse_bool(tls_options["tls-verify-peer"], text)
        host = parts.hostname
        if scheme.endswith("+unix"):
            if not socket:
                raise URIError(f"NBD URI {text!r}: nbd+unix needs ?socket=PATH")
            if host or port is not None:
                raise URIError(f"NBD URI {text!r}: nbd+unix takes no host or port")
            host = None
        else:
            if socket is not None:
                raise URIError(f"NBD URI {text!r}: socket= is only for +unix schemes")
            if not host:
                host = "localhost"
        return cls(scheme, host, port, socket, export, tls_options)

    def __str__(self) -> str:
        export = quote(self.export, safe="/:@!$&'()*+,;=-._~")
        if self.is_unix:
            netloc = ""
        else:
            assert self.host is not None
            host = self.host
            try:
                if ipaddress.ip_address(host).version == 6:
                    host = f"[{host}]"
            except ValueError:
                pass
            netloc = host if self.port is None else f"{host}:{self.port}"
        query = []
        if self.socket is not None:
            query.append("socket=" + quote(self.socket, safe="/"))
        for key, value in self.tls_options.items():
            query.append(f"{key}={quote(value, safe='/')}")
        text = f"{self.scheme}://{netloc}/{export}"
        if query:
            text += "?" + "&".join(query)
        return text

    @property
    def verify_peer(self) -> bool:
        return _parse_bool(self.tls_options.get("tls-verify-peer", "true"), str(self))


def _parse_bool(value: str, text: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise URIError(f"NBD URI {text!r}: tls-verify-peer={value!r} is not a boolean")
