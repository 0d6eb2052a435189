"""What every command against a running gateway shares: the target and credential flags, the
client library's AsyncClient built from them (the commands are a thin layer over it), one-line
errors with their ErrorInfo reason, and the printing of extents.

The gateway is ``--target HOST:PORT`` (or ``$NBDGW_TARGET``, default 127.0.0.1:50051), with an
optional bearer token (``--token`` / ``$NBDGW_TOKEN``) and TLS (``--tls-ca``, ``--tls-cert``,
``--tls-key``). A failed call prints one line: the gRPC code, the message and the ErrorInfo
reason, and the command exits with 1. Bad arguments print one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import nbdgw
from nbdcore.tools import command_name

if TYPE_CHECKING:
    from nbdgw import AsyncClient, Retry, RetryEvent
    from nbdgw.v1 import bitmap_service_pb2 as pb

DEFAULT_TARGET = "127.0.0.1:50051"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
# A snapshot's view of the changes since checkpoint C, as the API names it (since_checkpoint).
SINCE_PREFIX = DIRTY_BITMAP_PREFIX + "since:"


class CommandError(Exception):
    """A local mistake in the command line (exit code 2), found after parsing."""


class CommandFailed(Exception):
    """The command cannot do its job for a reason the message explains (exit code 1)."""


# --- Arguments -------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kKmMgGtTpPeE]?)(i?[bB])?\s*$")
_SIZE_SHIFT = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


def parse_size(text: str) -> int:
    """A byte count: ``65536``, ``64k``, ``1M``, ``2GiB`` (binary multiples)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 4096, 64k, 1M, 2G)")
    value = int(match.group(1)) << _SIZE_SHIFT[match.group(2).lower()]
    if value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"size {text!r} does not fit in 64 bits")
    return value


