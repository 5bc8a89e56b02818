"""Device: the Python face of libublk (its requests: `_io`)."""

from __future__ import annotations

import atexit
import ctypes
import errno as _errno
import itertools
import logging
import os
import signal
import threading
import time
import weakref
from typing import Any, Callable, Optional

from . import _batch
from . import _lib as L
from ._io import _INT_MAX, _U32_MAX, _U64_MAX, Io, UblkError, _check, _int_in

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
    if dev_id is not None and (not isinstance(dev_id, int) or isinstance(dev_id, bool) or not 0 <= dev_id <= _INT_MAX):
        raise ValueError(f"dev_id must be a non-negative int (at most {_INT_MAX}), got {dev_id!r}")
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
    exception (any BaseException, SystemExit included; also in `route`, or
    a result that is not one) fails that request with EIO and is logged
    with its traceback; the device keeps serving.

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
    `with` block, or garbage collection, or the interpreter exiting) stops
    and deletes it. Keep the Device object alive while it serves: its
    callbacks are referenced from C. See `close` for what happens to Io
    objects still held.
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
            if v > (_U64_MAX if k == "size" else _U32_MAX):
                raise ValueError(f"{k} {v} is too large (at most {_U64_MAX if k == 'size' else _U32_MAX})")
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
        _devices.add(self)
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
        _devices.add(self)
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
        _devices.add(self)
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
        # Use after close: close() frees the C device and with it every
        # ublk_io handle, while a worker thread may still hold an Io. Each
        # call into C on the device or a handle is entered under `_lock`
        # (Device._enter, Io._enter): refused once `_closed` is set, else
        # counted in `_busy` (an entry appended, popped when the call
        # returned: list ops need no lock). close() sets `_closed` under the
        # lock, then waits for `_busy` to empty before ublk_dev_free. One
        # short critical section per call (about 0.2 us, a fraction of a
        # ctypes call's own cost); the batch paths (simple methods, route)
        # make no such call per request and pay nothing. Calls made inside
        # a callback would be safe without it (ublk_dev_free waits for the
        # callbacks to return) but are counted all the same: telling them
        # apart would cost as much.
        self._closed = False
        self._busy: list = []
        # Ios whose `buf` view is live, weakly (a request completed by the
        # engine, e.g. by its lease, never releases it): close() releases them
        self._bufs: "weakref.WeakSet[Io]" = weakref.WeakSet()
        self._queue_threads: set[int] = set()  # thread idents of the queue threads (queue_init..deinit)
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
        # queue_init / queue_deinit tell which threads are queue threads:
        # close() there would wait for itself (ublk_dev_free refuses it)
        self._qinit_cb = L.QUEUE_INIT(self._on_queue_init)
        self._qdeinit_cb = L.QUEUE_DEINIT(self._on_queue_deinit)
        if self._batcher is not None:
            self._ops = L.ublk_target_ops(handle_batch=self._batcher.cb, queue_init=self._qinit_cb,
                                          queue_deinit=self._qdeinit_cb)
        else:
            self._ops = L.ublk_target_ops(handle_io=self._handle_cb, queue_init=self._qinit_cb,
                                          queue_deinit=self._qdeinit_cb)
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
    # Nothing may escape them, not even SystemExit / KeyboardInterrupt
    # (ctypes would print it and return, leaving the request pending forever).
    def _on_queue_init(self, _user: Any, _qid: int, _data: Any) -> int:
        try:
            self._queue_threads.add(threading.get_ident())
        except BaseException:
            pass
        return 0

    def _on_queue_deinit(self, _user: Any, _qid: int, _data: Any) -> None:
        try:
            self._queue_threads.discard(threading.get_ident())
        except BaseException:
            pass

    def _on_io(self, _user: Any, ptr: int) -> None:
        io = None
        try:
            io = Io(self, ptr)
            if self._handle is not None:
                self._handle(io)
                return
            res = self._simple(io)
            io.complete(res)
        except BaseException:
            try:
                log.exception("pyublk: device %s: %r failed: the request fails with EIO (unless it was completed)",
                              getattr(self, "id", "?"), io)
            except BaseException:
                pass
            self._fail(io, ptr)
        finally:
            if io is not None and self._handle is None:
                try:
                    io._release()
                except BufferError:
                    pass  # (reported by io.complete)

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
        """Fails a request with EIO after its callback raised (on its queue
        thread: a call into C there is safe even while close() runs, as
        ublk_dev_free waits for the callbacks). `io` is marked completed
        first, so a worker thread still holding it cannot complete the tag's
        next request; nothing is done if it already was completed. Its view
        is released before the request completes; an export of it that is
        still held is logged (it is the holder's to drop)."""
        try:
            if io is not None:
                if not io._claim():
                    return
                try:
                    io._release()
                except BufferError:
                    log.error("pyublk: %r: an export of io.buf is still held (e.g. a numpy array over it) "
                              "while the request fails: it shows memory the engine reuses", io)
            r = L.lib().ublk_io_complete(ctypes.c_void_p(ptr), -_errno.EIO)
            if r < 0 and r not in (-_errno.EALREADY, -_errno.ESHUTDOWN, -_errno.ESTALE):
                log.error("pyublk: failing request: %s", L.lib().ublk_strerror(r).decode())
        except BaseException:  # never let anything unwind into C
            try:
                log.exception("pyublk: failing a request")
            except BaseException:
                pass

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
        except BaseException:
            try:
                log.exception("pyublk: device %s: lease callback of %r failed: the request fails with EIO",
                              self.id, io)
            except BaseException:
                pass
            if not io._done:
                try:
                    L.lib().ublk_io_lease_manual(io._ptr)
                except BaseException:
                    pass
            self._fail(io, ptr)

    # --- life cycle ------------------------------------------------------------------
    def _enter(self) -> ctypes.c_void_p:
        """Before a call into C on the device: refused once it is closed
        (ValueError), counted so that close() waits for it. Pair with
        `self._busy.pop()`."""
        with self._lock:
            if self._closed or not self._dev:
                raise ValueError("the device is closed")
            self._busy.append(None)
            return self._dev

    def _call(self, fn: Any, *args: Any) -> int:
        """fn(device handle, *args), entered as by _enter."""
        dev = self._enter()
        try:
            return fn(dev, *args)
        finally:
            self._busy.pop()

    def start(self) -> None:
        """Starts serving in background threads; returns once `path` exists.
        The target's `fixed_fds` are read now."""
        if self._batcher is not None:
            self._batcher.arm()
        _check(self._call(L.lib().ublk_dev_start), "start")
        self._started = True

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Waits until the device stops serving; True if it did within `timeout` s."""
        ms = -1 if timeout is None else int(min(max(timeout, 0) * 1000, _INT_MAX))
        r = self._call(L.lib().ublk_dev_wait, ms)
        if r == -_errno.ETIMEDOUT:
            return False
        _check(r, "wait")
        return True

    def serve(self) -> None:
        """Starts (if needed) and serves until the device is stopped (`stop()`,
        `ublk del`), closed by another thread, or SIGINT / SIGTERM arrives;
        then stops it. A KeyboardInterrupt is not re-raised: the device is
        simply stopped."""
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
        except ValueError:
            if not self._closed:
                raise
            return  # closed by another thread: stopped and deleted already
        finally:
            if old is not None:
                signal.signal(signal.SIGTERM, old)
        self.stop()
        try:
            self.wait(30)
        except ValueError:
            if not self._closed:
                raise

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
        extents); ValueError for arguments out of their C range."""
        flags = (L.UBLK_MAP_READ if read else 0) | (L.UBLK_MAP_WRITE if write else 0)
        for k, v, hi in (("offset", offset, _U64_MAX), ("length", length, _U64_MAX), ("fd", fd, _INT_MAX)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{k} must be a non-negative int, got {v!r}")
            _int_in(k, v, 0, hi)
        file_offset = offset if file_offset is None else file_offset
        if not isinstance(file_offset, int) or file_offset < 0:
            raise ValueError(f"file_offset must be a non-negative int, got {file_offset!r}")
        _int_in("file_offset", file_offset, 0, _U64_MAX)
        _check(self._call(L.lib().ublk_dev_map, offset, length, fd, file_offset, flags), "map")

    def unmap(self, offset: int, length: int) -> None:
        """Removes device bytes [offset, offset + length) from the routes of
        `map`: requests there reach the target again."""
        for k, v in (("offset", offset), ("length", length)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError("offset and length must be non-negative ints")
            _int_in(k, v, 0, _U64_MAX)
        _check(self._call(L.lib().ublk_dev_unmap, offset, length), "unmap")

    def stop(self) -> None:
        """Stops the device (any thread); pending requests are aborted. A
        no-op once the device is closed."""
        if not self._dev or not self._started:
            return
        try:
            r = self._call(L.lib().ublk_dev_stop)
        except ValueError:
            return  # closed meanwhile (close stops it)
        if r < 0 and r != -_errno.EALREADY:
            _check(r, "stop")

    def close(self) -> None:
        """Stops and deletes the device and frees it (idempotent). Io
        objects still held (a worker thread) then refuse with UblkError
        ESHUTDOWN, the Device's methods with ValueError; calls into the
        library in progress on other threads are waited for (a `wait()` is
        ended by stopping the device), so none runs on freed memory. `buf`
        views of requests not completed are released (an export of one that
        is still held is the holder's: it shows freed memory). Raises
        UblkError EDEADLK on a queue thread of this device (inside one of
        its callbacks), where it would wait for itself: the device is kept
        then; close it from another thread (`stop()` works there)."""
        if not self._dev:
            return
        with self._lock:
            if not self._dev:
                return
            if threading.get_ident() in self._queue_threads:
                raise UblkError(_errno.EDEADLK, "close() on a queue thread of the device (inside a callback) "
                                "would wait for itself: the device is kept; close it from another thread")
            closing = self._closed
            self._closed = True  # from now on nothing new enters the library
            busy = bool(self._busy)
            bufs = list(self._bufs)
        if closing:  # another thread is closing it: done when it is
            while self._dev:
                time.sleep(0.001)
            return
        if busy and self._started:
            L.lib().ublk_dev_stop(self._dev)  # ends a wait() in progress (stop: any thread, any time)
        while self._busy:  # the calls in progress (short ones, but for wait)
            time.sleep(0.001)
        for io in bufs:
            try:
                io._release()
            except BufferError:
                log.error("pyublk: device %s: closed while an export of %r's buffer is still held: "
                          "it shows freed memory now", getattr(self, "id", "?"), io)
        L.lib().ublk_dev_free(self._dev)  # waits for the callbacks, which find the device closed
        with self._lock:
            self._dev = ctypes.c_void_p()
        _devices.discard(self)

    def stats(self) -> list[dict[str, int]]:
        """Per queue: ios, bytes, errors, in_flight, copied_bytes, lease_ops."""
        out = []
        for q in range(self.queues):
            s = L.ublk_queue_stats()
            _check(self._call(L.lib().ublk_dev_queue_stats, q, ctypes.byref(s)), "stats")
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
        except UblkError as e:
            if e.errno == _errno.EDEADLK:
                # collected on one of its own queue threads: freeing its
                # callbacks now would pull them from under the engine; kept
                # (resurrected) until exit, where _close_at_exit closes it
                _parked.append(self)
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"<pyublk.Device {self.path} {self.size} bytes, {self.queues} queues, mode {self.data_mode}, "
                f"recovery {self.recovery}>")


# Devices not closed yet (weakly: an unreferenced Device closes itself when
# collected), and those collected on their own queue thread (kept alive).
_devices: "weakref.WeakSet[Device]" = weakref.WeakSet()
_parked: list[Device] = []


@atexit.register
def _close_at_exit() -> None:
    """At interpreter exit, stops and deletes the devices still open, so that
    no queue thread calls into an interpreter being finalized (a device with
    a recovery policy too: to leave one for `Device.recover`, the process
    must end without closing it, e.g. killed, or os._exit())."""
    for dev in list(_devices) + _parked:
        try:
            dev.close()
        except BaseException:
            try:
                log.exception("pyublk: closing %r at exit", dev)
            except BaseException:
                pass
    _parked.clear()
