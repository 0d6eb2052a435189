"""Who may call the gateway, and what for: authentication, authorization and per-call limits,
as one grpc.aio server interceptor.

Authentication (:class:`Authenticator`):

- a bearer token in the metadata ``authorization: Bearer TOKEN``, looked up in a token file
  (:class:`TokenFile`: lines ``IDENTITY TOKEN``; a line with a token alone is identity
  ``default``). The file is re-read when it changes (a rotated Kubernetes Secret). The lookup
  compares SHA-256 digests of the token with every entry in constant time, so neither timing nor
  an early exit tells how much of a guess was right;
- or, under mutual TLS, the verified client certificate: its subject common name (or its first
  subject alternative name). A token, when sent, wins; a wrong token fails even with a good
  certificate (fail closed).

Authorization (:class:`Policy`): identity -> export name globs x operations (``list``,
``extents``, ``data``, ``clear``, ``snapshot``). Without a policy every authenticated identity may
do everything. A denial is PERMISSION_DENIED and names only what the caller asked for: it is
decided before the servicer looks the export up, so asking for an export that does not exist and
for one that exists but is not yours get the same answer. ListExports lists only the caller's
exports (the interceptor pages over the visible ones itself).

gRPC interceptors see only the method name and metadata, not the request nor the peer's
certificate; so :class:`AccessInterceptor` wraps the method handler: the wrapper authenticates
with the call's context, reads the export from the request, authorizes, takes the limits
(:mod:`gateway.security.limits`), then runs the servicer's own behaviour. Every wrapper runs
request-streaming (:func:`receiving`), so that a call counts from its headers on and its
request message has a deadline. Health
(``grpc.health.v1``) stays open to everyone; everything else, reflection included, needs an
identity.
"""

from __future__ import annotations

import contextvars
import fnmatch
import hashlib
import hmac
import inspect
import logging
import os
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import grpc

from gateway import errors
from gateway.api import names
from gateway.errors import GatewayError
from gateway.security.limits import Limiter
from nbdcore.tools.snapshot_cmds import SEPARATOR as SNAPSHOT_SEPARATOR

log = logging.getLogger("nbdgw.access")

OPERATIONS = frozenset({"list", "extents", "data", "clear", "snapshot"})
DEFAULT_IDENTITY = "default"

# Open to anyone: the kubelet's probes send no credentials. Only the overall statuses, though:
# a per-export status (HEALTH_EXPORT_PREFIX) needs the access GetExport needs, or it would tell
# apart exports that exist from missing ones, which the API hides. Calls without credentials
# are bounded and cut short (gateway.security.limits).
OPEN_PREFIXES = ("/grpc.health.v1.",)
HEALTH_EXPORT_PREFIX = "exports/"
# Any authenticated identity, whatever its policy: describing the API reveals no export.
ANY_IDENTITY_PREFIXES = ("/grpc.reflection.",)

_BITMAP_SERVICE = "/nbdgw.v1.BitmapService/"
# Method -> operation; StreamExtents with include_data is "data" (see _operation).
METHOD_OPERATIONS: Mapping[str, str] = {
    _BITMAP_SERVICE + "ListExports": "list",
    _BITMAP_SERVICE + "GetExport": "list",
    _BITMAP_SERVICE + "ListBitmaps": "list",
    _BITMAP_SERVICE + "StreamExtents": "extents",
    _BITMAP_SERVICE + "ClearRange": "clear",
    # Changes which clears mask the export's bitmaps: as strong as clearing.
    _BITMAP_SERVICE + "SetExportGeneration": "clear",
    _BITMAP_SERVICE + "StreamRemainingDirty": "extents",
}
# Every method of these services is this operation.
SERVICE_OPERATIONS: Mapping[str, str] = {"/nbdgw.v1.SnapshotService/": "snapshot"}
LIST_EXPORTS = _BITMAP_SERVICE + "ListExports"
STREAM_EXTENTS = _BITMAP_SERVICE + "StreamExtents"
CLEAR_RANGE = _BITMAP_SERVICE + "ClearRange"
# Request fields that name the export, in the order they are looked for.
EXPORT_FIELDS = ("export", "parent", "name")


# The identity of the call being served (set by AccessInterceptor before the servicer runs).
CURRENT_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "nbdgw_identity", default=None
)


