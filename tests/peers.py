"""Where the real NBD peers live, and how a test asks for one.

Locally a missing peer skips the test with the command that installs it; in CI (CI=true) it is a
failure, because a silently skipped interop test proves nothing.
"""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
QEMU10_DIR = Path(os.environ.get("NBDGW_QEMU10_DIR", ROOT / ".cache" / "qemu10")) / "usr" / "bin"
LIBNBD_PYTHONPATH = "/usr/lib/python3/dist-packages"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str, install: str = "run scripts/install-deps.sh") -> NoReturn:
    """``what`` is not installed: skip the test locally, fail it in CI; ``install`` says how to
    get it. Every test that needs something optional asks through here (or :func:`tool`)."""
    msg = f"{what} is not installed: {install}"
    if IN_CI:
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def need_module(name: str, install: str) -> ModuleType:
    """Import ``name``, or :func:`missing` it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"Python module {name}", install)


def _missing(what: str) -> None:
    missing(what)


def tool(name: str) -> str:
    """Path of a Debian-installed tool (qemu-nbd 7.2, nbdinfo, nbdkit...)."""
    path = shutil.which(name)
    if path is None:
        _missing(name)
        raise AssertionError  # unreachable
    return path


def qemu10(name: str) -> str:
    """Path of a qemu 10 tool (extended headers) unpacked from bookworm-backports."""
    path = QEMU10_DIR / name
    if not path.exists():
        _missing(f"qemu 10 {name} ({path})")
    return str(path)
