"""The exceptions of the nbdgw client, caught by meaning rather than by gRPC status code.

::

    NbdgwError                    everything this library raises
     ├── ConfigurationError       a local mistake in the client's options (also a ValueError)
     ├── StreamError              the gateway broke a stream's promise (a gap, a repeat, data of
     │                            the wrong size); never retried, so nothing is consumed twice
     └── CallError                the gateway answered a call with an error status
          ├── InvalidArgument     INVALID_ARGUMENT: ``field_violations`` says which fields
          │    └── ClearTokenInvalid    a clear token of another export or bitmap, or malformed
          ├── NotFound            NOT_FOUND: ``resource_type``, ``resource_name``
          │    ├── ExportNotFound, BitmapNotFound, SnapshotNotFound
          ├── AlreadyExists       ALREADY_EXISTS (a snapshot id in use)
          ├── OutOfRange          OUT_OF_RANGE: a range past the end of the export
          ├── FailedPrecondition  FAILED_PRECONDITION: ``violations``
          │    ├── GenerationMismatch   ``generation``, ``current_generation``
          │    ├── ClearNotSupported, GenerationsNotSupported, SnapshotsNotSupported
      │    ├── BitmapManagementNotSupported   AddBitmap/RemoveBitmap off qmp/libvirt
          │    ├── BitmapManagementNotSupported   AddBitmap/RemoveBitmap off qmp/libvirt
          │    ├── ClearTokenRequired   a clear of a writable export without a clear token
          │    └── ReadOnly
          ├── Unavailable         UNAVAILABLE (host or gateway down): ``retry_after`` and, for a
          │                       stream, ``resume_offset`` / ``resume_token``
          ├── DeadlineExceeded    DEADLINE_EXCEEDED (the client's deadline or the gateway's)
          ├── ResourceExhausted   RESOURCE_EXHAUSTED (a per-caller limit): ``retry_after``
          ├── PermissionDenied    PERMISSION_DENIED (the access policy)
          ├── Unauthenticated     UNAUTHENTICATED (no token or a wrong one, no client cert)
          ├── Cancelled           CANCELLED
          └── Internal            INTERNAL, UNKNOWN, UNIMPLEMENTED, DATA_LOSS, ABORTED

Every :class:`CallError` carries the status code's name (``code``), the gateway's message,
the ``google.rpc.ErrorInfo`` reason and metadata (``reason``, ``metadata``) and every decoded
``google.rpc.Status`` detail (``details``: ErrorInfo, BadRequest, ResourceInfo,
PreconditionFailure, RetryInfo... as protobuf messages). The class is chosen by the status
code, and refined by the ErrorInfo reason (``GENERATION_MISMATCH`` -> GenerationMismatch).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "AlreadyExists",
    "BitmapManagementNotSupported",
    "BitmapNotFound",
    "CallError",
    "Cancelled",
    "ClearNotSupported",
    "ClearTokenInvalid",
    "ClearTokenRequired",
    "ConfigurationError",
    "DeadlineExceeded",
    "ExportNotFound",
    "FailedPrecondition",
    "FieldViolation",
    "GenerationMismatch",
    "GenerationsNotSupported",
    "Internal",
    "InvalidArgument",
    "NbdgwError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "PreconditionViolation",
    "ReadOnly",
    "ResourceExhausted",
    "SnapshotNotFound",
    "SnapshotsNotSupported",
    "StreamError",
    "Unauthenticated",
    "Unavailable",
]


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad request field (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class PreconditionViolation:
    """One unmet precondition (``google.rpc.PreconditionFailure.Violation``)."""

    type: str
    subject: str
    description: str


class NbdgwError(Exception):
    """The root of every exception this library raises."""


class ConfigurationError(NbdgwError, ValueError):
    """The client's own options are wrong (a malformed target, a key without a certificate,
    an unreadable file); nothing was sent."""


class StreamError(NbdgwError):
    """A stream broke its promise: a message that does not start where the previous one
    ended, or data that does not match its extents. Not retried: the consumer would otherwise
    see a gap or a repeat."""


class DataCorrupted(StreamError):
    """A message's data does not match its CRC32C (``data_crc32c``): it was corrupted between
    the gateway and here. Nothing of it should be stored; ``offset`` and ``next_offset`` name
    the range, which a resumed stream delivers again."""

    def __init__(self, message: str, offset: int, next_offset: int) -> None:
        super().__init__(message)
        self.offset = offset
        self.next_offset = next_offset


class DigestMismatch(DataCorrupted):
    """The digest of what a stream delivered, computed here, is not the gateway's: every
    message passed its CRC32C, but something in ``[offset, next_offset)``, the whole range of
    the stream, differs. Unlike a message's :class:`DataCorrupted`, the data was already
    handed out: discard everything stored from the stream and read the range again."""


class CallError(NbdgwError):
    """The gateway (or gRPC on its behalf) ended a call with an error status."""

    #: The gRPC status code names this class stands for (the first is its own).
    codes: ClassVar[tuple[str, ...]] = ()
    #: The ErrorInfo reasons this class stands for (subclasses refined by reason).
    reasons: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        message: str,
        *,
        code: str = "UNKNOWN",
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        details: tuple[Any, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.details = details
        #: How many attempts were made before this error was raised (retries included).
        self.attempts = 1

    def __str__(self) -> str:
        """One line: ``CODE: message [REASON]``, and the first bad field if the message does
        not name it (the form the ``nbdgw`` command prints)."""
        text = f"{self.code}: {self.message or 'no message'}"
        if self.reason:
            text += f" [{self.reason}]"
        for v in self.field_violations[:1]:
            if v.field and v.field not in text:
                text += f" (field {v.field})"
        return text

    def detail(self, kind: type[Any]) -> Any | None:
        """The first decoded detail of this protobuf type, or None."""
        return next((d for d in self.details if isinstance(d, kind)), None)

    def _details_named(self, name: str) -> list[Any]:
        return [d for d in self.details if type(d).DESCRIPTOR.full_name == name]

    @property
    def field_violations(self) -> tuple[FieldViolation, ...]:
        """The bad fields the gateway named (BadRequest), in its order."""
        return tuple(
            FieldViolation(v.field, v.description)
            for d in self._details_named("google.rpc.BadRequest")
            for v in d.field_violations
        )

    @property
    def violations(self) -> tuple[PreconditionViolation, ...]:
        """The unmet preconditions the gateway named (PreconditionFailure)."""
        return tuple(
            PreconditionViolation(v.type, v.subject, v.description)
            for d in self._details_named("google.rpc.PreconditionFailure")
            for v in d.violations
        )

    @property
    def retry_after(self) -> float | None:
        """How long the gateway asked to wait before trying again (RetryInfo), if it did."""
        for d in self._details_named("google.rpc.RetryInfo"):
            return float(d.retry_delay.ToTimedelta().total_seconds())
        return None

    @property
    def resource_type(self) -> str:
        for d in self._details_named("google.rpc.ResourceInfo"):
            return str(d.resource_type)
        return ""

    @property
    def resource_name(self) -> str:
        for d in self._details_named("google.rpc.ResourceInfo"):
            return str(d.resource_name)
        return ""


class InvalidArgument(CallError):
    codes = ("INVALID_ARGUMENT",)


class ClearTokenInvalid(InvalidArgument):
    """ClearRange with a clear token that is malformed or was read from another export or
    bitmap."""

    reasons = ("CLEAR_TOKEN_INVALID",)


class NotFound(CallError):
    codes = ("NOT_FOUND",)


class ExportNotFound(NotFound):
    reasons = ("EXPORT_NOT_FOUND",)


class BitmapNotFound(NotFound):
    reasons = ("BITMAP_NOT_FOUND",)


class SnapshotNotFound(NotFound):
    reasons = ("SNAPSHOT_NOT_FOUND",)


class AlreadyExists(CallError):
    codes = ("ALREADY_EXISTS",)


class OutOfRange(CallError):
    codes = ("OUT_OF_RANGE",)


class FailedPrecondition(CallError):
    codes = ("FAILED_PRECONDITION",)


class GenerationMismatch(FailedPrecondition):
    """ClearRange named a generation that is not the export's current one."""

    reasons = ("GENERATION_MISMATCH",)

    @property
    def generation(self) -> str:
        return self.metadata.get("generation", "")

    @property
    def current_generation(self) -> str:
        return self.metadata.get("current_generation", "")


