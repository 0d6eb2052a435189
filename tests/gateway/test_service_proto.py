"""The API's tooling: the generated code matches the proto (scripts/gen-proto --check), buf lint
passes, and once proto/breaking-baseline names a commit, buf breaking refuses an incompatible
change (exercised in a scratch git repository holding a copy of proto/ and the script)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nbdgw.v1 import bitmap_service_pb2 as pb
from tests.peers import ROOT, missing

VENV_BIN = ROOT / ".venv" / "bin"


def sh(*cmd: str, cwd: Path = ROOT, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "BUF": str(VENV_BIN / "buf")}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd}: {proc.stdout}{proc.stderr}")
    return proc


@pytest.fixture(autouse=True)
def _need_buf() -> None:
    if not (VENV_BIN / "buf").exists():
        missing("buf", ".venv/bin/pip install buf-bin")


def test_generated_code_is_current_and_lint_clean() -> None:
    assert "up to date" in sh("scripts/gen-proto", "--check").stdout
    assert "lint ok" in sh("scripts/buf-check").stdout


def test_every_error_reason_is_documented_in_the_service() -> None:
    from gateway.errors import Reason

    reasons = {v for k, v in vars(Reason).items() if k.isupper()}
    names = {n.removeprefix("ERROR_REASON_") for n in pb.ErrorReason.keys()}  # noqa: SIM118
    assert reasons == names - {"UNSPECIFIED"}


# proto/buf.yaml turns off buf's FILE_SAME_*_PACKAGE/NAMESPACE rules (the options were added
# after v1 froze); this pins them instead. Every value but go_package is what protoc chose
# without the option, so the Java, C#, PHP and Ruby code generated before keeps its names.
LANGUAGE_OPTIONS = {
    "csharp_namespace": "Nbdgw.V1",
    "go_package": "nbdgw.dev/gen/go/nbdgw/v1;nbdgwv1",
    "java_package": "nbdgw.v1",
    "php_namespace": "Nbdgw\\V1",
    "ruby_package": "Nbdgw::V1",
}


def test_language_options_are_pinned() -> None:
    from nbdgw.v1 import snapshot_service_pb2 as spb

    for module, service in ((pb, "BitmapService"), (spb, "SnapshotService")):
        options = module.DESCRIPTOR.GetOptions()
        got = {name: getattr(options, name) for name in LANGUAGE_OPTIONS}
        assert got == LANGUAGE_OPTIONS, module.DESCRIPTOR.name
        # protoc's Java default: the file's name in CamelCase, plus OuterClass when a service
        # or message has that name; one class per file, as before.
        assert options.java_outer_classname == f"{service}OuterClass"
        assert service in module.DESCRIPTOR.services_by_name
        assert not options.HasField("java_multiple_files")


def test_breaking_change_is_refused_once_frozen(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "proto", repo / "proto")
    (repo / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "buf-check", repo / "scripts" / "buf-check")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    sh("git", "init", "-q", cwd=repo)
    sh(*git, "add", ".", cwd=repo)
    sh(*git, "commit", "-q", "-m", "v1", cwd=repo)
    head = sh("git", "rev-parse", "HEAD", cwd=repo).stdout.strip()
    (repo / "proto" / "breaking-baseline").write_text(head + "\n")
    ok = sh("scripts/buf-check", cwd=repo)
    assert f"no breaking change since {head}" in ok.stdout
    proto = repo / "proto" / "nbdgw" / "v1" / "bitmap_service.proto"
    text = proto.read_text()
    # Additive: a new field passes.
    proto.write_text(
        text.replace(
            "  uint64 granularity_bytes = 4;\n}",
            "  uint64 granularity_bytes = 4;\n  // New.\n  string note = 5;\n}",
        )
    )
    sh("scripts/buf-check", cwd=repo)
    # Changing a field's type does not.
    proto.write_text(text.replace("uint64 cleared_bytes = 2;", "uint32 cleared_bytes = 2;"))
    bad = sh("scripts/buf-check", cwd=repo, check=False)
    assert bad.returncode != 0
    assert "cleared_bytes" in bad.stdout + bad.stderr
    # A baseline that is not a commit id is refused clearly.
    (repo / "proto" / "breaking-baseline").write_text("main\n")
    bad = sh("scripts/buf-check", cwd=repo, check=False)
    assert bad.returncode == 2 and "commit id" in bad.stderr
