"""The gateway in front of a qemu-nbd that requires TLS (x509, client certificates), configured
by a TOML host entry; plaintext and a wrong CA fail with clear statuses."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gateway.config import GatewayConfig, load_file
from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.gateway.conftest import QemuDisk, call_error, merged, run, stream_all
from tests.peers import tool, wait_listening

pytestmark = pytest.mark.interop


def make_pki(d: Path, cn: str) -> Path:
    """A CA, a server certificate for localhost and a client certificate, in the layout qemu's
    tls-creds-x509 reads (it verifies client certificates by default)."""
    d.mkdir(parents=True)
    openssl = tool("openssl")
    run(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca-cert.pem"), "-subj", f"/CN={cn}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for role, usage, san in (
        ("server", "serverAuth", "subjectAltName=DNS:localhost\n"),
        ("client", "clientAuth", ""),
    ):
        ext = d / f"{role}.ext"
        ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n{san}")
        run(openssl, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{role}-key.pem"),
            "-out", str(d / f"{role}.csr"), "-subj", f"/CN=nbdgw {role}")  # fmt: skip
        run(openssl, "x509", "-req", "-in", str(d / f"{role}.csr"), "-CA", str(d / "ca-cert.pem"),
            "-CAkey", str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2",
            "-out", str(d / f"{role}-cert.pem"), "-extfile", str(ext))  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tls_host(qemu_disk: QemuDisk, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("tls")
    pki = make_pki(d / "pki", "nbdgw test CA")
    make_pki(d / "other", "some other CA")
    sock = d / "tls.sock"
    proc = subprocess.Popen(
        [tool("qemu-nbd"), "-r", "-t", "-e", "8", "-f", "qcow2", "-x", "disk", "-B", "b0",
         "--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint=server",
         "--tls-creds", "tls0", "-k", str(sock), str(qemu_disk.path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_listening(proc, sock=sock)
        yield d
    finally:
        proc.terminate()
        proc.wait()


def write_config(d: Path, tmp_path: Path, pki: str, with_tls: bool = True) -> GatewayConfig:
    tls = (
        f'tls_ca_file = "{d / pki / "ca-cert.pem"}"\n'
        f'tls_cert_file = "{d / "pki" / "client-cert.pem"}"\n'
        f'tls_key_file = "{d / "pki" / "client-key.pem"}"\n'
        'tls_server_hostname = "localhost"\n'
    )
    scheme = "nbds+unix" if with_tls else "nbd+unix"
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "gw.toml"
    host = f'[[hosts]]\nname = "secure"\nuri = "{scheme}:///?socket={d / "tls.sock"}"\n'
    export = '[[exports]]\nname = "sec"\nhost = "secure"\nnbd_export = "disk"\n'
    path.write_text(host + (tls if with_tls else "") + export)
    config = load_file(path)
    config.data_dir = tmp_path
    return config


async def test_stream_through_tls(tls_host: Path, tmp_path: Path, start_gateway, qemu_nbd) -> None:
    gw = await start_gateway(write_config(tls_host, tmp_path, "pki"))
    export = await gw.stub.GetExport(pb.GetExportRequest(name="exports/sec"))
    assert export.host == "secure" and export.size_bytes == qemu_nbd.disk.size
    secure = await stream_all(gw.stub, export="sec", context="b0", merge_allocation=True)
    # The same disk without TLS (the plain qemu-nbd fixture) gives the same map.
    plain_config = GatewayConfig(data_dir=tmp_path)
    plain_config.add_uri_export("plain", qemu_nbd.uri)
    plain_gw = await start_gateway(plain_config)
    plain = await stream_all(plain_gw.stub, export="plain", context="b0", merge_allocation=True)
    assert merged(secure.rows) == merged(plain.rows)
    assert any(r[2] for r in secure.rows)


async def test_wrong_ca_and_plaintext_fail_clearly(
    tls_host: Path, tmp_path: Path, start_gateway
) -> None:
    gw = await start_gateway(write_config(tls_host, tmp_path, "other"))
    err = await call_error(gw.stub.GetExport(pb.GetExportRequest(name="sec")))
    assert err.code == grpc.StatusCode.INTERNAL
    assert err.info.reason == "NBD_PROTOCOL_ERROR"
    assert "certificate verify failed" in err.message

    plain = await start_gateway(write_config(tls_host, tmp_path / "p", "pki", with_tls=False))
    err = await call_error(plain.stub.GetExport(pb.GetExportRequest(name="sec")))
    assert err.code == grpc.StatusCode.FAILED_PRECONDITION
    assert err.info.reason == "NBD_OPTION_FAILED"
    assert err.info.metadata["nbd_reply"] == "ERR_TLS_REQD"
    assert err.info.metadata["host"] == "secure" and "NBD host secure" in err.message
