"""NBD URIs (libnbd / qemu forms) and TLS settings derived from them."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdcore.exceptions import URIError
from nbdcore.tls import TLSConfig, server_context
from nbdcore.uri import NBDURI


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        ("nbd://example.com/disk", ("nbd", "example.com", None, None, "disk", False)),
        ("nbd://example.com:10810/", ("nbd", "example.com", 10810, None, "", False)),
        ("nbd://example.com", ("nbd", "example.com", None, None, "", False)),
        ("nbds://[::1]:99/a/b", ("nbds", "::1", 99, None, "a/b", True)),
        (
            "nbd+unix:///vm%201?socket=/tmp/s.sock",
            ("nbd+unix", None, None, "/tmp/s.sock", "vm 1", False),
        ),
        ("nbd+unix://?socket=rel.sock", ("nbd+unix", None, None, "rel.sock", "", False)),
        (
            "nbds+unix:///?socket=/s&tls-certificates=/pki",
            ("nbds+unix", None, None, "/s", "", True),
        ),
        ("NBD://h/x", ("nbd", "h", None, None, "x", False)),
    ],
)
def test_parse(text: str, fields: tuple[object, ...]) -> None:
    uri = NBDURI.parse(text)
    assert (uri.scheme, uri.host, uri.port, uri.socket, uri.export, uri.tls) == fields
    assert NBDURI.parse(str(uri)) == uri


def test_tcp_address_defaults_to_10809() -> None:
    assert NBDURI.parse("nbd://h/").address == ("h", 10809)
    with pytest.raises(URIError):
        _ = NBDURI.parse("nbd+unix:///?socket=/s").address


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("http://h/", "scheme"),
        ("nbd+vsock://1:2/", "scheme"),
        ("nbd+unix:///disk", "socket="),
        ("nbd+unix://host/?socket=/s", "no host"),
        ("nbd://h/?socket=/s", "only for"),
        ("nbd://h/?bogus=1", "unknown query parameter"),
        ("nbd://h/?tls-certificates=/x", "plain-text"),
        ("nbds://h/?tls-verify-peer=maybe", "boolean"),
        ("nbd://user@h/", "user"),
        ("nbd://h:notaport/", "invalid"),
        ("nbd://h/#frag", "fragment"),
        ("nbd://h/%ff", "export"),
    ],
)
def test_parse_errors(text: str, match: str) -> None:
    with pytest.raises(URIError, match=match):
        NBDURI.parse(text)


def test_uri_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        NBDURI.parse("ftp://x")


@given(
    st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=30),
    st.sampled_from(["nbd", "nbds"]),
)
def test_any_export_name_round_trips(export: str, scheme: str) -> None:
    uri = NBDURI(scheme, "localhost", 10809, None, export)
    assert NBDURI.parse(str(uri)) == uri


def test_tls_config_from_uri(tmp_path: Path) -> None:
    (tmp_path / "ca-cert.pem").write_text("x")
    (tmp_path / "client-cert.pem").write_text("x")
    (tmp_path / "client-key.pem").write_text("x")
    uri = NBDURI.parse(f"nbds://server.example:1/e?tls-certificates={tmp_path}")
    cfg = TLSConfig.from_uri(uri)
    assert cfg.ca_file == str(tmp_path / "ca-cert.pem")
    assert cfg.cert_file == str(tmp_path / "client-cert.pem")
    assert cfg.server_hostname == "server.example" and cfg.verify_peer
    off = TLSConfig.from_uri(NBDURI.parse("nbds+unix:///?socket=/s&tls-verify-peer=false"))
    assert not off.verify_peer and off.server_hostname is None
    ctx = off.client_context()
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    with pytest.raises(URIError, match="PSK"):
        TLSConfig.from_uri(NBDURI.parse("nbds://h/?tls-psk-file=/k"))


def test_default_client_context_verifies() -> None:
    ctx = TLSConfig().client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


def test_server_context_needs_a_ca_for_client_certs(tmp_path: Path) -> None:
    with pytest.raises((ValueError, OSError, ssl.SSLError)):
        server_context(str(tmp_path / "missing.pem"), str(tmp_path / "missing.key"))


def test_replace_changes_only_what_it_is_given() -> None:
    uri = NBDURI.parse("nbds://h:10810/a?tls-verify-peer=false")
    other = uri.replace(export="b/c")
    assert str(other) == "nbds://h:10810/b/c?tls-verify-peer=false"
    assert (other.export, uri.export) == ("b/c", "a") and other.tls_options == uri.tls_options
    assert str(uri.replace(tls_options={})) == "nbds://h:10810/a"
    with pytest.raises(TypeError):
        uri.replace(hostname="x")
