"""deploy/kubernetes: schema-valid for Kubernetes 1.33 (kubernetes-validate --strict), and
consistent with the gateway they run: a native sidecar whose flags `nbdgw serve` accepts, probes
on the port it listens on, the NBD socket shared with qemu-nbd, every container hardened."""

from __future__ import annotations

import argparse
import importlib
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from gateway.cli import build_parser
from nbdcore.uri import NBDURI
from tests.peers import IN_CI, ROOT

KDIR = ROOT / "deploy" / "kubernetes"
K8S_VERSION = "1.33.0"


def need(module: str) -> ModuleType:
    """kubernetes-validate (and PyYAML, its dependency) come from PyPI, not from Debian."""
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} is missing: .venv/bin/pip install kubernetes-validate"
        if IN_CI:
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


def documents(path: Path) -> list[dict[str, Any]]:
    yaml = need("yaml")
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def resource_files() -> list[Path]:
    return sorted(p for p in KDIR.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def pod() -> dict[str, Any]:
    (deployment,) = documents(KDIR / "deployment.yaml")
    assert deployment["kind"] == "Deployment"
    return deployment["spec"]["template"]


def containers(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod["spec"]
    return {c["name"]: c for c in [*spec["initContainers"], *spec["containers"]]}


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: p.name)
def test_schema_strict_1_33(path: Path) -> None:
    kv = need("kubernetes_validate")
    docs = documents(path)
    assert docs
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError


def test_cli_validates_every_file() -> None:
    need("kubernetes_validate")
    files = [str(p) for p in resource_files()]
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", K8S_VERSION, *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_validator_would_catch_mistakes(pod: dict[str, Any]) -> None:
    """The two checks above mean something: a misspelt field fails --strict, and a native
    sidecar fails against a Kubernetes that has none (1.27)."""
    kv = need("kubernetes_validate")
    (deployment,) = documents(KDIR / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)
    (deployment,) = documents(KDIR / "deployment.yaml")
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, "1.27.0", strict=True)


def test_every_container_is_hardened(pod: dict[str, Any]) -> None:
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == 65532 and security["runAsGroup"] == 65532
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["automountServiceAccountToken"] is False
    for name, c in containers(pod).items():
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        assert "privileged" not in sc and "runAsUser" not in sc, name  # the Pod's 65532
        assert c["resources"]["limits"]["memory"], name


