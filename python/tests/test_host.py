"""Host tests (no kernel needed): the ctypes declarations match
include/ublk.h, and bad arguments raise clear Python errors before the
kernel is asked."""

import ctypes
import errno
import os
import pickle
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

import pyublk
from pyublk import _lib as L

REPO = Path(__file__).resolve().parents[2]
HEADER = REPO / "include" / "ublk.h"


def header_text() -> str:
    if not HEADER.exists():
        pytest.skip(f"{HEADER} not found (tests run from the repository)")
    return HEADER.read_text()


def test_function_list_matches_header():
    text = re.sub(r"/\*.*?\*/", "", header_text(), flags=re.S)
    declared = set(re.findall(r"\b(ublk_[a-z0-9_]+)\s*\(", text))
    assert declared == set(L.FUNCTIONS), (
        f"only in the header: {sorted(declared - set(L.FUNCTIONS))}; "
        f"only in pyublk: {sorted(set(L.FUNCTIONS) - declared)}")


def test_constants_match_header():
    defines = dict(re.findall(r"^#define (UBLK_[A-Z0-9_]+) (\d+|INT32_MIN)$", header_text(), flags=re.M))
    limits = {"INT32_MIN": -(1 << 31)}
    assert {k: limits[v] if v in limits else int(v) for k, v in defines.items()} == L.CONSTANTS


def test_struct_layouts_match_the_c_compiler():
    """sizeof/offsetof of every field as gcc sees the header, against ctypes."""
    header_text()
    lines = ['#include <stddef.h>', '#include <stdio.h>', '#include "ublk.h"', "int main(void) {"]
    for name, st in L.STRUCTS.items():
        lines.append(f'printf("{name}=%zu\\n", sizeof(struct {name}));')
        for f, _ in st._fields_:
            lines.append(f'printf("{name}.{f}=%zu %zu\\n", offsetof(struct {name}, {f}), sizeof(((struct {name} *)0)->{f}));')
    lines.append("return 0; }")
    with tempfile.TemporaryDirectory() as d:
        src, exe = os.path.join(d, "layout.c"), os.path.join(d, "layout")
        Path(src).write_text("\n".join(lines))
        cc = os.environ.get("CC", "cc")
        r = subprocess.run([cc, "-I", str(HEADER.parent), "-o", exe, src], capture_output=True, text=True)
        assert r.returncode == 0, f"the layout probe does not compile (struct or field renamed?):\n{r.stderr}"
        out = subprocess.run([exe], capture_output=True, text=True, check=True).stdout.split("\n")
    want = {}
    for name, st in L.STRUCTS.items():
        want[name] = str(ctypes.sizeof(st))
        for f, _ in st._fields_:
            fd = getattr(st, f)
            want[f"{name}.{f}"] = f"{fd.offset} {fd.size}"
    got = dict(line.split("=", 1) for line in out if line)
    assert got == want


def test_every_header_struct_is_declared():
    names = set(re.findall(r"^typedef struct (ublk_[a-z_]+) \{", header_text(), flags=re.M))
    assert names == set(L.STRUCTS)


class Reader:
    def read(self, offset, length, buf):
        pass


@pytest.mark.parametrize("kw, exc, text", [
    (dict(size=-1), ValueError, "size must be positive"),
    (dict(size=0), ValueError, "size must be positive"),
    (dict(size=1000), ValueError, "multiple of the logical block size"),
    (dict(size=1 << 20, queues=0), ValueError, "queues must be positive"),
    (dict(size=1 << 20, depth=5000), ValueError, "must be 1..4096"),
    (dict(size="1G"), TypeError, "size must be an int"),
    (dict(size=1 << 20, zero_copy="fast"), ValueError, "zero_copy must be one of"),
    (dict(size=1 << 20, dev_id=-3), ValueError, "dev_id"),
    (dict(size=1 << 20, recovery="sometimes"), ValueError, "recovery must be one of none, reissue, fail, wait"),
    (dict(size=1 << 20, recovery=1), ValueError, "recovery must be one of"),
    (dict(size=1 << 20, target_args=b"file=/x"), TypeError, "target_args must be a str or None"),
    (dict(size=1 << 20, target_args="a\0b"), ValueError, "target_args contains a NUL"),
])
def test_bad_arguments(kw, exc, text):
    with pytest.raises(exc, match=text):
        pyublk.Device(Reader(), **kw)


