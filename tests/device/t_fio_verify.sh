#!/usr/bin/env bash
# Scenario 1: fio randrw with crc32c verify (block sizes 4k..1M, --queues 2,
# direct IO, do_verify, verify_fatal) on
#   - mem;
#   - loop over a file on tmpfs (/dev/shm);
#   - loop over a file on ext4 (an ext4 image mounted through the kernel loop
#     driver: a real disk file system, so the server's O_DIRECT path is used);
#   - loop over a block device (a kernel loop device);
#   - mem again with --ioengine=psync buffered through the page cache, then a
#     direct verify-only pass of the same workload, so what was verified came
#     from the device and not from the page cache.
# The loop runs also fsync every 32 writes: FLUSH requests must reach the
# device (sysfs flush counter), served as fdatasync of the backing file.
# For loop, the device content must also equal the backing file byte for byte.
# Negative controls: the same verify on `null` (which keeps no data) and a
# verify-only pass on a fresh device must fail, or the checks prove nothing.
# compat: yes   (compat: mem and loop-on-tmpfs only)
# timeout: 480
. "$(dirname "$0")/lib.sh"
t_require fio cmp

SIZE=$T_FIO_SIZE

# loop_run LABEL FILE ENGINE: a loop device over FILE, fio verify, content check.
loop_run() {
    local label=$1 file=$2 engine=$3
    truncate -s "$SIZE" "$file" || { fail "$label-setup" "truncate $file failed"; return; }
    must_add "$label-add" loop --queues 2 --file "$file" || return
    local id=$DEV_ID dev=$DEV_PATH
    log "$label: device $id over $file ($(grep -E '^arg\.direct=' "/run/ublk/$id.state" 2>/dev/null))"
    FIO_EXPECT_FLUSH=1 fio_verify "$label" "$dev" --ioengine="$engine" --iodepth=32 --fsync=32
    # The device and its backing file hold the same bytes.
    if cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$file" >/dev/null 2>"$T_WORK/cmp.err"; then
        pass "$label-file-matches-device"
    else
        fail "$label-file-matches-device" "device $dev and $file differ: $(head -c 300 "$T_WORK/cmp.err")"
    fi
    dev_del "$id" && wait_until 10 dev_absent "$id" && pass "$label-del" || fail "$label-del" "device $id not removed"
    rm -f "$file"
}

# --- mem, io_uring -----------------------------------------------------------------
if must_add mem-add mem --queues 2 --size "$SIZE"; then
    fio_verify mem-io_uring "$DEV_PATH" --ioengine=io_uring --iodepth=32
    if ((!T_COMPAT)); then
        # --- mem, psync buffered (page cache), then a direct verify-only pass
        fio_verify mem-psync-buffered "$DEV_PATH" --ioengine=psync --direct=0 --end_fsync=1 \
            --randseed=4242 --bsrange=4k-256k
        sync
        echo 3 >/proc/sys/vm/drop_caches
        blockdev --flushbufs "$DEV_PATH"
        FIO_EXPECT=r fio_verify mem-psync-verify-only-direct "$DEV_PATH" --ioengine=psync --direct=1 --verify_only=1 \
            --randseed=4242 --bsrange=4k-256k
    fi
    id=$DEV_ID
    dev_del "$id" && wait_until 10 dev_absent "$id" && pass mem-del || fail mem-del "device $id not removed"
fi

# --- negative controls: the verify catches a device that loses data ------------------
if ((!T_COMPAT)); then
    if must_add control-null-add null --queues 2 --size "$SIZE"; then
        T_FIO_SIZE=32M fio_verify_must_fail control-null-fails-verify "$DEV_PATH"
        dev_del "$DEV_ID" || fail control-null-del "ublk del $DEV_ID failed"
    fi
    if must_add control-fresh-add mem --size "$SIZE"; then
        FIO_EXPECT=r T_FIO_SIZE=32M fio_verify_must_fail control-verify-only-on-fresh-device-fails "$DEV_PATH" \
            --ioengine=psync --verify_only=1 --randseed=4242 --bsrange=4k-256k
        dev_del "$DEV_ID" || fail control-fresh-del "ublk del $DEV_ID failed"
    fi
fi

# --- loop over tmpfs ---------------------------------------------------------------
loop_run loop-tmpfs "$T_WORK/backing-tmpfs.img" io_uring

# --- loop over a block device (the kernel loop driver over a tmpfs file) ------------
if ((!T_COMPAT)); then
    modprobe loop 2>/dev/null
    truncate -s 64M "$T_WORK/kloop.img"
    if kl=$(losetup -f --show "$T_WORK/kloop.img"); then
        T_LOOPDEVS+=("$kl")
        if must_add loop-blockdev-add loop --queues 2 --file "$kl"; then
            id=$DEV_ID
            row=$(list_row "$id")
            [[ $(awk '{ print $4 }' <<<"$row") == 64M ]] && pass "loop-blockdev-size" || fail loop-blockdev-size "row '$row', want 64M"
            FIO_EXPECT_FLUSH=1 T_FIO_SIZE=64M fio_verify loop-blockdev "$DEV_PATH" --ioengine=io_uring --fsync=32
            dev_del "$id" && wait_until 10 dev_absent "$id" || fail loop-blockdev-del "device $id not removed"
        fi
        losetup -d "$kl"
    else
        fail loop-blockdev-setup "losetup failed"
    fi
    rm -f "$T_WORK/kloop.img"
fi

# --- loop over ext4 ----------------------------------------------------------------
if ((!T_COMPAT)); then
    if ext4_scratch 200; then
        loop_run loop-ext4 "$EXT4_DIR/backing.img" libaio
    else
        fail loop-ext4-setup "could not make the scratch ext4"
    fi
fi
