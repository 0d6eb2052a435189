"""The client's exceptions, by meaning, with the gateway's decoded details; its TLS, mutual
TLS, token and deadline options. Real ``nbdgw serve`` processes, both flavours."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import nbdgw
from nbdgw import errors
from tests.gateway.cli_support import EmbeddedDisk, GatewayProcess, make_certs, make_embedded_disk
from tests.gateway.client_support import FLAVOURS, client, serve_embedded

pytestmark = pytest.mark.interop
TOKEN = "backup-s3cret"
MONITOR_TOKEN = "monitor-s3cret"
FAST = nbdgw.Retry(attempts=2, backoff=0.01, max_backoff=0.01)


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    yield from serve_embedded(tmp_path_factory, "errors")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_errors_by_meaning(served: tuple[GatewayProcess, EmbeddedDisk], flavour: str) -> None:
    gw, disk = served
    with client(flavour, gw.target) as c:
        with pytest.raises(errors.ExportNotFound) as nf:
            c.call("get_export", "nope")
        e = nf.value
        assert isinstance(e, errors.NotFound) and isinstance(e, nbdgw.NbdgwError)
        assert (e.code, e.reason, e.metadata["export"]) == ("NOT_FOUND", "EXPORT_NOT_FOUND", "nope")
        assert (e.resource_type, e.resource_name) == ("nbdgw.dev/Export", "exports/nope")
        assert "nope" in e.message and str(e).startswith("NOT_FOUND: ")
        assert e.attempts == 1  # not worth a retry

        with pytest.raises(errors.BitmapNotFound) as bnf:
            c.call("iter_extents", "disk", "nosuch")
        assert bnf.value.resource_name.endswith("qemu:dirty-bitmap:nosuch")

        with pytest.raises(errors.OutOfRange) as oor:
            c.call("iter_extents", "disk", "backup", offset=disk.size)
        assert oor.value.reason == "RANGE_PAST_END"
        assert oor.value.metadata["size"] == str(disk.size)
        with pytest.raises(errors.OutOfRange):
            c.call("clear_range", "disk", "backup", disk.size - 4096, 8192)

        with pytest.raises(errors.InvalidArgument) as bad:
            c.call("iter_extents", "disk", "backup", length=0)
        assert [v.field for v in bad.value.field_violations] == ["length"]
        assert bad.value.field_violations[0].description

        with pytest.raises(errors.InvalidArgument) as token:
            c.call("iter_extents", "disk", "backup", resume_token="garbage")
        assert token.value.reason == "INVALID_RESUME_TOKEN"

        with pytest.raises(errors.ClearNotSupported) as unsup:
            c.call("clear_range", "disk", "base:allocation", 0, 65536)
        assert isinstance(unsup.value, errors.FailedPrecondition)
        assert unsup.value.violations and unsup.value.violations[0].description


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_unavailable_after_bounded_retries(flavour: str) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{probe.getsockname()[1]}"
    with client(flavour, target, retry=FAST) as c:
        with pytest.raises(errors.Unavailable) as unary:
            c.call("list_exports")
        assert unary.value.attempts == FAST.attempts + 1
        with pytest.raises(errors.Unavailable) as stream:
            c.call("iter_extents", "disk", "backup")
        assert stream.value.attempts == FAST.attempts + 1
        # Not retried: a second snapshot could come of it.
        with pytest.raises(errors.Unavailable) as create:
            c.call("create_snapshot", "disk")
        assert create.value.attempts == 1


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_deadline_on_by_default(flavour: str) -> None:
    """A peer that accepts and never answers: the unary deadline ends the call."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        with client(flavour, target, timeout=0.5, retry=FAST) as c:
            start = time.monotonic()
            with pytest.raises(errors.DeadlineExceeded):
                c.call("get_export", "disk")
            assert time.monotonic() - start < 20  # the deadline ended it, not a hang
    assert nbdgw.Client.__init__.__kwdefaults__["timeout"] == 30.0


