#!/usr/bin/env python3
"""A loop device whose data never passes through Python: each READ/WRITE
lends the request's buffer to IO on the backing file (pyublk leases, zero
copy where the kernel allows); Python only decides where it goes.

    loop.py --file F [--queues 1] [--depth 64] [--zero-copy auto]

Prints "<id> <path>" once the device exists, serves until SIGINT/SIGTERM."""

import argparse
import ctypes
import errno
import os
import sys

import pyublk

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class Loop:
    def __init__(self, fd: int):
        self.fd = fd
        self.registered = set()  # queues whose ring has the file in its table

    def handle(self, io: pyublk.Io) -> None:
        if io.queue_id not in self.registered:  # once per queue
            self.registered.add(io.queue_id)
            try:
                io.register_fd(self.fd)
            except pyublk.UblkError:
                pass  # an older kernel: the IO works the same
        if io.op == "read":  # completes by itself when the read is done
            io.lease.read_into(self.fd, io.offset, 0, io.length)
        elif io.op == "write":  # FUA -> RWF_DSYNC, done by the engine
            io.lease.write_from(self.fd, io.offset, 0, io.length)
        elif io.op == "flush":
            os.fdatasync(self.fd)
            io.complete(0)
        elif io.op in ("discard", "write_zeroes"):
            r = _libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, io.offset, io.length)
            io.complete(0 if r == 0 else -ctypes.get_errno())
        else:
            io.complete(-errno.EOPNOTSUPP)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", required=True)
    p.add_argument("--queues", default=1, type=int)
    p.add_argument("--depth", default=64, type=int)
    p.add_argument("--zero-copy", default="auto")
    a = p.parse_args()
    try:
        fd = os.open(a.file, os.O_RDWR | os.O_DIRECT)
    except OSError:
        fd = os.open(a.file, os.O_RDWR)
    size = os.fstat(fd).st_size // 4096 * 4096
    with pyublk.Device(Loop(fd), size=size, queues=a.queues, depth=a.depth, zero_copy=a.zero_copy,
                       discard=True, name="py-loop") as dev:
        print(dev.id, dev.path, flush=True)
        dev.serve()
        print(f"loop: {dev.summary()}", file=sys.stderr)
    os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
