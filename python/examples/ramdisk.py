#!/usr/bin/env python3
"""A RAM disk in a few lines: read/write methods over an anonymous mmap
(sparse: untouched pages cost nothing). The data goes through Python, so the
device runs in copy mode.

    ramdisk.py [--size 256M] [--queues 1] [--depth 64]

Prints "<id> <path>" once the device exists, serves until SIGINT/SIGTERM."""

import argparse
import mmap
import sys

import pyublk


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


class RamDisk:
    def __init__(self, size: int):
        self.mem = mmap.mmap(-1, size)
        self.view = memoryview(self.mem)

    def read(self, offset, length, buf):
        buf[:] = self.view[offset:offset + length]

    def write(self, offset, data):
        self.view[offset:offset + len(data)] = data

    def flush(self):
        pass

    def discard(self, offset, length):
        self.view[offset:offset + length] = bytes(length)

    write_zeroes = discard


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="256M", type=parse_size)
    p.add_argument("--queues", default=1, type=int)
    p.add_argument("--depth", default=64, type=int)
    a = p.parse_args()
    with pyublk.Device(RamDisk(a.size), size=a.size, queues=a.queues, depth=a.depth, name="py-ramdisk") as dev:
        print(dev.id, dev.path, flush=True)
        dev.serve()
        print(f"ramdisk: {dev.summary()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
