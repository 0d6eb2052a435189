"""A TCP proxy between a gRPC client and the gateway that corrupts data in flight.

It forwards both directions unchanged, except that it follows the HTTP/2 frames the gateway
sends and, inside them, the gRPC messages of each stream (a 5-byte prefix, then the message):
in the first ``count`` messages of at least ``min_message`` bytes, it flips one byte in the
middle, which lies inside the ``data`` field of a StreamExtents data message (its other fields
are a few hundred bytes at its start and its CRC at its end). Loopback plaintext only: there is
no TLS to notice, and gRPC itself carries no checksum, which is the point of the test.

With ``fix_crc``, it also rewrites the message's ``data_crc32c`` (its last 5 bytes: the tag of
field 13, fixed32, then 4 bytes little-endian) to the CRC32C of the altered data, as a
corruption that CRC32C misses would look (once in 2^32 messages): only the stream digest can
then see it. CRC32C is linear, so the new value is the old one XOR the CRC of the error
pattern alone: ``crc(0x40, m zeros) ^ crc(m + 1 zeros)``, with ``m`` the data bytes after the
flipped one. That assumes the data field runs up to the CRC field and the CRC field is last:
true of the uncompressed messages of a ``base:allocation`` stream other than a digest
stream's last one (a compressed message has ``data_compression`` after the CRC, a digest
stream's last message its ``digest``, a dirty bitmap's stream a clear token between the data
and the CRC). ``crc_not_found`` counts the messages whose last 5 bytes were not a CRC field;
a test must also see that the altered message got through its CRC32C check.
"""

from __future__ import annotations

import asyncio
import struct
import threading
from dataclasses import dataclass, field

from gateway.integrity import crc32c

_FRAME_HEADER = struct.Struct(">I")  # 24-bit length in the first 3 bytes, then type
_DATA = 0x0
_CRC_TAG = 13 << 3 | 5  # data_crc32c: field 13, wire type 5 (fixed32)
_PADDED = 0x8


@dataclass
class _GrpcStream:
    """Where the gRPC framing of one HTTP/2 stream stands."""

    prefix: bytearray = field(default_factory=bytearray)  # of the current message, up to 5
    remaining: int = 0  # bytes of the current message still to come
    length: int = 0  # of the current message
    flip_at: int = -1  # position in the current message to flip, -1 for none
    crc_delta: bytes = b""  # with fix_crc: XOR of the CRC field's 4 bytes, once flipped


class CorruptingProxy:
    """``with CorruptingProxy("127.0.0.1:PORT") as proxy:`` then point the client at
    ``proxy.target``. ``flipped`` lists the (message length, position) of each flip."""

    def __init__(
        self, target: str, *, min_message: int = 64 << 10, count: int = 1, fix_crc: bool = False
    ) -> None:
        host, port = target.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.min_message = min_message
        self.count = count
        self.fix_crc = fix_crc
        self.flipped: list[tuple[int, int]] = []
        self.crc_fixed = 0  # messages whose CRC field was rewritten
        self.crc_not_found = 0  # messages where the last 5 bytes were not a CRC field
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
                    s.crc_delta = b""
                    if s.length >= self.min_message and len(self.flipped) < self.count:
                        s.flip_at = s.length // 2
                continue
            take = min(s.remaining, end - pos)
            at = s.length - s.remaining  # position in the message of payload[pos]
            if 0 <= s.flip_at - at < take:
                payload[pos + s.flip_at - at] ^= 0x40
                self.flipped.append((s.length, s.flip_at))
                if self.fix_crc:
                    m = s.length - 5 - s.flip_at - 1
                    delta = crc32c(b"\x40" + bytes(m)) ^ crc32c(bytes(m + 1))
                    s.crc_delta = delta.to_bytes(4, "little")
            if s.crc_delta:
                self._fix_crc(s, payload, pos, at, take)
            s.remaining -= take
            pos += take

    def _fix_crc(self, s: _GrpcStream, payload: bytearray, pos: int, at: int, take: int) -> None:
        """XOR the CRC field's bytes that lie in ``payload[pos : pos + take]``."""
        tag_at = s.length - 5
        for i in range(max(at, tag_at), min(at + take, s.length)):
            if i == tag_at:
                if payload[pos + i - at] != _CRC_TAG:
                    self.crc_not_found += 1
                    s.crc_delta = b""
                    return
                continue
            payload[pos + i - at] ^= s.crc_delta[i - tag_at - 1]
            if i == s.length - 1:
                self.crc_fixed += 1
                s.crc_delta = b""
