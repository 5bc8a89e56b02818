#!/usr/bin/env bash
# Stress and faults (issue 7):
# - 100 cycles (STRESS_CYCLES) of add -> fio 2 s -> del, all in one process (examples/multi):
#   its fds and threads after cycle 100 equal those after cycle 1, and its
#   resident memory grew by less than 16 MiB;
# - 8 devices served by one process at once, fio crc32c verify on all 8 in
#   parallel, deleted together, 3 cycles, the same leak checks;
# - backing errors: a loop device over a file on a full tmpfs (writes fail
#   with ENOSPC), and over a null_blk disk whose blocks turn bad in the middle
#   of a read run (configfs badblocks: reads fail with EIO): fio reports the
#   errors and ends, nothing hangs, the server keeps serving, `ublk del`
#   removes the device and the server exits.
# timeout: 1200
. "$(dirname "$0")/lib.sh"
t_require fio mkfs.ext4

MULTI=$T_REPO/target/release/examples/multi
[[ -x $MULTI ]] || { fail multi-binary "$MULTI missing: cargo build --release --examples"; exit 1; }

# counts PID: "fds threads rss_kib" of a process
counts() {
    echo "$(ls "/proc/$1/fd" | wc -l) $(ls "/proc/$1/task" | wc -l) $(awk '/^VmRSS:/ { print $2 }' "/proc/$1/status")"
}

