#!/usr/bin/env python3
"""A loop device whose data never passes through Python: each READ/WRITE
lends the request's buffer to IO on the backing file (pyublk leases, zero
copy where the kernel allows); Python only decides where it goes: once, for
the whole device (Device.map: the engine then serves READ and WRITE without
calling Python), or with --per-request for each request (route(), one call
per batch of requests).

    loop.py --file F [--queues 1] [--depth 64] [--zero-copy auto] [--recovery POLICY] [--per-request]
    loop.py --recover ID

--recovery reissue|fail|wait: the device survives this process dying (even
kill -9); `loop.py --recover ID` in a new process serves it again, on the
backing file recorded when it was created (target_args "file=<path>"; the
device keeps its size, queues and data mode).

Prints "<id> <path>" once the device exists (or is taken over), serves
until SIGINT/SIGTERM, then deletes it."""

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
    def __init__(self, fd: int = -1):
        self.registered = set()  # queues whose ring has the file in its table
        self.attach(fd)

    def attach(self, fd: int) -> None:
        """The backing file (before the device starts: after Device.recover
        told us which file it is)."""
        self.fd = fd
        self.fixed_fds = (fd,) if fd >= 0 else ()  # pyublk registers it in each queue ring's file table

    def route(self, op: str, offset: int, length: int):
        """READ and WRITE (in batches): the engine lends the whole request to
        the file at the same offset; no data and no per-request Io object."""
        return self.fd, offset

    def handle(self, io: pyublk.Io) -> None:
        """The other requests (FLUSH, DISCARD, WRITE_ZEROES)."""
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


def open_backing(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError:
        return os.open(path, os.O_RDWR)


def recover(dev_id: int, target: Loop) -> pyublk.Device:
    """Takes over device `dev_id`; its backing file is the one recorded at creation."""
    dev = pyublk.Device.recover(target, dev_id)
    args = dev.target_args or ""
    try:
        if not args.startswith("file="):
            raise ValueError(f"device {dev_id} was not made by loop.py (target args: {dev.target_args!r})")
        path = args[len("file="):]
        fd = open_backing(path)
        if os.fstat(fd).st_size < dev.size:
            os.close(fd)
            raise ValueError(f"{path} is smaller than device {dev_id} ({dev.size} bytes)")
    except (OSError, ValueError):
        dev.close()  # it never served: the device waits for another try
        raise
    target.attach(fd)
    return dev


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--file", help="backing file (a new device)")
    which.add_argument("--recover", type=int, metavar="ID", help="take over device ID after its server died")
    p.add_argument("--queues", default=1, type=int)
    p.add_argument("--depth", default=64, type=int)
    p.add_argument("--zero-copy", default="auto")
    p.add_argument("--per-request", action="store_true",
                   help="decide each READ/WRITE in route() (one call per batch) instead of mapping "
                        "the whole file once (Device.map)")
    p.add_argument("--recovery", choices=("none", "reissue", "fail", "wait"),
                   help="crash recovery policy of a new device (default none)")
    a = p.parse_args()
    target = Loop()
    try:
        if a.recover is not None:
            if a.recovery:
                p.error("--recovery is recorded at creation: not with --recover")
            dev = recover(a.recover, target)
        else:
            fd = open_backing(a.file)
            target.attach(fd)
            size = os.fstat(fd).st_size // 4096 * 4096
            dev = pyublk.Device(target, size=size, queues=a.queues, depth=a.depth, zero_copy=a.zero_copy,
                                discard=True, name="py-loop", recovery=a.recovery or "none",
                                target_args=f"file={os.path.realpath(a.file)}")
    except (OSError, ValueError) as e:  # UblkError is an OSError
        print(f"loop: {e}", file=sys.stderr)
        return 1
    with dev:
        if not a.per_request:
            # the whole device is the file at the same offsets: READ and WRITE
            # never reach Python (route() stays for requests outside the map)
            dev.map(0, dev.size, target.fd)
        dev.start()  # the path exists (and a recovered device serves again) before we say so
        print(dev.id, dev.path, flush=True)
        dev.serve()
        print(f"loop: {dev.summary()}", file=sys.stderr)
    os.close(target.fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