def positive_seconds(text: str) -> float:
    """A duration in seconds, > 0 (a deadline of 0 would fail every call at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (seconds, e.g. 30 or 2.5)"
        ) from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"the duration must be more than 0 seconds, not {text}")
    return value


def parse_target(text: str) -> tuple[str, bool]:
    """``HOST:PORT`` (or ``http://HOST:PORT``, ``https://HOST:PORT``) -> (HOST:PORT, TLS?)."""
    tls = False
    for scheme, secure in (("http://", False), ("https://", True)):
        if text.startswith(scheme):
            text, tls = text.removeprefix(scheme).rstrip("/"), secure
    if "://" in text or "/" in text:
        raise CommandError(
            f"--target must be HOST:PORT (for example {DEFAULT_TARGET}), not {text!r}"
        )
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(
            f"--target must be HOST:PORT (for example {DEFAULT_TARGET}), not {text!r}"
        )
    return text, tls


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make argparse report a usage error as one line (no usage dump), exit code 2."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]
    return parser


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    group = parser.add_argument_group("gateway connection")
    group.add_argument(
        "--target",
        default=env.get("NBDGW_TARGET", DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"the gateway's address (env NBDGW_TARGET, default {DEFAULT_TARGET}); "
        "https://HOST:PORT means TLS with the system's CAs unless --tls-ca is given",
    )
    group.add_argument(
        "--token",
        default=env.get("NBDGW_TOKEN") or None,
        help="bearer token sent as 'authorization: Bearer TOKEN' (env NBDGW_TOKEN)",
    )
    group.add_argument(
        "--tls-ca",
        default=env.get("NBDGW_TLS_CA") or None,
        metavar="FILE",
        help="use TLS, trusting this CA bundle (env NBDGW_TLS_CA)",
    )
    group.add_argument(
        "--tls-cert",
        default=env.get("NBDGW_TLS_CERT") or None,
        metavar="FILE",
        help="client certificate chain for mutual TLS (env NBDGW_TLS_CERT)",
    )
    group.add_argument(
        "--tls-key",
        default=env.get("NBDGW_TLS_KEY") or None,
        metavar="FILE",
        help="client private key for mutual TLS (env NBDGW_TLS_KEY)",
    )
    group.add_argument(
        "--tls-server-name",
        default=env.get("NBDGW_TLS_SERVER_NAME") or None,
        metavar="NAME",
        help="expect this name in the gateway's certificate instead of HOST"
        " (env NBDGW_TLS_SERVER_NAME)",
    )
    group.add_argument(
        "--timeout",
        type=positive_seconds,
        default=env.get("NBDGW_TIMEOUT") or 30.0,
        metavar="SECONDS",
        help="deadline of each unary call (env NBDGW_TIMEOUT, default 30)",
    )


# --- Connection ------------------------------------------------------------------------------


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read the {what} {path}: {exc.strerror}") from None


def open_client(args: argparse.Namespace, *, retries: int = 0) -> AsyncClient:
    """The client library's AsyncClient, as the connection arguments say: every command that
    talks to a gateway goes through it. ``retries``: how often a call or stream is retried
    (resumed) after UNAVAILABLE; 0 for a command that should fail at once (a person is
    waiting). A long stream can be given its own (:func:`stream_retry`)."""
    target, https = parse_target(args.target or "")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise CommandError("--tls-cert and --tls-key go together")
    tls = None
    if https or args.tls_ca or args.tls_cert:
        for path, what in ((args.tls_ca, "CA bundle"), (args.tls_cert, "certificate")):
            _read(path, what)  # a missing file: one line naming the flag's file
        _read(args.tls_key, "private key")
        tls = nbdgw.TLS(
            ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, server_name=args.tls_server_name
        )
    import logging  # ~10 ms that --help need not pay; grpc loads it anyway

    # The library logs its retries; the command says them itself (on_retry), once.
    logging.getLogger("nbdgw").addHandler(logging.NullHandler())
    return nbdgw.AsyncClient(
        target,
        token=args.token,
        tls=tls,
        timeout=args.timeout,
        retry=nbdgw.Retry(attempts=retries),
        on_retry=lambda event: warn(args)(retry_note(event, command_name(args))),
    )


def stream_retry(retries: int) -> Retry:
    """How a data stream of backup or verify is resumed: ``retries`` times in a row without
    progress, after 0.5 s, doubled each time up to 8 s (or longer when the gateway asks)."""
    return nbdgw.Retry(attempts=retries, backoff=0.5, max_backoff=8.0)


def retry_note(event: RetryEvent, command: str) -> str:
    """The one-line note a command prints before the client retries a call or resumes a
    stream."""
    why = describe_call_error(event.error, command)
    wait = f"in {event.delay:.1f}s (attempt {event.attempt} of {event.attempts})"
    if event.method.startswith("Stream"):
        where = "before the first message" if event.position is None else f"at {event.position}"
        return f"stream interrupted {where} ({why}); resuming {wait}"
    return f"{METHOD_COMMANDS.get(event.method, event.method)!r} failed ({why}); retrying {wait}"


# --- Errors ----------------------------------------------------------------------------------


# The API's words in server messages and BadRequest fields -> the CLI's: a request field is
# the flag (or argument) that sets it, an RPC the command that calls it. The one place where
# the gateway's vocabulary becomes the command line's.
FIELD_FLAGS: dict[str, str] = {
    "export": "EXPORT",
    "parent": "EXPORT",
    "offset": "--offset",
    "length": "--length",
    "bitmap": "--bitmap",
    "bitmaps": "--bitmap",
    "context": "--context",
    "generation": "--generation",
    "clear_token": "--clear-token",
    "unconditional": "--unconditional",
    "snapshot_id": "SNAPSHOT",
    "cluster_size_bytes": "--cluster-size",
    "max_preserved_bytes": "--max-size",
    "on_full": "--on-full",
    "group": "--group",
    "checkpoint_id": "--checkpoint",
    "since_checkpoint": "--since",
    "granularity_bytes": "--granularity",
    "resume_token": "--resume",
}
# Where a command sets a field otherwise: (command, field) -> its argument.
COMMAND_FIELDS: dict[tuple[str, str], str] = {
    ("nbdgw export generation", "generation"): "NAME",
    ("nbdgw bitmap add", "bitmap"): "NAME",
    ("nbdgw bitmap remove", "name"): "NAME",
    ("nbdgw snapshot release", "name"): "SNAPSHOT",
    ("nbdgw checkpoint delete", "name"): "CHECKPOINT",
}
METHOD_COMMANDS: dict[str, str] = {
    "ListExports": "nbdgw export list",
    "SetExportGeneration": "nbdgw export generation",
    "ListBitmaps": "nbdgw bitmap list",
    "StreamExtents": "nbdgw bitmap map",
    "ClearRange": "nbdgw bitmap clear",
    "StreamRemainingDirty": "nbdgw bitmap remaining",
    "AddBitmap": "nbdgw bitmap add",
    "RemoveBitmap": "nbdgw bitmap remove",
    "CreateSnapshot": "nbdgw snapshot create",
    "ListSnapshots": "nbdgw snapshot list",
    "ReleaseSnapshot": "nbdgw snapshot release",
    "ListCheckpoints": "nbdgw checkpoint list",
    "DeleteCheckpoint": "nbdgw checkpoint delete",
}
# Phrases whose quoted word is not a request field (a configuration key), said the CLI's way.
PHRASES: dict[str, str] = {
    "set 'generation' in the configuration": "set 'generation = NAME' in its [[exports]] table",
    "pass the clear_token of the StreamExtents message that carried the range (or set"
    " unconditional if nothing writes the export)": "pass --clear-token with the token that"
    " 'nbdgw bitmap map --show-clear-token' printed when it read the range (or --unconditional"
    " if nothing writes the export)",
    "set unconditional only if nothing writes the export": "give --unconditional only if"
    " nothing writes the export",
    "send the metadata 'authorization: Bearer TOKEN'": "give --token TOKEN (or $NBDGW_TOKEN)",
}
# What to do next, for the reasons whose message cannot say it in the CLI's words.
REASON_HINTS: dict[str, str] = {
    "EXPORT_NOT_FOUND": "'nbdgw export list' lists the exports",
    "SNAPSHOT_NOT_FOUND": "'nbdgw snapshot list EXPORT' lists them",
    "CHECKPOINT_NOT_FOUND": "'nbdgw checkpoint list EXPORT' lists them",
}
_QUOTED_FIELD = re.compile(r"'([a-z_]+)'")
_METHOD = re.compile(r"\b(" + "|".join(METHOD_COMMANDS) + r")\b")


def cli_flag(command: str, field: str) -> str | None:
    """The argument of ``command`` that sets request field ``field`` (None: none known)."""
    return COMMAND_FIELDS.get((command, field)) or FIELD_FLAGS.get(field)


def cli_words(text: str, command: str) -> str:
    """A gateway message in the command line's words: ``'generation'`` -> ``--generation``,
    ``SetExportGeneration`` -> ``'nbdgw export generation'``."""
    for phrase, words in PHRASES.items():
        text = text.replace(phrase, words)
    text = _QUOTED_FIELD.sub(lambda m: cli_flag(command, m.group(1)) or m.group(0), text)
    return _METHOD.sub(lambda m: repr(METHOD_COMMANDS[m.group(1)]), text)


def describe_call_error(exc: nbdgw.errors.CallError, command: str) -> str:
    """One line: ``CODE: message [REASON]``, in the CLI's words, plus the first bad argument."""
    message = cli_words(exc.message, command) or "no message"
    flags = []
    for violation in exc.field_violations:
        flag = cli_flag(command, violation.field) or violation.field
        # The gateway lists bad fields as "FIELD: why": name the argument instead.
        message = re.sub(rf"\b{re.escape(violation.field)}: ", f"{flag}: ", message)
        flags.append(flag)
    text = f"{exc.code}: {message}"
    if exc.reason in REASON_HINTS:
        text += f" ({REASON_HINTS[exc.reason]})"
    if exc.reason:
        text += f" [{exc.reason}]"
    if flags and flags[0] not in text:
        text += f" ({flags[0]})"
    return " ".join(text.split())


def client_unreachable(exc: nbdgw.errors.CallError, target: str) -> str | None:
    """For a call that never reached a gateway (grpc's own UNAVAILABLE, no ErrorInfo): what
    went wrong in a few words and what to check, instead of grpc's resolver or C-core text."""
    if exc.code != "UNAVAILABLE" or exc.reason or exc.details:
        return None
    why = "no answer"
    for words, meaning in (
        ("Connection refused", "connection refused"),
        ("lookup", "its host name does not resolve"),
        ("Network is unreachable", "network unreachable"),
        ("No route to host", "no route to host"),
        ("handshake", "the TLS handshake failed (check --tls-ca and --tls-server-name)"),
        ("Socket closed", "it closed the connection (TLS to a plaintext port, or the reverse?)"),
    ):
        if words in exc.message:
            why = meaning
            break
    return (
        f"UNAVAILABLE: cannot reach the gateway at {target or DEFAULT_TARGET}: {why}; is "
        "'nbdgw serve' running there? (--target or $NBDGW_TARGET)"
    )


def describe_error(exc: nbdgw.errors.NbdgwError, args: argparse.Namespace) -> str:
    """One line for any error of the client library, in the words of the running command."""
    if isinstance(exc, nbdgw.errors.CallError):
        return client_unreachable(exc, getattr(args, "target", "")) or describe_call_error(
            exc, command_name(args)
        )
    return str(exc)


def command(
    func: Callable[[argparse.Namespace], Awaitable[int]],
) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """Turn gRPC failures and local mistakes into one line on stderr and an exit code."""

    @wraps(func)
    async def run(args: argparse.Namespace) -> int:
        name = command_name(args)
        try:
            return await func(args)
        except (CommandError, nbdgw.errors.ConfigurationError) as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
            return 2
        except nbdgw.errors.NbdgwError as exc:  # a failed call, a broken stream
            print(f"{name}: {describe_error(exc, args)}", file=sys.stderr)
            return 1
        except CommandFailed as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            # `nbdgw bitmap map ... | head`: the reader left; not an error of ours.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0

    return run


def warn(args: argparse.Namespace) -> Callable[[str], None]:
    """A one-line note on stderr, prefixed with the command's name."""
    return lambda text: print(f"{command_name(args)}: {text}", file=sys.stderr, flush=True)


def iter_rows(msg: pb.StreamExtentsResponse) -> Iterable[tuple[int, int, int, int]]:
    """The extents of one message as ``(offset, length, flags, allocation)`` rows."""
    pos = msg.offset
    allocation = msg.allocation
    for i, (delta, length, flags) in enumerate(
        zip(msg.offset_deltas, msg.lengths, msg.flags, strict=True)
    ):
        pos += delta
        yield pos, length, flags, (allocation[i] if allocation else 0)
        pos += length


def full_context_name(name: str) -> str:
    """The API's shorthand: a name without ``:`` is a qemu dirty bitmap."""
    return name if ":" in name else DIRTY_BITMAP_PREFIX + name


# --- nbdinfo --map format ------------------------------------------------------------------------


def extent_description(context: str, flags: int) -> str | None:
    """What ``nbdinfo --map`` prints beside the flags of ``context`` (None: nothing)."""
    if context == "base:allocation":
        return {0: "data", 1: "hole", 2: "zero", 3: "hole,zero"}.get(flags)
    if context.startswith(DIRTY_BITMAP_PREFIX):
        return {0: "clean", 1: "dirty"}.get(flags)
    if context == "qemu:allocation-depth":
        return {0: "absent", 1: "local"}.get(flags, f"backing depth {flags}")
    return None


class MapPrinter:
    """Writes extents exactly as ``nbdinfo --map[ --json]`` does, coalescing adjacent extents of
    equal flags (nbdinfo merges them too, so a split between messages never shows).

    Rows arrive as a message's packed columns and are formatted in one tight loop per message:
    a map of a million extents is printed at a few million rows per second.
    """

    def __init__(self, context: str, out: TextIO, *, json_output: bool) -> None:
        self.context = context
        self.out = out
        self.json = json_output
        self.pending: tuple[int, int, int] | None = None  # (offset, length, flags)
        self.count = 0
        self.lines: list[str] = []
        self._suffix: dict[int, str] = {}

    def suffix(self, flags: int) -> str:
        """Everything after the offset and length, for rows with these flags."""
        text = self._suffix.get(flags)
        if text is None:
            descr = extent_description(self.context, flags)
            if self.json:
                text = f', "type": {flags}'
                text += f', "description": {json.dumps(descr)}}}' if descr is not None else "}"
            else:
                text = f"  {flags:3d}" + (f"  {descr}" if descr is not None else "") + "\n"
            self._suffix[flags] = text
        return text

    def add(self, offset: int, length: int, flags: int) -> None:
        self.add_columns(offset, (0,), (length,), (flags,))

    def add_message(self, msg: pb.StreamExtentsResponse) -> None:
        self.add_columns(msg.offset, msg.offset_deltas, msg.lengths, msg.flags)

    def add_columns(
        self, start: int, deltas: Iterable[int], lengths: Iterable[int], flags: Iterable[int]
    ) -> None:
        fmt = '{ "offset": %d, "length": %d%s' if self.json else "%10d  %10d%s"
        suffixes = self._suffix
        lines = self.lines
        suffix = self.suffix
        if self.pending is None:
            p_off, p_len, p_flags = -1, 0, -1
        else:
            p_off, p_len, p_flags = self.pending
        pos = start
        for delta, length, flag in zip(deltas, lengths, flags, strict=True):
            pos += delta
            if flag == p_flags and pos == p_off + p_len:
                p_len += length
            else:
                if p_off >= 0:
                    lines.append(fmt % (p_off, p_len, suffixes.get(p_flags) or suffix(p_flags)))
                p_off, p_len, p_flags = pos, length, flag
            pos += length
        self.pending = (p_off, p_len, p_flags) if p_off >= 0 else None
        if len(lines) >= 8192:
            self.flush()

    def begin(self) -> None:
        if self.json:
            self.out.write("[\n")

    def flush(self) -> None:
        if not self.lines:
            return
        if self.json:
            # nbdinfo separates rows with ",\n" and ends the last one with "\n]\n".
            self.out.write((",\n" if self.count else "") + ",\n".join(self.lines))
        else:
            self.out.write("".join(self.lines))
        self.count += len(self.lines)
        self.lines.clear()

    def end(self) -> None:
        if self.pending is not None:
            off, length, flags = self.pending
            fmt = '{ "offset": %d, "length": %d%s' if self.json else "%10d  %10d%s"
            self.lines.append(fmt % (off, length, self.suffix(flags)))
            self.pending = None
        self.flush()
        if self.json:
            self.out.write("\n]\n")
        self.out.flush()


# --- Commands ----------------------------------------------------------------------------------


# --- JSON output ------------------------------------------------------------------------------


def api_json(message: Any) -> dict[str, Any]:
    """A message in the API's JSON mapping (proto3 JSON: lowerCamelCase names, uint64 as
    strings, enums by name), every field present: what grpcurl or buf curl print, so that
    `--json` of every command reads like the API itself."""
    from google.protobuf import json_format  # ~10 ms, for --json only

    out: dict[str, Any] = json_format.MessageToDict(
        message, always_print_fields_with_no_presence=True
    )
    return out


def print_json(value: Any) -> None:
    """``--json``: one document on stdout (a message, or a list or dict of them)."""

    def plain(v: Any) -> Any:
        if hasattr(v, "DESCRIPTOR"):
            return api_json(v)
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    sys.stdout.write(json.dumps(plain(value), indent=2) + "\n")


def print_table(rows: list[list[str]]) -> None:
    """Rows of text as aligned columns; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(w) for cell, w in zip(row, widths, strict=True)]
        sys.stdout.write("  ".join(cells).rstrip() + "\n")