def test_non_target_object():
    with pytest.raises(TypeError, match="neither handle"):
        pyublk.Device(object(), size=1 << 20)


@pytest.mark.parametrize("args, exc, text", [
    ((Reader(), -1), ValueError, "dev_id must be a non-negative int"),
    ((Reader(), "3"), ValueError, "dev_id must be a non-negative int"),
    ((object(), 3), TypeError, "neither handle"),
])
def test_recover_bad_arguments(args, exc, text):
    with pytest.raises(exc, match=text):
        pyublk.Device.recover(*args)


def test_recover_without_state_file(tmp_path):
    """No state file for the id: ENOENT before the kernel is asked."""
    with pytest.raises(pyublk.UblkError) as e:
        pyublk.Device.recover(Reader(), 4000, state_dir=str(tmp_path))
    assert e.value.errno == errno.ENOENT, e.value
    assert "4000" in str(e.value), e.value


def test_recovery_names_match_constants():
    from pyublk import _device as D
    assert {k: v for k, v in L.CONSTANTS.items() if k.startswith("UBLK_RECOVERY_")} == \
        {f"UBLK_RECOVERY_{k.upper()}": v for k, v in D._RECOVERY.items()}


def test_library_search_names_what_it_tried(monkeypatch):
    monkeypatch.setattr(L, "_candidates", lambda: ["/nonexistent/libublk.so"])
    with pytest.raises(OSError, match="/nonexistent/libublk.so"):
        L.load()


def test_pyublk_lib_env_is_used(monkeypatch):
    lib = L.lib()  # found by the normal search
    path = os.environ.get("PYUBLK_LIB")
    monkeypatch.setenv("PYUBLK_LIB", "/elsewhere/libublk.so")
    assert "/elsewhere/libublk.so" in L._candidates()
    assert lib.ublk_strerror(-22).decode().startswith("EINVAL")
    del path


# --- the binding's own rules, against a fake library (no kernel, no C call) -----------

class FakeLib:
    """Stands in for libublk.so: records the calls; ublk_io_complete and the
    other entry points return `ret` (0) unless a test replaces them."""

    def __init__(self):
        self.calls = []
        self.bufs = {}  # io pointer -> ctypes buffer (copy mode)

    def __getattr__(self, name):
        if not name.startswith("ublk_"):
            raise AttributeError(name)

        def call(*args):
            self.calls.append((name, args))
            return 0
        return call

    def ublk_strerror(self, r):
        return f"E{-r}".encode()

    def ublk_last_error_message(self, buf, n):
        return 0

    def ublk_io_buf(self, ptr):
        self.calls.append(("ublk_io_buf", (ptr,)))
        b = self.bufs.get(ptr.value)
        return ctypes.addressof(b) if b is not None else None

    def names(self):
        return [c[0] for c in self.calls]


@pytest.fixture
def fake(monkeypatch):
    f = FakeLib()
    monkeypatch.setattr(L, "_LIB", f)
    return f


@pytest.fixture
def fake_dev(fake):
    """A Device over the fake library (made without ublk_dev_new); closed
    (fake ublk_dev_free) before the fake goes away."""
    from pyublk import _device as D
    made = []

    def make(target=None, started=True):
        dev = D.Device.__new__(D.Device)
        dev._dev = ctypes.c_void_p(0xD0)
        dev._init_state(target, getattr(target, "handle", None), {})
        dev._batcher = None
        dev._started = started
        dev.id, dev.queues, dev.data_mode, dev._max_io = 99, 1, "copy", 1 << 16
        made.append(dev)
        return dev
    yield make
    for dev in made:
        dev._queue_threads.clear()
        dev.close()


def an_io(dev, ptr=0x1000, op=L.UBLK_OP_READ, length=4096):
    return pyublk.Io._from_fields(dev, ptr, op, 0, 0, length, 0, 0)