def test_gateway_is_a_native_sidecar_with_flags_serve_accepts(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    gateway = containers(pod)["nbdgw"]
    assert gateway in spec["initContainers"] and gateway["restartPolicy"] == "Always"
    # Regular init containers before it run to completion first; none may come after it
    # expecting qemu-nbd (it only starts after all init containers).
    assert spec["initContainers"][-1] is gateway
    args = build_parser().parse_args(gateway["args"])
    assert args.command == "serve"
    host, port = args.listen.rsplit(":", 1)
    assert host == "0.0.0.0"  # reachable through the Service and by the kubelet's probes
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports["grpc"] == int(port)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert gateway[probe]["grpc"]["port"] == int(port), probe
    # Startup and liveness must not depend on qemu-nbd, which waits for the startup probe.
    assert gateway["startupProbe"]["grpc"]["service"] == ""
    assert gateway["livenessProbe"]["grpc"]["service"] == ""
    from nbdgw.v1 import bitmap_service_pb2

    service = bitmap_service_pb2.DESCRIPTOR.services_by_name["BitmapService"].full_name
    assert gateway["readinessProbe"]["grpc"]["service"] == service
    grace = float(args.grace_period)
    assert spec["terminationGracePeriodSeconds"] > grace


def _mounts(c: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def test_nbd_socket_is_shared_with_qemu_nbd(pod: dict[str, Any]) -> None:
    cs = containers(pod)
    gateway, qemu = cs["nbdgw"], cs["qemu-nbd"]
    args = build_parser().parse_args(gateway["args"])
    exports = [e.split("=", 1) for e in args.export]
    assert len(exports) == 1
    _gateway_name, uri_text = exports[0]
    uri = NBDURI.parse(uri_text)
    assert uri.is_unix and uri.socket
    qemu_args = dict(a.split("=", 1) for a in qemu["args"] if a.startswith("--") and "=" in a)
    assert qemu_args["--socket"] == uri.socket
    assert qemu_args["--export-name"] == uri.export
    sock_dir = str(Path(uri.socket).parent)
    assert _mounts(gateway)[sock_dir] == _mounts(qemu)[sock_dir]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert "emptyDir" in volumes[_mounts(gateway)[sock_dir]]
    # The bitmap qemu-nbd exports is the one make-disk creates.
    script = " ".join(cs["make-disk"]["args"])
    assert f'bitmap --add --granularity 65536 "$disk.new" {qemu_args["--bitmap"]}' in script
    assert qemu["args"][-1].startswith(_by_name(_mounts(qemu), "disk"))
    assert "--read-only" in qemu["args"]


def _by_name(mounts: dict[str, str], volume: str) -> str:
    (path,) = [p for p, v in mounts.items() if v == volume]
    return path


def test_writable_paths_are_volumes_and_secrets_are_read_only_files(pod: dict[str, Any]) -> None:
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    gateway = containers(pod)["nbdgw"]
    mounts = _mounts(gateway)
    args = build_parser().parse_args(gateway["args"])
    for path in ("/tmp", args.data_dir):
        assert "emptyDir" in volumes[mounts[path]], path
    secret_mounts = {
        m["mountPath"]: volumes[m["name"]]["secret"]["secretName"]
        for m in gateway["volumeMounts"]
        if "secret" in volumes[m["name"]]
    }
    assert set(secret_mounts.values()) == {"nbdgw-api-token", "nbdgw-nbd-tls"}
    for m in gateway["volumeMounts"]:
        if "secret" in volumes[m["name"]]:
            assert m["readOnly"] is True
            assert volumes[m["name"]]["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    env = {e["name"]: e["value"] for e in gateway["env"]}
    for key in ("NBDGW_TLS_CA_FILE", "NBDGW_TLS_CERT_FILE", "NBDGW_TLS_KEY_FILE"):
        assert str(Path(env[key]).parent) in secret_mounts, key
    # The example Secrets carry the keys the Pod expects.
    examples = {d["metadata"]["name"]: d for d in documents(KDIR / "secrets.example.yaml")}
    assert set(examples) == set(secret_mounts.values())
    tls_dir = next(p for p, s in secret_mounts.items() if s == "nbdgw-nbd-tls")
    for key in ("NBDGW_TLS_CA_FILE", "NBDGW_TLS_CERT_FILE", "NBDGW_TLS_KEY_FILE"):
        assert Path(env[key]).relative_to(tls_dir).name in examples["nbdgw-nbd-tls"]["stringData"]


def test_service_reaches_the_gateway_port(pod: dict[str, Any]) -> None:
    (service,) = documents(KDIR / "service.yaml")
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (port,) = service["spec"]["ports"]
    gateway = containers(pod)["nbdgw"]
    assert port["targetPort"] in {p["name"] for p in gateway["ports"]}
    (policy,) = documents(KDIR / "networkpolicy.yaml")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert [p["port"] for p in grpc_rule["ports"]] == [ports["grpc"]]
    assert [p["port"] for p in metrics_rule["ports"]] == [ports["metrics"]]
    # Metrics only from the monitoring namespace, not from every client of the API.
    (source,) = metrics_rule["from"]
    assert source == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
    }


def test_gateway_serves_metrics_on_the_declared_port(pod: dict[str, Any]) -> None:
    from gateway.config import LOG_FORMATS, parse_listen

    gateway = containers(pod)["nbdgw"]
    env = {e["name"]: e["value"] for e in gateway["env"]}
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = " ".join(a.help or "" for a in sub.choices["serve"]._actions)
    for name in env:
        # Every variable set here is one the gateway reads (a typo would be silently ignored).
        assert f"${name}" in helps, name
    assert parse_listen(env["NBDGW_METRICS_LISTEN"]) == ("0.0.0.0", ports["metrics"])
    assert env["NBDGW_LOG_FORMAT"] in LOG_FORMATS


def test_kustomization_lists_every_resource_and_image(pod: dict[str, Any]) -> None:
    (kustomization,) = documents(KDIR / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in resource_files()} - {"secrets.example.yaml"}
    assert listed == present
    (pvc,) = documents(KDIR / "pvc.yaml")
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == [pvc["metadata"]["name"]]
    (sa,) = documents(KDIR / "serviceaccount.yaml")
    assert pod["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    images = {i["name"] for i in kustomization["images"]}
    assert {c["image"] for c in containers(pod).values()} == images


def test_make_disk_script_is_valid_shell(pod: dict[str, Any]) -> None:
    (script,) = containers(pod)["make-disk"]["args"]
    proc = subprocess.run(["sh", "-n", "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(containers(pod)["make-disk"]["command"][0]) == ["/bin/sh"]


def test_gateway_checks_the_mounted_token(pod: dict[str, Any]) -> None:
    """The API token Secret is required and the gateway reads it with --token-file (the
    security helper's wiring): the API port never serves unauthenticated calls."""
    gateway = containers(pod)["nbdgw"]
    args = build_parser().parse_args(gateway["args"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = _mounts(gateway)
    token_dir = str(Path(args.token_file).parent)
    secret = volumes[mounts[token_dir]]["secret"]
    assert secret["secretName"] == "nbdgw-api-token"
    assert secret["optional"] is False
    examples = {d["metadata"]["name"]: d for d in documents(KDIR / "secrets.example.yaml")}
    assert Path(args.token_file).name in examples["nbdgw-api-token"]["stringData"]
    # What the example Secret holds is a token file the gateway accepts.
    from gateway.security.access import parse_tokens

    (entry,) = parse_tokens(examples["nbdgw-api-token"]["stringData"]["token"])
    assert entry[1] == "default"
