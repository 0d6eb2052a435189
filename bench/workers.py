"""Our side of each benchmark, run in a fresh interpreter: ``python -m bench.workers NAME ...``.

Each measuring worker times its own work with ``perf_counter`` from just before it connects to
just after it closes (the interpreter's start and imports are not counted; the reference tools'
figures include their exec, a few milliseconds) and prints one JSON object as its last line.
A worker whose component has not landed exits with code 3 and the reason on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

EXIT_NOT_AVAILABLE = 3


def _not_available(why: str) -> None:
    print(f"not available: {why}", file=sys.stderr)
    sys.exit(EXIT_NOT_AVAILABLE)


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


def _client_malloc(args: argparse.Namespace) -> None:
    """``--keep-freed-memory``: the gateway's glibc tuning in a draining client too (each
    1 MiB message is otherwise a fresh mmap that the client page-faults in; see
    docs/benchmarks.md, gateway-data)."""
    if args.keep_freed_memory:
        from nbdcore.memory import keep_freed_memory

        keep_freed_memory()


# --- client -------------------------------------------------------------------------------------


def _client() -> Any:
    try:
        from nbdcore.aio.client import NBDClient
    except ImportError as exc:
        _not_available(f"nbdcore.aio.client has not landed ({exc})")
    return NBDClient


async def client_read(args: argparse.Namespace) -> None:
    """Read the whole export: ``in_flight`` tasks, each with its own preallocated buffer, take
    the next ``request_size`` slice until the end. ``--connections N``: through
    ``MultiConnClient`` (N connections when the export allows multi-conn), each read going to
    the least busy one. ``--block-status``: one base:allocation BLOCK_STATUS first, as nbdcopy
    does (it changes qemu-nbd's allocator regime, see docs/benchmarks.md)."""
    client_cls = _client()
    contexts = ["base:allocation"] if args.block_status else []
    start = time.perf_counter()
    client: Any
    if args.connections:
        try:
            from nbdcore.aio.multiconn import MultiConnClient
        except ImportError as exc:
            _not_available(f"nbdcore.aio.multiconn has not landed ({exc})")
        client = await MultiConnClient.connect(
            args.uri,
            connections=args.connections,
            meta_contexts=contexts,
            max_in_flight=args.in_flight,
            extended_headers=not args.compact,
        )
    else:
        client = await client_cls.connect(
            args.uri,
            meta_contexts=contexts,
            max_in_flight=args.in_flight,
            extended_headers=not args.compact,
        )
    size = client.size
    if args.block_status and size:
        await client.block_status(0, size)
    request = args.request_size
    next_offset = 0

    async def reader(buf: bytearray) -> int:
        nonlocal next_offset
        view = memoryview(buf)
        done = 0
        while next_offset < size:
            offset = next_offset
            next_offset += request
            n = min(request, size - offset)
            await client.pread_into(view[:n], offset)
            done += n
        return done

    buffers = [bytearray(request) for _ in range(args.in_flight)]
    total = sum(await asyncio.gather(*(reader(b) for b in buffers)))
    await client.close()
    elapsed = time.perf_counter() - start
    if total != size:
        raise SystemExit(f"read {total} bytes of {size}")
    _emit(seconds=elapsed, bytes=total, connections=getattr(client, "connections", 1))


def client_copy(args: argparse.Namespace) -> None:
    """``nbdcore.sync.copy.copy_export`` into a NullSink: the library's equivalent of
    ``nbdcopy URI null:`` (base:allocation per stripe, then the reads; blocking connections,
    one thread each)."""
    try:
        from nbdcore.sync.copy import NullSink, copy_export
    except ImportError as exc:
        _not_available(f"nbdcore.sync.copy has not landed ({exc})")
    start = time.perf_counter()
    result = copy_export(
        args.uri,
        NullSink(),
        connections=args.connections,
        request_size=args.request_size,
        window=args.window,
    )
    elapsed = time.perf_counter() - start
    if result.bytes_read != result.size:
        raise SystemExit(f"read {result.bytes_read} bytes of {result.size}")
    _emit(seconds=elapsed, bytes=result.bytes_read, connections=result.connections)


def client_read_sync(args: argparse.Namespace) -> None:
    """The blocking client alone: one connection, ``NBDClient.iter_reads`` over the export."""
    try:
        from nbdcore.sync.client import NBDClient
    except ImportError as exc:
        _not_available(f"nbdcore.sync.client has not landed ({exc})")
    start = time.perf_counter()
    contexts = ["base:allocation"] if args.block_status else []
    with NBDClient.connect(args.uri, meta_contexts=contexts) as client:
        if args.block_status:
            client.block_status(0, client.size)
        total = 0
        ranges = [(0, client.size)]
        for _, data in client.iter_reads(
            ranges, request_size=args.request_size, window=args.in_flight
        ):
            total += len(data)
        size = client.size
    elapsed = time.perf_counter() - start
    if total != size:
        raise SystemExit(f"read {total} bytes of {size}")
    _emit(seconds=elapsed, bytes=total, connections=1)


async def extents(args: argparse.Namespace) -> None:
    """Walk the export's extents with ``nbdcore.extents.iter_extents``, counting rows."""
    client_cls = _client()
    try:
        from nbdcore.extents import iter_extents
    except ImportError as exc:
        _not_available(f"nbdcore.extents has not landed ({exc})")
    start = time.perf_counter()
    client = await client_cls.connect(
        args.uri, meta_contexts=args.context, extended_headers=not args.compact
    )
    rows = 0
    end = 0
    async for batch in iter_extents(client, args.context):
        rows += len(batch.lengths)
        end = batch.end
    size = client.size
    await client.close()
    elapsed = time.perf_counter() - start
    if end != size:
        raise SystemExit(f"extents end at {end}, export size {size}")
    if args.expect is not None and rows != args.expect:
        raise SystemExit(f"{rows} extents, expected {args.expect}")
    _emit(seconds=elapsed, extents=rows, bytes=size)


# --- server -------------------------------------------------------------------------------------


async def serve(args: argparse.Namespace) -> None:
    """Serve ``--image`` read-only as export ``disk`` with NBDServer until SIGTERM."""
    try:
        from nbdcore.aio.server import ExportConfig, NBDServer
    except ImportError as exc:
        _not_available(f"nbdcore.aio.server has not landed ({exc})")
    try:
        from nbdcore.storage import Image
    except ImportError as exc:
        _not_available(f"nbdcore.storage.Image has not landed ({exc})")
    image = Image.open(args.image, read_only=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        async with NBDServer([ExportConfig(name="disk", image=image, read_only=True)]) as server:
            await server.start_unix(args.socket)
            await stop.wait()
    finally:
        image.close()


# --- gRPC ---------------------------------------------------------------------------------------


def _file_chunks(path: str, message_size: int) -> Iterator[bytes]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(message_size, size - offset), offset)
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


BARE_METHOD = "/bench.Bare/Stream"


NBD_READ = 512 << 10  # as the gateway's StreamExtents (MAX_READ_REQUEST)


async def _nbd_chunks(uri: str, message_size: int) -> AsyncIterator[bytes]:
    """The export's bytes in ``message_size`` pieces, as a minimal relay moves them: reads of
    512 KiB straight into the message's buffer, the next message's reads in flight while the
    current one is written (the gateway's read-ahead), one copy to ``bytes`` for grpc."""
    from nbdcore.aio.client import NBDClient

    async def fill(client: NBDClient, offset: int) -> bytes:
        n = min(message_size, client.size - offset)
        buf = bytearray(n)
        view = memoryview(buf)
        await asyncio.gather(
            *(client.pread_into(view[p : p + NBD_READ], offset + p) for p in range(0, n, NBD_READ))
        )
        return bytes(buf)

    async with await NBDClient.connect(uri) as client:
        offsets = range(0, client.size, message_size)
        nxt = asyncio.ensure_future(fill(client, offsets[0])) if offsets else None
        for i in range(len(offsets)):
            assert nxt is not None
            chunk = await nxt
            if i + 1 < len(offsets):
                nxt = asyncio.ensure_future(fill(client, offsets[i + 1]))
            yield chunk


async def _nbd_sync_chunks(uri: str, message_size: int) -> AsyncIterator[bytes]:
    """The same bytes through the blocking client (nbdcore.sync), read by a thread: what the
    gateway's data path would gain from it (an idea of issue 17, measured here, not built).
    512 KiB READs, 4 in flight, each copied into the message's buffer (iter_reads lends its
    own buffers), two messages ahead of grpc."""
    from nbdcore.sync.client import NBDClient as BlockingClient

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=2)

    def produce() -> None:
        with BlockingClient.connect(uri) as client:
            for offset in range(0, client.size, message_size):
                n = min(message_size, client.size - offset)
                buf = bytearray(n)
                for o, data in client.iter_reads([(offset, n)], request_size=NBD_READ, window=4):
                    buf[o - offset : o - offset + len(data)] = data
                asyncio.run_coroutine_threadsafe(queue.put(bytes(buf)), loop).result()
        asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    reader = loop.run_in_executor(None, produce)
    while (chunk := await queue.get()) is not None:
        yield chunk
    await reader


