#!/usr/bin/env python3
"""Helpers of t_zero_copy.sh (run in the VM as root; python3 starts slowly
there, so each call does a whole scenario).

  zc_helper.py reads DEV MODEL ITEM...
      Runs ITEMs in order. `OFF:LEN`: an O_DIRECT read of DEV into an
      mmap-ed (page-aligned) buffer pre-filled with 0xa5 must return LEN
      bytes equal to what MODEL says the device holds now. `trunc:FILE:SIZE`
      truncates FILE (a backing file) now. `control:OFF:LEN:MODEL2`: a
      negative control, the same read must NOT match MODEL2. MODEL is
      `loop:FILE` (the device is FILE, zeroes past its end) or
      `stripe:CHUNK:F0,F1,...` (device chunk k is file k % N at (k // N) *
      CHUNK; zeroes past a file's end); the files are read again for each
      read. Prints one line per item; exits 1 on a mismatch.

  zc_helper.py destripe DUMP CHUNK F0,F1,... [control]
      DUMP is the whole device read back; each file must be exactly its share
      of it (de-striped). With `control`, the same check with files 0 and 1
      swapped must fail. Exits 1 on a mismatch.

  zc_helper.py writer DEV BASE NBLOCKS THREADS STATE READY
      THREADS threads write 4 KiB blocks (O_DIRECT) at random into the
      NBLOCKS blocks from byte BASE of DEV; thread t owns the blocks b with
      b % THREADS == t, so no two writes to one block are ever in flight. Each
      block written carries its number and a random 64-bit generation.
      Before each pwrite the generation is recorded as attempted, after a
      successful pwrite as the block's last success. A thread stops at its
      first error (the device died). Creates READY after 200 successful
      writes; writes the record to STATE (JSON) when every thread stopped, or
      after 120 s.

  zc_helper.py check-writes STATE BASE FILE... [control]
      Every FILE (a backing file holding the device region at the same
      offsets; a mirror's legs) must hold, for each block, the generation of
      its last successful write or of a write attempted after it (a failed or
      interrupted write may or may not have landed, in part); a block never
      written successfully: zeroes or an attempted generation. Exits 1 on a
      violation, e.g. a write reported successful that is not in the file.
      With `control`, the check must also flag a copy of the first file in
      which one successfully written block reads as zeroes (a lost write).
"""
import mmap
import os
import struct
import sys

BS = 4096
MAGIC = b"UBLKZCWR"
REC = struct.Struct("<8sQQQ")  # magic, block, generation, thread: 32 bytes


def model_reader(spec):
    """Returns f(off, len) -> bytes the device holds, from the files now."""
    kind, _, rest = spec.partition(":")
    if kind == "loop":
        def loop_read(off, n):
            with open(rest, "rb") as f:
                f.seek(off)
                b = f.read(n)
            return b + bytes(n - len(b))
        return loop_read
    if kind == "stripe":
        chunk_s, _, files = rest.partition(":")
        chunk = int(chunk_s)
        names = files.split(",")
        nf = len(names)

        def stripe_read(off, n):
            out = bytearray()
            while n > 0:
                k, inn = divmod(off, chunk)
                piece = min(chunk - inn, n)
                with open(names[k % nf], "rb") as f:
                    f.seek((k // nf) * chunk + inn)
                    b = f.read(piece)
                out += b + bytes(piece - len(b))
                off += piece
                n -= piece
            return bytes(out)
        return stripe_read
    sys.exit(f"bad model {spec}")


def first_diff(a, b):
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b))


def direct_read(fd, off, n):
    buf = mmap.mmap(-1, n)  # page-aligned, as O_DIRECT needs
    buf.write(b"\xa5" * n)
    got = os.preadv(fd, [buf], off)
    data = bytes(buf[:n])
    buf.close()
    return got, data