# multi_run LABEL DEVICES CYCLES PER-CYCLE-FN: runs examples/multi and calls
# PER-CYCLE-FN CYCLE PATH... in each cycle; checks the leak counts.
multi_run() {
    local label=$1 ndev=$2 cycles=$3 fn=$4 c line paths base now ok=1
    coproc MULTI_P { "$MULTI" --devices "$ndev" --cycles "$cycles" --size 64 2>"$T_WORK/$label.err"; }
    local pid=$MULTI_P_PID
    bg_track "$pid"
    for ((c = 1; c <= cycles; c++)); do
        paths=()
        while IFS= read -r -t 120 line <&"${MULTI_P[0]}"; do
            [[ $line == "ready $c" ]] && break
            [[ $line =~ ^cycle\ $c\ [0-9]+\ (/dev/ublkb[0-9]+)$ ]] && paths+=("${BASH_REMATCH[1]}")
        done
        if ((${#paths[@]} != ndev)); then
            show_file "$T_WORK/$label.err"
            fail "$label-cycle-$c" "multi did not make $ndev devices (got ${#paths[@]}: ${paths[*]})"
            ok=0
            break
        fi
        "$fn" "$c" "${paths[@]}" || { ok=0; break; }
        echo next >&"${MULTI_P[1]}"
        if ! IFS= read -r -t 120 line <&"${MULTI_P[0]}" || [[ $line != "deleted $c" ]]; then
            show_file "$T_WORK/$label.err"
            fail "$label-cycle-$c" "multi did not delete the devices of cycle $c (said '$line')"
            ok=0
            break
        fi
        local p
        for p in "${paths[@]}"; do
            dev_absent "${p#/dev/ublkb}" || { fail "$label-cycle-$c" "$p still exists after delete"; ok=0; }
        done
        ((ok)) || break
        # multi now holds no device and waits for the next cycle
        ((c == 1)) && base=$(counts "$pid")
        ((c == cycles)) && now=$(counts "$pid")
        echo next >&"${MULTI_P[1]}"
    done
    eval "exec ${MULTI_P[1]}>&-"
    wait_pid_exit "$pid" 60 || fail "$label-exit" "multi did not exit at EOF"
    wait "$pid" 2>/dev/null
    ((ok)) || return 1
    pass "$label-$cycles-cycles"
    local b n
    read -r -a b <<<"$base"
    read -r -a n <<<"$now"
    log "$label: after cycle 1: fds=${b[0]} threads=${b[1]} rss=${b[2]}KiB; after cycle $cycles: fds=${n[0]} threads=${n[1]} rss=${n[2]}KiB"
    ((n[0] == b[0])) && pass "$label-no-fd-leak (${n[0]})" || fail "$label-no-fd-leak" "fds ${b[0]} -> ${n[0]}"
    ((n[1] == b[1])) && pass "$label-no-thread-leak (${n[1]})" || fail "$label-no-thread-leak" "threads ${b[1]} -> ${n[1]}"
    ((n[2] - b[2] < 16384)) && pass "$label-no-memory-leak (+$((n[2] - b[2])) KiB)" \
        || fail "$label-no-memory-leak" "RSS ${b[2]} -> ${n[2]} KiB"
}

# one device per cycle: fio 2 s of randrw
fio_2s() {
    local c=$1 dev=$2
    if ! run_with_timeout 60 fio --name=c$c --filename="$dev" --rw=randrw --bs=4k --direct=1 --ioengine=io_uring \
        --iodepth=16 --size=32M --time_based --runtime=2 >"$T_WORK/cycle.out" 2>&1; then
        show_file "$T_WORK/cycle.out" 20
        fail "cycles-fio-$c" "fio on $dev failed"
        return 1
    fi
}
multi_run cycles 1 "${STRESS_CYCLES:-100}" fio_2s

# eight devices at once: fio verify on all of them in parallel
fio_verify_all() {
    local c=$1 dev i=0 pids=() rc=0
    shift
    for dev in "$@"; do
        i=$((i + 1))
        fio --name=m$c-$i --filename="$dev" --rw=randrw --bsrange=4k-128k --direct=1 --ioengine=io_uring \
            --iodepth=8 --size=16M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
            >"$T_WORK/m-$i.out" 2>&1 &
        pids+=($!)
    done
    i=0
    for p in "${pids[@]}"; do
        i=$((i + 1))
        if ! wait "$p" || grep -Eq 'err= *[1-9]|verify: bad|io_u error' "$T_WORK/m-$i.out"; then
            show_file "$T_WORK/m-$i.out" 20
            rc=1
        fi
    done
    ((rc == 0)) && pass "eight-fio-verify-cycle-$c" || fail "eight-fio-verify-cycle-$c" "fio failed on a device"
    return $rc
}
multi_run eight 8 3 fio_verify_all

# backing errors ---------------------------------------------------------------------
# expect_fio_error NAME OUT RC ERE: fio (exit status RC, 124 = still ran at its
# bound, output OUT) must have ended with an error matching ERE.
expect_fio_error() {
    local name=$1 out=$2 rc=$3 re=$4
    if ((rc == 124)); then
        fail "$name" "fio still ran at its time bound (hung IO?)"
    elif fio_errored "$out" "$rc" && grep -Eqi "$re" "$out"; then
        pass "$name ($(grep -Eoi -m1 "$re" "$out"))"
    else
        show_file "$out" 20
        fail "$name" "fio exited $rc without an error matching /$re/"
    fi
}

# backing_error_case LABEL: after the IO failed, the server still serves, and
# `ublk del` removes the device and ends the server.
after_errors() {
    local label=$1 id=$2 pid=$3
    [[ $(list_row "$id" | awk '{ print $8 }') == LIVE ]] && pid_alive "$pid" \
        && pass "$label-server-keeps-serving" || fail "$label-server-keeps-serving" "$(list_row "$id")"
    if dev_del "$id" >"$T_WORK/del.out" 2>&1 && wait_pid_exit "$pid" 30 && wait_until 10 dev_absent "$id"; then
        pass "$label-del-and-exit"
    else
        show_file "$T_WORK/del.out"
        fail "$label-del-and-exit" "ublk del failed, or the server / device stayed"
    fi
}

small=$T_WORK/small
mkdir -p "$small"
if mount -t tmpfs -o size=16M tmpfs "$small"; then
    mount_track "$small"
    truncate -s 64M "$small/sparse.img"
    if must_add full-add loop --file "$small/sparse.img"; then
        id=$DEV_ID pid=$(server_pid "$DEV_ID")
        out=$T_WORK/fio-full.out
        run_with_timeout 120 fio --name=full --filename="$DEV_PATH" --rw=write --bs=64k --direct=1 \
            --ioengine=io_uring --iodepth=8 --size=64M >"$out" 2>&1
        expect_fio_error full-tmpfs-write-fails "$out" $? 'No space left on device|Input/output error|err= *-?(28|5)\b'
        after_errors full "$id" "$pid"
    fi
else
    fail full-tmpfs "cannot mount a small tmpfs"
fi

# a file made unreadable mid-run: the loop's backing file lives on ext4 on a
# null_blk disk whose every block turns bad under a read run
nb=/sys/kernel/config/nullb/ublk-stress
modprobe null_blk nr_devices=0 2>/dev/null
mountpoint -q /sys/kernel/config || mount -t configfs none /sys/kernel/config 2>/dev/null
if [[ ! -d /sys/kernel/config/nullb ]] || ! mkdir "$nb" 2>/dev/null; then
    fail badblocks-setup "no null_blk configfs (/sys/kernel/config/nullb)"
else
    echo 64 >"$nb/size" && echo 1 >"$nb/memory_backed" && echo 1 >"$nb/power"
    # newer kernels name the disk after the configfs item, older ones nullbN
    nbdev=/dev/${nb##*/}
    [[ -e /sys/block/${nb##*/} ]] || nbdev=/dev/nullb$(cat "$nb/index")
    if ! wait_until 10 test -b "$nbdev"; then
        fail badblocks-setup "null_blk disk $nbdev did not appear ($(ls /sys/block | tr '\n' ' '))"
    elif ! mkfs.ext4 -q -F "$nbdev" || ! mkdir -p "$T_WORK/nb" || ! mount "$nbdev" "$T_WORK/nb"; then
        fail badblocks-setup "mkfs.ext4 / mount of $nbdev failed"
    elif mount_track "$T_WORK/nb" && dd if=/dev/urandom of="$T_WORK/nb/file.img" bs=1M count=16 conv=fsync status=none \
        && must_add bad-add loop --file "$T_WORK/nb/file.img"; then
        id=$DEV_ID pid=$(server_pid "$DEV_ID")
        grep -qx "arg.direct=true" "/run/ublk/$id.state" || log "note: the loop does not use O_DIRECT on $T_WORK/nb/file.img"
        fio_bg bad "$DEV_PATH" --rw=randread --size=16M
        # the whole disk turns bad (ranges of at most 512 sectors: 64 MiB = 256 of them),
        # and the page cache forgets the file (reads must reach the disk)
        for ((s = 0; s < 131072; s += 512)); do echo "+$s-$((s + 511))" >"$nb/badblocks"; done
        echo 3 >/proc/sys/vm/drop_caches
        fio_wait "$FIO_PID" "$FIO_OUT" 60
        expect_fio_error bad-blocks-read-fails "$FIO_OUT" "$FIO_RC" 'Input/output error|err= *-?5\b'
        after_errors bad "$id" "$pid"
    fi
    umount_all
    echo 0 >"$nb/power" 2>/dev/null
    rmdir "$nb" 2>/dev/null
fi
