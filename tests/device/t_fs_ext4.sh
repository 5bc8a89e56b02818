#!/usr/bin/env bash
# Scenario 2: a file system on a loop device (backing file on tmpfs).
# mkfs.ext4, mount, write files (recording sha256 sums), umount, drop caches,
# `fsck.ext4 -n -f` clean, remount and verify the sums; then delete the device
# and check the backing file on its own: `fsck.ext4 -n -f` clean, and mounted
# through the kernel loop driver it holds the same files (the data went to
# the file, not just through the ublk device).
# timeout: 300
. "$(dirname "$0")/lib.sh"
t_require mkfs.ext4 fsck.ext4 sha256sum losetup

BACKING=$T_WORK/fs.img
MNT=$T_WORK/mnt
SUMS=$T_WORK/sums
mkdir -p "$MNT"
modprobe ext4 2>/dev/null
modprobe loop 2>/dev/null
truncate -s 256M "$BACKING"

must_add add loop --queues 2 --file "$BACKING" || exit 1
ID=$DEV_ID DEV=$DEV_PATH
log "device $ID over $BACKING"

drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    blockdev --flushbufs "$DEV" 2>/dev/null
}

if run_with_timeout 120 mkfs.ext4 -q -F -L ublktest "$DEV" >"$T_WORK/mkfs.out" 2>&1; then
    pass mkfs
else
    show_file "$T_WORK/mkfs.out"
    fail mkfs "mkfs.ext4 $DEV failed"
    exit 1
fi

if run_with_timeout 60 mount -t ext4 "$DEV" "$MNT"; then
    mount_track "$MNT"
    pass mount
else
    fail mount "mount $DEV failed"
    exit 1
fi

# Files of assorted sizes (not multiples of the block size too), some in
# subdirectories, ~40 MiB in all.
ok=1
mkdir -p "$MNT/a/b/c" "$MNT/d"
i=0
for sz in 0 1 511 4096 4097 65535 131072 1000000 3145728 4194305 8388608 12582912; do
    for dir in "" a/b/c; do
        [[ -n $dir && $sz -gt 1000000 ]] && continue
        f=$MNT/${dir:+$dir/}file$i.bin
        head -c "$sz" /dev/urandom >"$f" || ok=0
        i=$((i + 1))
    done
done
seq 1 200000 >"$MNT/d/numbers.txt" || ok=0
ln -s ../d/numbers.txt "$MNT/a/link" || ok=0
nfiles=$(find "$MNT" -type f | wc -l)
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) >"$SUMS" || ok=0
sync || ok=0
((ok)) && [[ $(wc -l <"$SUMS") -eq $nfiles && $nfiles -ge 15 ]] && pass "write-files ($nfiles files)" || fail write-files "writing the files failed"

if run_with_timeout 60 umount "$MNT"; then pass umount; else fail umount "umount failed"; fi
drop_caches

if run_with_timeout 120 fsck.ext4 -n -f "$DEV" >"$T_WORK/fsck1.out" 2>&1; then
    pass fsck-clean
else
    show_file "$T_WORK/fsck1.out"
    fail fsck-clean "fsck.ext4 -n -f $DEV is not clean"
fi

if run_with_timeout 60 mount -t ext4 -o ro "$DEV" "$MNT"; then
    if (cd "$MNT" && sha256sum --quiet -c "$SUMS") >"$T_WORK/sum1.out" 2>&1; then
        pass remount-checksums
    else
        show_file "$T_WORK/sum1.out"
        fail remount-checksums "checksums differ after remount"
    fi
    [[ $(readlink "$MNT/a/link") == ../d/numbers.txt ]] && pass remount-symlink || fail remount-symlink "symlink lost"
    run_with_timeout 60 umount "$MNT" || fail umount2 "umount failed"
else
    fail remount "remount of $DEV failed"
fi

# Delete the device; the backing file alone must hold the file system.
if dev_del "$ID" && wait_until 15 dev_absent "$ID"; then
    pass del
else
    fail del "ublk del $ID failed or the device stayed"
fi

if run_with_timeout 120 fsck.ext4 -n -f "$BACKING" >"$T_WORK/fsck2.out" 2>&1; then
    pass backing-fsck-clean
else
    show_file "$T_WORK/fsck2.out"
    fail backing-fsck-clean "fsck.ext4 -n -f on the backing file is not clean"
fi
if run_with_timeout 60 mount -t ext4 -o loop,ro "$BACKING" "$MNT"; then
    mount_track "$MNT"
    if [[ $(blkid -o value -s LABEL "$BACKING" 2>/dev/null) == ublktest ]] \
        && (cd "$MNT" && sha256sum --quiet -c "$SUMS") >"$T_WORK/sum2.out" 2>&1; then
        pass backing-file-holds-files
    else
        show_file "$T_WORK/sum2.out"
        fail backing-file-holds-files "the backing file, mounted by the kernel loop driver, lacks the files"
    fi
    run_with_timeout 60 umount "$MNT"
else
    fail backing-file-mount "the kernel cannot mount the backing file"
fi
