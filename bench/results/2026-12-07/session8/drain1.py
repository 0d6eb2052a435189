import asyncio
import json
import sys

import grpc

MS = 1 << 20


async def main():
    async with grpc.aio.insecure_channel(
        sys.argv[1],
        options=[
            ("grpc.max_receive_message_length", 2 * MS),
            *[tuple(o) for o in json.loads(sys.argv[2])],
        ],
    ) as ch:
        n = 0
        async for m in ch.unary_stream("/bench.Bare/Stream")(b""):
            n += len(m)
    print(n)


asyncio.run(main())
