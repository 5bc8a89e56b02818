"""Device, Io and Lease: the Python face of libublk."""

from __future__ import annotations

import ctypes
import errno as _errno
import itertools
import logging
import os
import signal
import threading
from typing import Any, Callable, Optional

from . import _batch
from . import _lib as L

log = logging.getLogger("pyublk")

_MODES = {
    "auto": L.UBLK_DATA_AUTO,
    "auto-buf-reg": L.UBLK_DATA_AUTO_BUF_REG,
    "register": L.UBLK_DATA_REGISTER,
    "user-copy": L.UBLK_DATA_USER_COPY,
    "copy": L.UBLK_DATA_COPY,
}


_AFFINITY = {"single": L.UBLK_AFFINITY_SINGLE, "all": L.UBLK_AFFINITY_ALL}
_RECOVERY = {
    "none": L.UBLK_RECOVERY_NONE,
    "reissue": L.UBLK_RECOVERY_REISSUE,
    "fail": L.UBLK_RECOVERY_FAIL,
    "wait": L.UBLK_RECOVERY_WAIT,
}
_RECOVERY_NAMES = {v: k for k, v in _RECOVERY.items()}


def _choices(zero_copy: str, dev_id: Optional[int], recovery: str, affinity: str) -> dict[str, int]:
    """Checks the named choices every device takes; gives them as
    ublk_dev_config field values."""
    if zero_copy not in _MODES:
        raise ValueError(f"zero_copy must be one of {', '.join(_MODES)}, got {zero_copy!r}")
    if dev_id is not None and (not isinstance(dev_id, int) or dev_id < 0):
        raise ValueError(f"dev_id must be a non-negative int, got {dev_id!r}")
    if not isinstance(recovery, str) or recovery not in _RECOVERY:
        raise ValueError(f"recovery must be one of {', '.join(_RECOVERY)}, got {recovery!r}")
    if affinity not in _AFFINITY:
        raise ValueError(f"affinity must be one of {', '.join(_AFFINITY)}, got {affinity!r}")
    return {"data_mode": _MODES[zero_copy], "dev_id": -1 if dev_id is None else dev_id,
            "recovery": _RECOVERY[recovery], "cpu_affinity": _AFFINITY[affinity]}