def cmd_reads(dev, model, items):
    expect = model_reader(model)
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    bad = 0
    for it in items:
        f = it.split(":")
        if f[0] == "trunc":
            os.truncate(f[1], int(f[2], 0))
            print(f"  truncated {f[1]} to {int(f[2], 0)}")
            continue
        if f[0] == "control":
            off, n = int(f[1], 0), int(f[2], 0)
            got, data = direct_read(fd, off, n)
            if got == n and data == model_reader(":".join(f[3:]))(off, n):
                print(f"  control read {off}+{n}: matches {':'.join(f[3:])} although it must not")
                bad += 1
            else:
                print(f"  control read {off}+{n}: differs from {':'.join(f[3:])}, as it must")
            continue
        off, n = int(f[0], 0), int(f[1], 0)
        got, data = direct_read(fd, off, n)
        want = expect(off, n)
        if got != n or data != want:
            i = first_diff(data, want)
            print(f"  read {off}+{n}: returned {got}; differs from the model at byte {i}: "
                  f"got {data[i:i + 8].hex()} want {want[i:i + 8].hex()} "
                  f"({data.count(0xa5)} bytes 0xa5, {sum(1 for x, y in zip(data, want) if x != y)} differ)")
            bad += 1
        else:
            print(f"  read {off}+{n}: ok ({want.count(0)} zero bytes expected and read)")
    os.close(fd)
    return 1 if bad else 0


