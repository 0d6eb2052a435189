"""deploy/kubernetes-cbt: nbdgw as a CSI driver's SnapshotMetadata backend. The Kubernetes core
types are schema-valid for 1.33 (kubernetes-validate --strict), the SnapshotMetadataService
resource is valid against its CRD's schema (crd/, written from the upstream CRD's fields), and
the pieces agree: the sidecar dials the socket nbdgw serves (one shared volume), the resource
is named after the driver name nbdgw answers and points at the sidecar's Service, and the
sidecar's ServiceAccount holds the RBAC it needs."""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.cli import build_parser
from gateway.config import load_file
from tests.deploy.test_manifests import K8S_VERSION, documents, need
from tests.peers import ROOT

CDIR = ROOT / "deploy" / "kubernetes-cbt"
CORE = ["rbac.yaml", "configmap.yaml", "deployment.yaml", "service.yaml"]


def by_kind(name: str) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in documents(CDIR / name)}


@pytest.mark.parametrize("name", [*CORE, "crd/snapshotmetadataservices.yaml"])
def test_core_types_strict(name: str) -> None:
    kv = need("kubernetes_validate")
    for doc in documents(CDIR / name):
        kv.validate(doc, K8S_VERSION, strict=True)


def crd_schema() -> dict[str, Any]:
    (crd,) = documents(CDIR / "crd" / "snapshotmetadataservices.yaml")
    (version,) = crd["spec"]["versions"]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])

    def strict(node: dict[str, Any]) -> None:  # unknown fields are pruned by the API: refuse
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
            for child in node["properties"].values():
                strict(child)

    strict(schema)
    return schema


def test_resource_matches_its_crd() -> None:
    jsonschema = need("jsonschema")
    (crd,) = documents(CDIR / "crd" / "snapshotmetadataservices.yaml")
    (cr,) = documents(CDIR / "snapshotmetadataservice.yaml")
    group, version = cr["apiVersion"].split("/")
    assert (group, cr["kind"]) == (crd["spec"]["group"], crd["spec"]["names"]["kind"])
    assert version in [v["name"] for v in crd["spec"]["versions"]]
    assert "namespace" not in cr["metadata"]  # cluster-scoped
    schema = crd_schema()
    jsonschema.validate(cr, schema)
    base64.b64decode(cr["spec"]["caCert"], validate=True)  # format: byte
    # The check bites: a misspelt or missing field fails.
    for broken in ({"adress": "x"}, {"address": None}):
        bad = copy.deepcopy(cr)
        bad["spec"].update(broken)
        bad["spec"] = {k: v for k, v in bad["spec"].items() if v is not None}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def pod() -> dict[str, Any]:
    return by_kind("deployment.yaml")["Deployment"]["spec"]["template"]["spec"]


def test_the_pieces_agree(tmp_path: Path) -> None:
    spec = pod()
    cs = {c["name"]: c for c in spec["containers"]}
    gw, sidecar = cs["nbdgw"], cs["csi-snapshot-metadata"]
    args = build_parser().parse_args(gw["args"])
    assert args.command == "serve"
    # nbdgw's configuration is the ConfigMap's, mounted where --config says.
    (toml,) = by_kind("configmap.yaml")["ConfigMap"]["data"].values()
    (tmp_path / "nbdgw.toml").write_text(toml)
    config = load_file(tmp_path / "nbdgw.toml")
    assert config.csi_socket and config.exports
    mounts = {m["mountPath"]: m["name"] for m in gw["volumeMounts"]}
    assert mounts[str(Path(args.config).parent)] == "config"
    # One emptyDir holds the socket nbdgw serves and the sidecar dials.
    flags = dict(a.removeprefix("--").split("=", 1) for a in sidecar["args"])
    assert flags["csi-address"] == config.csi_socket
    sock_dir = str(Path(config.csi_socket).parent)
    side_mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert mounts[sock_dir] == side_mounts[sock_dir]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts[sock_dir]]
    # Tokens are checked for the audience the resource advertises.
    (cr,) = documents(CDIR / "snapshotmetadataservice.yaml")
    assert flags["audience"] == cr["spec"]["audience"]
    # Ready from the sidecar's health endpoint, on the port it serves it.
    probe = sidecar["readinessProbe"]["httpGet"]
    (http,) = [p for p in sidecar["ports"] if p["name"] == probe["port"]]
    assert probe["path"] == "/health" and f":{http['containerPort']}" == flags["http-endpoint"]
    # No 10-minute cap on streams.
    assert int(flags["max-streaming-duration-min"]) > 10
    # The resource: named after nbdgw's driver name, pointing at the sidecar's Service port.
    assert cr["metadata"]["name"] == config.csi_driver_name
    svc = by_kind("service.yaml")["Service"]
    host, port = cr["spec"]["address"].rsplit(":", 1)
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    (sp,) = [p for p in svc["spec"]["ports"] if p["port"] == int(port)]
    (cp,) = [p for p in sidecar["ports"] if p["name"] == sp["targetPort"]]
    assert cp["containerPort"] == int(flags["port"])
    labels = by_kind("deployment.yaml")["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    # TLS files come from the Secret mounted where the flags say.
    assert side_mounts[str(Path(flags["tls-cert"]).parent)] == "tls"
    assert "secret" in volumes["tls"]


def test_sidecar_rbac() -> None:
    docs = documents(CDIR / "rbac.yaml")
    kinds = {d["kind"]: d for d in docs}
    sa, role, binding = kinds["ServiceAccount"], kinds["ClusterRole"], kinds["ClusterRoleBinding"]
    assert pod()["serviceAccountName"] == sa["metadata"]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": sa["metadata"]["name"],
            "namespace": sa["metadata"]["namespace"]} in binding["subjects"]  # fmt: skip
    granted = {
        (group, res, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
    }
    for need_ in [
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("authorization.k8s.io", "subjectaccessreviews", "create"),
        ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
        ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
        ("cbt.storage.k8s.io", "snapshotmetadataservices", "get"),
    ]:
        assert need_ in granted, need_
    # Nothing more than reading: no secrets, no writes to snapshots.
    assert not any(r == "secrets" for _, r, _ in granted)
    assert not any(v in ("update", "patch", "delete") for _, _, v in granted)


def test_kustomization_lists_every_resource() -> None:
    (k,) = documents(CDIR / "kustomization.yaml")
    assert sorted(k["resources"]) == sorted([*CORE, "snapshotmetadataservice.yaml"])
