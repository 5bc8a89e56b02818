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
        try:
            # the engine passes the same array (one per queue) every time: its
            # views are made once per (address, count)
            vs = self.batch_views.get((ptr, n))
            if vs is None:
                raw = memoryview((ctypes.c_char * (n * ENTRY.size)).from_address(ptr)).cast("B")
                vs = self.batch_views[(ptr, n)] = (raw, raw.cast("i"), raw.cast("Q"))
            raw, ints, u64s = vs
            simple = self.simple
            entries = SIMPLE.iter_unpack(raw) if simple else list(ENTRY.iter_unpack(raw))
        except Exception:  # never unwind into C: the requests stay pending forever otherwise
            log.exception("pyublk: reading a batch failed")
            return
        if simple:
            self._simple_batch(entries, ints, self.methods)
            return
        if self.fixed:
            self._register(entries[0][0], entries[0][6])
        methods, route, handle = self.methods, self.route, self.handle
        for i, (io, buf, op, flags, off, ln, qid, tag, _r, _fd, _lo) in enumerate(entries):
            handed = False
            try:
                if route is not None and (op == L.UBLK_OP_READ or op == L.UBLK_OP_WRITE):
                    where = route("read" if op == L.UBLK_OP_READ else "write", off, ln)
                    if where is not None:
                        fd, file_off = where
                        ints[i * _INTS + _LEASE_FD] = fd
                        u64s[i * _U64S + _LEASE_OFF] = file_off
                        continue
                if handle is not None:
                    handed = True
                    self._to_handle(io, op, flags, off, ln, qid, tag)
                    continue
                ints[i * _INTS + _RESULT] = self._simple(methods, op, off, ln, buf)
            except Exception:
                log.exception("pyublk: device %s: %s of %d bytes at %d failed: the request fails with EIO",
                              self.dev.id, _NAMES.get(op, op), ln, off)
                if handed:  # handle(io) may have completed it or leased it
                    self.dev._fail(None, io)
                else:
                    ints[i * _INTS + _RESULT] = -_errno.EIO
                    ints[i * _INTS + _LEASE_FD] = -1

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
                elif not isinstance(r, int):
                    raise TypeError(f"{_NAMES[op]}() returned {type(r).__name__}: want None or an int result")
                ints[i * _INTS + _RESULT] = r
            except Exception:
                log.exception("pyublk: device %s: %s of %d bytes at %d failed: the request fails with EIO",
                              self.dev.id, _NAMES.get(op, op), ln, off)
                ints[i * _INTS + _RESULT] = -_errno.EIO
                ints[i * _INTS + _LEASE_FD] = -1

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
        if not isinstance(r, int):
            raise TypeError(f"{name}() returned {type(r).__name__}: want None or an int result")
        return r

    def _to_handle(self, io: int, op: int, flags: int, off: int, ln: int, qid: int, tag: int) -> None:
        from ._device import Io
        self.handle(Io._from_fields(self.dev, io, op, flags, off, ln, qid, tag))

    def _register(self, io: int, qid: int) -> None:
        if qid in self.fixed_queues:
            return
        self.fixed_queues.add(qid)
        for fd in self.fixed:
            r = L.lib().ublk_io_register_fd(ctypes.c_void_p(io), fd)
            if r < 0 and r != -_errno.EOPNOTSUPP:
                log.warning("pyublk: device %s queue %d: registering fd %d: %s", self.dev.id, qid, fd,
                            L.lib().ublk_strerror(r).decode())
