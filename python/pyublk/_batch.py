"""Requests in batches: one ctypes callback per pass over a queue ring
(`ublk_target_ops.handle_batch`) instead of one per request.

Each crossing of the C boundary costs far more in Python than the work of a
simple target, so pyublk takes this path whenever it can decide a request
without building an `Io` for it:

- targets with the simple methods (`read`, `write`, `flush`, `discard`,
  `write_zeroes`): the results go back in the batch entries, and the engine
  completes the requests after the callback, with no call per request;
- `handle` targets that also define `route(op, offset, length)`: for READ
  and WRITE, `route` returns `(fd, file_offset)` and the engine lends the
  whole request to IO on that file (a lease: zero copy where the kernel
  allows), or None to get the request in `handle(io)` as usual. Python only
  decides; the engine moves the data.

Everything else goes to `handle(io)` with an `Io` built from the entry
(no extra call for its fields).
"""

from __future__ import annotations

import ctypes
import errno as _errno
import logging
import struct
from typing import Any

from . import _lib as L
from ._io import Io

log = logging.getLogger("pyublk")

ENTRY = struct.Struct("<QQiIQIHHiiQ")  # ublk_io_batch_entry
assert ENTRY.size == ctypes.sizeof(L.ublk_io_batch_entry)
# what a simple target's loop reads of an entry: buf, op, offset, len
SIMPLE = struct.Struct("<8xQi4xQI20x")
assert SIMPLE.size == ENTRY.size
assert SIMPLE.unpack(ENTRY.pack(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)) == (2, 3, 5, 6)
_INTS = ENTRY.size // 4  # int32 slots per entry
_RESULT = L.ublk_io_batch_entry.result.offset // 4
_LEASE_FD = L.ublk_io_batch_entry.lease_fd.offset // 4
_LEASE_OFF = L.ublk_io_batch_entry.lease_file_off.offset // 8
_U64S = ENTRY.size // 8

_NAMES = {L.UBLK_OP_READ: "read", L.UBLK_OP_WRITE: "write", L.UBLK_OP_FLUSH: "flush",
          L.UBLK_OP_DISCARD: "discard", L.UBLK_OP_WRITE_ZEROES: "write_zeroes"}
PENDING = L.UBLK_BATCH_PENDING


def _result(r: Any, op: int) -> int:
    """A method's int result as an entry's `result`; TypeError / ValueError
    (the request then fails with EIO) for what is not an int or does not
    fit one, and for UBLK_BATCH_PENDING (the request would stay pending)."""
    if not isinstance(r, int) or isinstance(r, bool):
        raise TypeError(f"{_NAMES.get(op, op)}() returned {type(r).__name__}: want None or an int result")
    if not PENDING < r <= 0x7FFFFFFF:
        raise ValueError(f"{_NAMES.get(op, op)}() returned {r}: not a result (bytes done or -errno)")
    return r


def _log_exception(msg: str, *args: Any) -> None:
    """log.exception that never raises (a failing log handler must not keep
    a request from being failed)."""
    try:
        log.exception(msg, *args)
    except BaseException:
        pass


def _fail_pending(ptr: int, n: int, first: int) -> None:
    """Fails with EIO the entries from `first` on that are still pending
    (neither a result nor a lease set), straight through ctypes: for when
    the batch's views themselves may be what failed."""
    try:
        entries = (L.ublk_io_batch_entry * n).from_address(ptr)
        for j in range(max(first, 0), n):
            e = entries[j]
            if e.result == PENDING and e.lease_fd < 0:
                e.result = -_errno.EIO
    except BaseException:
        pass


