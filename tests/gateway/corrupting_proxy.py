"""A TCP proxy between a gRPC client and the gateway that corrupts data in flight.

It forwards both directions unchanged, except that it follows the HTTP/2 frames the gateway
sends and, inside them, the gRPC messages of each stream (a 5-byte prefix, then the message):
in the first ``count`` messages of at least ``min_message`` bytes, it flips one byte in the
middle, which lies inside the ``data`` field of a StreamExtents data message (its other fields
are a few hundred bytes at its start and its CRC at its end). Loopback plaintext only: there is
no TLS to notice, and gRPC itself carries no checksum, which is the point of the test.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from dataclasses import dataclass, field

_FRAME_HEADER = struct.Struct(">I")  # 24-bit length in the first 3 bytes, then type
_DATA = 0x0
_PADDED = 0x8


@dataclass
class _GrpcStream:
    """Where the gRPC framing of one HTTP/2 stream stands."""

    prefix: bytearray = field(default_factory=bytearray)  # of the current message, up to 5
    remaining: int = 0  # bytes of the current message still to come
    length: int = 0  # of the current message
    flip_at: int = -1  # position in the current message to flip, -1 for none


class CorruptingProxy:
    """``with CorruptingProxy("127.0.0.1:PORT") as proxy:`` then point the client at
    ``proxy.target``. ``flipped`` lists the (message length, position) of each flip."""

    def __init__(self, target: str, *, min_message: int = 64 << 10, count: int = 1) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.min_message = min_message
        self.count = count
        self.flipped: list[tuple[int, int]] = []
        self.target = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> CorruptingProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.target = f"127.0.0.1:{port}"

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        tasks = [
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._frames(up_reader, writer)),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            up_writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(1 << 16):
            writer.write(chunk)
            await writer.drain()

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Gateway to client: frame by frame, looking into DATA frames."""
        streams: dict[int, _GrpcStream] = {}
        try:
            while True:
                header = await reader.readexactly(9)
                length = _FRAME_HEADER.unpack(b"\0" + header[:3])[0]
                kind, flags = header[3], header[4]
                stream_id = _FRAME_HEADER.unpack(header[5:9])[0] & 0x7FFFFFFF
                payload = bytearray(await reader.readexactly(length))
                if kind == _DATA and payload:
                    start = 1 if flags & _PADDED else 0
                    end = length - (payload[0] if flags & _PADDED else 0)
                    grpc = streams.setdefault(stream_id, _GrpcStream())
                    self._scan(grpc, payload, start, end)
                writer.write(header + payload)
                await writer.drain()
        except asyncio.IncompleteReadError:
            return

    def _scan(self, s: _GrpcStream, payload: bytearray, pos: int, end: int) -> None:
        while pos < end:
            if s.remaining == 0:
                take = min(5 - len(s.prefix), end - pos)
                s.prefix += payload[pos : pos + take]
                pos += take
                if len(s.prefix) == 5:
                    s.length = s.remaining = struct.unpack(">I", s.prefix[1:5])[0]
                    s.prefix.clear()
                    s.flip_at = -1
                    if s.length >= self.min_message and len(self.flipped) < self.count:
                        s.flip_at = s.length // 2
                continue
            take = min(s.remaining, end - pos)
            at = s.length - s.remaining  # position in the message of payload[pos]
            if 0 <= s.flip_at - at < take:
                payload[pos + s.flip_at - at] ^= 0x40
                self.flipped.append((s.length, s.flip_at))
            s.remaining -= take
            pos += take
