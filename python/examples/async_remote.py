#!/usr/bin/env python3
"""An asyncio target: every request is handed to an event loop (in its own
thread), which awaits a simulated remote backend (a random delay) and then
completes the request from the loop: `io.complete()` works from any thread.

    async_remote.py [--size 128M] [--queues 1] [--depth 64] [--delay-ms 2]

Prints "<id> <path>" once the device exists, serves until SIGINT/SIGTERM."""

import argparse
import asyncio
import mmap
import random
import sys
import threading

import pyublk


class Remote:
    """The "remote" store: only reachable by awaiting."""

    def __init__(self, size: int, delay: float):
        self.view = memoryview(mmap.mmap(-1, size))
        self.delay = delay

    async def get(self, offset: int, length: int) -> bytes:
        await asyncio.sleep(random.uniform(0, self.delay))
        return bytes(self.view[offset:offset + length])

    async def put(self, offset: int, data: bytes) -> None:
        await asyncio.sleep(random.uniform(0, self.delay))
        self.view[offset:offset + len(data)] = data


class AsyncTarget:
    def __init__(self, remote: Remote, loop: asyncio.AbstractEventLoop):
        self.remote = remote
        self.loop = loop

    def handle(self, io: pyublk.Io) -> None:
        # the queue thread only hands the request over
        asyncio.run_coroutine_threadsafe(self.serve(io), self.loop)

    async def serve(self, io: pyublk.Io) -> None:
        try:
            if io.op == "read":
                io.buf[:] = await self.remote.get(io.offset, io.length)
                io.complete(io.length)
            elif io.op == "write":
                await self.remote.put(io.offset, bytes(io.buf))
                io.complete(io.length)
            elif io.op == "flush":
                io.complete(0)
            else:
                io.complete(-95)  # EOPNOTSUPP
        except Exception as e:  # never leave a request hanging
            print(f"async_remote: {io!r}: {e!r}", file=sys.stderr)
            try:
                io.complete(-5)  # EIO
            except pyublk.UblkError:
                pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default=128 << 20, type=lambda s: int(s[:-1]) << 20 if s.endswith("M") else int(s))
    p.add_argument("--queues", default=1, type=int)
    p.add_argument("--depth", default=64, type=int)
    p.add_argument("--delay-ms", default=2.0, type=float)
    a = p.parse_args()
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, name="asyncio", daemon=True)
    t.start()
    target = AsyncTarget(Remote(a.size, a.delay_ms / 1000), loop)
    # handle() uses io.buf later, from the loop: the data must be in memory (copy mode)
    with pyublk.Device(target, size=a.size, queues=a.queues, depth=a.depth, needs_buffer=True,
                       name="py-async") as dev:
        print(dev.id, dev.path, flush=True)
        dev.serve()
        print(f"async_remote: {dev.summary()}", file=sys.stderr)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
