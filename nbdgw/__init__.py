"""The Python client of nbdgw, and (``nbdgw.v1``) the generated gRPC code of its API.

::

    import nbdgw

    with nbdgw.Client("127.0.0.1:50051") as client:
        for extent in client.iter_extents("disk", "backup", filter=nbdgw.ExtentFilter.SET):
            print(extent.offset, extent.length)

``nbdgw.Client`` (blocking) and ``nbdgw.AsyncClient`` (asyncio) have the same surface; the
models are frozen dataclasses and the exceptions live in :mod:`nbdgw.errors`. Everything is
imported on first use (PEP 562), so ``import nbdgw.v1.bitmap_service_pb2`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbdgw import errors
    from nbdgw._async import AsyncClient
    from nbdgw._models import (
        Allocation,
        Bitmap,
        BitmapKind,
        BlockSizes,
        ByteRange,
        Checkpoint,
        ClearMode,
        ClearResult,
        DataChunk,
        Export,
        ExportFlags,
        ExportState,
        Extent,
        ExtentBatch,
        ExtentFilter,
        ForkedBitmap,
        GenerationChange,
        Release,
        RetryEvent,
        Snapshot,
        SnapshotOnFull,
        SnapshotState,
    )
    from nbdgw._options import TLS, Retry
    from nbdgw._sync import Client
    from nbdgw.errors import (
        CallError,
        ConfigurationError,
        NbdgwError,
        NotFound,
        StreamError,
        Unavailable,
    )

__all__ = [
    "TLS",
    "Allocation",
    "AsyncClient",
    "Bitmap",
    "BitmapKind",
    "BlockSizes",
    "ByteRange",
    "CallError",
    "Checkpoint",
    "ClearMode",
    "ClearResult",
    "Client",
    "ConfigurationError",
    "DataChunk",
    "Export",
    "ExportFlags",
    "ExportState",
    "Extent",
    "ExtentBatch",
    "ExtentFilter",
    "ForkedBitmap",
    "GenerationChange",
    "NbdgwError",
    "NotFound",
    "Release",
    "Retry",
    "RetryEvent",
    "Snapshot",
    "SnapshotOnFull",
    "SnapshotState",
    "StreamError",
    "Unavailable",
    "errors",
]

# Where each public name is defined; imported on first use.
_LAZY: dict[str, str] = {
    "AsyncClient": "nbdgw._async",
    "Client": "nbdgw._sync",
    "Retry": "nbdgw._options",
    "TLS": "nbdgw._options",
    "errors": "nbdgw.errors",
    **{
        name: "nbdgw.errors"
        for name in (
            "CallError",
            "ConfigurationError",
            "NbdgwError",
            "NotFound",
            "StreamError",
            "Unavailable",
        )
    },
}
_LAZY.update({name: "nbdgw._models" for name in __all__ if name not in _LAZY})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nbdgw' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "errors":
        value = getattr(value, name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
