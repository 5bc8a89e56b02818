"""Device tests (root, a ublk kernel: run inside the VM): the examples under
fio crc32c verify, ext4 on loop.py, exceptions failing one IO with EIO while
the device keeps serving, lease rules from Python, buffer lifetime."""

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


@pytest.mark.parametrize("mode", ["auto", "copy"])
def test_loop_example_leases(backing, mode):
    ex = Example(str(EXAMPLES / "loop.py"), "--file", backing, "--zero-copy", mode)
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
