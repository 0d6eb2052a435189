"""Parsers of the gateway and of nbdcore.uri fed arbitrary input: NBD URIs, configuration
files, resume and page tokens, token files, policies, authorization headers.

Each returns a value or raises its one documented error (URIError, ConfigError, GatewayError
INVALID_ARGUMENT, AccessConfigError, GatewayError UNAUTHENTICATED); what parses round-trips.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import grpc
from hypothesis import given
from hypothesis import strategies as st

from gateway import config as gwconfig
from gateway.api import bitmaps as service
from gateway.errors import GatewayError
from gateway.security.access import (
    AccessConfigError,
    Authenticator,
    Policy,
    StaticTokens,
    export_of,
    parse_tokens,
)
from nbdcore.exceptions import URIError
from nbdcore.uri import NBDURI
from tests.fuzz.support import FUZZ, tried

# --- NBD URIs ------------------------------------------------------------------------------

uri_parts = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}{path}{query}",
    st.sampled_from(["nbd", "nbds", "nbd+unix", "nbds+unix", "NBD", "http", ""]),
    st.sampled_from(["", "localhost", "[::1]", "127.0.0.1", "a@b", "h%zz", "[::1"]),
    st.sampled_from(["", ":10809", ":0", ":99999", ":x", ":"]),
    st.one_of(
        st.sampled_from(["", "/", "/disk", "/a%2Fb", "/%ff", "disk", "/#f"]), st.text(max_size=10)
    ),
    st.sampled_from(
        [
            "",
            "?socket=/tmp/s",
            "?socket=",
            "?tls-verify-peer=maybe",
            "?tls-certificates=/x",
            "?x=1",
            "?&&",
            "?a",
        ]
    ),
)


@FUZZ
@given(st.one_of(st.text(max_size=80), uri_parts))
def test_nbd_uri(text: str) -> None:
    tried("uri.parse")
    try:
        uri = NBDURI.parse(text)
    except URIError as exc:
        assert str(exc)
        return
    again = NBDURI.parse(str(uri))
    assert again == uri, (text, str(uri))


# --- configuration files -------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (no surrogates here)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


strings = st.one_of(
    st.sampled_from(
        ["disk", "", "nbd+unix:///d?socket=/tmp/x.sock", "nbd://h:1/e", "127.0.0.1:0", "x"]
    ),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
)
scalars = st.one_of(strings, st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans())
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(strings, inner, max_size=3)
    ),
    max_leaves=6,
)
HOST_KEYS = sorted(gwconfig._HOST_KEYS)
EXPORT_KEYS = sorted(gwconfig._EXPORT_KEYS)
TOP_KEYS = sorted(gwconfig._TOP_KEYS - {"hosts", "exports"})


def entries(keys: list[str]) -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(
        st.dictionaries(st.one_of(st.sampled_from(keys), strings), values, max_size=5), max_size=3
    )


documents = st.builds(
    lambda top, hosts, exports: {**top, "hosts": hosts, "exports": exports},
    st.dictionaries(st.one_of(st.sampled_from(TOP_KEYS), strings), values, max_size=4),
    st.one_of(entries(HOST_KEYS), values),
    st.one_of(entries(EXPORT_KEYS), values),
)


@FUZZ
@given(st.one_of(documents, st.text(max_size=120)))
def test_config_file(doc: Any) -> None:
    tried("config.load_file")
    if isinstance(doc, dict):
        text = "\n".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in doc.items())
    else:
        text = doc
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gw.toml"
        path.write_text(text, errors="surrogatepass")
        try:
            gwconfig.load_file(path)
        except gwconfig.ConfigError as exc:
            assert str(exc)


# --- resume and page tokens ----------------------------------------------------------------

FP = bytes(range(16))


@FUZZ
@given(st.one_of(st.text(max_size=60), st.binary(max_size=40).map(lambda b: b.hex())))
def test_resume_and_page_tokens(token: str) -> None:
    tried("service.tokens")
    for decode in (
        lambda: service.decode_resume(token, FP),
        lambda: service.decode_page(token, "exports", 10),
    ):
        try:
            value = decode()
        except GatewayError as err:
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        else:
            assert isinstance(value, int) and value >= 0


@FUZZ
@given(st.integers(0, 2**64 - 1), st.binary(min_size=16, max_size=16), st.integers(0, 1000))
def test_tokens_round_trip(offset: int, fp: bytes, index: int) -> None:
    tried("service.tokens")
    assert service.decode_resume(service.encode_resume(fp, offset), fp) == offset
    token = service.encode_page("scope", index)
    assert service.decode_page(token, "scope", max(index, 1000)) == index
    other = bytes(16) if fp != bytes(16) else b"\1" * 16
    try:
        service.decode_resume(service.encode_resume(fp, offset), other)
    except GatewayError as err:
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    else:
        raise AssertionError("a token of another request was accepted")


# --- access: token files, policies, headers ------------------------------------------------


@FUZZ
@given(
    st.one_of(
        st.text(max_size=200),
        st.lists(
            st.sampled_from(
                ["# c", "", "a 0123456789", "0123456789abc", "a b c", "x  yyyyyyyyyy  "]
            ),
            max_size=6,
        ).map("\n".join),
    )
)
def test_token_file_text(text: str) -> None:
    tried("access.parse_tokens")
    try:
        entries = parse_tokens(text)
    except AccessConfigError as exc:
        assert str(exc)
    else:
        assert entries and all(len(d) == 32 and name for d, name in entries)


@FUZZ
@given(st.one_of(values, st.fixed_dictionaries({"identities": values})))
def test_policy_table(table: Any) -> None:
    tried("access.policy")
    if not isinstance(table, dict):
        table = {"identities": table}
    try:
        policy = Policy.from_table(table)
    except AccessConfigError as exc:
        assert str(exc)
        return
    for name in policy.rules:
        policy.allows(name, "list", "disk")


AUTH = Authenticator(StaticTokens({"alice": "alice-token-123"}), client_certificates=True)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["authorization", "x-other", "Authorization"]),
            st.one_of(
                st.text(max_size=30), st.binary(max_size=30), st.just("Bearer alice-token-123")
            ),
        ),
        max_size=3,
    ),
    st.dictionaries(
        st.sampled_from(
            ["transport_security_type", "x509_common_name", "x509_subject_alternative_name"]
        ),
        st.lists(st.one_of(st.binary(max_size=10), st.sampled_from([b"ssl", b""])), max_size=2),
    ),
)
def test_authorization_metadata(
    metadata: list[tuple[str, Any]], auth_context: dict[str, Any]
) -> None:
    tried("access.authenticate")
    try:
        identity = AUTH.authenticate(metadata, auth_context)
    except GatewayError as err:
        assert err.code == grpc.StatusCode.UNAUTHENTICATED
        assert "alice-token" not in err.message
    else:
        assert identity.name


@FUZZ
@given(st.text(max_size=40))
def test_export_of(name: str) -> None:
    tried("access.export_of")

    class Request:
        export = name

    got = export_of(Request())
    assert got is not None and "/" not in got
