"""pyublk: Linux ublk block devices in Python, over libublk.so (ctypes).

    import pyublk

    class Zero:
        def read(self, offset, length, buf):
            buf[:] = bytes(length)

    with pyublk.Device(Zero(), size=1 << 30) as dev:
        print(dev.path)
        dev.serve()

Threading: the engine runs one thread per queue; each request's callback is
called on its queue's thread with the GIL taken (so Python code of several
queues runs one at a time). The engine never holds the GIL while it waits on
the kernel; `serve()` and `wait()` release it. `io.complete()` may be called
from any thread (a pool, an asyncio loop); leases only from the callback
that received the request. See Device, Io and Lease.

Crash recovery: `Device(..., recovery="reissue")` survives its process
dying; `Device.recover(target, dev_id)` in a new process serves it again.
"""

from ._device import Device, features
from ._io import Io, Lease, UblkError
from ._lib import (UBLK_DATA_AUTO, UBLK_DATA_AUTO_BUF_REG, UBLK_DATA_COPY, UBLK_DATA_REGISTER,
                   UBLK_DATA_USER_COPY, UBLK_FLAG_FUA, UBLK_FLAG_NOUNMAP, UBLK_RECOVERY_FAIL,
                   UBLK_RECOVERY_NONE, UBLK_RECOVERY_REISSUE, UBLK_RECOVERY_WAIT)

__all__ = ["Device", "Io", "Lease", "UblkError", "features", "UBLK_FLAG_FUA", "UBLK_FLAG_NOUNMAP",
           "UBLK_DATA_AUTO", "UBLK_DATA_AUTO_BUF_REG", "UBLK_DATA_REGISTER", "UBLK_DATA_USER_COPY",
           "UBLK_DATA_COPY", "UBLK_RECOVERY_NONE", "UBLK_RECOVERY_REISSUE", "UBLK_RECOVERY_FAIL",
           "UBLK_RECOVERY_WAIT"]
__version__ = "0.1.0"
