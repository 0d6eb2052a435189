"""Server certificates that follow their files: renewed certificates (cert-manager, a rotated
Kubernetes Secret) are used from the next TLS handshake on, without a restart.

grpc asks :meth:`CertificateReloader.fetch` before each handshake (dynamic credentials); it
answers None (keep the current configuration) unless a file's (mtime, size, inode) changed. A
changed set is loaded only when the key matches the certificate (checked with :mod:`ssl`) and the
files did not change while being read: a half-written rotation keeps the previous certificate
instead of breaking every handshake.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import grpc

log = logging.getLogger("nbdgw.certs")

Stamp = tuple[tuple[int, int, int] | None, ...]


class CertificateError(ValueError):
    """The certificate files cannot be used."""


class CertificateReloader:
    def __init__(
        self,
        cert_file: str | Path,
        key_file: str | Path,
        client_ca_file: str | Path | None = None,
    ) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self.client_ca_file = Path(client_ca_file) if client_ca_file else None
        self.reloads = 0
        self._lock = threading.Lock()
        loaded = self._load()
        if loaded is None:
            raise CertificateError(
                f"cannot use {self.cert_file} and {self.key_file}: unreadable, or the key does"
                " not match the certificate"
            )
        self._stamp, self._config = loaded

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def _paths(self) -> list[Path]:
        paths = [self.cert_file, self.key_file]
        if self.client_ca_file is not None:
            paths.append(self.client_ca_file)
        return paths

    def _stamps(self) -> Stamp:
        out: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            try:
                st = os.stat(path)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(out)

    def _load(self) -> tuple[Stamp, grpc.ServerCertificateConfiguration] | None:
        before = self._stamps()
        try:
            chain = self.cert_file.read_bytes()
            key = self.key_file.read_bytes()
            ca = self.client_ca_file.read_bytes() if self.client_ca_file else None
            # Does the key match the certificate? (grpc would only fail the handshakes.)
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                self.cert_file, self.key_file
            )
            if ca is not None:
                ssl.create_default_context(cadata=ca.decode())
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("certificate files not loaded: %s", exc)
            return None
        if self._stamps() != before:  # changed under us: try again next handshake
            return None
        config = grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)
        return before, config

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate configuration fetcher: a new configuration, or None."""
        with self._lock:
            if self._stamps() == self._stamp:
                return None
            loaded = self._load()
            if loaded is None:
                return None
            self._stamp, self._config = loaded
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.cert_file)
            return self._config

    def credentials(self) -> grpc.ServerCredentials:
        # grpc accepts None from the fetcher ("unchanged"); grpc-stubs does not say so.
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self.fetch)
        return grpc.dynamic_ssl_server_credentials(
            self._config, fetch, require_client_authentication=self.mutual
        )