async def bare_grpc_server(args: argparse.Namespace) -> None:
    """A bare grpcio server: one server-streaming method sending the bytes of ``--file`` in
    ``--message-size`` messages (no protobuf: the ceiling of a gRPC byte stream). With ``--nbd
    URI`` it relays the export's bytes from that NBD host instead: everything the gateway does
    to move data, without the gateway (no protobuf, extents, tokens, metrics or auth)."""
    import grpc

    if args.keep_freed_memory:
        from nbdcore.memory import keep_freed_memory

        keep_freed_memory()

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        if args.nbd:
            chunks = _nbd_sync_chunks if args.sync else _nbd_chunks
            async for chunk in chunks(args.nbd, args.message_size):
                yield chunk
            return
        for chunk in _file_chunks(args.file, args.message_size):
            yield chunk

    handler = grpc.method_handlers_generic_handler(
        "bench.Bare",
        {
            "Stream": grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=None, response_serializer=None
            )
        },
    )
    limit = args.message_size + (1 << 20)
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Written then renamed: the harness never reads a half-written port.
    tmp = args.port_file + ".tmp"
    Path(tmp).write_text(str(port))  # noqa: ASYNC240 - a few bytes, before serving starts
    os.rename(tmp, args.port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


async def bare_grpc_drain(args: argparse.Namespace) -> None:
    import grpc

    _client_malloc(args)

    limit = args.message_size + (1 << 20)
    start, cpu = time.perf_counter(), time.process_time()
    async with grpc.aio.insecure_channel(
        args.target, options=[("grpc.max_receive_message_length", limit)]
    ) as channel:
        method = channel.unary_stream(BARE_METHOD, None, None)
        call = method(b"")
        total = 0
        if args.out:
            # Into a file, as a backup writes: each message where it belongs, fsync'd once.
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                async for msg in call:
                    os.pwrite(fd, msg, total)
                    total += len(msg)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            async for msg in call:
                total += len(msg)
    _emit(seconds=time.perf_counter() - start, bytes=total, cpu=time.process_time() - cpu)


async def stream_extents(args: argparse.Namespace) -> None:
    """Drain one StreamExtents call of the gateway, counting extents and data bytes."""
    import grpc

    try:
        from nbdgw.v1 import bitmap_service_pb2 as pb
        from nbdgw.v1 import bitmap_service_pb2_grpc as pb_grpc
    except ImportError as exc:
        _not_available(f"nbdgw.v1 generated code is missing ({exc})")
    _client_malloc(args)
    request = pb.StreamExtentsRequest(
        export=f"exports/{args.export}",
        context=args.context,
        include_data=args.include_data,
        max_extents_per_message=args.max_extents,
        digest=args.digest,
        compression=args.compression,
    )
    check: Callable[[Any], bytes] | None = None
    if args.verify:
        # As a client that stores the data must: CRC32C (and zstd) of every message.
        from nbdgw._core import message_data as check
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if args.library:
        await _stream_with_library(args, request)
        return
    start, cpu = time.perf_counter(), time.process_time()
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stream: Any = pb_grpc.BitmapServiceStub(channel).StreamExtents
        if args.in_place:
            # As nbdgw backup receives: the data stays in the bytes grpc hands over.
            from nbdgw._wire import parse_response

            stream = channel.unary_stream(
                "/nbdgw.v1.BitmapService/StreamExtents",
                request_serializer=pb.StreamExtentsRequest.SerializeToString,
                response_deserializer=parse_response,
            )
        extents = data = messages = 0
        next_offset = range_end = 0
        digest = b""
        async for msg in stream(request):
            messages += 1
            extents += len(msg.lengths)
            data += len(msg.data) if check is None else len(check(msg))
            next_offset, range_end = msg.next_offset, msg.range_end
            digest = msg.digest
    _finish(args, start, cpu, extents, data, messages, next_offset, range_end, digest)


def _finish(
    args: argparse.Namespace,
    start: float,
    cpu: float,
    extents: int,
    data: int,
    messages: int,
    next_offset: int,
    range_end: int,
    digest: bytes,
) -> None:
    """Check that a drained stream was whole (and had its digest), then print its figures."""
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if next_offset != range_end or range_end == 0:
        raise SystemExit(f"stream ended at {next_offset} of {range_end}")
    if args.expect is not None and extents < args.expect:
        raise SystemExit(f"{extents} extents, expected at least {args.expect}")
    if args.digest and len(digest) != 32:
        raise SystemExit(f"asked for a {args.digest} digest, got {digest.hex()!r}")
    _emit(seconds=elapsed, extents=extents, bytes=data, messages=messages, size=range_end, cpu=cpu)


async def _stream_with_library(args: argparse.Namespace, request: Any) -> None:
    """The same stream as a user of the Python client library receives it:
    ``nbdgw.AsyncClient.stream_extents`` (data left in the received bytes, each message's data
    checked against its CRC32C before it is yielded, resumable)."""
    from nbdgw import AsyncClient

    start, cpu = time.perf_counter(), time.process_time()
    extents = data = messages = 0
    next_offset = range_end = 0
    digest = b""
    async with AsyncClient(args.target, timeout=None) as client:
        async for batch in client.stream_extents(request):
            messages += 1
            extents += len(batch.raw.lengths)
            data += 0 if batch.data is None else len(batch.data)
            next_offset, range_end = batch.next_offset, batch.range_end
            digest = batch.raw.digest
    _finish(args, start, cpu, extents, data, messages, next_offset, range_end, digest)


# --- dispatch -----------------------------------------------------------------------------------

WORKERS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "client-read": client_read,
    "client-copy": client_copy,
    "client-read-sync": client_read_sync,
    "extents": extents,
    "serve": serve,
    "bare-grpc-server": bare_grpc_server,
    "bare-grpc-drain": bare_grpc_drain,
    "stream-extents": stream_extents,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.workers")
    sub = p.add_subparsers(dest="worker", required=True)
    s = sub.add_parser("client-read")
    s.add_argument("uri")
    s.add_argument("--request-size", type=int, default=2 << 20)
    s.add_argument("--in-flight", type=int, default=8)
    s.add_argument("--compact", action="store_true", help="no extended headers")
    s.add_argument("--connections", type=int, default=0, help="MultiConnClient (0: NBDClient)")
    s.add_argument("--block-status", action="store_true", help="one BLOCK_STATUS first")
    s = sub.add_parser("client-copy")
    s.add_argument("uri")
    s.add_argument("--connections", type=int, default=4)
    s.add_argument("--request-size", type=int, default=512 << 10)
    s.add_argument("--window", type=int, default=2, help="reads in flight per connection")
    s = sub.add_parser("client-read-sync")
    s.add_argument("uri")
    s.add_argument("--request-size", type=int, default=512 << 10)
    s.add_argument("--in-flight", type=int, default=4)
    s.add_argument("--block-status", action="store_true", help="one BLOCK_STATUS first")
    s = sub.add_parser("extents")
    s.add_argument("uri")
    s.add_argument("--context", action="append", required=True)
    s.add_argument("--expect", type=int)
    s.add_argument("--compact", action="store_true", help="no extended headers")
    s = sub.add_parser("serve")
    s.add_argument("--socket", required=True)
    s.add_argument("--image", required=True)
    s = sub.add_parser("bare-grpc-server")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--file")
    src.add_argument("--nbd", metavar="URI", help="relay the export's bytes from this NBD host")
    s.add_argument("--keep-freed-memory", action="store_true", help="glibc mallopt, as nbdgw")
    s.add_argument("--sync", action="store_true", help="--nbd through the blocking client")
    s.add_argument("--message-size", type=int, required=True)
    s.add_argument("--port-file", required=True)
    s = sub.add_parser("bare-grpc-drain")
    s.add_argument("target")
    s.add_argument("--message-size", type=int, required=True)
    s.add_argument("--keep-freed-memory", action="store_true", help="glibc mallopt, as nbdgw")
    s.add_argument("--out", metavar="FILE", help="write the bytes into FILE (fsync'd at the end)")
    s = sub.add_parser("stream-extents")
    s.add_argument("target", help="HOST:PORT of the gateway")
    s.add_argument("--export", default="disk")
    s.add_argument("--context", required=True)
    s.add_argument("--include-data", action="store_true")
    s.add_argument("--max-extents", type=int, default=0, help="per message (0: the default)")
    s.add_argument("--expect", type=int, help="at least this many extents")
    s.add_argument("--keep-freed-memory", action="store_true", help="glibc mallopt, as nbdgw")
    s.add_argument("--verify", action="store_true", help="check every message's CRC32C")
    s.add_argument(
        "--library",
        action="store_true",
        help="receive through nbdgw.AsyncClient (in place, every CRC32C checked)",
    )
    s.add_argument(
        "--in-place",
        action="store_true",
        help="parse as nbdgw backup does: data left in the received bytes (parse_response)",
    )
    s.add_argument("--digest", default="", help="ask for this digest (sha256, blake3)")
    s.add_argument("--compression", default="", help="ask for compressed data (zstd)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    result = WORKERS[args.worker](args)
    if asyncio.iscoroutine(result):
        asyncio.run(result)


if __name__ == "__main__":
    main()