def test_io_refuses_everything_once_completed(fake, fake_dev):
    """A second complete (or any other Io call) after the first is refused in
    Python with EALREADY: the C handle may carry the tag's next request."""
    io = an_io(fake_dev())
    io.complete(4096)
    assert fake.names() == ["ublk_io_complete"]
    for what, f in (("complete", lambda: io.complete(0)), ("buf", lambda: io.buf),
                    ("register_fd", lambda: io.register_fd(3)),
                    ("read_into", lambda: io.lease.read_into(3, 0, 0, 4096)),
                    ("write_from", lambda: io.lease.write_from(3, 0, 0, 4096)),
                    ("send", lambda: io.lease.send(3, 0, 4096)), ("recv", lambda: io.lease.recv(3, 0, 4096)),
                    ("manual", lambda: io.lease.manual())):
        with pytest.raises(pyublk.UblkError) as e:
            f()
        assert e.value.errno == errno.EALREADY, (what, e.value)
    assert fake.names() == ["ublk_io_complete"], "a call reached the library after the completion"


def test_fail_marks_the_io_completed(fake, fake_dev):
    """pyublk failing a request (its callback raised) marks the Io done: a
    worker still holding it cannot complete the tag's next request."""
    dev = fake_dev()
    io = an_io(dev, ptr=0x2000)
    dev._fail(io, 0x2000)
    assert [(c[0], c[1][0].value, c[1][1]) for c in fake.calls] == [("ublk_io_complete", 0x2000, -errno.EIO)]
    with pytest.raises(pyublk.UblkError) as e:
        io.complete(4096)
    assert e.value.errno == errno.EALREADY
    dev._fail(io, 0x2000)  # already done: nothing more
    assert len(fake.calls) == 1, fake.calls
    # and a request the target completed before raising is not failed again
    io2 = an_io(dev, ptr=0x3000)
    io2.complete(4096)
    dev._fail(io2, 0x3000)
    assert fake.names() == ["ublk_io_complete", "ublk_io_complete"], fake.calls


def test_held_buffer_export_still_completes(fake, fake_dev, caplog):
    """An export of io.buf still held (numpy; here a PickleBuffer) makes
    complete raise BufferError only after the request is completed; the view
    is gone from pyublk either way. Same for a request pyublk fails."""
    dev = fake_dev()
    fake.bufs[0x4000] = ctypes.create_string_buffer(4096)
    fake.bufs[0x5000] = ctypes.create_string_buffer(4096)
    io = an_io(dev, ptr=0x4000)
    holder = pickle.PickleBuffer(io.buf)
    with pytest.raises(BufferError, match="the request is completed"):
        io.complete(4096)
    assert (fake.calls[-1][0], fake.calls[-1][1][0].value, fake.calls[-1][1][1]) == ("ublk_io_complete", 0x4000, 4096)
    with pytest.raises(pyublk.UblkError) as e:
        io.buf
    assert e.value.errno == errno.EALREADY
    io2 = an_io(dev, ptr=0x5000)
    holder2 = pickle.PickleBuffer(io2.buf)
    dev._fail(io2, 0x5000)
    assert fake.calls[-1][0] == "ublk_io_complete" and fake.calls[-1][1][1] == -errno.EIO
    assert any("still held" in r.getMessage() for r in caplog.records)
    assert io2._done and io2._view is None
    del holder, holder2


def test_int_arguments_out_of_c_range(fake, fake_dev):
    """Values ctypes would truncate are refused before any call."""
    dev = fake_dev()
    io = an_io(dev)
    for f in (lambda: io.complete(1 << 31), lambda: io.complete(-(1 << 31) - 1),
              lambda: io.lease.read_into((1 << 32) + 3, 0, 0, 4096),
              lambda: io.lease.read_into(-1, 0, 0, 4096),
              lambda: io.lease.write_from(3, 1 << 64, 0, 4096),
              lambda: io.lease.read_into(3, -1, 0, 4096),
              lambda: io.lease.read_into(3, 0, 1 << 32, 4096),
              lambda: io.lease.send(3, 0, (1 << 32) + 4096),
              lambda: io.lease.recv(1 << 31, 0, 4096),
              lambda: io.register_fd(1 << 31), lambda: io.register_fd(-1),
              lambda: dev.map(0, 1 << 64, 3), lambda: dev.map(1 << 64, 4096, 3),
              lambda: dev.map(0, 4096, 1 << 31), lambda: dev.map(0, 4096, 3, 1 << 64),
              lambda: dev.unmap(1 << 64, 4096), lambda: dev.unmap(0, -1), lambda: dev.unmap(0, "1")):
        with pytest.raises(ValueError):
            f()
    with pytest.raises(TypeError):
        io.complete(1.0)
    assert fake.calls == [], fake.calls
    assert not io._done
    dev.wait(1e12)  # a huge timeout is clamped, not truncated
    assert fake.calls[-1][0] == "ublk_dev_wait" and 0 <= fake.calls[-1][1][1] <= (1 << 31) - 1


