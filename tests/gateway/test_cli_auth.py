"""The connection flags of the gateway commands against real gateway processes that require
them: ``--token`` / ``$NBDGW_TOKEN`` (sent as ``authorization: Bearer``), ``--tls-ca`` and
``--tls-server-name`` (TLS), ``--tls-cert`` / ``--tls-key`` (mutual TLS)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.cli_support import (
    EmbeddedDisk,
    GatewayProcess,
    assert_one_line_error,
    cli,
    dirty_map,
    granules,
    make_certs,
    make_embedded_disk,
)

pytestmark = pytest.mark.interop

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def disk(tmp_path: Path) -> EmbeddedDisk:
    return make_embedded_disk(tmp_path / "disk.img")


def serve(disk: EmbeddedDisk, tmp_path: Path, *args: str) -> GatewayProcess:
    return GatewayProcess("--image", f"disk={disk.path}", *args, data_dir=tmp_path / "data")


@pytest.fixture
def token_gateway(
    disk: EmbeddedDisk, tmp_path: Path
) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with serve(disk, tmp_path, "--token-file", str(token_file)) as gw:
        yield gw, disk


def test_token_flag_and_env(
    token_gateway: tuple[GatewayProcess, EmbeddedDisk],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gw, disk = token_gateway
    t = ["--target", gw.target]
    line = assert_one_line_error(cli("export", "list", *t), 1)
    assert line.startswith("nbdgw export list: UNAUTHENTICATED")
    line = assert_one_line_error(cli("export", "list", *t, "--token", "wrong"), 1)
    assert "UNAUTHENTICATED" in line
    ok = cli("export", "list", *t, "--token", TOKEN, "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"exports/disk"' in ok.stdout

    # From the environment, for every command: extents, clear, backup.
    monkeypatch.setenv("NBDGW_TOKEN", TOKEN)
    monkeypatch.setenv("NBDGW_TARGET", gw.target)
    dirty = granules(disk.dirty, disk.size)
    assert dirty_map(gw.target, "disk", "backup") == dirty
    out = tmp_path / "b.img"
    done = cli("backup", "disk", "--bitmap", "backup", str(out), "--clear")
    assert done.returncode == 0, done.stderr
    assert dirty_map(gw.target, "disk", "backup") == []


def test_tls_and_mutual_tls(disk: EmbeddedDisk, tmp_path: Path, certs: dict[str, Path]) -> None:
    tls = ["--grpc-tls-cert-file", str(certs["server_pem"])]
    tls += ["--grpc-tls-key-file", str(certs["server_key"])]
    with serve(disk, tmp_path, *tls) as gw:
        t = ["--target", gw.target, "--timeout", "10"]
        ok = cli("export", "list", *t, "--tls-ca", str(certs["ca_pem"]))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.splitlines()[1].split()[0] == "disk"
        named = cli("bitmap", "list", "disk", *t, "--tls-ca", str(certs["ca_pem"]),
                    "--tls-server-name", "gateway.test")  # fmt: skip
        assert named.returncode == 0, named.stderr
        # A name the certificate does not carry, or no TLS at all: one line, no hang.
        line = assert_one_line_error(
            cli(
                "export",
                "list",
                *t,
                "--tls-ca",
                str(certs["ca_pem"]),
                "--tls-server-name",
                "x.test",
            ),
            1,
        )
        assert "UNAVAILABLE" in line
        line = assert_one_line_error(cli("export", "list", *t), 1)
        assert "UNAVAILABLE" in line or "DEADLINE_EXCEEDED" in line

    mtls = [*tls, "--grpc-tls-client-ca-file", str(certs["ca_pem"])]
    with serve(disk, tmp_path, *mtls) as gw:
        t = ["--target", gw.target, "--timeout", "10", "--tls-ca", str(certs["ca_pem"])]
        client = ["--tls-cert", str(certs["client_pem"]), "--tls-key", str(certs["client_key"])]
        ok = cli("bitmap", "map", "disk", "--context", "backup", "--dirty", *t, *client)
        assert ok.returncode == 0, ok.stderr
        assert len(ok.stdout.splitlines()) == len(granules(disk.dirty, disk.size))
        # Without a client certificate the handshake fails: UNAVAILABLE, one line.
        line = assert_one_line_error(cli("export", "list", *t), 1)
        assert "UNAVAILABLE" in line