class ClearNotSupported(FailedPrecondition):
    reasons = ("CLEAR_NOT_SUPPORTED",)


class BitmapManagementNotSupported(FailedPrecondition):
    """AddBitmap/RemoveBitmap on an export whose host's bitmaps the gateway does not manage
    (only qmp and libvirt hosts add and remove bitmaps)."""

    reasons = ("BITMAP_MANAGEMENT_NOT_SUPPORTED",)


class ClearTokenRequired(FailedPrecondition):
    """ClearRange of a writable export without the ``clear_token`` of the stream that read the
    range (a write after the read would be cleared with it): pass the token of the batch that
    carried the range, or ``unconditional=True`` when nothing writes the export."""

    reasons = ("CLEAR_TOKEN_REQUIRED",)


class GenerationsNotSupported(FailedPrecondition):
    """SetExportGeneration on an export whose bitmaps clear at the source."""

    reasons = ("GENERATIONS_NOT_SUPPORTED",)


class SnapshotsNotSupported(FailedPrecondition):
    reasons = ("SNAPSHOTS_NOT_SUPPORTED",)


class ReadOnly(FailedPrecondition):
    reasons = ("READ_ONLY",)


class Unavailable(CallError):
    """The export's host or the gateway is unreachable or going away; worth retrying."""

    codes = ("UNAVAILABLE",)

    @property
    def resume_offset(self) -> int | None:
        """Where an interrupted stream can resume (ErrorInfo metadata), if it said."""
        try:
            return int(self.metadata["resume_offset"])
        except (KeyError, ValueError):
            return None

    @property
    def resume_token(self) -> str:
        return self.metadata.get("resume_token", "")


class DeadlineExceeded(CallError):
    codes = ("DEADLINE_EXCEEDED",)


class ResourceExhausted(CallError):
    codes = ("RESOURCE_EXHAUSTED",)


class PermissionDenied(CallError):
    codes = ("PERMISSION_DENIED",)


class Unauthenticated(CallError):
    codes = ("UNAUTHENTICATED",)


class Cancelled(CallError):
    codes = ("CANCELLED",)


class Internal(CallError):
    codes = ("INTERNAL", "UNKNOWN", "UNIMPLEMENTED", "DATA_LOSS", "ABORTED")


def _table() -> tuple[dict[str, type[CallError]], dict[tuple[str, str], type[CallError]]]:
    by_code: dict[str, type[CallError]] = {}
    by_reason: dict[tuple[str, str], type[CallError]] = {}
    pending: list[type[CallError]] = list(CallError.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        for code in cls.__dict__.get("codes", ()):
            by_code[code] = cls
        for reason in cls.__dict__.get("reasons", ()):
            by_reason[(cls.codes[0], reason)] = cls  # codes: inherited from its base
    return by_code, by_reason


_BY_CODE, _BY_REASON = _table()


def error_class(code: str, reason: str = "") -> type[CallError]:
    """The exception class for a status code name and an ErrorInfo reason."""
    return _BY_REASON.get((code, reason)) or _BY_CODE.get(code, Internal)