@pytest.mark.parametrize("kw", [dict(size=1 << 64), dict(size=1 << 20, max_io_size=1 << 32),
                                dict(size=1 << 33, logical_block_size=1 << 32),
                                dict(size=1 << 20, dev_id=1 << 31), dict(size=1 << 20, dev_id=True)])
def test_device_arguments_out_of_c_range(fake, kw):
    with pytest.raises(ValueError):
        pyublk.Device(Reader(), **kw)
    assert fake.calls == [], fake.calls


def test_closed_device_refuses_calls(fake, fake_dev):
    """After close: Io calls raise UblkError ESHUTDOWN, Device calls
    ValueError, without reaching the freed device; close is idempotent."""
    dev = fake_dev()
    io = an_io(dev)
    dev.close()
    dev.close()
    assert fake.names() == ["ublk_dev_free"], fake.calls
    for f in (lambda: io.complete(4096), lambda: io.lease.read_into(3, 0, 0, 4096), lambda: io.buf,
              lambda: io.register_fd(3), lambda: io.lease.manual()):
        with pytest.raises(pyublk.UblkError) as e:
            f()
        assert e.value.errno == errno.ESHUTDOWN, e.value
    for f in (lambda: dev.wait(0), dev.stats, lambda: dev.map(0, 4096, 3), lambda: dev.unmap(0, 4096), dev.start):
        with pytest.raises(ValueError, match="closed"):
            f()
    dev.stop()  # a no-op
    assert fake.names() == ["ublk_dev_free"], fake.calls


def test_close_waits_for_calls_in_progress(fake, fake_dev):
    """A worker thread inside ublk_io_complete when another thread closes
    the device: the device is stopped (ending a wait()), and freed only once
    that call returned."""
    import threading
    import time
    dev = fake_dev()
    io = an_io(dev)
    entered, go = threading.Event(), threading.Event()

    def slow_complete(ptr, result):
        fake.calls.append(("ublk_io_complete", (ptr, result)))
        entered.set()
        go.wait(10)
        fake.calls.append(("complete returns", ()))
        return 0
    fake.ublk_io_complete = slow_complete
    worker = threading.Thread(target=io.complete, args=(4096,))
    worker.start()
    assert entered.wait(10)
    closer = threading.Thread(target=dev.close)
    closer.start()
    time.sleep(0.3)
    assert "ublk_dev_free" not in fake.names(), "freed while a call was in progress"
    assert "ublk_dev_stop" in fake.names()
    go.set()
    worker.join(10)
    closer.join(10)
    assert not closer.is_alive()
    names = fake.names()
    assert names.index("complete returns") < names.index("ublk_dev_free"), names


def test_concurrent_completions_reach_the_library_once(fake, fake_dev):
    """Two threads completing one Io, or a worker completing it while pyublk
    fails it: one call into the library, the other is refused / skipped."""
    import threading
    dev = fake_dev()
    io = an_io(dev, ptr=0x6000)
    entered, go = threading.Event(), threading.Event()

    def slow_complete(ptr, result):
        fake.calls.append(("ublk_io_complete", (ptr, result)))
        entered.set()
        go.wait(10)
        return 0
    fake.ublk_io_complete = slow_complete
    worker = threading.Thread(target=io.complete, args=(4096,))
    worker.start()
    assert entered.wait(10)
    with pytest.raises(pyublk.UblkError) as e:
        io.complete(0)
    assert e.value.errno == errno.EALREADY
    dev._fail(io, 0x6000)
    go.set()
    worker.join(10)
    assert [c[1][1] for c in fake.calls if c[0] == "ublk_io_complete"] == [4096], fake.calls


def test_serve_ends_when_another_thread_closes(fake, fake_dev):
    import threading
    dev = fake_dev()
    fake.ublk_dev_wait = lambda d, ms: (time.sleep(ms / 1000), -errno.ETIMEDOUT)[1]
    closer = threading.Timer(0.3, dev.close)
    closer.start()
    dev.serve()  # returns, no "closed" error
    closer.join(10)
    assert "ublk_dev_free" in fake.names() and not dev._dev


def test_close_on_a_queue_thread_is_refused(fake, fake_dev):
    """close() inside a callback (a queue thread) would wait for itself: it
    raises EDEADLK and keeps the device (nothing freed, nothing nulled)."""
    from pyublk import _device as D
    dev = fake_dev()
    assert dev._on_queue_init(None, 0, None) == 0  # this thread is now a queue thread of dev
    with pytest.raises(pyublk.UblkError) as e:
        dev.close()
    assert e.value.errno == errno.EDEADLK
    assert dev._dev and not dev._closed and "ublk_dev_free" not in fake.names()
    an_io(dev).complete(4096)  # still usable
    # garbage collected there: kept alive until exit instead of freed under the engine
    dev.__del__()
    assert dev in D._parked and "ublk_dev_free" not in fake.names()
    dev._on_queue_deinit(None, 0, None)
    D._close_at_exit()
    assert fake.names().count("ublk_dev_free") == 1 and not dev._dev and not D._parked


def test_exit_closes_devices_still_open(fake, fake_dev):
    from pyublk import _device as D
    dev = fake_dev()
    D._devices.add(dev)
    D._close_at_exit()
    assert fake.names() == ["ublk_dev_free"] and dev not in D._devices


def test_handle_raising_base_exception_fails_its_request(fake, fake_dev):
    """handle_io path: SystemExit / KeyboardInterrupt in handle() fail the
    request with EIO (they used to escape into ctypes, leaving it pending),
    and mark the Io done; one completed before raising is left alone."""
    kept = []

    class T:
        def handle(self, io):
            kept.append(io)
            if len(kept) == 3:
                io.complete(0)
            raise (SystemExit(2) if len(kept) == 1 else KeyboardInterrupt)
    dev = fake_dev(T())
    for ptr in (0x7000, 0x7100, 0x7200):
        dev._on_io(None, ptr)  # returns: nothing escapes
    done = [(c[1][0].value, c[1][1]) for c in fake.calls if c[0] == "ublk_io_complete"]
    assert done == [(0x7000, -errno.EIO), (0x7100, -errno.EIO), (0x7200, 0)], done
    assert all(io._done for io in kept)


def batch(entries):
    """A ublk_io_batch_entry array: (io, op, offset, len, buf address)."""
    arr = (L.ublk_io_batch_entry * len(entries))()
    for e, (io, op, off, ln, buf) in zip(arr, entries):
        e.io, e.buf, e.desc.op, e.desc.offset, e.desc.len = io, buf, op, off, ln
        e.result, e.lease_fd = L.UBLK_BATCH_PENDING, -1
    return arr


def run_batch(dev, target, entries):
    from pyublk import _batch as B
    dev._methods = {m: getattr(target, m) for m in ("read", "write", "flush", "discard", "write_zeroes")
                    if callable(getattr(target, m, None))}
    dev._handle = getattr(target, "handle", None)
    route = getattr(target, "route", None)
    b = B.Batcher(dev, target, route)
    b.arm()
    arr = batch(entries)
    b.on_batch(None, ctypes.addressof(arr), len(arr))
    return b, arr


class Odd:
    """Simple methods that misbehave, one way per offset."""

    def read(self, offset, length, buf):
        if offset == 0:
            raise SystemExit(3)
        if offset == 4096:
            raise KeyboardInterrupt
        if offset == 8192:
            return L.UBLK_BATCH_PENDING  # would leave the request pending
        if offset == 12288:
            return 1 << 40
        return None

    def write(self, offset, data):
        return "done"

    def flush(self):
        return L.UBLK_BATCH_PENDING


def test_batch_of_simple_methods_ends_every_request(fake, fake_dev):
    """BaseException, the pending marker, results that are no int or do not
    fit: each of those requests fails with EIO, the others are served."""
    dev = fake_dev()
    bufs = [ctypes.create_string_buffer(1 << 16) for _ in range(6)]
    R, W, F = L.UBLK_OP_READ, L.UBLK_OP_WRITE, L.UBLK_OP_FLUSH
    ents = [(0x10 + i, op, off, 4096, ctypes.addressof(bufs[i]))
            for i, (op, off) in enumerate([(R, 0), (R, 4096), (R, 8192), (R, 12288), (W, 0), (R, 65536)])]
    ents.append((0x20, F, 0, 0, 0))
    _, arr = run_batch(dev, Odd(), ents)
    assert [e.result for e in arr] == [-errno.EIO] * 5 + [4096, -errno.EIO], [e.result for e in arr]


class Routes:
    def __init__(self):
        self.handed = []

    def route(self, op, offset, length):
        return {0: (-1, 0), 4096: (3, -1), 8192: ("3", 0), 12288: (5, 4096), 16384: (1 << 31, 0),
                20480: (7,)}.get(offset)

    def handle(self, io):
        self.handed.append(io)
        if io.offset == 65536:
            raise SystemExit("handle gives up")


def test_batch_route_and_handle_failures_end_every_request(fake, fake_dev):
    """route() giving a negative or bad fd or offset fails the request
    (it used to stay pending forever); handle() raising a BaseException
    fails its request in C and marks its Io done."""
    dev = fake_dev()
    R = L.UBLK_OP_READ
    offs = [0, 4096, 8192, 12288, 16384, 20480, 65536, 69632]
    ents = [(0x100 + i, R, off, 4096, 0) for i, off in enumerate(offs)]
    t = Routes()
    _, arr = run_batch(dev, t, ents)
    res = [(e.result, e.lease_fd) for e in arr]
    E = (-errno.EIO, -1)
    P = L.UBLK_BATCH_PENDING
    assert res == [E, E, E, (P, 5), E, E, (P, -1), (P, -1)], res
    assert arr[3].lease_file_off == 4096
    assert [io.offset for io in t.handed] == [65536, 69632]
    failed = [c for c in fake.calls if c[0] == "ublk_io_complete"]
    assert [(c[1][0].value, c[1][1]) for c in failed] == [(0x106, -errno.EIO)], fake.calls
    assert t.handed[0]._done and not t.handed[1]._done


def test_batch_that_cannot_be_read_fails_every_request(fake, fake_dev):
    dev = fake_dev()
    bufs = [ctypes.create_string_buffer(1 << 16) for _ in range(3)]
    from pyublk import _batch as B

    class Broken(dict):
        def get(self, *a):
            raise MemoryError("no views")
    t = Odd()
    dev._methods = {"read": t.read}
    b = B.Batcher(dev, t, None)
    b.arm()
    b.batch_views = Broken()
    arr = batch([(0x30 + i, L.UBLK_OP_READ, 65536, 4096, ctypes.addressof(bufs[i])) for i in range(3)])
    b.on_batch(None, ctypes.addressof(arr), 3)
    assert [e.result for e in arr] == [-errno.EIO] * 3


def test_batch_registering_fixed_fds_failure_still_serves(fake, fake_dev):
    """A failure registering fixed_fds (an optimization) leaves the batch
    served: it used to leave every request of it pending."""
    dev = fake_dev()

    def boom(*a):
        raise OSError("register failed")
    fake.ublk_io_register_fd = boom

    class T:
        fixed_fds = (3,)

        def route(self, op, offset, length):
            return 3, offset

        def handle(self, io):
            io.complete(0)
    ents = [(0x40, L.UBLK_OP_READ, 0, 4096, 0), (0x41, L.UBLK_OP_FLUSH, 0, 0, 0)]
    _, arr = run_batch(dev, T(), ents)
    assert (arr[0].result, arr[0].lease_fd) == (L.UBLK_BATCH_PENDING, 3)
    assert [c[1][1] for c in fake.calls if c[0] == "ublk_io_complete"] == [0]