class Batcher:
    """The handle_batch callback of one device."""

    def __init__(self, dev: Any, target: Any, route: Any):
        self.dev = dev
        self.route = route
        self.methods = dev._methods
        self.handle = dev._handle
        self.views: dict[int, memoryview] = {}  # buffer address -> view of max_io_bytes
        self.max_io = 0
        self.target = target
        self.fixed: tuple[int, ...] = ()  # target.fixed_fds, read by arm() when the device starts
        self.fixed_queues: set[int] = set()
        # only the simple methods: each batch takes _simple_batch (set by arm())
        self.simple = False
        # (batch address, count) -> views of its bytes, int32s and uint64s
        self.batch_views: dict[tuple[int, int], tuple[memoryview, memoryview, memoryview]] = {}
        self.cb = L.HANDLE_BATCH(self.on_batch)  # kept alive with the device

    def arm(self) -> None:
        """Reads the target's `fixed_fds` (at start: a target may open its
        files only after `Device.recover` told it which ones)."""
        self.fixed = tuple(getattr(self.target, "fixed_fds", None) or ())
        self.simple = self.route is None and self.handle is None and not self.fixed

    def view(self, addr: int, length: int) -> memoryview:
        """A fresh view of `length` bytes at `addr` (a request buffer: each tag
        keeps its address, so the base view is made once per tag)."""
        base = self.views.get(addr)
        if base is None:
            if not self.max_io:
                self.max_io = self.dev._max_io
            base = memoryview((ctypes.c_char * self.max_io).from_address(addr)).cast("B")
            self.views[addr] = base
        return base[:length]

    def on_batch(self, _user: Any, ptr: int, n: int) -> None:
        # Every entry must end completed, lent, or handed to handle(io),
        # whatever Python does: an entry left at UBLK_BATCH_PENDING with no
        # lease_fd is a request pending forever. Nothing escapes this
        # callback, not even SystemExit / KeyboardInterrupt (ctypes would
        # print it and return).
        i, handed = -1, None  # the entry in hand; its Io once given to handle()
        try:
            # the engine passes the same array (one per queue) every time: its
            # views are made once per (address, count)
            vs = self.batch_views.get((ptr, n))
            if vs is None:
                raw = memoryview((ctypes.c_char * (n * ENTRY.size)).from_address(ptr)).cast("B")
                vs = self.batch_views[(ptr, n)] = (raw, raw.cast("i"), raw.cast("Q"))
            raw, ints, u64s = vs
            if self.simple:
                self._simple_batch(SIMPLE.iter_unpack(raw), ints, self.methods)
                return
            entries = list(ENTRY.iter_unpack(raw))
            if self.fixed:
                try:
                    self._register(entries[0][0], entries[0][6])
                except BaseException:  # an optimization only: the batch is served all the same
                    _log_exception("pyublk: device %s: registering fixed_fds failed", self.dev.id)
            methods, route, handle = self.methods, self.route, self.handle
            for i, (io, buf, op, flags, off, ln, qid, tag, _r, _fd, _lo) in enumerate(entries):
                handed = None
                try:
                    if route is not None and (op == L.UBLK_OP_READ or op == L.UBLK_OP_WRITE):
                        where = route("read" if op == L.UBLK_OP_READ else "write", off, ln)
                        if where is not None:
                            fd, file_off = where
                            # a negative fd would leave the request pending; the
                            # views refuse what is not an int or does not fit
                            # (TypeError / ValueError: the request fails with EIO)
                            if fd < 0:
                                raise ValueError(f"route() returned {where!r}: a negative fd")
                            u64s[i * _U64S + _LEASE_OFF] = file_off
                            ints[i * _INTS + _LEASE_FD] = fd
                            continue
                    if handle is not None:
                        handed = self._io(io, op, flags, off, ln, qid, tag)
                        handle(handed)
                        continue
                    ints[i * _INTS + _RESULT] = self._simple(methods, op, off, ln, buf)
                except BaseException:
                    if handed is None:
                        ints[i * _INTS + _RESULT] = -_errno.EIO
                        ints[i * _INTS + _LEASE_FD] = -1
                    _log_exception("pyublk: device %s: %s of %d bytes at %d failed: the request fails with EIO",
                                   self.dev.id, _NAMES.get(op, op), ln, off)
                    if handed is not None:  # handle(io) may have completed it, leased it, passed it on
                        self.dev._fail(handed, io)
        except BaseException:
            # a failure outside the entries' own handling (reading the batch,
            # a failing failure path): whatever is still pending and was not
            # handed to handle(io) fails
            if handed is not None:
                self.dev._fail(handed, handed._ptr.value)
            _fail_pending(ptr, n, i if handed is None else i + 1)
            _log_exception("pyublk: device %s: a batch of %d requests failed: its pending requests fail with EIO",
                           getattr(self.dev, "id", "?"), n)

    def _simple_batch(self, entries: Any, ints: memoryview, methods: dict) -> None:
        """The loop of a target with only the simple methods (`entries`: the
        SIMPLE fields of each entry): READ and WRITE served here without a
        call per request beyond the method's own (this loop is most of what a
        Python RAM disk costs per request)."""
        read, write = methods.get("read"), methods.get("write")
        views, READ, WRITE = self.views, L.UBLK_OP_READ, L.UBLK_OP_WRITE
        for i, (buf, op, off, ln) in enumerate(entries):
            try:
                if op == READ and read is not None:
                    base = views.get(buf)
                    v = base[:ln] if base is not None else self.view(buf, ln)
                    r = read(off, ln, v)
                elif op == WRITE and write is not None:
                    base = views.get(buf)
                    v = base[:ln] if base is not None else self.view(buf, ln)
                    r = write(off, v)
                else:
                    ints[i * _INTS + _RESULT] = self._simple(methods, op, off, ln, buf)
                    continue
                v.release()
                if r is None:
                    r = ln
                elif type(r) is not int or r == PENDING:
                    r = _result(r, op)
                ints[i * _INTS + _RESULT] = r
            except BaseException:
                ints[i * _INTS + _RESULT] = -_errno.EIO
                ints[i * _INTS + _LEASE_FD] = -1
                _log_exception("pyublk: device %s: %s of %d bytes at %d failed: the request fails with EIO",
                               self.dev.id, _NAMES.get(op, op), ln, off)

    def _simple(self, methods: dict, op: int, off: int, ln: int, buf: int) -> int:
        name = _NAMES.get(op)
        m = methods.get(name) if name else None
        if m is None:
            return -_errno.EOPNOTSUPP
        if op == L.UBLK_OP_READ or op == L.UBLK_OP_WRITE:
            v = self.view(buf, ln)
            try:
                r = m(off, ln, v) if op == L.UBLK_OP_READ else m(off, v)
            finally:
                v.release()
            if r is None:
                return ln
        elif op == L.UBLK_OP_FLUSH:
            r = m()
            if r is None:
                return 0
        else:
            r = m(off, ln)
            if r is None:
                return 0
        return _result(r, op)

    def _io(self, io: int, op: int, flags: int, off: int, ln: int, qid: int, tag: int) -> Any:
        return Io._from_fields(self.dev, io, op, flags, off, ln, qid, tag)

    def _register(self, io: int, qid: int) -> None:
        # (on the queue thread, inside the callback: Device.close cannot free
        # the handle under it, as ublk_dev_free waits for the callbacks)
        if qid in self.fixed_queues:
            return
        self.fixed_queues.add(qid)
        for fd in self.fixed:
            r = L.lib().ublk_io_register_fd(ctypes.c_void_p(io), fd)
            if r < 0 and r != -_errno.EOPNOTSUPP:
                log.warning("pyublk: device %s queue %d: registering fd %d: %s", self.dev.id, qid, fd,
                            L.lib().ublk_strerror(r).decode())
