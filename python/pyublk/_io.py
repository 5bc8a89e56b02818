"""Io and Lease: one request of a device, and its buffer lent to IO on
files and sockets; the errors and argument checks they share with Device."""

from __future__ import annotations

import ctypes
import errno as _errno
from typing import TYPE_CHECKING, Any, Callable, Optional

from . import _lib as L

if TYPE_CHECKING:
    from ._device import Device

# the ranges of the C arguments (ctypes would silently keep the low bits of
# a larger value: an fd of 2**32 + 3 would become fd 3)
_INT_MIN, _INT_MAX = -(1 << 31), (1 << 31) - 1
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1


def _int_in(what: str, v: Any, lo: int, hi: int) -> int:
    """`v` if it is an int in lo..hi, else ValueError saying so."""
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{what} must be an int in {lo}..{hi}, got {v!r}")
    return v


def _lease_args(what: str, fd: int, file_off: int, offset: int, length: int) -> None:
    """fd (C int, >= 0), file offset (u64), range in the request (u32 each)."""
    if type(fd) is int and type(file_off) is int and type(offset) is int and type(length) is int and \
            0 <= fd <= _INT_MAX and 0 <= file_off <= _U64_MAX and 0 <= offset <= _U32_MAX and 0 <= length <= _U32_MAX:
        return  # (the usual case, checked at once)
    _int_in(f"{what}: fd", fd, 0, _INT_MAX)
    _int_in(f"{what}: file offset", file_off, 0, _U64_MAX)
    _int_in(f"{what}: offset", offset, 0, _U32_MAX)
    _int_in(f"{what}: length", length, 0, _U32_MAX)


_NULL_CB = L.BACKING_CB()  # a NULL callback: the request completes in aggregate


class UblkError(OSError):
    """A libublk call failed: `errno` is the error number, the message says what."""


def _message() -> str:
    buf = ctypes.create_string_buffer(512)
    n = L.lib().ublk_last_error_message(buf, len(buf))
    return buf.value.decode(errors="replace") if n > 0 else ""


def _check(r: int, what: str) -> int:
    if r < 0:
        detail = _message()
        name = L.lib().ublk_strerror(r).decode()
        raise UblkError(-r, f"{what}: {name}" + (f" ({detail})" if detail else ""))
    return r



class Lease:
    """The request's buffer lent to IO on files and sockets, on the queue's
    io_uring: zero copy where the kernel allows, so no data passes through
    Python. Only from the callback that received the request (its queue
    thread). Each method takes a range (`offset`, `length`) of the request
    buffer and an optional `callback(io, result)`; without callbacks the
    request completes by itself when the last operation is over (with the
    total bytes or the first error). Direction is enforced: `read_into` and
    `recv` only on READ requests, `write_from` and `send` only on WRITE
    requests (else UblkError EPERM). Once the request is completed, every
    method raises UblkError EALREADY without touching the engine (ESHUTDOWN
    once the device is closed); ValueError for an fd, offset or length out
    of its C type's range."""

    __slots__ = ("_io",)

    def __init__(self, io: "Io"):
        self._io = io

    def _op(self, name: str, fn: Any, args: tuple, callback: Optional[Callable[["Io", int], None]]) -> None:
        io = self._io
        dev = io._enter(name)
        try:
            if callback is None:
                r = fn(io._ptr, *args, _NULL_CB, None)
            else:
                key = dev._remember(io, callback)
                r = fn(io._ptr, *args, dev._backing_cb, ctypes.c_void_p(key))
                if r < 0:
                    dev._pending.pop(key, None)
        finally:
            dev._busy.pop()
        _check(r, name)

    def read_into(self, fd: int, file_off: int, offset: int, length: int, callback=None) -> None:
        """Fills `[offset, offset+length)` of a READ request from `fd` at
        `file_off` (zeros past the end of the file)."""
        _lease_args("lease.read_into", fd, file_off, offset, length)
        self._op("lease.read_into", L.lib().ublk_io_lease_read, (fd, file_off, offset, length), callback)

    def write_from(self, fd: int, file_off: int, offset: int, length: int, callback=None) -> None:
        """Writes `[offset, offset+length)` of a WRITE request to `fd` at
        `file_off` (durably when the request has FUA)."""
        _lease_args("lease.write_from", fd, file_off, offset, length)
        self._op("lease.write_from", L.lib().ublk_io_lease_write, (fd, file_off, offset, length), callback)

    def send(self, sock: int, offset: int, length: int, callback=None) -> None:
        """Sends `[offset, offset+length)` of a WRITE request on a stream socket."""
        _lease_args("lease.send", sock, 0, offset, length)
        self._op("lease.send", L.lib().ublk_io_lease_send, (sock, offset, length), callback)

    def recv(self, sock: int, offset: int, length: int, callback=None) -> None:
        """Receives exactly `length` bytes from a stream socket into a READ request."""
        _lease_args("lease.recv", sock, 0, offset, length)
        self._op("lease.recv", L.lib().ublk_io_lease_recv, (sock, offset, length), callback)

    def manual(self) -> None:
        """The target completes the request itself (`io.complete`), e.g. from a
        callback; the completion still waits for the operations in flight."""
        io = self._io
        dev = io._enter("lease.manual")
        try:
            r = L.lib().ublk_io_lease_manual(io._ptr)
        finally:
            dev._busy.pop()
        _check(r, "lease.manual")


