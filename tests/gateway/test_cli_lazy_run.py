"""A running gateway command imports what its path needs and no more: no json_format unless
it prints --json, no crc32c unless data arrives, no nbdcore.storage where no image or backup
state is touched. Checked over ``sys.modules`` of a fresh interpreter, against a real
gateway; the start-up time this buys is measured, not asserted (bench/, the report)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.cli_support import ENV, GatewayProcess, make_embedded_disk

pytestmark = pytest.mark.interop

LAZY = ("google.protobuf.json_format", "crc32c", "nbdcore.storage", "zstandard")


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("lazy")
    disk = make_embedded_disk(tmp / "disk.img")
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=tmp / "data") as gw:
        yield gw.target


def imported_by(*argv: str) -> tuple[int, str, set[str]]:
    """Run `nbdgw ARGV` in a fresh interpreter: its exit code, stdout and the lazily imported
    modules (of LAZY) it loaded."""
    code = (
        "import json, sys\n"
        "from gateway.cli import main\n"
        f"try:\n    rc = main({list(argv)!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "sys.stdout.flush()\n"
        "print('\\n' + json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ENV
    )
    assert proc.returncode == 0, proc.stderr
    modules = set(json.loads(proc.stderr.strip().splitlines()[-1]))
    return proc.returncode, proc.stdout, {m for m in modules if m.startswith(LAZY)}


def test_export_list_loads_json_format_only_for_json(target: str) -> None:
    _, out, lazy = imported_by("export", "list", "--target", target)
    assert out.startswith("NAME") and "disk" in out
    assert lazy == set()
    _, out, lazy = imported_by("export", "list", "--json", "--target", target)
    assert json.loads(out)[0]["name"] == "exports/disk"
    assert lazy == {"google.protobuf.json_format"}


def test_a_map_loads_no_crc32c(target: str) -> None:
    _, out, lazy = imported_by("bitmap", "map", "disk", "--context", "backup", "--target", target)
    assert "dirty" in out
    assert lazy == set()


def test_a_backup_loads_crc32c_for_its_data(target: str, tmp_path: Path) -> None:
    """Data arrived, so the CRC32C check ran: the package is loaded where it is used."""
    _, _, lazy = imported_by(
        "backup", "disk", str(tmp_path / "b.img"), "--full", "--no-progress", "--target", target
    )
    assert "crc32c" in lazy
    # It records its progress with nbdcore.durable: the image store is not for it.
    assert not lazy & {"google.protobuf.json_format", "nbdcore.storage", "zstandard"}