class AccessConfigError(ValueError):
    """A token or policy file that cannot be used (the message says which line)."""


# --- identities and tokens ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    via: str  # "token" or "certificate"


def _digest(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else token
    return hashlib.sha256(raw).digest()


def _token_lines(text: str, where: str) -> tuple[list[tuple[bytes, str]], list[str]]:
    """The (SHA-256 of the token, identity) pairs of the good lines, and what is wrong with
    each bad one."""
    entries: list[tuple[bytes, str]] = []
    problems: list[str] = []
    seen: set[bytes] = set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            name, token = DEFAULT_IDENTITY, parts[0]
        elif len(parts) == 2:
            name, token = parts
        else:
            problems.append(f"{where}, line {number}: expected 'IDENTITY TOKEN'")
            continue
        if len(token) < 8:
            problems.append(f"{where}, line {number}: token shorter than 8 characters")
            continue
        digest = _digest(token)
        if digest in seen:
            problems.append(f"{where}, line {number}: token given twice")
            continue
        seen.add(digest)
        entries.append((digest, name))
    if not entries and not problems:
        problems.append(f"{where}: no token")
    return entries, problems


def parse_tokens(text: str, where: str = "token file") -> list[tuple[bytes, str]]:
    """``IDENTITY TOKEN`` lines (or a lone ``TOKEN``: identity ``default``); blank lines and
    ``#`` comments are skipped. Returns (SHA-256 of the token, identity) pairs."""
    entries, problems = _token_lines(text, where)
    if problems:
        raise AccessConfigError(problems[0])
    return entries


class TokenFile:
    """Tokens from a file, re-read when it changes (checked at most every ``interval`` s).

    A reload fails closed: a file rewritten with a bad line keeps only the tokens of its good
    lines (of those, only the ones that were valid already: a broken file adds nobody); an
    emptied, unreadable or deleted file leaves no token valid. Revoking a token by rewriting
    the file must work even when the rewrite is botched. Each failure is logged at ERROR,
    counted in ``reload_errors``, and ``valid`` is False until the file reads well again
    (``nbdgw_token_file_valid``, ``nbdgw_token_file_reload_errors_total``)."""

    def __init__(self, path: str | Path, *, interval: float = 1.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self.reloads = 0
        self.reload_errors = 0
        self.valid = True
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp: tuple[int, int, int] | None = None
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise AccessConfigError(f"token file {path}: {exc.strerror or exc}") from None
        self._entries = parse_tokens(text, f"token file {path}")
        self._stamp = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.interval:
            return
        with self._lock:
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return
            where = f"token file {self.path}"
            entries: list[tuple[bytes, str]]
            problems: list[str]
            try:
                text = self.path.read_text()
            except OSError as exc:
                entries, problems = [], [f"{where}: {exc.strerror or exc}"]
            else:
                entries, problems = _token_lines(text, where)
            if problems:
                before = {digest for digest, _ in self._entries}
                entries = [(d, name) for d, name in entries if d in before]
                self.reload_errors += 1
                self.valid = False
                log.error(
                    "%s; %d of %d tokens stay valid (only those its good lines still list)",
                    "; ".join(problems),
                    len(entries),
                    len(before),
                )
            else:
                self.valid = True
                log.info("token file %s reloaded (%d tokens)", self.path, len(entries))
            self._entries, self._stamp = entries, stamp
            self.reloads += 1

    def lookup(self, token: str) -> str | None:
        """The identity of ``token``, or None."""
        self._maybe_reload()
        return _constant_time_lookup(self._entries, token)


class StaticTokens:
    def __init__(self, tokens: Mapping[str, str]) -> None:
        self._entries = [(_digest(token), name) for name, token in tokens.items()]

    def lookup(self, token: str) -> str | None:
        return _constant_time_lookup(self._entries, token)


def _constant_time_lookup(entries: Sequence[tuple[bytes, str]], token: str) -> str | None:
    # Compare fixed-length digests against every entry, without stopping at a match.
    got = _digest(token)
    found: str | None = None
    for digest, name in entries:
        if hmac.compare_digest(digest, got) and found is None:
            found = name
    return found


# --- the policy ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    exports: tuple[str, ...] = ("*",)
    operations: frozenset[str] = OPERATIONS

    def allows(self, operation: str, export: str | None) -> bool:
        if operation not in self.operations:
            return False
        return export is None or self.sees(export)

    def sees(self, export: str) -> bool:
        # A snapshot's export (EXPORT@SNAPSHOT, gateway.hosts.snapshots) holds its export's data as
        # it was: whoever may use the export may use its snapshots.
        names = {export, export.split(SNAPSHOT_SEPARATOR, 1)[0]}
        return any(fnmatch.fnmatchcase(n, glob) for n in names for glob in self.exports)


@dataclass
class Policy:
    """identity -> Rule. An identity without a rule falls back to the ``*`` rule, if any;
    otherwise it may do nothing."""

    rules: dict[str, Rule] = field(default_factory=dict)

    def rule(self, identity: str) -> Rule | None:
        return self.rules.get(identity) or self.rules.get("*")

    def allows(self, identity: str, operation: str, export: str | None) -> bool:
        rule = self.rule(identity)
        return rule is not None and rule.allows(operation, export)

    def sees(self, identity: str, export: str) -> bool:
        rule = self.rule(identity)
        return rule is not None and bool(rule.operations) and rule.sees(export)

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str = "policy") -> Policy:
        """``{"identities": {NAME: {"exports": [GLOB...], "operations": [OP...]}}}``; a missing
        ``exports`` means all, a missing ``operations`` means all."""
        unknown = set(table) - {"identities"}
        if unknown:
            raise AccessConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
        identities = table.get("identities", {})
        if not isinstance(identities, Mapping):
            raise AccessConfigError(f"{where}: 'identities' must be a table")
        rules: dict[str, Rule] = {}
        for name, entry in identities.items():
            here = f"{where}: identities.{name}"
            if not isinstance(entry, Mapping):
                raise AccessConfigError(f"{here}: must be a table")
            bad = set(entry) - {"exports", "operations"}
            if bad:
                raise AccessConfigError(f"{here}: unknown key(s) {', '.join(sorted(bad))}")
            exports = entry.get("exports", ["*"])
            ops = entry.get("operations", sorted(OPERATIONS))
            if not _str_list(exports):
                raise AccessConfigError(f"{here}: 'exports' must be a list of glob strings")
            if not _str_list(ops):
                raise AccessConfigError(f"{here}: 'operations' must be a list of strings")
            unknown_ops = set(ops) - OPERATIONS - {"*"}
            if unknown_ops:
                raise AccessConfigError(
                    f"{here}: unknown operation(s) {', '.join(sorted(unknown_ops))}"
                    f" (known: {', '.join(sorted(OPERATIONS))})"
                )
            opset = OPERATIONS if "*" in ops else frozenset(ops)
            rules[str(name)] = Rule(tuple(exports), opset)
        return cls(rules)

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        try:
            with open(path, "rb") as f:
                table = tomllib.load(f)
        except OSError as exc:
            raise AccessConfigError(f"policy file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise AccessConfigError(f"policy file {path}: {exc}") from None
        return cls.from_table(table, f"policy file {path}")


def _str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


# --- errors -------------------------------------------------------------------------------


def permission_denied(identity: str, operation: str, export: str | None) -> GatewayError:
    what = f"export {export!r}" if export is not None else "exports"
    return GatewayError(
        grpc.StatusCode.PERMISSION_DENIED,
        "PERMISSION_DENIED",
        f"identity {identity!r} may not {operation} {what}",
        {"operation": operation},
    )


# --- authentication -----------------------------------------------------------------------


@dataclass
class Authenticator:
    tokens: TokenFile | StaticTokens | None = None
    # Trust the identity of verified client certificates (the port requires them: mutual TLS).
    client_certificates: bool = False

    @property
    def enabled(self) -> bool:
        return self.tokens is not None or self.client_certificates

    def authenticate(
        self, metadata: Iterable[tuple[str, str | bytes]] | None, auth_context: Mapping[str, Any]
    ) -> Identity:
        header = None
        for key, value in metadata or ():
            if key == "authorization":
                header = value
                break
        if header is not None:
            if self.tokens is None:
                raise errors.unauthenticated("bearer tokens are not accepted here")
            text = header.decode(errors="replace") if isinstance(header, bytes) else header
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise errors.unauthenticated("malformed authorization header")
            name = self.tokens.lookup(token.strip())
            if name is None:
                raise errors.unauthenticated("wrong bearer token")
            return Identity(name, "token")
        if self.client_certificates:
            name = certificate_identity(auth_context)
            if name is not None:
                return Identity(name, "certificate")
        if self.tokens is None:
            raise errors.unauthenticated("no client certificate")
        raise errors.unauthenticated("missing bearer token")


def certificate_identity(auth_context: Mapping[str, Any]) -> str | None:
    """The subject CN (else the first SAN) of the peer's verified certificate, from grpc's
    auth_context (present only when the TLS handshake verified it)."""
    if auth_context.get("transport_security_type") not in ([b"ssl"], ["ssl"]):
        return None
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth_context.get(key) or []
        for value in values:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if text:
                return text
    return None


# --- the interceptor ----------------------------------------------------------------------


def export_of(request: Any) -> str | None:
    """The export a request names (``exports/NAME[/...]`` or ``NAME``), or None."""
    for name in EXPORT_FIELDS:
        try:
            value = getattr(request, name)
        except AttributeError:
            continue
        if not isinstance(value, str):
            continue
        if value.startswith("exports/"):
            value = value[len("exports/") :]
        return value.split("/", 1)[0]
    return None


def operation_of(method: str, request: Any = None) -> str | None:
    op = METHOD_OPERATIONS.get(method)
    if op is None:
        for prefix, service_op in SERVICE_OPERATIONS.items():
            if method.startswith(prefix):
                return service_op
        return None
    if method == STREAM_EXTENTS and request is not None and getattr(request, "include_data", False):
        return "data"
    return op


if TYPE_CHECKING:  # grpc-stubs makes it generic; grpc itself does not
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor

Behaviour = Callable[[Any, Any], Any]


class AccessInterceptor(_Interceptor):
    """Authenticate, authorize and limit every call but health (see the module docstring)."""

    def __init__(
        self,
        authenticator: Authenticator | None = None,
        policy: Policy | None = None,
        limiter: Limiter | None = None,
    ) -> None:
        self.authenticator = authenticator or Authenticator()
        self.policy = policy
        self.limiter = limiter or Limiter()
        self.denied = 0  # calls refused (unauthenticated, permission, limits): for metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method: str = details.method
        handler = await continuation(details)
        if handler is None:
            return handler
        wrapped: grpc.RpcMethodHandler[Any, Any]
        if method.startswith(OPEN_PREFIXES):
            wrapped = self._wrap_health(handler)
            return wrapped
        refusal: grpc.RpcMethodHandler[Any, Any] | None = self._refuse_on_headers(details)
        if refusal is not None:
            return refusal
        wrapped = self._wrap(method, handler)
        return wrapped

    def _refuse_on_headers(self, details: grpc.HandlerCallDetails) -> Any:
        """A handler that refuses the call at once if its headers cannot authenticate it,
        without waiting for its request message: a call sent as headers with no body was held
        open until the body came. Only for tokens: a client certificate is in the TLS session,
        which interceptors cannot see (and a port that trusts them requires one anyway)."""
        auth = self.authenticator
        if auth.tokens is None or auth.client_certificates:
            return None
        try:
            auth.authenticate(details.invocation_metadata, {})
        except GatewayError as err:
            refused = err
        else:
            return None

        async def refuse(_requests: Any, context: Any) -> None:
            self.denied += 1
            await _abort(context, refused)

        # Request-streaming, so that grpc runs it before any message arrives; the response
        # side is the same on the wire (observability labels calls by their declared type).
        return grpc.stream_stream_rpc_method_handler(refuse)

    def _wrap_health(self, handler: Any) -> Any:
        """grpc.health.v1: the overall statuses for anyone (calls without credentials bounded
        and cut short), a per-export status only with the access of GetExport."""
        unary = handler.unary_unary is not None
        inner = handler.unary_unary if unary else handler.unary_stream
        if inner is None:
            return handler
        if inspect.isasyncgenfunction(inner):
            inner = written(inner)

        async def behaviour(request: Any, context: Any) -> Any:
            service: str = getattr(request, "service", "")
            identity = None
            refused: GatewayError | None = None
            if self.authenticator.enabled:
                try:
                    identity = self.identify(context)
                except GatewayError as err:
                    refused = err
            try:
                if service.startswith(HEALTH_EXPORT_PREFIX):
                    if refused is not None:
                        raise refused
                    export = service[len(HEALTH_EXPORT_PREFIX) :]
                    policy = self.policy
                    if identity and policy and not policy.allows(identity.name, "list", export):
                        raise permission_denied(identity.name, "list", export)
                if refused is None:
                    # Authenticated, or no authentication configured: a Watch may last (the
                    # call caps of every call bound how many, gateway.security.limits).
                    return await inner(request, context)
                slot = self.limiter.open_unauthenticated(str(context.peer()))
            except GatewayError as err:
                self.denied += 1
                await _abort(context, err)
                return None
            with slot:
                return await self.limiter.run_unauthenticated(inner(request, context), context)

        return receiving(self.limiter, handler, behaviour, streaming_response=not unary)

    # --- deciding -------------------------------------------------------------------------

    def identify(self, context: Any) -> Identity:
        if not self.authenticator.enabled:
            return Identity(DEFAULT_IDENTITY, "none")
        return self.authenticator.authenticate(
            context.invocation_metadata(), context.auth_context()
        )

    def authorize(self, identity: Identity, method: str, request: Any) -> str:
        """The operation, once allowed; raises PERMISSION_DENIED."""
        if method.startswith(ANY_IDENTITY_PREFIXES):
            return "reflection"
        op = operation_of(method, request)
        if op is None:  # a method this table does not know: nobody but a full rule
            if self.policy is None:
                return "other"
            rule = self.policy.rule(identity.name)
            if rule is not None and rule.operations == OPERATIONS and rule.exports == ("*",):
                return "other"
            raise permission_denied(identity.name, f"call {method} on", None)
        if self.policy is None:
            return op
        export = None if method == LIST_EXPORTS else export_of(request)
        if not self.policy.allows(identity.name, op, export):
            raise permission_denied(identity.name, op, export)
        return op

    # --- wrapping -------------------------------------------------------------------------

    def _wrap(self, method: str, handler: Any) -> Any:
        if handler.unary_unary is not None:
            inner = handler.unary_unary
            if method == LIST_EXPORTS:
                inner = self._list_exports(inner)

            async def unary(request: Any, context: Any) -> Any:
                identity = await self._admit(method, request, context)
                if identity is None:
                    return None
                if method == CLEAR_RANGE:
                    wait = self.limiter.take_clear(identity.name)
                    if wait:
                        self.denied += 1
                        await _abort(context, self.limiter.clear_rate_exceeded(wait))
                        return None
                return await self.limiter.run_unary(inner(request, context), context)

            return receiving(self.limiter, handler, unary, streaming_response=False)
        if handler.unary_stream is not None:
            inner = handler.unary_stream
            if inspect.isasyncgenfunction(inner):
                # A yielding servicer: run it against a write()-ing context instead.
                inner = written(inner)

            async def stream(request: Any, context: Any) -> None:
                identity = await self._admit(method, request, context)
                if identity is None:
                    return
                try:
                    slot = self.limiter.open_stream(identity.name)
                except GatewayError as err:
                    self.denied += 1
                    await _abort(context, err)
                    return
                # The data budget is shared by identity; with no authentication configured
                # every caller is "default": by connection, then.
                owner = identity.name if identity.via != "none" else str(context.peer())
                with slot, self.limiter.stream_lease(owner):
                    await self.limiter.run_stream(inner, request, context)

            return receiving(self.limiter, handler, stream, streaming_response=True)
        # Client-streaming methods: none in the API; authenticate and authorize (no export).
        for kind in ("stream_unary", "stream_stream"):
            inner = getattr(handler, kind)
            if inner is not None:
                return self._wrap_streaming_request(method, handler, kind, inner)
        return handler

    def _wrap_streaming_request(self, method: str, handler: Any, kind: str, inner: Any) -> Any:
        async def behaviour(request_iterator: Any, context: Any) -> Any:
            identity = await self._admit(method, None, context)
            if identity is None:
                return None
            try:
                slot = self.limiter.open_call(str(context.peer()))
            except GatewayError as err:
                self.denied += 1
                await _abort(context, err)
                return None
            with slot:
                result = inner(request_iterator, context)
                if inspect.isawaitable(result):
                    return await result
                async for item in result:  # pragma: no cover - no such method today
                    await context.write(item)
            return None

        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    async def _admit(self, method: str, request: Any, context: Any) -> Identity | None:
        try:
            identity = self.identify(context)
            self.authorize(identity, method, request)
        except GatewayError as err:
            self.denied += 1
            await _abort(context, err)
            return None
        CURRENT_IDENTITY.set(identity)
        return identity

    def _list_exports(self, inner: Behaviour) -> Behaviour:
        """ListExports restricted to the caller's exports: page over the visible ones here,
        so pages are full and nothing (not even a count) hints at the others."""

        async def list_exports(request: Any, context: Any) -> Any:
            identity = CURRENT_IDENTITY.get()
            if self.policy is None or identity is None:
                return await inner(request, context)
            size = names.page_size(request.page_size)
            everything: list[Any] = []
            token = ""
            while True:
                page = await inner(type(request)(page_size=1000, page_token=token), context)
                if page is None:  # the servicer aborted the call
                    return None
                everything += page.exports
                token = page.next_page_token
                if not token:
                    break
            visible = [e for e in everything if self.policy.sees(identity.name, _bare(e.name))]
            scope = f"exports:{identity.name}"
            start = names.decode_page(request.page_token, scope, len(visible))
            chosen = visible[start : start + size]
            end = start + len(chosen)
            response = type(page)(exports=chosen)
            if end < len(visible):
                response.next_page_token = names.encode_page(scope, end)
            return response

        async def guarded(request: Any, context: Any) -> Any:
            try:
                return await list_exports(request, context)
            except GatewayError as err:
                await _abort(context, err)
                return None

        return guarded


def _bare(name: str) -> str:
    return name[len("exports/") :] if name.startswith("exports/") else name


async def _abort(context: Any, err: GatewayError) -> None:
    await cast(Any, context).abort_with_status(err.grpc_status())


def receiving(
    limiter: Limiter, handler: Any, behaviour: Behaviour, *, streaming_response: bool
) -> Any:
    """A handler running ``behaviour(request, context)`` (a unary-request method's) that counts
    the call in ``limiter``'s per-connection and total call limits from its headers on, and
    waits for its request message at most ``request_timeout`` seconds: grpc itself runs a
    unary-request handler only once the message is in, and held a call sent as headers with
    no body open for as long as the client liked. The handler is request-streaming so that
    it runs at once; on the wire the call is the same (observability labels calls by their
    declared type)."""

    async def receive(requests: Any, context: Any) -> Any:
        try:
            slot = limiter.open_call(str(context.peer()))
        except GatewayError as err:
            await _abort(context, err)
            return None
        with slot:
            request = await limiter.receive_request(requests, context)
            return await behaviour(request, context)

    kind = "stream_stream" if streaming_response else "stream_unary"
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(
        receive,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class OverallHealthInterceptor(_Interceptor):
    """For the plaintext health port (the kubelet's): only the overall statuses. A per-export
    name is NOT_FOUND whether the export exists or not, and every call is one without
    credentials: bounded and cut short by ``limiter`` like those of the API port."""

    def __init__(self, limiter: Limiter) -> None:
        self.limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(OPEN_PREFIXES):
            return handler
        unary = handler.unary_unary is not None
        inner: Any = handler.unary_unary if unary else handler.unary_stream
        if inner is None:
            return handler
        if inspect.isasyncgenfunction(inner):
            inner = written(inner)

        async def behaviour(request: Any, context: Any) -> Any:
            service = getattr(request, "service", "")
            if service.startswith(HEALTH_EXPORT_PREFIX):
                # As for a name the gateway has no status for (gateway.api.health).
                await _abort(context, errors.health_service_not_found(service, exports=False))
                return None
            try:
                slot = self.limiter.open_unauthenticated(str(context.peer()))
            except GatewayError as err:
                await _abort(context, err)
                return None
            with slot:
                return await self.limiter.run_unauthenticated(inner(request, context), context)

        wrapped: grpc.RpcMethodHandler[Any, Any] = receiving(
            self.limiter, handler, behaviour, streaming_response=not unary
        )
        return wrapped


def written(generator_function: Any) -> Any:
    """A yielding servicer as a writing one: each message written with context.write, the
    generator closed before the call ends (never left to the garbage collector, whose clean-up
    may touch a call grpc has freed)."""

    async def behaviour(request: Any, context: Any) -> None:
        messages = generator_function(request, context)
        try:
            async for message in messages:
                await context.write(message)
        finally:
            await messages.aclose()

    return behaviour