def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.ConfigurationError):
        nbdgw.Client("no-port")
    with pytest.raises(ValueError, match="go together"):
        nbdgw.Client("127.0.0.1:1", tls=nbdgw.TLS(cert=b"x"))
    with pytest.raises(errors.ConfigurationError, match="cannot read the CA bundle"):
        nbdgw.Client("127.0.0.1:1", tls=nbdgw.TLS(ca=tmp_path / "missing.pem"))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_tls_token_and_policy(tmp_path: Path, certs: dict[str, Path], flavour: str) -> None:
    disk = make_embedded_disk(tmp_path / "disk.img")
    (tmp_path / "tokens").write_text(f"backup {TOKEN}\nmonitoring {MONITOR_TOKEN}\n")
    (tmp_path / "policy.toml").write_text(
        '[identities.backup]\noperations = ["list", "extents", "data", "clear"]\n'
        '[identities.monitoring]\noperations = ["list"]\n'
    )
    args = ["--image", f"disk={disk.path}", "--token-file", str(tmp_path / "tokens")]
    args += ["--policy-file", str(tmp_path / "policy.toml")]
    args += ["--grpc-tls-cert-file", str(certs["server_pem"])]
    args += ["--grpc-tls-key-file", str(certs["server_key"])]
    tls = nbdgw.TLS(ca=certs["ca_pem"])
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        with client(flavour, gw.target, tls=tls, token=TOKEN) as c:
            assert [e.id for e in c.call("list_exports")] == ["disk"]
            assert c.call("iter_extents", "disk", "backup")[-1].end == disk.size
        named = nbdgw.TLS(ca=certs["ca_pem"].read_bytes(), server_name="gateway.test")
        with client(flavour, gw.target, tls=named, token=TOKEN) as c:
            assert c.call("get_export", "disk").size == disk.size
        for token in (None, "wrong"):
            with client(flavour, gw.target, tls=tls, token=token) as c:
                with pytest.raises(errors.Unauthenticated) as unauth:
                    c.call("list_exports")
                assert unauth.value.reason == "UNAUTHENTICATED"
        with client(flavour, gw.target, tls=tls, token=MONITOR_TOKEN) as c:
            c.call("list_exports")
            with pytest.raises(errors.PermissionDenied) as denied:
                c.call("iter_extents", "disk", "backup")
            assert denied.value.reason == "PERMISSION_DENIED"
        # Plaintext against a TLS port, or a certificate for another name: no connection.
        with (
            client(flavour, gw.target, token=TOKEN, retry=FAST) as c,
            pytest.raises(errors.Unavailable),
        ):
            c.call("list_exports")
        wrong = nbdgw.TLS(ca=certs["ca_pem"], server_name="other.test")
        with (
            client(flavour, gw.target, tls=wrong, token=TOKEN, retry=FAST) as c,
            pytest.raises(errors.Unavailable),
        ):
            c.call("list_exports")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_mutual_tls(tmp_path: Path, certs: dict[str, Path], flavour: str) -> None:
    disk = make_embedded_disk(tmp_path / "disk.img")
    args = ["--image", f"disk={disk.path}"]
    args += ["--grpc-tls-cert-file", str(certs["server_pem"])]
    args += ["--grpc-tls-key-file", str(certs["server_key"])]
    args += ["--grpc-tls-client-ca-file", str(certs["ca_pem"])]
    with GatewayProcess(*args, data_dir=tmp_path / "data") as gw:
        mtls = nbdgw.TLS(ca=certs["ca_pem"], cert=certs["client_pem"], key=certs["client_key"])
        with client(flavour, gw.target, tls=mtls) as c:
            assert c.call("iter_extents", "disk", "backup")[-1].end == disk.size
        no_cert = nbdgw.TLS(ca=certs["ca_pem"])
        with (
            client(flavour, gw.target, tls=no_cert, retry=FAST) as c,
            pytest.raises(errors.NbdgwError),
        ):
            c.call("list_exports")
