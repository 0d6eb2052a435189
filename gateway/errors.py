"""The one place where failures become gRPC statuses (AIP-193).

Every error the gateway returns is a :class:`GatewayError`: a canonical code, a short message for
developers, and a ``google.rpc.Status`` whose details hold an ``ErrorInfo`` (domain
``nbdgw.dev``, a stable reason from ``nbdgw.v1.ErrorReason`` without its prefix, metadata with
every variable of the message) plus the detail that fits: ``BadRequest`` for bad fields,
``ResourceInfo`` for an unknown export or bitmap, ``PreconditionFailure`` for a refused clear,
``RetryInfo`` with UNAVAILABLE.

:func:`from_exception` is the NBD-to-gRPC mapping (grpc-conventions.md, "NBD → gRPC mapping");
nothing else in the gateway decides a status code for an NBD failure.
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from gateway.ledger import ScopeFullError
from nbdcore.constants import Errno, Rep
from nbdcore.exceptions import (
    ConnectionLostError,
    HandshakeError,
    NBDError,
    NBDTimeoutError,
    OptionError,
    ProtocolError,
    RequestError,
    UsageError,
)

DOMAIN = "nbdgw.dev"
EXPORT_TYPE = "nbdgw.dev/Export"
BITMAP_TYPE = "nbdgw.dev/Bitmap"
HEALTH_SERVICE_TYPE = "grpc.health.v1/Service"

# Trailing metadata keys that repeat a stream's resume position outside the status details, for
# clients that cannot decode grpc-status-details-bin (grpc-js).
RESUME_OFFSET_KEY = "nbdgw-resume-offset"
RESUME_TOKEN_KEY = "nbdgw-resume-token"

# What an error echoes of a request is capped: a 10 KB export name made a 30 KB trailer (the
# message is percent-encoded), over the client's metadata limit, so that the client saw
# RESOURCE_EXHAUSTED instead of NOT_FOUND. The message, and every string in the details.
MAX_MESSAGE_CHARS = 400
MAX_DETAIL_CHARS = 200


class Reason:
    """ErrorInfo reasons: ``nbdgw.v1.ErrorReason`` names without the ``ERROR_REASON_`` prefix."""

    INVALID_FIELD = "INVALID_FIELD"
    EXPORT_NOT_FOUND = "EXPORT_NOT_FOUND"
    BITMAP_NOT_FOUND = "BITMAP_NOT_FOUND"
    RANGE_PAST_END = "RANGE_PAST_END"
    INVALID_RESUME_TOKEN = "INVALID_RESUME_TOKEN"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    CLEAR_NOT_SUPPORTED = "CLEAR_NOT_SUPPORTED"
    HOST_UNAVAILABLE = "HOST_UNAVAILABLE"
    GATEWAY_SHUTTING_DOWN = "GATEWAY_SHUTTING_DOWN"
    NBD_OPTION_FAILED = "NBD_OPTION_FAILED"
    NBD_REQUEST_FAILED = "NBD_REQUEST_FAILED"
    NBD_PROTOCOL_ERROR = "NBD_PROTOCOL_ERROR"
    READ_ONLY = "READ_ONLY"
    INTERNAL = "INTERNAL"
    # SetExportGeneration on an export whose bitmaps clear at the source (no ledger).
    GENERATIONS_NOT_SUPPORTED = "GENERATIONS_NOT_SUPPORTED"
    BITMAP_MANAGEMENT_NOT_SUPPORTED = "BITMAP_MANAGEMENT_NOT_SUPPORTED"
    # A health check of a name that is neither "", the BitmapService nor exports/{export}.
    HEALTH_SERVICE_NOT_FOUND = "HEALTH_SERVICE_NOT_FOUND"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    # Raised by gateway.security.access and gateway.security.limits (they name them themselves),
    # and for a full ledger scope (ledger_full).
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    # ClearRange named a generation that is not the export's current one (gateway.ledger).
    GENERATION_MISMATCH = "GENERATION_MISMATCH"
    # ClearRange on a writable export without a clear_token (nor unconditional).
    CLEAR_TOKEN_REQUIRED = "CLEAR_TOKEN_REQUIRED"
    CLEAR_TOKEN_INVALID = "CLEAR_TOKEN_INVALID"
    # Exports of running QEMU VMs (gateway.hosts.qmp).
    BITMAP_EXISTS = "BITMAP_EXISTS"
    BITMAP_BUSY = "BITMAP_BUSY"
    HOST_COMMAND_FAILED = "HOST_COMMAND_FAILED"


@dataclass(frozen=True)
class _Status(grpc.Status):
    """A concrete ``grpc.Status`` (grpc only defines the interface)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