class Io:
    """One request. `op` is "read", "write", "flush", "discard" or
    "write_zeroes"; `offset` and `length` in bytes. Complete it once with
    `complete(result)` (bytes done, 0 for ops without data, or a negative
    errno), from any thread, now or later (an asyncio loop, a thread pool).

    Once it is completed (by `complete`, or failed with EIO by pyublk when
    the callback raised) every method refuses with UblkError EALREADY
    without touching the engine: the handle is reused for the tag's next
    request. A request leased without `lease.manual()` is completed by the
    engine when its last operation is over; pyublk cannot see that, so do
    not complete such a request later from another thread. After
    `Device.close` the methods raise UblkError ESHUTDOWN."""

    __slots__ = ("_dev", "_ptr", "op", "offset", "length", "flags", "tag", "queue_id", "_view", "_done",
                 "__weakref__")

    _OPS = {L.UBLK_OP_READ: "read", L.UBLK_OP_WRITE: "write", L.UBLK_OP_FLUSH: "flush",
            L.UBLK_OP_DISCARD: "discard", L.UBLK_OP_WRITE_ZEROES: "write_zeroes"}

    def __init__(self, dev: "Device", ptr: int):
        self._dev = dev
        self._ptr = ctypes.c_void_p(ptr)
        d = L.ublk_io_desc()  # one call for all the fields (per call: ctypes drops the GIL in it)
        _check(dev._get_desc(self._ptr, ctypes.byref(d)), "ublk_io_get_desc")
        code = d.op
        self.op = Io._OPS.get(code) or f"op{code}"
        self.offset = d.offset
        self.length = d.len
        self.flags = d.flags
        self.tag = d.tag
        self.queue_id = d.queue_id
        self._view: Optional[memoryview] = None
        self._done = False

    @classmethod
    def _from_fields(cls, dev: "Device", ptr: int, code: int, flags: int, offset: int, length: int,
                     queue_id: int, tag: int) -> "Io":
        """An Io from a batch entry's fields (no call into the library)."""
        io = cls.__new__(cls)
        io._dev = dev
        io._ptr = ctypes.c_void_p(ptr)
        io.op = Io._OPS.get(code) or f"op{code}"
        io.offset = offset
        io.length = length
        io.flags = flags
        io.tag = tag
        io.queue_id = queue_id
        io._view = None
        io._done = False
        return io

    @property
    def fua(self) -> bool:
        return bool(self.flags & L.UBLK_FLAG_FUA)

    def _enter(self, what: str) -> "Device":
        """Before a call into C with this request's handle: refuses it once
        the request is completed (the handle then carries the tag's next
        request, or soon will: a call would act on someone else's request)
        and once the device is closed (the handle is freed memory then), and
        counts the call so that `Device.close` waits for it. Pair with
        `dev._busy.pop()`."""
        dev = self._dev
        with dev._lock:
            if self._done or dev._closed:
                raise self._refused(what)
            dev._busy.append(None)
        return dev

    def _refused(self, what: str) -> UblkError:
        if self._done:
            return UblkError(_errno.EALREADY, f"{what}: the request is already completed")
        return UblkError(_errno.ESHUTDOWN, f"{what}: the device is closed")

    def _claim(self) -> bool:
        """Marks the request completed; False if it already was (by another
        thread, perhaps): only the caller that got True may complete it in C."""
        with self._dev._lock:
            if self._done:
                return False
            self._done = True
            return True

    @property
    def buf(self) -> memoryview:
        """The request data as a writable memoryview over the engine's memory
        (READ: fill it; WRITE: read it). Only in copy mode (a target with
        read/write methods, or needs_buffer=True). Valid until the request is
        completed (or the device closed): the view is released then and using
        it raises ValueError. Do not keep slices of it, objects over its
        memory (`ctypes` `from_buffer`) nor objects exporting it (a numpy
        array over it) beyond that: pyublk cannot revoke those, and they
        would show the memory of the tag's later requests (`complete` raises
        BufferError when it meets an export; slices and ctypes objects go
        unnoticed). UblkError EALREADY once the request is completed."""
        v = self._view
        if v is not None:
            return v
        dev = self._enter("io.buf")
        try:
            p = L.lib().ublk_io_buf(self._ptr)
        finally:
            dev._busy.pop()
        if not p:
            raise ValueError(f"no buffer: a {self.op} request, or data mode {dev.data_mode} "
                             "(buffers exist in copy mode only; use io.lease, or needs_buffer=True)")
        v = memoryview((ctypes.c_char * self.length).from_address(p)).cast("B")
        with dev._lock:  # (another thread may have completed it, or closed the device, meanwhile)
            if not (self._done or dev._closed or self._view is not None):
                self._view = v
                dev._bufs.add(self)  # close() releases it
                return v
        v.release()
        cur = self._view  # (made by another thread meanwhile)
        if cur is not None:
            return cur
        raise self._refused("io.buf")

    @property
    def lease(self) -> Lease:
        return Lease(self)

    def register_fd(self, fd: int) -> None:
        """Registers `fd` in the file table of this request's queue ring, so
        that lease operations on it skip a file lookup each: what a loop
        target does once per queue for its backing file. Only inside `handle`
        (the queue thread); `fd` must stay open while the device serves.
        Registering twice is a no-op; raises UblkError (EOPNOTSUPP on kernels
        without sparse file tables: IO on the fd works the same)."""
        _int_in("io.register_fd: fd", fd, 0, _INT_MAX)
        dev = self._enter("io.register_fd")
        try:
            r = L.lib().ublk_io_register_fd(self._ptr, fd)
        finally:
            dev._busy.pop()
        _check(r, "io.register_fd")

    def _release(self) -> None:
        """Releases the view of `buf`. pyublk drops it even when that raises
        BufferError (an export of it is still held): `buf` is not handed out
        again, the export stays the holder's."""
        v = self._view
        if v is not None:
            self._view = None
            self._dev._bufs.discard(self)
            v.release()

    def complete(self, result: int) -> None:
        """Completes the request (raises UblkError: EALREADY if it was already
        completed, by `complete` or by pyublk failing it after its callback
        raised; EINVAL for a result larger than the request or one short of
        it where the kernel cannot take part of a request (anything but a
        READ in copy mode: the request then fails with EIO); ESHUTDOWN after
        the device stopped or was closed; ValueError for a result that does
        not fit a C int). The view of `buf` is released first; if something
        still exports it, the request is completed all the same and
        BufferError is raised after (that export now shows memory the engine
        reuses: drop it)."""
        if not isinstance(result, int):
            raise TypeError(f"result must be an int (bytes done or -errno), not {type(result).__name__}")
        if not _INT_MIN <= result <= _INT_MAX:
            raise ValueError(f"result must fit a C int ({_INT_MIN}..{_INT_MAX}), got {result}")
        dev = self._dev
        with dev._lock:  # (one test-and-set: two threads cannot both complete it)
            if self._done or dev._closed:
                raise self._refused("io.complete")
            self._done = True
            dev._busy.append(None)
        held = None
        try:
            if self._view is not None:
                try:
                    self._release()
                except BufferError as e:  # completed all the same: reported below
                    held = e
            r = L.lib().ublk_io_complete(self._ptr, result)
        finally:
            dev._busy.pop()
        _check(r, "io.complete")
        if held is not None:
            raise BufferError("io.complete: the request is completed, but an export of io.buf is still held "
                              "(e.g. a numpy array over it): it now shows memory the engine reuses "
                              "for later requests; release it before complete()") from held

    def __repr__(self) -> str:
        return f"<pyublk.Io {self.op} offset={self.offset} length={self.length} q{self.queue_id} tag {self.tag}>"
