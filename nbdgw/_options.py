"""The client's options: where the gateway is, how to authenticate, deadlines and retries;
and what they become for a gRPC channel (shared by both flavours)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from nbdgw.errors import ConfigurationError

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
# A data message holds at most 1 MiB of data plus its columns; leave room above gRPC's 4 MiB
# default so that a gateway configured for more extents per message is still readable.
MAX_RECEIVE_MESSAGE = 64 << 20

Source = str | os.PathLike[str] | bytes


@dataclass(frozen=True, slots=True)
class TLS:
    """TLS to the gateway. ``ca``: the CA bundle to trust (None: the system's roots);
    ``cert`` and ``key``: a client certificate for mutual TLS (together or not at all);
    ``server_name``: the name expected in the gateway's certificate instead of the target's
    host. Each of ``ca``, ``cert``, ``key`` is a path, or the PEM itself as bytes."""

    ca: Source | None = None
    cert: Source | None = None
    key: Source | None = None
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    """How hard the client tries again after UNAVAILABLE (a restarting gateway, a host that
    went away, a dropped connection), RESOURCE_EXHAUSTED with RetryInfo (a limit that
    passes), and the gateway's own DEADLINE_EXCEEDED on streams: ``attempts`` retries in a
    row without progress (0: never retry), waiting ``backoff`` seconds, doubled each time up
    to ``max_backoff``, or longer if the gateway asks (RetryInfo). A stream that makes
    progress starts counting again."""

    attempts: int = 6
    backoff: float = 0.25
    max_backoff: float = 8.0

    def delay(self, attempt: int, asked: float | None) -> float:
        """The wait before retry number ``attempt`` (1-based)."""
        delay = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return max(delay, asked or 0.0)


def _read(source: Source | None, what: str) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        return Path(source).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {source}: {exc.strerror}") from None


def parse_target(text: str) -> tuple[str, bool]:
    """``HOST:PORT``, ``http://HOST:PORT``, ``https://HOST:PORT`` (TLS) or ``unix:PATH`` ->
    (what gRPC dials, whether the scheme asks for TLS); the forms the ``nbdgw`` command takes."""
    if text.startswith("unix:"):
        return text, False
    secure = False
    for scheme, tls in (("http://", False), ("https://", True)):
        if text.startswith(scheme):
            text, secure = text.removeprefix(scheme).rstrip("/"), tls
    host, sep, port = text.rpartition(":")
    if "/" in text or not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"the target must be HOST:PORT (for example {DEFAULT_TARGET}), https://HOST:PORT"
            f" or unix:PATH, not {text!r}"
        )
    return text, secure


@dataclass(frozen=True, slots=True)
class ChannelSpec:
    """What both flavours need to open a channel and send a call."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]


def check_timeout(timeout: float | None) -> float | None:
    """A deadline in seconds, > 0 (a deadline of 0 would fail every call at once), or None."""
    if timeout is not None and not 0 < timeout < float("inf"):
        raise ConfigurationError(f"the timeout must be more than 0 seconds, not {timeout}")
    return timeout


def channel_spec(
    target: str,
    *,
    token: str | None,
    tls: TLS | None,
    options: tuple[tuple[str, Any], ...] = (),
) -> ChannelSpec:
    target, secure = parse_target(target)
    if secure and tls is None:
        tls = TLS()  # https://: the system's CAs
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE),
        # A proxy from the environment must not see the gateway's traffic (or its token).
        ("grpc.enable_http_proxy", 0),
        # Long streams: find a dead gateway within ~40 s (the gateway allows pings every 10 s).
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.primary_user_agent", "nbdgw-python"),
    ]
    credentials = None
    if tls is not None:
        if (tls.cert is None) != (tls.key is None):
            raise ConfigurationError("a client certificate and its key go together")
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(tls.ca, "CA bundle"),
            private_key=_read(tls.key, "private key"),
            certificate_chain=_read(tls.cert, "certificate"),
        )
        if tls.server_name:
            opts.append(("grpc.ssl_target_name_override", tls.server_name))
    opts += options
    metadata: tuple[tuple[str, str], ...] = ()
    if token:
        if token != token.strip() or "\n" in token:
            raise ConfigurationError("the token must not contain spaces or newlines")
        metadata = (("authorization", f"Bearer {token}"),)
    return ChannelSpec(target, credentials, tuple(opts), metadata)