@dataclass
class GatewayError(Exception):
    """A failure with its gRPC status. Raise it anywhere below the servicer."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    details: list[Message] = field(default_factory=list)
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.message = capped(self.message, MAX_MESSAGE_CHARS)
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"

    def with_resume(self, offset: int, token: str) -> GatewayError:
        """Say where a stream ending with this error resumes (ErrorInfo metadata, trailers)."""
        self.metadata["resume_offset"] = str(offset)
        self.metadata["resume_token"] = token
        self.trailers += [(RESUME_OFFSET_KEY, str(offset)), (RESUME_TOKEN_KEY, token)]
        return self

    def status_proto(self) -> status_pb2.Status:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        info.metadata.update({k: capped(v, MAX_DETAIL_CHARS) for k, v in self.metadata.items()})
        anys = []
        for detail in [info, *self.details]:
            _cap_strings(detail)
            packed = any_pb2.Any()
            packed.Pack(detail)
            anys.append(packed)
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=anys)

    def grpc_status(self) -> grpc.Status:
        proto = self.status_proto()
        # Same trailer as grpc_status.rpc_status.to_status, plus our own resume keys.
        trailers: tuple[tuple[str, str | bytes], ...] = (
            ("grpc-status-details-bin", proto.SerializeToString()),
            *self.trailers,
        )
        return _Status(self.code, self.message, trailers)


def capped(text: str, limit: int) -> str:
    """``text``, or its first ``limit`` characters and how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def _cap_strings(message: Message) -> None:
    """Cap every string field of ``message`` (and of the messages inside it), in place."""
    for fd, value in message.ListFields():
        if fd.type == fd.TYPE_STRING:
            if fd.is_repeated:
                value[:] = [capped(v, MAX_DETAIL_CHARS) for v in value]
            else:
                setattr(message, fd.name, capped(value, MAX_DETAIL_CHARS))
        elif fd.type == fd.TYPE_MESSAGE:
            if fd.message_type is None or fd.message_type.GetOptions().map_entry:
                continue  # ErrorInfo.metadata: capped where it is filled
            for item in value if fd.is_repeated else [value]:
                _cap_strings(item)


# --- constructors, one per reason ---------------------------------------------------------


def precondition_failed(
    reason: str, message: str, metadata: dict[str, str], *, kind: str, subject: str, why: str
) -> GatewayError:
    """FAILED_PRECONDITION with one PreconditionFailure violation (``kind`` is its type)."""
    violation = error_details_pb2.PreconditionFailure.Violation(
        type=kind, subject=subject, description=why
    )
    return GatewayError(
        grpc.StatusCode.FAILED_PRECONDITION,
        reason,
        message,
        metadata,
        [error_details_pb2.PreconditionFailure(violations=[violation])],
    )


def resource_error(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    metadata: dict[str, str],
    *,
    resource_type: str,
    resource_name: str,
    description: str,
) -> GatewayError:
    """A status about one named resource (NOT_FOUND, ALREADY_EXISTS...) with its ResourceInfo."""
    info = error_details_pb2.ResourceInfo(
        resource_type=resource_type, resource_name=resource_name, description=description
    )
    return GatewayError(code, reason, message, metadata, [info])


def invalid_field(name: str, description: str) -> GatewayError:
    return invalid_fields([(name, description)])


def invalid_fields(violations: Sequence[tuple[str, str]]) -> GatewayError:
    bad = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations
        ]
    )
    message = "; ".join(f"{f}: {d}" for f, d in violations)
    return GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_FIELD,
        f"invalid request: {message}",
        {"fields": ",".join(f for f, _ in violations)},
        [bad],
    )


def field_violations(err: GatewayError) -> list[tuple[str, str]]:
    """The (field, description) pairs of ``err``'s BadRequest details: the inverse of
    :func:`invalid_fields`, so that a request's checks can gather several errors into one."""
    out = []
    for detail in err.details:
        if isinstance(detail, error_details_pb2.BadRequest):
            out += [(v.field, v.description) for v in detail.field_violations]
    return out


