"""gRPC spoken by hand over one HTTP/2 connection (the ``h2`` package): what a hostile client
does that grpc's own clients never do. Calls sent as headers without their request message,
and many streams opened with a zero receive window that are never read (the server can send
nothing, so whatever it prepared stays in its memory until a limit frees it).

The client never acknowledges received data: its windows only shrink.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\0" + len(message).to_bytes(4, "big") + message


@dataclass
class RawCall:
    stream_id: int
    status: int | None = None  # grpc-status, once the trailers came
    message: str = ""  # grpc-message
    data: int = 0  # response bytes received (not acknowledged)


@dataclass
class RawH2:
    """One HTTP/2 connection to ``host:port``. ``window``: the receive window of each stream
    (SETTINGS_INITIAL_WINDOW_SIZE); 0 lets the server send headers and trailers only."""

    host: str
    port: int
    window: int = 0
    calls: dict[int, RawCall] = field(default_factory=dict)
    _conn: h2.connection.H2Connection | None = None
    _writer: asyncio.StreamWriter | None = None
    _pump: asyncio.Task[None] | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def connect(cls, target: str, window: int = 0) -> RawH2:
        host, _, port = target.rpartition(":")
        self = cls(host.strip("[]"), int(port), window)
        reader, self._writer = await asyncio.open_connection(self.host, self.port)
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._conn = h2.connection.H2Connection(config=config)
        self._conn.initiate_connection()
        self._conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
        self._flush()
        self._pump = asyncio.create_task(self._read(reader))
        return self

    def _flush(self) -> None:
        assert self._conn is not None and self._writer is not None
        data = self._conn.data_to_send()
        if data:
            self._writer.write(data)

    def call(self, path: str, metadata: dict[str, str], message: bytes | None) -> RawCall:
        """Open a call; send its request message (and end the stream) unless ``message`` is
        None: then the call is headers only, its body never comes."""
        assert self._conn is not None
        sid = self._conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", f"{self.host}:{self.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *metadata.items(),
        ]
        self._conn.send_headers(sid, headers, end_stream=False)
        if message is not None:
            self._conn.send_data(sid, grpc_frame(message), end_stream=True)
        self._flush()
        self.calls[sid] = RawCall(sid)
        return self.calls[sid]

    async def _read(self, reader: asyncio.StreamReader) -> None:
        assert self._conn is not None
        try:
            with contextlib.suppress(ConnectionError, OSError):  # the peer or we closed it
                while data := await reader.read(65536):
                    for event in self._conn.receive_data(data):
                        self._on(event)
                    self._flush()
                    self._changed.set()
        finally:
            self.closed.set()
            self._changed.set()

    def _on(self, event: h2.events.Event) -> None:
        headers = None
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
            headers = dict(event.headers)  # type: ignore[arg-type]
            call = self.calls.get(event.stream_id)  # type: ignore[arg-type]
            if call is not None and "grpc-status" in headers:
                call.status = int(headers["grpc-status"])
                call.message = str(headers.get("grpc-message", ""))
        elif isinstance(event, h2.events.DataReceived):
            call = self.calls.get(event.stream_id)  # type: ignore[arg-type]
            if call is not None:
                call.data += len(event.data or b"")

    def statuses(self) -> dict[int, int]:
        """grpc-status -> how many calls ended with it."""
        out: dict[int, int] = {}
        for call in self.calls.values():
            if call.status is not None:
                out[call.status] = out.get(call.status, 0) + 1
        return out

    async def wait(self, ended: int) -> None:
        """Wait until ``ended`` calls have a status, or the connection closed (bound it with
        ``asyncio.timeout``)."""
        while sum(self.statuses().values()) < ended and not self.closed.is_set():
            self._changed.clear()
            await self._changed.wait()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.wait_closed()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
