"""Every gateway command parses its arguments and prints --help without the client library:
grpc (and with it asyncio and ssl), the generated messages, json_format, crc32c, the backup
and verify engines are imported only by a command that runs (tests/gateway/test_cli_lazy_run.py
checks what a running command imports). Checked over ``sys.modules`` of a fresh interpreter."""

from __future__ import annotations

import pytest

from tests.unit.test_cli_startup import imported_by

# What a command imports once it runs, never for its --help (nor for a mistyped flag).
RUNTIME_ONLY = (
    "grpc",
    "asyncio",
    "ssl",
    "google.protobuf",
    "nbdgw._async",
    "nbdgw._core",
    "nbdgw._models",
    "nbdgw.v1",
    "crc32c",
    "zstandard",
    "nbdcore.storage",
    "gateway.cli.backup",  # the engines; gateway.cli.backup_args is their command line
    "gateway.cli.verify",
)


def runtime_only(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == r or m.startswith(r + ".") for r in RUNTIME_ONLY))


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "list", "--help"],
        ["export", "generation", "--help"],
        ["bitmap", "map", "--help"],
        ["bitmap", "clear", "--help"],
        ["snapshot", "create", "--help"],
        ["checkpoint", "list", "--help"],
        ["backup", "--help"],
        ["restore", "--help"],
        ["verify", "--help"],
    ],
)
def test_help_imports_no_client(argv: list[str]) -> None:
    rc, out, modules = imported_by(*argv)
    assert rc == 0 and f"usage: nbdgw {' '.join(argv[:-1])}" in out
    assert runtime_only(modules) == []


def test_a_mistyped_flag_imports_no_client() -> None:
    rc, _, modules = imported_by("backup", "vm1", "out.img", "--fulll")
    assert rc == 2
    assert runtime_only(modules) == []


def test_the_check_sees_a_client_import() -> None:
    """The check bites: a command that opens a client (refused: nothing listens on the
    socket's port 1) has imported grpc, asyncio and the client's core."""
    rc, _, modules = imported_by("export", "list", "--target", "127.0.0.1:1", "--timeout", "5")
    assert rc == 1
    assert {"grpc", "asyncio", "nbdgw._core"} <= set(runtime_only(modules))


def test_the_since_prefix_is_the_apis() -> None:
    """The CLI keeps its own copy of the since-view's name (importing the storage for one
    string would cost every backup its start-up); it must stay the server's."""
    from gateway.cli.common import DIRTY_BITMAP_PREFIX, SINCE_PREFIX
    from nbdcore.constants import CONTEXT_QEMU_DIRTY_BITMAP_PREFIX
    from nbdcore.storage.checkpoint import SINCE_PREFIX as STORAGE_SINCE

    assert DIRTY_BITMAP_PREFIX == CONTEXT_QEMU_DIRTY_BITMAP_PREFIX
    assert SINCE_PREFIX == CONTEXT_QEMU_DIRTY_BITMAP_PREFIX + STORAGE_SINCE