def export_not_found(export: str) -> GatewayError:
    return resource_error(
        grpc.StatusCode.NOT_FOUND,
        Reason.EXPORT_NOT_FOUND,
        f"export {export!r} not found",
        {"export": export},
        resource_type=EXPORT_TYPE,
        resource_name=f"exports/{export}",
        description="no export of this name is configured in the gateway",
    )


def health_service_not_found(service: str, *, exports: bool = True) -> GatewayError:
    """``exports``: whether this port answers ``exports/{export}`` (the plaintext health port
    answers only the overall statuses)."""
    names = "'' (liveness), 'nbdgw.v1.BitmapService' (readiness)"
    names += " or 'exports/{export}'" if exports else " (this port has no per-export status)"
    return resource_error(
        grpc.StatusCode.NOT_FOUND,
        Reason.HEALTH_SERVICE_NOT_FOUND,
        f"no health status for {service!r}: ask for {names}",
        {"service": service},
        resource_type=HEALTH_SERVICE_TYPE,
        resource_name=service,
        description="the gateway reports the health of no service of this name",
    )


def bitmap_not_found(export: str, context: str, available: Sequence[str] = ()) -> GatewayError:
    offered = ", ".join(available) if available else "none"
    return resource_error(
        grpc.StatusCode.NOT_FOUND,
        Reason.BITMAP_NOT_FOUND,
        f"export {export!r} has no metadata context {context!r} (offered: {offered})",
        {"export": export, "context": context, "offered": offered},
        resource_type=BITMAP_TYPE,
        resource_name=f"exports/{export}/bitmaps/{context}",
        description="the export's NBD host does not offer this metadata context",
    )


def range_past_end(field_name: str, value: int, size: int, what: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.OUT_OF_RANGE,
        Reason.RANGE_PAST_END,
        f"{what} {value} is past the end of the export (size {size})",
        {"field": field_name, "value": str(value), "size": str(size)},
        [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=field_name, description=f"{what} {value} > export size {size}"
                    )
                ]
            )
        ],
    )


def invalid_token(kind: str, field_name: str, why: str) -> GatewayError:
    reason = {
        "resume": Reason.INVALID_RESUME_TOKEN,
        "clear": Reason.CLEAR_TOKEN_INVALID,
    }.get(kind, Reason.INVALID_PAGE_TOKEN)
    return GatewayError(
        grpc.StatusCode.INVALID_ARGUMENT,
        reason,
        f"invalid {field_name}: {why}",
        {"field": field_name},
        [
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field_name, description=why)
                ]
            )
        ],
    )


def clear_not_supported(export: str, context: str, why: str) -> GatewayError:
    return precondition_failed(
        Reason.CLEAR_NOT_SUPPORTED,
        f"cannot clear {context!r} of export {export!r}: {why}",
        {"export": export, "context": context},
        kind="CLEAR_MODE",
        subject=f"exports/{export}/bitmaps/{context}",
        why=why,
    )


def generation_mismatch(export: str, context: str, given: str, current: str) -> GatewayError:
    why = (
        f"the clear names generation {given!r} but the export's current generation is"
        f" {current!r}: data copied from another point in time cannot be acknowledged"
    )
    return precondition_failed(
        Reason.GENERATION_MISMATCH,
        f"cannot clear {context!r} of export {export!r}: {why}",
        {"export": export, "context": context, "generation": given, "current_generation": current},
        kind="GENERATION",
        subject=f"exports/{export}",
        why=why,
    )


def generation_required(export: str, context: str, current: str) -> GatewayError:
    why = (
        f"the export's bitmaps are cleared through the ledger, under its current generation"
        f" {current!r}: name the generation the range was copied from in 'generation' (the"
        " generation can change between the copy and the clear)"
    )
    return precondition_failed(
        Reason.GENERATION_MISMATCH,
        f"cannot clear {context!r} of export {export!r}: {why}",
        {"export": export, "context": context, "generation": "", "current_generation": current},
        kind="GENERATION",
        subject=f"exports/{export}",
        why=why,
    )


def clear_token_required(export: str, context: str, why: str) -> GatewayError:
    return precondition_failed(
        Reason.CLEAR_TOKEN_REQUIRED,
        f"cannot clear {context!r} of export {export!r}: {why}",
        {"export": export, "context": context},
        kind="CLEAR_TOKEN",
        subject=f"exports/{export}/bitmaps/{context}",
        why=why,
    )


