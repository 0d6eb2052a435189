"""TLS settings for NBD (STARTTLS): client and server ``ssl.SSLContext`` factories.

The certificate directory layout follows qemu and libnbd (GnuTLS x509 credentials): a
``tls-certificates=DIR`` holds ``ca-cert.pem`` and, for client certificates,
``client-cert.pem`` and ``client-key.pem``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Final

from nbdcore._record import Frozen
from nbdcore.exceptions import URIError
from nbdcore.uri import NBDURI

# ssl is imported where a context is made: a plain connection (nbdgw nbd copy without TLS)
# should not pay for it at start-up.
if TYPE_CHECKING:
    import ssl


# In a tls-certificates=DIR, as qemu and libnbd name them.
_CERTDIR_FILES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


class TLSConfig(Frozen):
    __slots__ = ("ca_file", "cert_file", "key_file", "server_hostname", "verify_peer")
    ca_file: Final[str | None]
    cert_file: Final[str | None]
    key_file: Final[str | None]
    verify_peer: Final[bool]
    server_hostname: Final[str | None]

    def __init__(
        self,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        verify_peer: bool = True,
        server_hostname: str | None = None,
    ) -> None:
        self.ca_file = ca_file
        self.cert_file = cert_file
        self.key_file = key_file
        self.verify_peer = verify_peer
        self.server_hostname = server_hostname

    def client_context(self) -> ssl.SSLContext:
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # the spec requires 1.2 support
        if not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if self.cert_file:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx

    @classmethod
    def from_uri(cls, uri: NBDURI) -> TLSConfig:
        """The settings an ``nbds://`` URI asks for."""
        opts = uri.tls_options
        if "tls-psk-file" in opts:
            raise URIError("TLS-PSK (tls-psk-file) is not supported by Python's ssl module")
        ca = cert = key = None
        certdir = opts.get("tls-certificates")
        if certdir:
            ca, cert, key = (os.path.join(certdir, f) for f in _CERTDIR_FILES)
            if not os.path.exists(ca):
                ca = None
            if not (os.path.exists(cert) and os.path.exists(key)):
                cert = key = None
        hostname = opts.get("tls-hostname") or (None if uri.is_unix else uri.host)
        return cls(ca, cert, key, uri.verify_peer, hostname)


def server_context(
    cert_file: str, key_file: str, ca_file: str | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """Context for an NBD server: its certificate, and optionally client-certificate checks."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file:
        ctx.load_verify_locations(ca_file)
    if require_client_cert:
        if not ca_file:
            raise ValueError("require_client_cert needs ca_file")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif ca_file:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx
