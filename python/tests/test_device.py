"""Device tests (root, a ublk kernel: run inside the VM): the examples under
fio crc32c verify, ext4 on loop.py, exceptions failing one IO with EIO while
the device keeps serving, lease rules from Python, buffer lifetime, crash
recovery (loop.py killed with SIGKILL, taken over by `loop.py --recover`)."""

import errno
import mmap
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import pyublk

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
REPO = HERE.parents[1]
UBLK = Path(os.environ.get("UBLK_BIN") or REPO / "target" / "release" / "ublk")

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/ublk-control"),
    reason="needs root and /dev/ublk-control (a ublk kernel: run inside the VM, tests/vm/run)")

WORK = Path(os.environ.get("PYUBLK_TEST_WORK", "/dev/shm"))


def fio_verify(dev: str, size: str = "48M", extra=()) -> None:
    cmd = ["fio", "--name=v", f"--filename={dev}", "--rw=randrw", "--bsrange=4k-1M", "--direct=1",
           "--ioengine=io_uring", "--iodepth=16", f"--size={size}", "--verify=crc32c", "--do_verify=1",
           "--verify_fatal=1", "--verify_state_save=0", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "err= 0" in r.stdout, f"fio failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


class Example:
    """Runs an example script; reads its "<id> <path>" line."""

    def __init__(self, *args: str):
        env = dict(os.environ)
        self.p = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        line = self.p.stdout.readline().split()
        if len(line) != 2:
            self.p.kill()
            raise AssertionError(f"{args[0]} printed {line!r}: {self.p.stderr.read()[-2000:]}")
        self.id, self.path = int(line[0]), line[1]

    def kill(self) -> None:
        """SIGKILL: the process dies without any cleanup."""
        self.p.kill()
        self.p.communicate(timeout=30)

    def stop(self) -> str:
        self.p.send_signal(signal.SIGTERM)
        try:
            rc = self.p.wait(60)
        except subprocess.TimeoutExpired:
            self.p.kill()
            raise AssertionError("the example did not exit within 60 s of SIGTERM")
        err = self.p.stderr.read()
        assert rc == 0, f"exit {rc}: {err[-2000:]}"
        assert not os.path.exists(f"/sys/block/ublkb{self.id}"), "the device is still there"
        return err


def test_ramdisk_example():
    ex = Example(str(EXAMPLES / "ramdisk.py"), "--size", "64M", "--queues", "2")
    try:
        fio_verify(ex.path)
    finally:
        err = ex.stop()
    assert "mode=copy" in err


@pytest.fixture
def backing():
    fd, path = tempfile.mkstemp(dir=WORK, prefix="pyublk-", suffix=".img")
    os.ftruncate(fd, 96 << 20)
    os.close(fd)
    yield path
    os.unlink(path)


@pytest.mark.parametrize("mode,how", [("auto", "map"), ("copy", "map"), ("auto", "per-request")])
def test_loop_example_leases(backing, mode, how):
    extra = ["--per-request"] if how == "per-request" else []
    ex = Example(str(EXAMPLES / "loop.py"), "--file", backing, "--zero-copy", mode, *extra)
    try:
        fio_verify(ex.path)
        with open(ex.path, "rb", buffering=0) as d, open(backing, "rb") as f:
            assert d.read(8 << 20) == f.read(8 << 20), "the device and its backing file differ"
    finally:
        err = ex.stop()
    # the data went through leases, not through Python
    assert " lease_ops=0" not in err and " lease_ops=" in err, err
    if mode == "auto" and "AUTO_BUF_REG" in pyublk.features():
        assert "mode=auto-buf-reg" in err and " copied_bytes=0 " in err, err


def test_loop_example_ext4(backing):
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 missing")
    ex = Example(str(EXAMPLES / "loop.py"), "--file", backing)
    mnt = tempfile.mkdtemp(dir=WORK)
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", ex.path], check=True, timeout=120)
        subprocess.run(["mount", ex.path, mnt], check=True, timeout=60)
        data = os.urandom(3 << 20)
        try:
            Path(mnt, "f").write_bytes(data)
            os.sync()
        finally:
            subprocess.run(["umount", mnt], check=True, timeout=60)
        subprocess.run(["mount", ex.path, mnt], check=True, timeout=60)
        try:
            assert Path(mnt, "f").read_bytes() == data
        finally:
            subprocess.run(["umount", mnt], check=True, timeout=60)
        r = subprocess.run(["fsck.ext4", "-n", "-f", ex.path], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        os.rmdir(mnt)
        ex.stop()


def test_async_remote_example():
    ex = Example(str(EXAMPLES / "async_remote.py"), "--size", "64M", "--delay-ms", "1")
    try:
        fio_verify(ex.path, "32M")
    finally:
        ex.stop()


def read_at(path: str, off: int, n: int = 4096):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        got = os.preadv(fd, [buf], off)
        return bytes(buf[:got])
    finally:
        os.close(fd)


class Flaky:
    """Raises on reads at offset 1 MiB; keeps the rest in memory."""

    def __init__(self, size):
        self.mem = bytearray(size)
        self.kept = None

    def read(self, offset, length, buf):
        if offset == 1 << 20:
            raise RuntimeError("backend failure (expected by the test)")
        if offset == 2 << 20:
            self.kept = buf  # misuse: keep the buffer beyond the call
        buf[:] = self.mem[offset:offset + length]

    def write(self, offset, data):
        self.mem[offset:offset + len(data)] = data


def test_exception_fails_one_io_and_device_keeps_serving(caplog):
    t = Flaky(8 << 20)
    with pyublk.Device(t, size=8 << 20, depth=4) as dev:
        dev.start()
        with pytest.raises(OSError) as e:
            read_at(dev.path, 1 << 20)
        assert e.value.errno == errno.EIO
        assert any("backend failure" in (r.exc_text or "") for r in caplog.records), "traceback not logged"
        # still serving
        fd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, 4096)
        buf[:] = b"\x5a" * 4096
        assert os.pwritev(fd, [buf], 4096) == 4096
        os.close(fd)
        assert read_at(dev.path, 4096) == b"\x5a" * 4096
        # a buffer kept beyond its call raises instead of touching engine memory
        read_at(dev.path, 2 << 20)
        with pytest.raises(ValueError):
            t.kept[0] = 1
        dev.stop()
        assert dev.wait(30)


class HalfMapped:
    """The second half of the device in Python (a bytearray); the first half
    is the file at FILE_OFF, mapped, so Python sees a READ/WRITE there only
    when it also crosses into the second half (then it moves that part
    itself, with pread/pwrite on the file: the engine lends only requests
    that lie inside one extent)."""

    FILE_OFF = 8 << 20

    def __init__(self, size: int, fd: int):
        self.size, self.fd = size, fd
        self.mem = bytearray(size)
        self.seen = []  # (op, offset, length) of the READ/WRITE requests Python got
        self.file_below = size // 2  # device bytes below this are the file's

    def handle(self, io):
        if io.op not in ("read", "write"):
            io.complete(0)
            return
        self.seen.append((io.op, io.offset, io.length))
        off, end, buf = io.offset, io.offset + io.length, io.buf
        cut = min(max(off, self.file_below), end)  # [off, cut) in the file, [cut, end) in memory
        if io.op == "read":
            if cut > off:
                buf[:cut - off] = os.pread(self.fd, cut - off, self.FILE_OFF + off)
            buf[cut - off:] = self.mem[cut:end]
        else:
            if cut > off:
                os.pwrite(self.fd, buf[:cut - off], self.FILE_OFF + off)
            self.mem[cut:end] = buf[cut - off:]
        io.complete(io.length)


@pytest.fixture
def qemu_nbd(backing):
    """qemu-nbd serving `backing` (raw) on a free loopback port."""
    if not shutil.which("qemu-nbd"):
        pytest.fail("qemu-nbd is missing (package qemu-utils: tests/vm/setup)")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen(["qemu-nbd", "-f", "raw", "-t", "-e", "8", "-b", "127.0.0.1", "-p", str(port), backing],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        p.kill()
        pytest.fail(f"qemu-nbd did not listen: {p.stderr.read()[-500:]}")
    yield port
    p.kill()
    p.wait(30)


def test_nbd_device_from_python(qemu_nbd, backing):
    port = qemu_nbd
    with pytest.raises(pyublk.UblkError) as e:
        pyublk.Device.nbd("127.0.0.1", 1)  # nothing listens on port 1
    assert e.value.errno == errno.ECONNREFUSED, e.value
    for bad in (dict(port=0), dict(connections=0), dict(connections=17), dict(timeout=0.5), dict(zero_copy="x")):
        with pytest.raises(ValueError):
            pyublk.Device.nbd("127.0.0.1", **{"port": port, **bad})
    with pytest.raises(ValueError):
        pyublk.Device.nbd("", port)
    with pyublk.Device.nbd("127.0.0.1", port, connections=2, queues=2, depth=32) as dev:
        assert dev.size == os.path.getsize(backing), (dev.size, os.path.getsize(backing))
        assert dev.target_name == "nbd" and dev.queues == 2, (dev.target_name, dev.queues)
        with pytest.raises(pyublk.UblkError) as e:
            dev.map(0, 4096, 0)
        assert e.value.errno == errno.EOPNOTSUPP, e.value
        dev.start()
        fio_verify(dev.path, size="32M")
        # what went through the device is in the file qemu-nbd serves
        with open(dev.path, "rb", buffering=0) as d, open(backing, "rb") as f:
            assert d.read(1 << 20) == f.read(1 << 20), "the device and the export differ"
        st = dev.stats()
        assert sum(q["ios"] for q in st) > 0, st


def test_map_routes_reads_and_writes_past_python(backing):
    size = 32 << 20
    fd = os.open(backing, os.O_RDWR)
    t = HalfMapped(size, fd)
    try:
        with pyublk.Device(t, size=size, depth=16, zero_copy="copy", needs_buffer=True) as dev:
            # refusals: clear errors, nothing mapped
            for args, err in (((0, size + 4096, fd), errno.EINVAL), ((512 + 1, 4096, fd), errno.EINVAL),
                              ((0, 0, fd), errno.EINVAL)):
                with pytest.raises(pyublk.UblkError) as e:
                    dev.map(*args)
                assert e.value.errno == err, (args, e.value)
            with pytest.raises(pyublk.UblkError) as e:
                dev.map(0, 4096, fd, read=False, write=False)
            assert e.value.errno == errno.EINVAL
            with pytest.raises(ValueError):
                dev.map(0, 4096, -1)
            # the first half is the file, at file offset 8 MiB
            dev.map(0, size // 2, fd, t.FILE_OFF)
            dev.start()
            fio_verify(dev.path, size="32M")
            assert t.seen, "Python served nothing: the unmapped half must reach it"
            inside = [x for x in t.seen if x[1] + x[2] <= size // 2]
            assert not inside, f"Python got requests inside the mapped half: {inside[:5]}"
            # the file holds the first half, shifted by 8 MiB
            with open(dev.path, "rb", buffering=0) as d, open(backing, "rb") as f:
                f.seek(8 << 20)
                assert d.read(1 << 20) == f.read(1 << 20), "the mapped half is not the file"
            # read-only map of the first 4 MiB: writes there go to Python
            # (which writes them to the file itself: file_below stays)
            dev.map(0, 4 << 20, fd, t.FILE_OFF, write=False)
            t.seen.clear()
            wfd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 4096)
            buf[:] = b"\x77" * 4096
            assert os.pwritev(wfd, [buf], 1 << 20) == 4096
            os.close(wfd)
            assert ("write", 1 << 20, 4096) in t.seen, t.seen
            t.seen.clear()
            assert read_at(dev.path, 1 << 20) == b"\x77" * 4096, "the read-only extent does not serve the file"
            assert not t.seen, f"a read inside a read-only extent reached Python: {t.seen}"
            # unmapped, and Python's memory now holds the first half: reads
            # there reach Python again
            dev.unmap(0, size // 2)
            t.file_below = 0
            t.seen.clear()
            assert read_at(dev.path, 4096) == bytes(4096)
            assert ("read", 4096, 4096) in t.seen, t.seen
            dev.stop()
            assert dev.wait(30)
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["auto", "copy"])
def test_map_after_fd_reuse_reaches_the_new_file(mode):
    """An fd unmapped, closed, and its number reused for another file that is
    then mapped: requests go to the new file, not to the registration the
    queue kept of the old one."""
    size = 8 << 20
    paths = []
    for fill in (b"\x11", b"\x22"):
        fd, path = tempfile.mkstemp(dir=WORK, prefix="pyublk-reuse-", suffix=".img")
        os.write(fd, fill * size)
        os.close(fd)
        paths.append(path)
    fd = os.open(paths[0], os.O_RDWR)
    t = HalfMapped(size, fd)
    t.file_below = size  # everything mapped: Python serves nothing here
    try:
        with pyublk.Device(t, size=size, depth=16, zero_copy=mode, needs_buffer=True) as dev:
            dev.map(0, size, fd)
            dev.start()
            assert read_at(dev.path, 0) == b"\x11" * 4096
            dev.unmap(0, size)
            other = os.open(paths[1], os.O_RDWR)
            os.dup2(other, fd)  # the same fd number now names the second file
            os.close(other)
            dev.map(0, size, fd)
            assert read_at(dev.path, 4096) == b"\x22" * 4096, "a read went to the closed file"
            wfd = os.open(dev.path, os.O_WRONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 4096)
            buf[:] = b"\x33" * 4096
            assert os.pwritev(wfd, [buf], 8192) == 4096
            os.close(wfd)
            dev.stop()
            assert dev.wait(30)
        assert not t.seen, f"requests reached Python although all is mapped: {t.seen[:5]}"
        with open(paths[1], "rb") as f:
            f.seek(8192)
            assert f.read(4096) == b"\x33" * 4096, "the write did not reach the new file"
        with open(paths[0], "rb") as f:
            assert f.read() == b"\x11" * size, "the closed file was written"
    finally:
        os.close(fd)
        for path in paths:
            os.unlink(path)


class LeaseRules:
    """READ requests try a lease in the wrong direction and out of range."""

    def __init__(self):
        self.results = {}
        self.zero = os.open("/dev/zero", os.O_RDONLY)

    def handle(self, io):
        if io.op != "read":
            io.complete(io.length if io.op == "write" else 0)
            return
        if io.offset != 1 << 20:
            io.lease.read_into(self.zero, 0, 0, io.length)
            return
        for name, f in (("direction", lambda: io.lease.write_from(self.zero, 0, 0, io.length)),
                        ("range", lambda: io.lease.read_into(self.zero, 0, io.length - 512, 1024)),
                        ("buf", lambda: io.buf)):
            try:
                f()
                self.results[name] = "no error"
            except (pyublk.UblkError, ValueError) as e:
                self.results[name] = e
        done = threading.Event()
        io.lease.read_into(self.zero, 0, 0, io.length, callback=lambda i, r: (self.results.setdefault("cb", r), done.set()))


def test_lease_rules_from_python():
    t = LeaseRules()
    with pyublk.Device(t, size=8 << 20, depth=4) as dev:
        dev.start()
        assert read_at(dev.path, 1 << 20) == bytes(4096)
        dev.stop()
        dev.wait(30)
    r = t.results
    assert isinstance(r["direction"], pyublk.UblkError) and r["direction"].errno == errno.EPERM, r
    assert isinstance(r["range"], pyublk.UblkError) and r["range"].errno == errno.EINVAL, r
    if dev.data_mode != "copy":
        assert isinstance(r["buf"], ValueError), r
    assert r["cb"] == 4096, r
    os.close(t.zero)


class HoleyReads:
    """READs of 12 KiB or more lease only their first and last 4 KiB from the
    file (a hole between); shorter READs lease all of it. With `early`, every
    READ is also completed as done at once, while its operation is in flight."""

    def __init__(self, fd: int, early: bool = False):
        self.fd, self.early, self.seen = fd, early, []

    def handle(self, io):
        if io.op != "read":
            io.complete(io.length if io.op == "write" else 0)
            return
        self.seen.append((io.offset, io.length))
        if io.length >= 12288 and not self.early:
            io.lease.read_into(self.fd, io.offset, 0, 4096)
            io.lease.read_into(self.fd, io.offset + io.length - 4096, io.length - 4096, 4096)
        else:
            io.lease.read_into(self.fd, io.offset, 0, io.length)
        if self.early:
            io.complete(io.length)


def read_direct(path: str, off: int, n: int, fill: bytes = b"\xee"):
    """O_DIRECT read into a buffer pre-filled with `fill`: (bytes or errno)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, n)
        buf[:] = fill * n
        try:
            got = os.preadv(fd, [buf], off)
        except OSError as e:
            return e.errno
        return bytes(buf[:got])
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["auto", "copy"])
def test_lease_result_stops_at_a_hole(backing, mode):
    """The automatic result counts the bytes from the start without a gap: a
    READ leased in two pieces with a hole between reports only the first. In
    copy mode the kernel then asks again for the rest; in the zero-copy modes
    it cannot take part of a request, so the READ fails with EIO. Either way
    no byte of the hole reaches the reader unfilled."""
    pattern = bytes((i * 7 + 3) % 251 for i in range(1 << 20))
    with open(backing, "r+b") as f:
        f.write(pattern)
    fd = os.open(backing, os.O_RDONLY)
    t = HoleyReads(fd)
    try:
        with pyublk.Device(t, size=8 << 20, depth=4, zero_copy=mode) as dev:
            dev.start()
            t.seen.clear()
            got = read_direct(dev.path, 65536, 12288)
            copy = dev.data_mode == "copy"
            dev.stop()
            dev.wait(30)
        if not copy:
            assert got == errno.EIO, f"the read gave {got!r:.60}, not EIO"
            return
        want = pattern[65536:65536 + 12288]
        bad = [i for i in range(0, 12288, 512) if got[i:i + 512] != want[i:i + 512]] if isinstance(got, bytes) else got
        assert got == want, f"the hole reached the reader unfilled (bad 512-byte sectors at {bad}; requests {t.seen})"
        assert (65536, 12288) in t.seen and (65536 + 4096, 8192) in t.seen, t.seen
    finally:
        os.close(fd)


@pytest.mark.parametrize("mode", ["auto", "copy"])
def test_completion_given_early_does_not_hide_a_failed_lease(backing, mode):
    """A READ completed as done while its lease operation is in flight, and
    that operation fails (a write-only fd): the read fails, it does not
    return the buffer unfilled."""
    fd = os.open(backing, os.O_WRONLY)
    t = HoleyReads(fd, early=True)
    try:
        with pyublk.Device(t, size=8 << 20, depth=4, zero_copy=mode) as dev:
            dev.start()
            got = read_direct(dev.path, 1 << 20, 4096)
            dev.stop()
            dev.wait(30)
        assert got == errno.EIO, f"the read gave {got!r:.60}, not EIO"
    finally:
        os.close(fd)


def test_complete_from_other_thread_and_twice():
    errs = []

    class Later:
        def handle(self, io):
            def work():
                time.sleep(0.01)
                io.complete(io.length if io.op in ("read", "write") else 0)
                try:
                    io.complete(0)
                except pyublk.UblkError as e:
                    errs.append(e.errno)
            threading.Thread(target=work).start()

    with pyublk.Device(Later(), size=8 << 20, depth=4) as dev:
        dev.start()
        assert len(read_at(dev.path, 0, 8192)) == 8192
        dev.stop()
        dev.wait(30)
    assert errno.EALREADY in errs


def read_within(path: str, off: int, n: int = 4096, timeout: float = 20):
    """read_direct on another thread: its bytes or errno; AssertionError if
    the request is still pending after `timeout` s (a request left pending
    by the binding)."""
    out = []
    t = threading.Thread(target=lambda: out.append(read_direct(path, off, n)), daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"a read of {n} bytes at {off} still pending after {timeout} s"
    return out[0]


class Stale:
    """depth 1: every request has tag 0, so the same C handle. The READ at
    1 MiB is completed at once and its Io kept; when the READ at 2 MiB
    arrives on that handle, a worker tries the old Io again (complete with
    EIO, buf), then completes the new request."""

    def __init__(self):
        self.old = None
        self.errs = []

    def handle(self, io):
        if io.op == "read" and io.offset == 1 << 20:
            self.old = io
            io.complete(io.length)
            return
        if io.op == "read" and io.offset == 2 << 20 and self.old is not None:
            old = self.old

            def later():
                for f in (lambda: old.complete(-errno.EIO), lambda: old.buf, lambda: old.lease.manual()):
                    try:
                        f()
                        self.errs.append("no error")
                    except pyublk.UblkError as e:
                        self.errs.append(e.errno)
                io.complete(io.length)
            threading.Thread(target=later).start()
            return
        io.complete(io.length if io.op in ("read", "write") else 0)


def test_second_complete_does_not_reach_the_next_request():
    """A completed Io refuses everything with EALREADY, without touching the
    handle its tag reuses: the next request on it is not failed by it."""
    t = Stale()
    with pyublk.Device(t, size=8 << 20, depth=1) as dev:
        dev.start()
        assert isinstance(read_within(dev.path, 1 << 20), bytes)
        got = read_within(dev.path, 2 << 20)
        assert isinstance(got, bytes) and len(got) == 4096, f"the next request on the tag failed: {got!r:.60}"
        dev.stop()
        dev.wait(30)
    # (a udev probe reading at 2 MiB adds its own three)
    assert t.errs and set(t.errs) == {errno.EALREADY}, t.errs


class Exporter:
    """Copy mode: READs fill their buffer with 0x42; at 1 and 2 MiB the
    target keeps an export of it (what numpy.frombuffer(io.buf) does; here a
    PickleBuffer); at 2 MiB it also raises."""

    def __init__(self):
        self.held, self.errors = [], []

    def handle(self, io):
        if io.op != "read":
            io.complete(io.length if io.op == "write" else 0)
            return
        import pickle
        buf = io.buf
        buf[:] = b"\x42" * io.length
        if io.offset in (1 << 20, 2 << 20):
            self.held.append(pickle.PickleBuffer(buf))
        if io.offset == 2 << 20:
            raise RuntimeError("expected by the test")
        try:
            io.complete(io.length)
        except BufferError as e:
            self.errors.append(e)


def test_held_buffer_export_does_not_leave_the_request_pending(caplog):
    """complete() with an export of io.buf still held completes the request
    and raises BufferError after; a callback that raises with one held still
    fails its request with EIO. Neither stays pending."""
    t = Exporter()
    with pyublk.Device(t, size=8 << 20, depth=4, zero_copy="copy", needs_buffer=True) as dev:
        dev.start()
        assert read_within(dev.path, 1 << 20) == b"\x42" * 4096
        assert t.errors and all("completed" in str(e) for e in t.errors), t.errors
        assert read_within(dev.path, 2 << 20) == errno.EIO
        assert any("still held" in r.getMessage() for r in caplog.records), "the held export was not reported"
        assert read_within(dev.path, 0) == b"\x42" * 4096  # still serving
        dev.stop()
        dev.wait(30)
    t.held.clear()


class Misbehaving:
    """Simple methods: SystemExit at 1 MiB, the batch's pending marker as a
    result at 2 MiB; zeros elsewhere."""

    def read(self, offset, length, buf):
        if offset == 1 << 20:
            raise SystemExit(1)
        if offset == 2 << 20:
            return -(1 << 31)
        buf[:] = bytes(length)


class BadRoute:
    """route(): a negative fd at 1 MiB, KeyboardInterrupt at 2 MiB; the file elsewhere."""

    def __init__(self, fd):
        self.fd = fd

    def route(self, op, offset, length):
        if offset == 1 << 20:
            return -1, 0
        if offset == 2 << 20:
            raise KeyboardInterrupt
        return self.fd, offset

    def handle(self, io):
        io.complete(io.length if io.op in ("read", "write") else 0)


def test_batch_failures_fail_the_request_instead_of_leaving_it_pending(backing):
    """Batch path: a BaseException in a method or in route(), a route to a
    negative fd, a result equal to UBLK_BATCH_PENDING: the request fails
    with EIO (it used to stay pending forever) and the device keeps serving."""
    with pyublk.Device(Misbehaving(), size=8 << 20, depth=4) as dev:
        dev.start()
        assert read_within(dev.path, 1 << 20) == errno.EIO
        assert read_within(dev.path, 2 << 20) == errno.EIO
        assert read_within(dev.path, 0) == bytes(4096)
        dev.stop()
        dev.wait(30)
    with open(backing, "r+b") as f:
        f.write(b"\x17" * 4096)
    fd = os.open(backing, os.O_RDWR)
    try:
        with pyublk.Device(BadRoute(fd), size=8 << 20, depth=4) as dev:
            dev.start()
            assert read_within(dev.path, 1 << 20) == errno.EIO
            assert read_within(dev.path, 2 << 20) == errno.EIO
            assert read_within(dev.path, 0) == b"\x17" * 4096
            dev.stop()
            dev.wait(30)
    finally:
        os.close(fd)


class Holder:
    """Keeps the READ at 1 MiB for a worker that never gets to complete it."""

    def __init__(self):
        self.got = threading.Event()
        self.io = None

    def handle(self, io):
        if io.op == "read" and io.offset == 1 << 20:
            self.io = io
            self.got.set()
            return
        io.complete(io.length if io.op in ("read", "write") else 0)


def test_close_while_a_worker_holds_an_io():
    """close() with a request held by another thread: the request is
    aborted, close returns, and the Io then refuses with ESHUTDOWN instead
    of calling into the freed device; the Device refuses with ValueError."""
    t = Holder()
    dev = pyublk.Device(t, size=8 << 20, depth=4, zero_copy="copy", needs_buffer=True)
    try:
        dev.start()
        out = []
        reader = threading.Thread(target=lambda: out.append(read_direct(dev.path, 1 << 20, 4096)), daemon=True)
        reader.start()
        assert t.got.wait(20), "the read did not reach the target"
        view = t.io.buf  # released by close
        closer = threading.Thread(target=dev.close, daemon=True)
        closer.start()
        closer.join(60)
        assert not closer.is_alive(), "close() did not return with a request held by a worker"
        reader.join(30)
        assert out and isinstance(out[0], int), f"the held read did not fail: {out!r:.60}"
        for f in (lambda: t.io.complete(4096), lambda: t.io.buf):
            with pytest.raises(pyublk.UblkError) as e:
                f()
            assert e.value.errno == errno.ESHUTDOWN, e.value
        with pytest.raises(ValueError):
            view[0] = 1
        with pytest.raises(ValueError, match="closed"):
            dev.stats()
    finally:
        dev.close()


class Closer:
    """Tries dev.close() inside its callback (a queue thread) once."""

    def __init__(self):
        self.dev = None
        self.errs = []

    def handle(self, io):
        if self.dev is not None and not self.errs:
            try:
                self.dev.close()
                self.errs.append("no error")
            except pyublk.UblkError as e:
                self.errs.append(e.errno)
        io.complete(io.length if io.op in ("read", "write") else 0)


def test_close_inside_a_callback_is_refused_and_the_device_kept():
    t = Closer()
    with pyublk.Device(t, size=8 << 20, depth=4) as dev:
        t.dev = dev
        dev.start()
        assert isinstance(read_within(dev.path, 0), bytes)
        assert t.errs == [errno.EDEADLK], t.errs
        assert isinstance(read_within(dev.path, 4096), bytes)  # still served
        assert dev.stats()[0]["ios"] > 0
        dev.stop()
        assert dev.wait(30)


def test_exit_with_a_device_still_open_closes_it():
    """A script that ends without closing its serving device: the atexit
    hook stops and deletes it before the interpreter is finalized."""
    # a daemon thread keeps reading, so that the queue thread is in its
    # callback when the main thread ends
    script = (
        "import mmap, os, threading, time, pyublk\n"
        "class Mem:\n"
        "    def read(self, offset, length, buf):\n"
        "        buf[:] = bytes(length)\n"
        "dev = pyublk.Device(Mem(), size=8 << 20)\n"
        "dev.start()\n"
        "print(dev.id, flush=True)\n"
        "def reader():\n"
        "    fd = os.open(dev.path, os.O_RDONLY | os.O_DIRECT)\n"
        "    buf = mmap.mmap(-1, 4096)\n"
        "    while True:\n"
        "        try:\n"
        "            os.preadv(fd, [buf], 0)\n"
        "        except OSError:\n"
        "            return\n"
        "threading.Thread(target=reader, daemon=True).start()\n"
        "time.sleep(0.5)\n"
    )
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    dev_id = int(p.stdout.split()[0]) if p.stdout.strip() else None
    try:
        assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
        assert "Fatal Python error" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr[-2000:]
        assert dev_id is not None
        deadline = time.monotonic() + 10  # (a delete may end as the process's last fd closes)
        while os.path.exists(f"/dev/ublkc{dev_id}") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/sys/block/ublkb{dev_id}") and not os.path.exists(f"/dev/ublkc{dev_id}"), \
            "the device outlived its process"
    finally:
        if dev_id is not None and os.path.exists(f"/dev/ublkc{dev_id}") and os.access(UBLK, os.X_OK):
            subprocess.run([str(UBLK), "del", str(dev_id)], capture_output=True, timeout=60)


# --- crash recovery -------------------------------------------------------------------

def need_recovery(feature: str = "USER_RECOVERY") -> None:
    if feature not in pyublk.features():
        pytest.skip(f"the kernel lacks UBLK_F_{feature}")
    if not os.access(UBLK, os.X_OK):
        pytest.skip(f"{UBLK} missing (make build): the test reads device states with `ublk list`")


def list_row(dev_id: int):
    """(STATE, PID, RECOVERY) of device `dev_id` in `ublk list`, or None."""
    r = subprocess.run([str(UBLK), "list"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"ublk list exited {r.returncode}: {r.stderr}"
    for line in r.stdout.splitlines()[1:]:
        f = line.split()
        if f and f[0] == str(dev_id):
            return f[7], f[8], f[9]
    return None


def wait_state(dev_id: int, want: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = list_row(dev_id)
        if row is not None and row[0] == want:
            return row
        time.sleep(0.1)
    raise AssertionError(f"device {dev_id} is not {want} after {timeout} s: `ublk list` row {row}")


def write_at(path: str, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        os.close(fd)


def file_at(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


class Nop:
    def handle(self, io):
        io.complete(-errno.EIO)


class Mem:
    def __init__(self, size):
        self.mem = bytearray(size)

    def read(self, offset, length, buf):
        buf[:] = self.mem[offset:offset + length]

    def write(self, offset, data):
        self.mem[offset:offset + len(data)] = data


class Recovering:
    """loop.py with a recovery policy on `backing`; kills what is left and
    deletes the device (`ublk del`) if a test fails half way."""

    def __init__(self, backing: str, policy: str):
        self.servers = [Example(str(EXAMPLES / "loop.py"), "--file", backing, "--recovery", policy)]
        self.id, self.path = self.servers[0].id, self.servers[0].path

    def kill(self, state: str = "QUIESCED") -> None:
        """SIGKILL the server; the device stays, in `state`, with no live server."""
        dead = self.servers[-1].p.pid
        self.servers[-1].kill()
        assert os.path.exists(f"/sys/block/ublkb{self.id}"), "the device went away with its server"
        row = wait_state(self.id, state)
        # newer kernels clear the server pid when they quiesce; 6.12 keeps the dead one
        assert row[1] in ("-", str(dead)), f"`ublk list` shows pid {row[1]} with the server ({dead}) dead"

    def recover(self) -> Example:
        ex = Example(str(EXAMPLES / "loop.py"), "--recover", str(self.id))
        self.servers.append(ex)
        assert (ex.id, ex.path) == (self.id, self.path), f"recovered {ex.id} {ex.path}, want {self.id} {self.path}"
        row = list_row(self.id)
        assert row is not None and row[0] == "LIVE" and row[1] == str(ex.p.pid), row
        return ex

    def cleanup(self) -> None:
        for ex in self.servers:
            if ex.p.poll() is None:
                ex.kill()
        if os.path.exists(f"/sys/block/ublkb{self.id}") or os.path.exists(f"/dev/ublkc{self.id}"):
            subprocess.run([str(UBLK), "del", str(self.id)], capture_output=True, timeout=60)


def test_loop_recover_after_kill(backing):
    """Data written before a kill -9 reads back through the recovered
    server; the new one serves writes; SIGTERM then deletes the device."""
    need_recovery()
    r = Recovering(backing, "reissue")
    try:
        row = list_row(r.id)
        assert row == ("LIVE", str(r.servers[0].p.pid), "reissue"), row
        state_dir = os.environ.get("UBLK_STATE_DIR") or "/run/ublk"
        state = Path(state_dir, f"{r.id}.state").read_text()
        assert f"file={os.path.realpath(backing)}" in state, state
        pat = os.urandom(1 << 20)
        write_at(r.path, 4 << 20, pat)
        r.kill()
        ex = r.recover()
        assert read_at(r.path, 4 << 20, 1 << 20) == pat, "data written before the kill is lost"
        more = os.urandom(2 << 20)
        write_at(r.path, 16 << 20, more)
        assert read_at(r.path, 16 << 20, 2 << 20) == more
        assert file_at(backing, 16 << 20, 2 << 20) == more, "the write did not reach the backing file"
        err = ex.stop()  # asserts the device is gone
        assert "lease_ops=" in err, err
        assert list_row(r.id) is None
    finally:
        r.cleanup()


def test_recover_in_process_closed_before_start(backing):
    """Device.recover gives back what the creator recorded; closed before it
    starts, it leaves the device for another try: a read/write target is then
    refused unless the device runs in copy mode, and loop.py takes it over."""
    need_recovery()
    r = Recovering(backing, "reissue")
    try:
        pat = os.urandom(64 << 10)
        write_at(r.path, 2 << 20, pat)
        r.kill()
        d = pyublk.Device.recover(Nop(), r.id)
        assert (d.id, d.size, d.recovery, d.target_name, d.target_args) == \
            (r.id, 96 << 20, "reissue", "py-loop", f"file={os.path.realpath(backing)}"), d
        d.close()
        assert os.path.exists(f"/sys/block/ublkb{r.id}")
        try:
            d = pyublk.Device.recover(Mem(0), r.id)
        except ValueError as e:
            assert "copy mode" in str(e), e
        else:
            assert d.data_mode == "copy", d
            d.close()
        ex = r.recover()
        assert read_at(r.path, 2 << 20, 64 << 10) == pat
        ex.stop()
    finally:
        r.cleanup()


def test_write_without_server_completes_after_recover(backing):
    """reissue: a write issued while no server runs waits, and completes
    (its data on the backing file) once a new server took over."""
    need_recovery()
    if not shutil.which("dd"):
        pytest.skip("dd missing")
    r = Recovering(backing, "reissue")
    pat_file = tempfile.NamedTemporaryFile(dir=WORK, prefix="pyublk-pat-", delete=False)
    dd = None
    try:
        pat = os.urandom(1 << 20)
        pat_file.write(pat)
        pat_file.close()
        r.kill()
        dd = subprocess.Popen(["dd", f"if={pat_file.name}", f"of={r.path}", "bs=1M", "seek=8", "count=1",
                               "oflag=direct", "conv=fsync,notrunc", "status=none"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert dd.poll() is None, f"the write ended (exit {dd.returncode}) while no server ran: {dd.stderr.read()}"
        ex = r.recover()
        try:
            out, err = dd.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the write did not complete within 60 s of the recovery")
        assert dd.returncode == 0, f"dd exited {dd.returncode}: {err}"
        assert file_at(backing, 8 << 20, 1 << 20) == pat, "the data is not on the backing file"
        assert read_at(r.path, 8 << 20, 1 << 20) == pat
        ex.stop()
    finally:
        if dd is not None and dd.poll() is None:
            dd.kill()
            dd.communicate()
        r.cleanup()
        os.unlink(pat_file.name)


def test_fail_policy_fails_io_without_server(backing):
    """fail: while no server runs, IO fails at once (an IO error); it works
    again after the recovery."""
    need_recovery("USER_RECOVERY_FAIL_IO")
    r = Recovering(backing, "fail")
    try:
        pat = os.urandom(64 << 10)
        write_at(r.path, 1 << 20, pat)
        r.kill("FAIL_IO")
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            read_at(r.path, 1 << 20, 64 << 10)
        # the kernel fails them with BLK_STS_TARGET: EREMOTEIO for the reader
        assert e.value.errno in (errno.EIO, errno.EREMOTEIO), e.value
        assert time.monotonic() - t0 < 10, "the read waited instead of failing at once"
        ex = r.recover()
        assert read_at(r.path, 1 << 20, 64 << 10) == pat
        ex.stop()
    finally:
        r.cleanup()


def test_recovery_attributes_and_refusals():
    need_recovery()
    with pyublk.Device(Mem(8 << 20), size=8 << 20, recovery="wait", target_args="mem=8M",
                       name="py-mem") as dev:
        assert (dev.recovery, dev.target_name, dev.target_args) == ("wait", "py-mem", "mem=8M")
        assert list_row(dev.id)[2] == "wait"
    with pyublk.Device(Mem(8 << 20), size=8 << 20) as dev:
        assert (dev.recovery, dev.target_name, dev.target_args) == ("none", "python", None)
        dev.start()
        with pytest.raises(pyublk.UblkError) as e:  # made without recovery
            pyublk.Device.recover(Mem(8 << 20), dev.id)
        assert e.value.errno == errno.EINVAL, e.value
        dev.stop()
        dev.wait(30)
    with pytest.raises(pyublk.UblkError) as e:  # no such device
        pyublk.Device.recover(Mem(8 << 20), 9999)
    assert e.value.errno in (errno.ENOENT, errno.ENODEV), e.value