def read_only(export: str, context: str, why: str) -> GatewayError:
    return precondition_failed(
        Reason.READ_ONLY,
        f"cannot clear {context!r} of export {export!r}: {why}",
        {"export": export, "context": context},
        kind="READ_ONLY",
        subject=f"exports/{export}",
        why=why,
    )


def generations_not_supported(export: str) -> GatewayError:
    why = (
        "the export's bitmaps clear at the source (CLEAR_MODE_AT_SOURCE): a generation scopes"
        " only the ledger of exports whose host cannot clear"
    )
    return precondition_failed(
        Reason.GENERATIONS_NOT_SUPPORTED,
        f"export {export!r} has no generation: {why}",
        {"export": export},
        kind="CLEAR_MODE",
        subject=f"exports/{export}",
        why=why,
    )


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return error_details_pb2.RetryInfo(retry_delay=delay)


def host_unavailable(export: str, host: str, cause: str, retry_after: float) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.HOST_UNAVAILABLE,
        f"NBD host {host} of export {export!r} is unavailable: {cause}",
        {"export": export, "host": host, "cause": cause},
        [_retry_info(retry_after)],
    )


def shutting_down(retry_after: float = 1.0) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.GATEWAY_SHUTTING_DOWN,
        "the gateway is shutting down; retry (and resume) on another instance or later",
        {},
        [_retry_info(retry_after)],
    )


def unauthenticated(why: str) -> GatewayError:
    return GatewayError(
        grpc.StatusCode.UNAUTHENTICATED,
        Reason.UNAUTHENTICATED,
        f"{why}: send the metadata 'authorization: Bearer TOKEN'",
        {},
    )


def ledger_full(exc: ScopeFullError) -> GatewayError:
    """A clear the ledger refused because its scope holds ``max_intervals`` intervals."""
    scope = exc.scope
    subject = f"exports/{scope.export}/bitmaps/{scope.bitmap}"
    return GatewayError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RESOURCE_EXHAUSTED,
        exc.strerror or str(exc),
        {
            "export": scope.export,
            "context": scope.bitmap,
            "generation": scope.generation,
            "limit": str(exc.limit),
            "intervals": str(exc.intervals),
        },
        [
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=subject,
                        description=f"at most {exc.limit} disjoint cleared ranges per generation"
                        " (ledger_max_intervals)",
                    )
                ]
            )
        ],
    )


def internal(message: str) -> GatewayError:
    return GatewayError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, message)


# --- the NBD mapping ------------------------------------------------------------------------

# NBD errno -> gRPC code. Anything not listed (EIO and unknown values) is INTERNAL.
_ERRNO_CODES: Mapping[Errno, grpc.StatusCode] = {
    Errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
    Errno.EINVAL: grpc.StatusCode.INVALID_ARGUMENT,
    Errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Errno.ENOMEM: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Errno.EOVERFLOW: grpc.StatusCode.OUT_OF_RANGE,
    Errno.ENOTSUP: grpc.StatusCode.FAILED_PRECONDITION,
    Errno.ESHUTDOWN: grpc.StatusCode.UNAVAILABLE,
}

# NBD_REP_ERR_* -> gRPC code; anything else is FAILED_PRECONDITION (the host refused).
_REP_CODES: Mapping[int, grpc.StatusCode] = {
    Rep.ERR_UNKNOWN: grpc.StatusCode.NOT_FOUND,
    Rep.ERR_POLICY: grpc.StatusCode.PERMISSION_DENIED,
    Rep.ERR_INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Rep.ERR_SHUTDOWN: grpc.StatusCode.UNAVAILABLE,
    Rep.ERR_UNSUP: grpc.StatusCode.FAILED_PRECONDITION,
    Rep.ERR_TLS_REQD: grpc.StatusCode.FAILED_PRECONDITION,
}


def is_connection_failure(exc: BaseException) -> bool:
    """True for failures that say the host (or the path to it) is down, not that it refused."""
    if isinstance(exc, OptionError):
        return _REP_CODES.get(exc.code) == grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, RequestError):
        return exc.errno == Errno.ESHUTDOWN
    return isinstance(
        exc, ConnectionLostError | NBDTimeoutError | ConnectionError | TimeoutError
    ) or (isinstance(exc, OSError) and exc.errno in _DOWN_ERRNOS)


_DOWN_ERRNOS = {
    errno_mod.ECONNREFUSED,
    errno_mod.ECONNRESET,
    errno_mod.ENOENT,  # unix socket path gone: the host is not running
    errno_mod.EHOSTUNREACH,
    errno_mod.ENETUNREACH,
    errno_mod.ETIMEDOUT,
    errno_mod.EPIPE,
}


def from_exception(
    exc: BaseException, *, export: str, host: str = "", retry_after: float = 1.0
) -> GatewayError:
    """Map any failure met while serving ``export`` to its gRPC status."""
    if isinstance(exc, GatewayError):
        return exc
    if is_connection_failure(exc):
        return host_unavailable(export, host, str(exc) or type(exc).__name__, retry_after)
    if isinstance(exc, OptionError):
        code = _REP_CODES.get(exc.code, grpc.StatusCode.FAILED_PRECONDITION)
        try:
            rep = Rep(exc.code).name
        except ValueError:
            rep = str(exc.code)
        err = GatewayError(
            code,
            Reason.NBD_OPTION_FAILED,
            f"NBD host {host} refused export {export!r}: {exc}",
            {"export": export, "host": host, "nbd_reply": rep},
        )
        if code == grpc.StatusCode.NOT_FOUND:
            err.details.append(
                error_details_pb2.ResourceInfo(
                    resource_type=EXPORT_TYPE,
                    resource_name=f"exports/{export}",
                    description=f"the NBD host {host} does not know this export",
                )
            )
        return err
    if isinstance(exc, RequestError):
        return GatewayError(
            _ERRNO_CODES.get(exc.errno, grpc.StatusCode.INTERNAL),
            Reason.NBD_REQUEST_FAILED,
            f"NBD request on export {export!r} failed: {exc}",
            {"export": export, "host": host, "errno": exc.errno.name},
        )
    if isinstance(exc, ProtocolError | HandshakeError):
        return GatewayError(
            grpc.StatusCode.INTERNAL,
            Reason.NBD_PROTOCOL_ERROR,
            f"NBD host {host} of export {export!r}: {exc}",
            {"export": export, "host": host},
        )
    if isinstance(exc, UsageError):
        # A request the gateway let through but nbdcore refused: the gateway's bug or a
        # feature the export lacks; either way the request cannot succeed as it stands.
        return GatewayError(
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.NBD_REQUEST_FAILED,
            f"export {export!r}: {exc}",
            {"export": export, "host": host},
        )
    if isinstance(exc, ScopeFullError):
        return ledger_full(exc)
    if isinstance(exc, OSError):
        code = {
            errno_mod.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
            errno_mod.EPERM: grpc.StatusCode.PERMISSION_DENIED,
            errno_mod.EACCES: grpc.StatusCode.PERMISSION_DENIED,
            errno_mod.EROFS: grpc.StatusCode.FAILED_PRECONDITION,
        }.get(exc.errno or 0, grpc.StatusCode.INTERNAL)
        name = errno_mod.errorcode.get(exc.errno or 0, str(exc.errno))
        return GatewayError(
            code,
            Reason.NBD_REQUEST_FAILED,
            f"storage of export {export!r} failed: {exc}",
            {"export": export, "errno": name},
        )
    if isinstance(exc, NBDError):
        return internal(f"export {export!r}: {exc}")
    return internal(f"export {export!r}: unexpected {type(exc).__name__}: {exc}")


def bitmap_management_not_supported(export: str, host_kind: str) -> GatewayError:
    why = (
        f"the gateway adds and removes bitmaps only on qmp and libvirt hosts; this export's host"
        f" is {host_kind!r}, whose bitmaps are its own configuration"
    )
    return precondition_failed(
        Reason.BITMAP_MANAGEMENT_NOT_SUPPORTED,
        f"export {export!r} cannot add or remove bitmaps: {why}",
        {"export": export, "host_kind": host_kind},
        kind="HOST_KIND",
        subject=f"exports/{export}",
        why=why,
    )


def bitmap_busy(export: str, bitmap: str, why: str) -> GatewayError:
    return precondition_failed(
        Reason.BITMAP_BUSY,
        f"bitmap {bitmap!r} of export {export!r} is busy: {why}",
        {"export": export, "bitmap": bitmap},
        kind="BITMAP_BUSY",
        subject=f"exports/{export}",
        why=why,
    )
