#!/usr/bin/env python3
"""A small NBD server for tests (Python 3 stdlib only), correct or malformed.

    nbd_bad_server.py --port P --mode MODE [--size BYTES] [--simple] [--once]
                      [--no-flush] [--min-block N]

Serves a RAM disk (zeroes at start) over fixed newstyle NBD: NBD_OPT_GO
(NBD_OPT_EXPORT_NAME too), structured replies unless --simple, FLUSH (not
with --no-flush), TRIM, WRITE_ZEROES, CAN_MULTI_CONN. Prints "listening
PORT" once it accepts, and "accepted" for each connection. --min-block:
NBD_INFO_BLOCK_SIZE with that minimum (preferred 4096 or more, maximum 32 MiB).

In the malformed modes it misbehaves on READs that start inside the trap
region [8 MiB, 16 MiB) (the kernel's partition scan at the start and end of
the disk is served correctly); with --once only the first time:
  bad-magic        a reply with a wrong magic
  oversized        structured: an OFFSET_DATA chunk far longer than the read
                   (simple mode: a simple reply, then only part of the data)
  unknown-handle   a reply for a handle that was never sent
  never-sent       the correct reply, then a second reply for the same
                   handle (a request that is no longer in flight)
  close-mid-payload  the reply header and half the data, then close
  chunk-past-end   structured: an OFFSET_DATA chunk ending past the read
  error-chunk      structured: an NBD_REPLY_TYPE_ERROR chunk (EIO) - a
                   correct reply that fails the read
  unknown-error    structured: an error chunk of a type the client cannot
                   know (0x8003) with a well-formed body (error, message,
                   4 type-specific bytes) - the read fails, the connection
                   stays (simple mode: a simple reply with EIO)
  split            (correct) structured: every READ of 8 KiB or more in
                   several chunks, out of order: the second half as data,
                   then the first half as a hole when it is all zeroes (else
                   data), then a NONE chunk with the DONE flag
and on every READ:
  df-overflow      (correct) offers NBD_FLAG_SEND_DF (structured) and answers
                   a READ with NBD_CMD_FLAG_DF longer than 64 KiB with an
                   NBD_EOVERFLOW error chunk, as proto.md allows; READs
                   without DF are served
and at the handshake (every connection):
  bad-greeting     a greeting that is not NBD
  no-fixed         newstyle without the fixed-newstyle flag
  trickle          the greeting and every option reply one byte a second
  endless-info     NBD_REP_INFO replies to NBD_OPT_GO, without end
"""
import argparse
import socket
import struct
import sys
import threading
import time

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x3E889045565A9
REQ_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
CHUNK_MAGIC = 0x668E33EF
TRAP = (8 << 20, 16 << 20)

lock = threading.Lock()
tripped = threading.Event()


def recv_exact(s, n):
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise EOFError
        b += c
    return bytes(b)


class Conn:
    def __init__(self, s, a, disk):
        self.s, self.a, self.disk = s, a, disk
        self.structured = False

    def send_hs(self, b):
        """Handshake bytes: at once, or one a second in trickle mode."""
        if self.a.mode != "trickle":
            self.s.sendall(b)
            return
        for i in range(len(b)):
            self.s.sendall(b[i:i + 1])
            time.sleep(1)

    def opt_reply(self, opt, typ, data=b""):
        self.send_hs(struct.pack(">QIII", REPLY_MAGIC, opt, typ, len(data)) + data)

    def handshake(self):
        if self.a.mode == "bad-greeting":
            self.s.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
            return False
        flags = 0 if self.a.mode == "no-fixed" else 3
        self.send_hs(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, flags))
        cflags = struct.unpack(">I", recv_exact(self.s, 4))[0]
        if flags == 0:
            return False
        tflags = 1 | 4 | 8 | 32 | 64 | 256  # HAS_FLAGS FLUSH FUA TRIM WRITE_ZEROES MULTI_CONN
        if self.a.no_flush:
            tflags &= ~4
        if self.a.mode == "df-overflow" and not self.a.simple:
            tflags |= 128  # SEND_DF
        size = len(self.disk)
        while True:
            magic, opt, ln = struct.unpack(">QII", recv_exact(self.s, 16))
            if magic != IHAVEOPT or ln > 65536:
                return False
            data = recv_exact(self.s, ln)
            if opt == 8:  # STRUCTURED_REPLY
                if self.a.simple:
                    self.opt_reply(opt, (1 << 31) | 1)
                else:
                    self.structured = True
                    self.opt_reply(opt, 1)
            elif opt == 7:  # GO
                while self.a.mode == "endless-info":
                    self.opt_reply(opt, 3, struct.pack(">H", 2) + b"endless")  # NBD_INFO_DESCRIPTION
                self.opt_reply(opt, 3, struct.pack(">HQH", 0, size, tflags))
                if self.a.min_block:
                    self.opt_reply(opt, 3, struct.pack(">HIII", 3, self.a.min_block, max(4096, self.a.min_block), 32 << 20))
                self.opt_reply(opt, 1)
                return True
            elif opt == 1:  # EXPORT_NAME
                self.s.sendall(struct.pack(">QH", size, tflags) + (b"" if cflags & 2 else bytes(124)))
                return True
            elif opt == 2:  # ABORT
                return False
            else:
                self.opt_reply(opt, (1 << 31) | 1)

    def simple(self, err, handle, data=b""):
        self.s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, err, handle) + data)

    def chunk(self, flags, typ, handle, body):
        self.s.sendall(struct.pack(">IHHQI", CHUNK_MAGIC, flags, typ, handle, len(body)) + body)

    def read_reply(self, handle, off, ln):
        with lock:
            data = bytes(self.disk[off:off + ln])
        if self.structured and self.a.mode == "split" and ln >= 8192:
            h = ln // 2
            self.chunk(0, 1, handle, struct.pack(">Q", off + h) + data[h:])
            if data[:h] == bytes(h):
                self.chunk(0, 2, handle, struct.pack(">QI", off, h))
            else:
                self.chunk(0, 1, handle, struct.pack(">Q", off) + data[:h])
            self.chunk(1, 0, handle, b"")
            return
        if self.structured:
            self.chunk(1, 1, handle, struct.pack(">Q", off) + data)
        else:
            self.simple(0, handle, data)

    def trap(self, handle, off, ln):
        """Misbehaves on a READ in the trap region; False: the connection ends."""
        m = self.a.mode
        if m == "bad-magic":
            self.s.sendall(struct.pack(">IIQ", 0xDEADBEEF, 0, handle))
            return False
        if m == "oversized":
            if self.structured:
                self.s.sendall(struct.pack(">IHHQIQ", CHUNK_MAGIC, 1, 1, handle, 0x7FFFFFF0, off))
            else:
                self.simple(0, handle, bytes(ln // 2))
            return False
        if m == "unknown-handle":
            self.simple(0, handle ^ 0x5A5A000000000000)
            return False
        if m == "never-sent":
            self.read_reply(handle, off, ln)
            self.simple(0, handle)
            return True
        if m == "close-mid-payload":
            if self.structured:
                self.s.sendall(struct.pack(">IHHQIQ", CHUNK_MAGIC, 1, 1, handle, 8 + ln, off) + bytes(ln // 2))
            else:
                self.s.sendall(struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle) + bytes(ln // 2))
            return False
        if m == "chunk-past-end":
            if self.structured:
                self.chunk(1, 1, handle, struct.pack(">Q", off + ln - 512) + bytes(4096))
            else:
                self.simple(0, handle ^ 1)
            return False
        if m == "error-chunk":
            if self.structured:
                msg = b"injected error"
                self.chunk(1, (1 << 15) | 1, handle, struct.pack(">IH", 5, len(msg)) + msg)
            else:
                self.simple(5, handle)
            return True
        if m == "unknown-error":
            if self.structured:
                msg = b"an error type from the future"
                self.chunk(1, (1 << 15) | 3, handle, struct.pack(">IH", 5, len(msg)) + msg + b"\x01\x02\x03\x04")
            else:
                self.simple(5, handle)
            return True
        self.read_reply(handle, off, ln)
        return True

    def serve(self):
        if not self.handshake():
            return
        size = len(self.disk)
        while True:
            magic, flags, typ, handle, off, ln = struct.unpack(">IHHQQI", recv_exact(self.s, 28))
            if magic != REQ_MAGIC:
                return
            if typ == 2:  # DISC
                return
            if typ in (0, 1, 4, 6) and (off + ln > size):
                if typ == 1:
                    recv_exact(self.s, ln)
                self.simple(22, handle)
                continue
            if typ == 0 and self.a.mode == "df-overflow" and flags & 4 and ln > 65536:
                print(f"trap: df-overflow on READ {off}+{ln} with DF", flush=True)
                msg = b"DF read over 64 KiB"
                self.chunk(1, (1 << 15) | 1, handle, struct.pack(">IH", 75, len(msg)) + msg)  # NBD_EOVERFLOW
            elif typ == 0:
                bad = self.a.mode not in ("good", "split", "df-overflow") and TRAP[0] <= off < TRAP[1]
                if bad and self.a.once and tripped.is_set():
                    bad = False
                if bad:
                    tripped.set()
                    print(f"trap: {self.a.mode} on READ {off}+{ln}", flush=True)
                    if not self.trap(handle, off, ln):
                        return
                else:
                    self.read_reply(handle, off, ln)
            elif typ == 1:
                data = recv_exact(self.s, ln)
                with lock:
                    self.disk[off:off + ln] = data
                self.simple(0, handle)
            elif typ in (4, 6):
                with lock:
                    self.disk[off:off + ln] = bytes(ln)
                self.simple(0, handle)
            elif typ == 3:
                self.simple(0, handle)
            else:
                self.simple(22, handle)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", default="good")
    p.add_argument("--size", type=int, default=64 << 20)
    p.add_argument("--simple", action="store_true")
    p.add_argument("--once", action="store_true")
    p.add_argument("--no-flush", action="store_true")
    p.add_argument("--min-block", type=int, default=0)
    a = p.parse_args()
    disk = bytearray(a.size)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", a.port))
    ls.listen(16)
    print(f"listening {a.port}", flush=True)

    def run(s):
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            Conn(s, a, disk).serve()
        except (EOFError, OSError):
            pass
        finally:
            s.close()

    while True:
        s, _ = ls.accept()
        print("accepted", flush=True)
        threading.Thread(target=run, args=(s,), daemon=True).start()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