def destripe_bad(dev, chunk, files, quiet=False):
    nf = len(files)
    if len(dev) % (chunk * nf):
        print(f"  dump size {len(dev)} is not a multiple of {nf} chunks of {chunk}")
        return 1
    bad = 0
    for i, f in enumerate(files):
        want = b"".join(dev[k * chunk:(k + 1) * chunk] for k in range(i, len(dev) // chunk, nf))
        with open(f, "rb") as fh:
            got = fh.read()
        if got != want:
            bad += 1
            if not quiet:
                j = first_diff(got, want)
                print(f"  {f}: {len(got)} bytes, its share of the device is {len(want)}; first difference at "
                      f"file byte {j} (device chunk {(j // chunk) * nf + i})")
        elif not quiet:
            print(f"  {f}: equals its share of the device ({len(got)} bytes)")
    return bad


def cmd_destripe(dump, chunk, files, control=None):
    chunk = int(chunk)
    files = files.split(",")
    with open(dump, "rb") as f:
        dev = f.read()
    bad = destripe_bad(dev, chunk, files)
    if control:
        sw = [files[1], files[0]] + files[2:]
        if destripe_bad(dev, chunk, sw, quiet=True):
            print("  control: with files 0 and 1 swapped the check fails, as it must")
        else:
            print("  control: with files 0 and 1 swapped the check PASSES: it proves nothing")
            bad += 1
    return 1 if bad else 0


def cmd_writer(dev, base, nblocks, nthreads, state, ready):
    import json
    import random
    import threading
    import time
    base, nblocks, nthreads = int(base), int(nblocks), int(nthreads)
    ok_gen = {}      # block -> generation of its last successful write
    after = {}       # block -> generations attempted since (failed or never answered)
    lock = threading.Lock()
    count = [0, 0]   # successes, failures
    errors = []
    ready_done = [False]

    def work(t):
        rnd = random.Random(os.urandom(8))
        fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, BS)
        mine = list(range(t, nblocks, nthreads))
        deadline = time.time() + 120
        try:
            while time.time() < deadline:
                b = rnd.choice(mine)
                gen = rnd.getrandbits(64)
                buf.seek(0)
                buf.write(REC.pack(MAGIC, b, gen, t) * (BS // REC.size))
                with lock:
                    after.setdefault(b, []).append(gen)
                try:
                    n = os.pwritev(fd, [buf], base + b * BS)
                except OSError as e:
                    with lock:
                        count[1] += 1
                        errors.append(f"thread {t}: {e.strerror} (errno {e.errno})")
                    return
                if n != BS:
                    with lock:
                        errors.append(f"thread {t}: short write {n}")
                    return
                with lock:
                    ok_gen[b] = gen
                    after[b] = []
                    count[0] += 1
                    if count[0] >= 200 and not ready_done[0]:
                        ready_done[0] = True
                        open(ready, "w").close()
        finally:
            os.close(fd)

    ths = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(nthreads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(130)
    with lock:
        rec = {"ok": {str(k): v for k, v in ok_gen.items()},
               "after": {str(k): v for k, v in after.items() if v},
               "successes": count[0], "failures": count[1], "errors": errors[:8],
               "hung_threads": sum(th.is_alive() for th in ths)}
    with open(state, "w") as f:
        json.dump(rec, f)
    print(f"writer: {count[0]} writes succeeded, {count[1]} failed, "
          f"{rec['hung_threads']} threads still blocked; first errors: {errors[:2]}")
    return 0


def block_image(b, gen_and_thread):
    gen, t = gen_and_thread
    return REC.pack(MAGIC, b, gen, t) * (BS // REC.size)


def block_verdict(b, data, ok, after):
    """None if block b's content is allowed, else why not."""
    allowed = set(after.get(b, []))
    if b in ok:
        allowed.add(ok[b])
    gens = set()
    for i in range(0, BS, REC.size):
        piece = data[i:i + REC.size]
        if len(piece) < REC.size or piece == bytes(REC.size):
            gens.add(None)
            continue
        magic, blk, gen, _ = REC.unpack(piece)
        if magic != MAGIC or blk != b:
            return f"foreign data at byte {i} (magic {magic!r}, block {blk})"
        gens.add(gen)
    if None in gens and b in ok:
        return "zeroes where a successful write must be"
    if not gens - {None} <= allowed:
        return "a generation that was never written there"
    if b in ok and not after.get(b) and gens != {ok[b]}:
        return "not the last successful write (no later write was attempted)"
    return None


def check_file(f, base, ok, after, blocks, damage=None):
    """Bad blocks of file f; damage = a block to read as zeroes (control)."""
    fbad = landed_after = 0
    zero = bytes(BS)
    with open(f, "rb") as fh:
        for b in blocks:
            fh.seek(base + b * BS)
            data = fh.read(BS)
            if b == damage:
                data = zero
            gen = None
            why = "unchecked"
            if len(data) == BS and data[:8] == MAGIC:
                _, blk, gen, t = REC.unpack(data[:REC.size])
                # fast path: the whole block is one write that was allowed there
                if blk == b and (gen == ok.get(b) or gen in after.get(b, ())) and data == block_image(b, (gen, t)):
                    why = None
            if why:
                why = block_verdict(b, data, ok, after)
            if why:
                fbad += 1
                if fbad <= 5 and damage is None:
                    print(f"  {f}: block {b}: {why}; last success {ok.get(b)}, attempted after it {after.get(b, [])}")
            elif ok.get(b) != gen:
                landed_after += 1
    return fbad, landed_after


def cmd_check_writes(state, base, files):
    import json
    control = files[-1] == "control"
    if control:
        files = files[:-1]
    with open(state) as fh:
        rec = json.load(fh)
    base = int(base)
    ok = {int(k): v for k, v in rec["ok"].items()}
    after = {int(k): v for k, v in rec["after"].items()}
    blocks = sorted(set(ok) | set(after))
    bad = 0
    for f in files:
        fbad, landed_after = check_file(f, base, ok, after, blocks)
        print(f"  {f}: {len(ok)} blocks with a successful write, {len(blocks)} written at all: "
              f"{fbad} bad, {landed_after} hold a later unanswered write")
        bad += fbad
    if control:
        victim = next((b for b in sorted(ok) if not after.get(b)), None)
        if victim is None:
            print("  control: no block written successfully with nothing attempted after it")
            bad += 1
        elif check_file(files[0], base, ok, after, blocks, damage=victim)[0] == 0:
            print(f"  control: block {victim} read as zeroes, yet the check passes: it proves nothing")
            bad += 1
        else:
            print(f"  control: block {victim} read as zeroes is flagged as a lost write, as it must")
    return 1 if bad else 0


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    if a[0] == "reads" and len(a) >= 4:
        return cmd_reads(a[1], a[2], a[3:])
    if a[0] == "destripe" and len(a) in (4, 5):
        return cmd_destripe(*a[1:])
    if a[0] == "writer" and len(a) == 7:
        return cmd_writer(*a[1:])
    if a[0] == "check-writes" and len(a) >= 4:
        return cmd_check_writes(a[1], a[2], a[3:])
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main())
