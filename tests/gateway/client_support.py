"""Both flavours of the nbdgw client behind one synchronous face, so that every client test
runs the same assertions against :class:`nbdgw.Client` and :class:`nbdgw.AsyncClient`."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import nbdgw
from tests.gateway.cli_support import EmbeddedDisk, GatewayProcess, make_embedded_disk

FLAVOURS = ["sync", "async"]


class Flavoured:
    """``client.call("iter_extents", ...)``: the method of the real client, its result (an
    iterator or async iterator drained into a list)."""

    def __init__(self, flavour: str, target: str, **kwargs: Any) -> None:
        self.flavour = flavour
        self.runner: asyncio.Runner | None = None
        if flavour == "sync":
            self.client: Any = nbdgw.Client(target, **kwargs)
        else:
            self.runner = asyncio.Runner()

            async def make() -> nbdgw.AsyncClient:  # inside the loop that will use it
                return nbdgw.AsyncClient(target, **kwargs)

            self.client = self.runner.run(make())

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        result = getattr(self.client, method)(*args, **kwargs)
        if self.runner is None:
            return result if not inspect.isgenerator(result) else list(result)
        if inspect.isasyncgen(result):

            async def drain() -> list[Any]:
                return [item async for item in result]

            return self.runner.run(drain())
        return self.runner.run(result)

    def close(self) -> None:
        if self.runner is None:
            self.client.close()
        else:
            self.runner.run(self.client.close())
            self.runner.close()


def serve_embedded(
    factory: pytest.TempPathFactory, name: str
) -> Iterator[tuple[GatewayProcess, EmbeddedDisk]]:
    """The body of a module's fixture: a gateway serving a fresh ``make_embedded_disk`` as
    export ``disk`` (``yield from serve_embedded(tmp_path_factory, "NAME")``)."""
    d = factory.mktemp(name)
    disk = make_embedded_disk(d / "disk.img")
    with GatewayProcess("--image", f"disk={disk.path}", data_dir=d / "data") as gw:
        yield gw, disk


@contextmanager
def client(flavour: str, target: str, **kwargs: Any) -> Iterator[Flavoured]:
    c = Flavoured(flavour, target, **kwargs)
    try:
        yield c
    finally:
        c.close()


def merged_extents(extents: list[nbdgw.Extent]) -> list[tuple[int, int, int]]:
    """(offset, length, flags) with adjacent extents of equal flags joined (nbdinfo's form)."""
    out: list[tuple[int, int, int]] = []
    for e in extents:
        if out and out[-1][0] + out[-1][1] == e.offset and out[-1][2] == e.flags:
            out[-1] = (out[-1][0], out[-1][1] + e.length, e.flags)
        else:
            out.append((e.offset, e.length, e.flags))
    return out