def _c_string(what: str, value: Optional[str]) -> Optional[bytes]:
    """A str argument as the NUL-terminated bytes C wants (None stays None)."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str or None, not {type(value).__name__}")
    b = value.encode()
    if b"\0" in b:
        raise ValueError(f"{what} contains a NUL character")
    return b


def _py_string(value: Optional[bytes]) -> Optional[str]:
    return None if value is None else value.decode(errors="surrogateescape")


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


def features() -> list[str]:
    """Names of the ublk features (UBLK_F_*) of the running kernel."""
    v = ctypes.c_uint64()
    _check(L.lib().ublk_features(ctypes.byref(v)), "ublk_features")
    out = []
    for bit in range(64):
        if v.value >> bit & 1:
            n = L.lib().ublk_feature_name(bit)
            out.append(n.decode() if n else f"bit{bit}")
    return out


class Lease:
    """The request's buffer lent to IO on files and sockets, on the queue's
    io_uring: zero copy where the kernel allows, so no data passes through
    Python. Only from the callback that received the request (its queue
    thread). Each method takes a range (`offset`, `length`) of the request
    buffer and an optional `callback(io, result)`; without callbacks the
    request completes by itself when the last operation is over (with the
    total bytes or the first error). Direction is enforced: `read_into` and
    `recv` only on READ requests, `write_from` and `send` only on WRITE
    requests (else UblkError EPERM)."""

    __slots__ = ("_io",)

    def __init__(self, io: "Io"):
        self._io = io

    def _op(self, name: str, fn: Any, args: tuple, callback: Optional[Callable[["Io", int], None]]) -> None:
        io = self._io
        dev = io._dev
        if callback is None:
            r = fn(io._ptr, *args, _NULL_CB, None)
        else:
            key = dev._remember(io, callback)
            r = fn(io._ptr, *args, dev._backing_cb, ctypes.c_void_p(key))
            if r < 0:
                dev._pending.pop(key, None)
        _check(r, name)

    def read_into(self, fd: int, file_off: int, offset: int, length: int, callback=None) -> None:
        """Fills `[offset, offset+length)` of a READ request from `fd` at
        `file_off` (zeros past the end of the file)."""
        self._op("lease.read_into", L.lib().ublk_io_lease_read, (fd, file_off, offset, length), callback)

    def write_from(self, fd: int, file_off: int, offset: int, length: int, callback=None) -> None:
        """Writes `[offset, offset+length)` of a WRITE request to `fd` at
        `file_off` (durably when the request has FUA)."""
        self._op("lease.write_from", L.lib().ublk_io_lease_write, (fd, file_off, offset, length), callback)

    def send(self, sock: int, offset: int, length: int, callback=None) -> None:
        """Sends `[offset, offset+length)` of a WRITE request on a stream socket."""
        self._op("lease.send", L.lib().ublk_io_lease_send, (sock, offset, length), callback)

    def recv(self, sock: int, offset: int, length: int, callback=None) -> None:
        """Receives exactly `length` bytes from a stream socket into a READ request."""
        self._op("lease.recv", L.lib().ublk_io_lease_recv, (sock, offset, length), callback)

    def manual(self) -> None:
        """The target completes the request itself (`io.complete`), e.g. from a
        callback; the completion still waits for the operations in flight."""
        _check(L.lib().ublk_io_lease_manual(self._io._ptr), "lease.manual")


class Io:
    """One request. `op` is "read", "write", "flush", "discard" or
    "write_zeroes"; `offset` and `length` in bytes. Complete it once with
    `complete(result)` (bytes done, 0 for ops without data, or a negative
    errno), from any thread, now or later (an asyncio loop, a thread pool)."""

    __slots__ = ("_dev", "_ptr", "op", "offset", "length", "flags", "tag", "queue_id", "_view", "_done")

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

    @property
    def buf(self) -> memoryview:
        """The request data as a writable memoryview over the engine's memory
        (READ: fill it; WRITE: read it). Only in copy mode (a target with
        read/write methods, or needs_buffer=True). Valid until the request is
        completed: the view is released then and using it raises ValueError.
        Do not keep slices of it beyond that."""
        if self._view is None:
            if self._done:
                raise ValueError("the request is completed: its buffer is gone")
            p = L.lib().ublk_io_buf(self._ptr)
            if not p:
                raise ValueError(f"no buffer: a {self.op} request, or data mode {self._dev.data_mode} "
                                 "(buffers exist in copy mode only; use io.lease, or needs_buffer=True)")
            self._view = memoryview((ctypes.c_char * self.length).from_address(p)).cast("B")
        return self._view

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
        _check(L.lib().ublk_io_register_fd(self._ptr, fd), "io.register_fd")

    def _release(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None

    def complete(self, result: int) -> None:
        """Completes the request (raises UblkError: EALREADY if it was already
        completed, EINVAL for a result larger than the request or one short
        of it where the kernel cannot take part of a request (anything but a
        READ in copy mode: the request then fails with EIO), ESHUTDOWN after
        the device stopped)."""
        if not isinstance(result, int):
            raise TypeError(f"result must be an int (bytes done or -errno), not {type(result).__name__}")
        self._release()
        self._done = True
        _check(L.lib().ublk_io_complete(self._ptr, result), "io.complete")

    def __repr__(self) -> str:
        return f"<pyublk.Io {self.op} offset={self.offset} length={self.length} q{self.queue_id} tag {self.tag}>"


_SIMPLE = ("read", "write", "flush", "discard", "write_zeroes")


class Device:
    """A ublk block device served by `target`.

    The target either defines `handle(io)` (full control: complete now or
    later, leases) or any of the simple methods, called on the queue threads
    with the GIL held:

    - `read(offset, length, buf)`: fill the memoryview `buf`;
    - `write(offset, data)`: store the memoryview `data`;
    - `flush()`, `discard(offset, length)`, `write_zeroes(offset, length)`.

    A `handle` target may also define `route(op, offset, length)`, called
    for "read" and "write" requests: it returns `(fd, file_offset)` and the
    engine lends the whole request to IO on that file (zero copy where the
    kernel allows; the request completes when the IO is over), or None to get
    the request in `handle(io)`. Python only decides; the data never passes
    through it. A target attribute `fixed_fds` (a sequence of fds) registers
    those files in each queue ring's file table (`Io.register_fd`); it is
    read when the device starts.

    The simple methods and `route` are called in batches: one callback into
    Python for all the requests of one pass over a queue ring, their results
    handed back together (the cost of crossing into Python is paid once per
    batch, not per request).

    Each returns None (success: the whole length) or a result (bytes done /
    negative errno). A missing method makes its op fail with EOPNOTSUPP (and
    FLUSH / DISCARD are only advertised when `flush` / `discard` exist, or
    for a `handle` target when `discard=True` is passed; FLUSH is always
    sent to a `handle` target). An
    exception fails that request with EIO and is logged with its traceback;
    the device keeps serving.

        with pyublk.Device(MyTarget(), size=1 << 30, queues=2) as dev:
            print(dev.path)
            dev.serve()          # until SIGINT/SIGTERM or `ublk del`

    Crash recovery: with `recovery="reissue"`, `"fail"` or `"wait"` the
    device survives its server process dying (even `kill -9`), and
    `Device.recover(target, dev_id)` in a new process takes it over (see
    there). `target_args` is free text recorded with the device (its state
    file) for that process to read back (`dev.target_args`), e.g. the path
    of a backing file. The policies, while no server runs: "reissue" sends
    the requests the dead server held to the next one and new IO waits;
    "wait" fails the held requests and new IO waits; "fail" fails all IO
    at once (the reader sees EIO or EREMOTEIO). "none" (default): the
    device is stopped.

    `affinity`: "single" (default) runs each queue thread on one CPU of the
    set the kernel maps to its queue; "all" on the whole set.

    Attributes: `id`, `path`, `size`, `queues`, `depth`, `data_mode`,
    `recovery` (policy name), `target_name`, `target_args` (str or None).

    Lifetime: the Device owns the kernel device; `close()` (or leaving the
    `with` block, or garbage collection) stops and deletes it. Keep the
    Device object alive while it serves: its callbacks are referenced from C.
    """

    def __init__(self, target: Any, *, size: int, queues: int = 1, depth: int = 128,
                 logical_block_size: int = 512, max_io_size: int = 512 << 10, read_only: bool = False,
                 zero_copy: str = "auto", needs_buffer: Optional[bool] = None, discard: Optional[bool] = None,
                 dev_id: Optional[int] = None, name: str = "python", recovery: str = "none",
                 target_args: Optional[str] = None, affinity: str = "single"):
        self._dev = ctypes.c_void_p()
        has_handle, simple = self._setup(target)
        for k, v in (("size", size), ("queues", queues), ("depth", depth),
                     ("logical_block_size", logical_block_size), ("max_io_size", max_io_size)):
            if not isinstance(v, int) or isinstance(v, bool):
                raise TypeError(f"{k} must be an int, not {type(v).__name__}")
            if v <= 0:
                raise ValueError(f"{k} must be positive, got {v}")
        if size % logical_block_size:
            raise ValueError(f"size {size} is not a multiple of the logical block size {logical_block_size}")
        if not 1 <= queues <= 4096 or not 1 <= depth <= 4096:
            raise ValueError(f"queues ({queues}) and depth ({depth}) must be 1..4096")
        choices = _choices(zero_copy, dev_id, recovery, affinity)
        args = _c_string("target_args", target_args)
        if needs_buffer is None:
            needs_buffer = bool(simple & {"read", "write"}) and not has_handle

        lib = L.lib()
        cfg = L.ublk_dev_config()
        _check(lib.ublk_dev_config_init(ctypes.byref(cfg)), "ublk_dev_config_init")
        cfg.size = size
        cfg.nr_queues = queues
        cfg.queue_depth = depth
        cfg.logical_block_size = logical_block_size
        cfg.physical_block_size = max(cfg.physical_block_size, logical_block_size)
        cfg.max_io_bytes = max_io_size
        cfg.read_only = int(read_only)
        cfg.volatile_cache = int(has_handle or "flush" in simple)
        if discard is None:
            discard = bool(simple & {"discard", "write_zeroes"})
        cfg.discard = int(discard)
        cfg.needs_buffer = int(needs_buffer)
        cfg.target_name = _c_string("name", name)
        cfg.target_args = args
        for k, v in choices.items():
            setattr(cfg, k, v)
        _check(lib.ublk_dev_new(ctypes.byref(cfg), ctypes.byref(self._ops), None, ctypes.byref(self._dev)),
               "ublk_dev_new")
        self._load_info()

    @classmethod
    def recover(cls, target: Any, dev_id: int, *, state_dir: Optional[str] = None) -> "Device":
        """Takes over device `dev_id` after its server process died (even
        with `kill -9`); the device must have been created with a recovery
        policy. Its configuration (size, queues, data mode, ...) comes from
        the state file written when it was created, in `state_dir` (default:
        `$UBLK_STATE_DIR`, else /run/ublk); `target_name` and `target_args`
        give back what the creator recorded. Then `start()` / `serve()`
        serve it as a new device: the requests the kernel kept for it (the
        "reissue" policy) go to `target`, which follows the same rules as
        for `Device(...)`. Target attributes read at start (`fixed_fds`) may
        be set between `recover` and `start`: a target can open the files
        `target_args` names then.

        Blocks (without the GIL) until the old server is gone, at most the
        recorded timeout. Raises UblkError: ENOENT (no state file), ENODEV
        (no such device, or it was stopped), EINVAL (created without
        recovery), EBUSY (a live server still serves it), ETIMEDOUT; and
        ValueError when `target` has only simple methods but the device does
        not run in copy mode.

        The returned Device owns the device like one from `Device(...)`:
        `close()` after it served stops and deletes it. Closing it before it
        started leaves the device waiting for another `recover` (nothing
        reaches the kernel before `start()`).
        """
        if not isinstance(dev_id, int) or isinstance(dev_id, bool) or not 0 <= dev_id < 1 << 32:
            raise ValueError(f"dev_id must be a non-negative int, got {dev_id!r}")
        sdir = None if state_dir is None else os.fsencode(state_dir)
        if sdir is not None and b"\0" in sdir:
            raise ValueError("state_dir contains a NUL byte")
        self = cls.__new__(cls)
        self._dev = ctypes.c_void_p()
        has_handle, simple = self._setup(target)
        _check(L.lib().ublk_dev_recover(dev_id, sdir, ctypes.byref(self._ops), None, ctypes.byref(self._dev)),
               f"recover device {dev_id}")
        self._load_info()
        if not has_handle and simple & {"read", "write"} and self.data_mode != "copy":
            self.close()  # it never served: the device is left for another try
            raise ValueError(f"device {dev_id} runs in data mode {self.data_mode}: a target with "
                             "read/write methods needs copy mode (create it with zero_copy=\"copy\")")
        return self

    @classmethod
    def nbd(cls, host: str, port: int = 10809, *, export: Optional[str] = None, connections: int = 1,
            timeout: float = 30.0, queues: int = 1, depth: int = 128, zero_copy: str = "auto",
            dev_id: Optional[int] = None, recovery: str = "none", affinity: str = "single") -> "Device":
        """A device served by libublk's built-in NBD client (no Python
        target: the engine moves the data between the block layer and the
        sockets). Connects once to learn the export's size and flags; each
        queue then opens `connections` TCP connections (several need a
        server that allows them). A request not answered within `timeout`
        seconds fails with EIO; dropped connections are reconnected.
        `start()` / `serve()` / `close()` as for any Device; `map()` is
        refused (EOPNOTSUPP). Raises UblkError: ECONNREFUSED & co (server
        unreachable), ENXIO (unknown host), ENOENT (no such export),
        EOPNOTSUPP, EPROTO (not NBD), ETIMEDOUT, EINVAL."""
        if not isinstance(host, str) or not host:
            raise ValueError(f"host must be a non-empty str, got {host!r}")
        for k, v, lo, hi in (("port", port, 1, 65535), ("connections", connections, 1, 16),
                             ("queues", queues, 1, 4096), ("depth", depth, 1, 4096)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"{k} must be an int in {lo}..{hi}, got {v!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not 1 <= timeout <= 86400:
            raise ValueError(f"timeout must be 1..86400 seconds, got {timeout!r}")
        choices = _choices(zero_copy, dev_id, recovery, affinity)
        lib = L.lib()
        cfg = L.ublk_dev_config()
        _check(lib.ublk_dev_config_init(ctypes.byref(cfg)), "ublk_dev_config_init")
        cfg.size = 0
        cfg.nr_queues = queues
        cfg.queue_depth = depth
        for k, v in choices.items():
            setattr(cfg, k, v)
        n = L.ublk_nbd_config()
        _check(lib.ublk_nbd_config_init(ctypes.byref(n)), "ublk_nbd_config_init")
        n.host = _c_string("host", host)
        n.export_name = _c_string("export", export)
        n.port = port
        n.connections = connections
        n.timeout_ms = int(timeout * 1000)
        self = cls.__new__(cls)
        self._dev = ctypes.c_void_p()
        self._init_state(None, None, {})
        self._batcher = None
        _check(lib.ublk_nbd_dev_new(ctypes.byref(cfg), ctypes.byref(n), ctypes.byref(self._dev)),
               f"nbd device for {host}:{port}")
        self._load_info()
        return self

    def _init_state(self, target: Any, handle: Optional[Callable], methods: dict[str, Callable]) -> None:
        """The per-device state every constructor sets (target None: a
        built-in target such as Device.nbd, which calls into Python never)."""
        self._target = target
        self._handle = handle
        self._methods = methods
        self._pending: dict[int, tuple[Io, Callable]] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self._started = False
        self._get_desc = L.lib().ublk_io_get_desc
        self._max_io = 0  # set by _load_info

    def _setup(self, target: Any) -> tuple[bool, set[str]]:
        """What `Device(...)` and `Device.recover` share: the target's kind
        and the callbacks handed to C. Returns (has handle, simple methods)."""
        has_handle = callable(getattr(target, "handle", None))
        simple = {m for m in _SIMPLE if callable(getattr(target, m, None))}
        if not has_handle and not simple:
            raise TypeError(f"target {type(target).__name__!r} has neither handle(io) nor any of "
                            f"{', '.join(_SIMPLE)}: it cannot serve a device")
        self._init_state(target, target.handle if has_handle else None, {m: getattr(target, m) for m in simple})
        # the C side calls these: they must live as long as the device
        self._handle_cb = L.HANDLE_IO(self._on_io)
        self._backing_cb = L.BACKING_CB(self._on_backing)
        # batches (one callback per pass over a queue ring) for the simple
        # methods and for handle targets that route reads and writes
        route = getattr(target, "route", None)
        self._batcher = _batch.Batcher(self, target, route if callable(route) else None) \
            if not has_handle or callable(route) else None
        if self._batcher is not None:
            self._ops = L.ublk_target_ops(handle_batch=self._batcher.cb)
        else:
            self._ops = L.ublk_target_ops(handle_io=self._handle_cb)
        return has_handle, simple

    def _load_info(self) -> None:
        """The device facts, from the library (after ublk_dev_new / _recover)."""
        lib = L.lib()
        info = L.ublk_dev_info()
        _check(lib.ublk_dev_get_info(self._dev, ctypes.byref(info)), "ublk_dev_get_info")
        self.id = info.dev_id
        self.size = info.size
        self.queues = info.nr_queues
        self.depth = info.queue_depth
        self.data_mode = lib.ublk_data_mode_name(info.data_mode).decode()
        self.recovery = _RECOVERY_NAMES.get(info.recovery, f"recovery{info.recovery}")
        self._max_io = info.max_io_bytes
        self.target_name = _py_string(lib.ublk_dev_target_name(self._dev))
        self.target_args = _py_string(lib.ublk_dev_target_args(self._dev))
        self.path = f"/dev/ublkb{self.id}"

    # --- callbacks (queue threads, GIL taken by ctypes) ------------------------------
    def _on_io(self, _user: Any, ptr: int) -> None:
        io = None
        try:
            io = Io(self, ptr)
            if self._handle is not None:
                self._handle(io)
                return
            res = self._simple(io)
            io.complete(res)
        except Exception:
            log.exception("pyublk: device %s: %r failed: the request fails with EIO", getattr(self, "id", "?"), io)
            self._fail(io, ptr)
        finally:
            if io is not None and self._handle is None:
                io._release()

    def _simple(self, io: Io) -> int:
        m = self._methods.get(io.op)
        if m is None:
            return -_errno.EOPNOTSUPP
        if io.op == "read":
            r = m(io.offset, io.length, io.buf)
        elif io.op == "write":
            r = m(io.offset, io.buf)
        elif io.op == "flush":
            r = m()
        else:
            r = m(io.offset, io.length)
        if r is None:
            return io.length if io.op in ("read", "write") else 0
        if not isinstance(r, int):
            raise TypeError(f"{io.op}() returned {type(r).__name__}: want None or an int result")
        return r

    def _fail(self, io: Optional[Io], ptr: int) -> None:
        try:
            if io is not None:
                io._release()
            r = L.lib().ublk_io_complete(ctypes.c_void_p(ptr), -_errno.EIO)
            if r < 0 and r not in (-_errno.EALREADY, -_errno.ESHUTDOWN, -_errno.ESTALE):
                log.error("pyublk: failing request: %s", L.lib().ublk_strerror(r).decode())
        except Exception:  # never let anything unwind into C
            log.exception("pyublk: failing a request")

    def _remember(self, io: Io, callback: Callable) -> int:
        with self._lock:
            key = next(self._keys)
            self._pending[key] = (io, callback)
        return key

    def _on_backing(self, user: Any, ptr: int, res: int) -> None:
        entry = self._pending.pop(user or 0, None)
        if entry is None:
            return
        io, callback = entry
        try:
            callback(io, res)
        except Exception:
            log.exception("pyublk: device %s: lease callback of %r failed: the request fails with EIO", self.id, io)
            try:
                L.lib().ublk_io_lease_manual(io._ptr)
            except Exception:
                pass
            self._fail(io, ptr)

    # --- life cycle ------------------------------------------------------------------
    def _live(self) -> ctypes.c_void_p:
        if not self._dev:
            raise ValueError("the device is closed")
        return self._dev

    def start(self) -> None:
        """Starts serving in background threads; returns once `path` exists.
        The target's `fixed_fds` are read now."""
        if self._batcher is not None:
            self._batcher.arm()
        _check(L.lib().ublk_dev_start(self._live()), "start")
        self._started = True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits until the device stops serving; True if it did within `timeout` s."""
        ms = -1 if timeout is None else max(0, int(timeout * 1000))
        r = L.lib().ublk_dev_wait(self._live(), ms)
        if r == -_errno.ETIMEDOUT:
            return False
        _check(r, "wait")
        return True

    def serve(self) -> None:
        """Starts (if needed) and serves until the device is stopped (`stop()`,
        `ublk del`) or SIGINT / SIGTERM arrives; then stops it. A
        KeyboardInterrupt is not re-raised: the device is simply stopped."""
        if not self._started:
            self.start()
        stop = threading.Event()
        old = None
        if threading.current_thread() is threading.main_thread():
            old = signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not self.wait(0.2):
                if stop.is_set():
                    break
        except KeyboardInterrupt:
            pass
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        self.stop()
        self.wait(30)

    def map(self, offset: int, length: int, fd: int, file_offset: Optional[int] = None, *,
            read: bool = True, write: bool = True) -> None:
        """Routes READ (`read`) and/or WRITE (`write`) requests that fall
        entirely inside device bytes [offset, offset + length) to IO on `fd`
        at `file_offset + (request offset - offset)` (default file_offset:
        offset): the engine lends each such request to that IO and completes
        it, with no call into Python at all. Other requests reach the target
        as usual. A new extent replaces what it overlaps; requests started
        after the call see the change. Keep `fd` open while it is mapped.
        Any thread, before or while serving. UblkError EINVAL (range not in
        the device or not block-aligned, no direction), EBADF, ENOSPC (65536
        extents)."""
        flags = (L.UBLK_MAP_READ if read else 0) | (L.UBLK_MAP_WRITE if write else 0)
        for k, v in (("offset", offset), ("length", length), ("fd", fd)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{k} must be a non-negative int, got {v!r}")
        file_offset = offset if file_offset is None else file_offset
        if not isinstance(file_offset, int) or file_offset < 0:
            raise ValueError(f"file_offset must be a non-negative int, got {file_offset!r}")
        _check(L.lib().ublk_dev_map(self._live(), offset, length, fd, file_offset, flags), "map")

    def unmap(self, offset: int, length: int) -> None:
        """Removes device bytes [offset, offset + length) from the routes of
        `map`: requests there reach the target again."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be non-negative")
        _check(L.lib().ublk_dev_unmap(self._live(), offset, length), "unmap")

    def stop(self) -> None:
        """Stops the device (any thread); pending requests are aborted."""
        if not self._dev or not self._started:
            return
        r = L.lib().ublk_dev_stop(self._dev)
        if r < 0 and r != -_errno.EALREADY:
            _check(r, "stop")

    def close(self) -> None:
        """Stops and deletes the device and frees it (idempotent)."""
        if self._dev:
            dev, self._dev = self._dev, ctypes.c_void_p()
            L.lib().ublk_dev_free(dev)

    def stats(self) -> list[dict[str, int]]:
        """Per queue: ios, bytes, errors, in_flight, copied_bytes, lease_ops."""
        out = []
        for q in range(self.queues):
            s = L.ublk_queue_stats()
            _check(L.lib().ublk_dev_queue_stats(self._live(), q, ctypes.byref(s)), "stats")
            out.append({f: getattr(s, f) for f, _ in L.ublk_queue_stats._fields_})
        return out

    def summary(self) -> str:
        """One line: "device N stopped: mode=M ios=.. bytes=.. errors=..
        copied_bytes=.. lease_ops=.." (counters summed over the queues), the
        format the C examples and the CLI print when a device stops."""
        tot = {k: 0 for k in ("ios", "bytes", "errors", "copied_bytes", "lease_ops")}
        for q in self.stats():
            for k in tot:
                tot[k] += q[k]
        return f"device {self.id} stopped: mode={self.data_mode} " + " ".join(f"{k}={v}" for k, v in tot.items())

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"<pyublk.Device {self.path} {self.size} bytes, {self.queues} queues, mode {self.data_mode}, "
                f"recovery {self.recovery}>")
