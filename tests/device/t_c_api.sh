#!/usr/bin/env bash
# The C ABI on a real kernel (issue 3): the C examples built against
# libublk.so serve real devices. fio crc32c verify on ramdisk (inline
# completion; and -b: batches through handle_batch), loop (backing IO on the queue ring) and threadpool (completion
# from worker threads); mkfs.ext4 + mount + fsck on loop; SIGTERM stops each
# and removes its device; null serves IO and exits when `ublk del` removes its
# device; the error-path test (tests/c/errors.c, kernel half) passes under
# ASan/UBSan with leak detection.
# timeout: 420
. "$(dirname "$0")/lib.sh"
t_require fio mkfs.ext4 fsck.ext4
B=$T_REPO/target/release

# start_c NAME ARGS...: starts $B/c-NAME in the background; sets CPID, ID, DEV.
start_c() {
    local name=$1
    shift
    local out=$T_WORK/$name.out
    "$B/c-$name" "$@" >"$out" 2>"$T_WORK/$name.err" &
    CPID=$!
    bg_track "$CPID"
    if ! wait_until 60 grep -q . "$out" || ! parse_add_line "$(head -n1 "$out")"; then
        show_file "$T_WORK/$name.err"
        fail "c-$name-start" "no '<id> <path>' line: ${ADD_ERR:-nothing printed}"
        return 1
    fi
    ID=$DEV_ID DEV=$DEV_PATH
    pass "c-$name-start ($DEV)"
}

# stop_c NAME: SIGTERM; the example must exit 0 and its device must be gone.
stop_c() {
    kill -TERM "$CPID"
    if ! wait_pid_exit "$CPID" 60; then
        fail "c-$1-sigterm" "still running 60s after SIGTERM"
        return 1
    fi
    wait "$CPID"
    local rc=$?
    if ((rc == 0)) && wait_until 10 dev_absent "$ID"; then
        pass "c-$1-sigterm (exit 0, device $ID removed)"
    else
        show_file "$T_WORK/$1.err"
        fail "c-$1-sigterm" "exit $rc, device $ID $(dev_exists "$ID" && echo still there || echo gone)"
    fi
}

for bin in c-null c-ramdisk c-loop c-threadpool c-errors-asan; do
    [[ -x $B/$bin ]] || { fail build "$B/$bin missing: run make build"; exit 1; }
done

# ramdisk: completes inside the callback
if start_c ramdisk -s 256M -q "$Q2"; then
    fio_verify c-ramdisk "$DEV"
    stop_c ramdisk
fi

# ramdisk -b: the requests of each pass over the ring in one handle_batch
# call, completed through the entries' results
if start_c ramdisk -s 256M -q "$Q2" -b; then
    fio_verify c-ramdisk-batch "$DEV"
    stop_c ramdisk
fi

# threadpool: completes from 3 worker threads
if start_c threadpool -s 256M -q "$Q2" -t 3; then
    fio_verify c-threadpool "$DEV"
    stop_c threadpool
fi

# threadpool -b: handle_batch queues each pass over the ring at once; every
# worker takes its share of the queue per wake-up; no -t: one worker per CPU
if start_c threadpool -s 256M -q "$Q2" -b; then
    fio_verify c-threadpool-batch "$DEV"
    stop_c threadpool
fi
# no worker would ever complete a request: refused before any device exists
for t in 0 -1; do
    tp_err=$("$B/c-threadpool" -t "$t" 2>&1 >/dev/null); tp_rc=$?
    if ((tp_rc == 2)) && [[ $tp_err == *"at least one worker"* ]]; then
        pass "c-threadpool-no-workers -t $t (exit 2: $tp_err)"
    else
        fail "c-threadpool-no-workers -t $t" "exit $tp_rc, stderr: $tp_err"
    fi
done

# loop -b: handle_batch; READ and WRITE lent whole to the file through the
# entries' lease_fd, FLUSH through the per-request path
truncate -s 256M "$T_WORK/loop-b.img"
if start_c loop -f "$T_WORK/loop-b.img" -q "$Q2" -b; then
    FIO_EXPECT_FLUSH=1 fio_verify c-loop-batch "$DEV" --fsync=64
    if run_with_timeout 60 cmp -n $((64 << 20)) "$DEV" "$T_WORK/loop-b.img"; then
        pass "c-loop-batch-backing-file (device == file)"
    else
        fail "c-loop-batch-backing-file" "device and backing file differ"
    fi
    stop_c loop
fi
rm -f "$T_WORK/loop-b.img"

# loop: backing IO on the queue ring, file on tmpfs
truncate -s 512M "$T_WORK/loop.img"
if start_c loop -f "$T_WORK/loop.img" -q "$Q2"; then
    FIO_EXPECT_FLUSH=1 fio_verify c-loop "$DEV" --fsync=64
    # what fio wrote is in the file
    if run_with_timeout 60 cmp -n $((64 << 20)) "$DEV" "$T_WORK/loop.img"; then
        pass "c-loop-backing-file (device == file)"
    else
        fail "c-loop-backing-file" "device and backing file differ"
    fi
    mnt=$T_WORK/mnt
    mkdir -p "$mnt"
    if run_with_timeout 120 mkfs.ext4 -q -F "$DEV" && mount "$DEV" "$mnt"; then
        mount_track "$mnt"
        head -c 8M /dev/urandom >"$mnt/a" && cp "$mnt/a" "$T_WORK/a"
        sync
        umount "$mnt" && T_MOUNTS=()
        echo 3 >/proc/sys/vm/drop_caches
        if run_with_timeout 120 fsck.ext4 -n -f "$DEV" >"$T_WORK/fsck.out" 2>&1 && mount "$DEV" "$mnt" \
            && mount_track "$mnt" && cmp -s "$mnt/a" "$T_WORK/a"; then
            pass "c-loop-ext4 (mkfs, mount, fsck -n clean, data back)"
        else
            show_file "$T_WORK/fsck.out"
            fail "c-loop-ext4" "fsck or read-back failed"
        fi
        umount_all
    else
        fail "c-loop-ext4" "mkfs/mount failed"
    fi
    stop_c loop
fi

# null: `ublk del` from outside makes the example's serve return
if start_c null -s 1G; then
    if run_with_timeout 60 fio --name=cnull --filename="$DEV" --rw=randread --bs=4k --direct=1 \
        --ioengine=io_uring --iodepth=32 --runtime=2 --time_based >"$T_WORK/null.fio" 2>&1; then
        pass "c-null-io"
    else
        show_file "$T_WORK/null.fio"
        fail "c-null-io" "fio failed"
    fi
    if dev_del "$ID" && wait_pid_exit "$CPID" 60; then
        wait "$CPID"
        rc=$?
        if ((rc == 0)); then pass "c-null-deleted (example exited 0)"; else fail "c-null-deleted" "exit $rc"; fi
    else
        fail "c-null-deleted" "del failed or the example did not exit"
    fi
fi

# the error paths, kernel half included, under ASan/UBSan + LeakSanitizer
if ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=halt_on_error=1 \
    run_with_timeout 120 "$B/c-errors-asan" >"$T_WORK/errors.out" 2>&1; then
    pass "c-errors-asan ($(tail -n1 "$T_WORK/errors.out"))"
else
    show_file "$T_WORK/errors.out" 60
    fail "c-errors-asan" "error-path test failed or sanitizer report"
fi

t_finish
