"""Names and page tokens of the API's requests: one reading of each field, shared by every servicer
(and by the access interceptor, which pages the exports a caller may see)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct

from gateway import errors
from nbdcore.constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX, NBD_MAX_STRING

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def export_id(value: str, field_name: str) -> str:
    """``exports/{export}`` or the bare ``{export}`` -> ``{export}``."""
    if not value:
        raise errors.invalid_field(field_name, "required: the export, as exports/{export}")
    name = value.removeprefix("exports/")
    if not name or "/" in name:
        raise errors.invalid_field(field_name, f"{value!r} is not an export name (exports/NAME)")
    return name


def context_name(value: str, field_name: str) -> str:
    """A metadata context name; ``NAME`` alone is short for ``qemu:dirty-bitmap:NAME``."""
    if not value:
        raise errors.invalid_field(field_name, "required: a metadata context name")
    if "\0" in value:
        # NBD strings cannot carry one (nbdcore.wire refuses to encode it).
        raise errors.invalid_field(field_name, "must not contain NUL")
    name = value if ":" in value else CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + value
    if len(name.encode()) > NBD_MAX_STRING:
        raise errors.invalid_field(field_name, f"longer than {NBD_MAX_STRING} bytes")
    return name


def page_size(value: int, field_name: str = "page_size") -> int:
    if value < 0:
        raise errors.invalid_field(field_name, f"must not be negative (got {value})")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def fingerprint(*parts: object) -> bytes:
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).digest()[:16]


def encode_page(scope: str, index: int) -> str:
    raw = json.dumps({"s": fingerprint(scope).hex(), "i": index}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page(token: str, scope: str, total: int) -> int:
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        index, fp = data["i"], data["s"]
    except (ValueError, KeyError, TypeError):
        raise errors.invalid_token("page", "page_token", "malformed token") from None
    if fp != fingerprint(scope).hex():
        raise errors.invalid_token("page", "page_token", "the token belongs to a different request")
    if not isinstance(index, int) or not 0 <= index <= total:
        raise errors.invalid_token("page", "page_token", "the token is out of date")
    return index


# A clear token: version, the bitmap it was read from (a hash of export and context), and the
# host's write-history position (history id, sequence) taken before the message was read.
_CLEAR_TOKEN = struct.Struct(">B8sQQ")
_CLEAR_TOKEN_VERSION = 1


def _bitmap_tag(export: str, context: str) -> bytes:
    return fingerprint("clear", export, context)[:8]


def encode_clear_token(export: str, context: str, position: tuple[int, int]) -> str:
    raw = _CLEAR_TOKEN.pack(_CLEAR_TOKEN_VERSION, _bitmap_tag(export, context), *position)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_clear_token(token: str, export: str, context: str) -> tuple[int, int]:
    """The position a clear token names; INVALID_ARGUMENT (CLEAR_TOKEN_INVALID) when it is
    malformed or was read from another export or bitmap. Not forgeable into anything unsafe
    by accident: a position the host does not know keeps every granule dirty."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        version, tag, history_id, sequence = _CLEAR_TOKEN.unpack(raw)
    except (ValueError, binascii.Error, struct.error):
        raise errors.invalid_token("clear", "clear_token", "malformed token") from None
    if version != _CLEAR_TOKEN_VERSION:
        raise errors.invalid_token("clear", "clear_token", f"unknown token version {version}")
    if tag != _bitmap_tag(export, context):
        raise errors.invalid_token(
            "clear", "clear_token", "the token was read from another export or bitmap"
        )
    return history_id, sequence


def bitmap_resource(value: str, field_name: str = "name") -> tuple[str, str]:
    """``exports/{export}/bitmaps/{context}`` -> (export, context); a bare NAME is a dirty
    bitmap's."""
    prefix, sep, rest = value.partition("/")
    export, sep2, ctx = rest.partition("/bitmaps/")
    if prefix != "exports" or not sep or not sep2 or not export or not ctx:
        raise errors.invalid_field(
            field_name, f"{value!r} is not a bitmap name (exports/EXPORT/bitmaps/CONTEXT)"
        )
    return export_id(export, field_name), context_name(ctx, field_name)
