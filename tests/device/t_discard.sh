#!/usr/bin/env bash
# Scenario 3: DISCARD and WRITE_ZEROES on mem, on loop over tmpfs (no
# FALLOC_FL_ZERO_RANGE there: the server falls back to punching a hole) and
# on loop over ext4 (zero-range).  A random pattern is written, then
#   [4M, 8M)            blkdiscard            (REQ_OP_DISCARD)
#   [12M+512, +3M+1K)   blkdiscard -z         (BLKZEROOUT; sub-page edges)
#   [20M+4K, +2M)       fallocate -p on the block device (REQ_OP_WRITE_ZEROES
#                       with no fallback: fails unless the server does it)
# and the whole device is read back with O_DIRECT: zeroes in those ranges,
# the pattern everywhere else.  For loop, the backing file itself must hold
# the same bytes, and the discard must have freed blocks of the file.
# timeout: 300
. "$(dirname "$0")/lib.sh"
t_require blkdiscard fallocate cmp

SIZE_MB=32
PAT=$T_WORK/pattern
head -c $((SIZE_MB << 20)) /dev/urandom >"$PAT"
M=$((1 << 20))
RANGES=(
    "discard $((4 * M)) $((4 * M))"
    "zeroout $((12 * M + 512)) $((3 * M + 1024))"
    "punch $((20 * M + 4096)) $((2 * M))"
)

# zero_expected FILE OFF LEN: zeroes a byte range of the expected image.
zero_expected() {
    dd if=/dev/zero of="$1" bs=512 seek=$(($2 / 512)) count=$(($3 / 512)) conv=notrunc status=none
}

# first_diffs A B: the first differing offsets of two files, for messages.
first_diffs() {
    cmp -l "$1" "$2" 2>/dev/null | head -n 3 | awk '{ printf "offset %d: expected %s got %s; ", $1 - 1, $2, $3 }'
    echo "($(cmp -l "$1" "$2" 2>/dev/null | wc -l) bytes differ)"
}

# run_case LABEL FILE|- ADD-ARGS...
run_case() {
    local label=$1 file=$2
    shift 2
    must_add "$label-add" "$@" || return
    local id=$DEV_ID dev=$DEV_PATH n=${DEV_PATH##*/}
    local q=/sys/block/$n/queue
    log "$label: device $id ($*)"
    local dmax wzmax
    dmax=$(cat "$q/discard_max_bytes" 2>/dev/null || echo 0)
    wzmax=$(cat "$q/write_zeroes_max_bytes" 2>/dev/null || echo 0)
    if ((dmax > 0 && wzmax > 0)); then
        pass "$label-limits (discard_max_bytes=$dmax write_zeroes_max_bytes=$wzmax)"
    else
        fail "$label-limits" "discard_max_bytes=$dmax write_zeroes_max_bytes=$wzmax: the device does not advertise discard/write-zeroes"
    fi

    if ! run_with_timeout 120 dd if="$PAT" of="$dev" bs=1M oflag=direct conv=fsync status=none; then
        fail "$label-write-pattern" "dd to $dev failed"
        dev_del "$id"
        return
    fi
    local exp=$T_WORK/expected-$label got=$T_WORK/got-$label
    cp "$PAT" "$exp"

    local blocks0 blocks1 st0 st1 kind off len rc
    [[ $file != - ]] && blocks0=$(stat -c %b "$file")
    for r in "${RANGES[@]}"; do
        read -r kind off len <<<"$r"
        st0=$(dev_stat "$dev")
        case $kind in
            discard) run_with_timeout 60 blkdiscard -o "$off" -l "$len" "$dev" ;;
            zeroout) run_with_timeout 60 blkdiscard -z -o "$off" -l "$len" "$dev" ;;
            punch) run_with_timeout 60 fallocate -p -o "$off" -l "$len" "$dev" ;;
        esac
        rc=$?
        st1=$(dev_stat "$dev")
        if ((rc != 0)); then
            fail "$label-$kind" "$kind of $off+$len on $dev exited $rc"
            continue
        fi
        zero_expected "$exp" "$off" "$len"
        if [[ $kind == discard ]]; then
            # the block layer really sent discards (sysfs discard IO counter)
            local d0 d1
            d0=$(awk '{ print $5 }' <<<"$st0")
            d1=$(awk '{ print $5 }' <<<"$st1")
            if ((d1 > d0)); then pass "$label-discard-sent"; else fail "$label-discard-sent" "discard IO counter did not move ($d0 -> $d1)"; fi
            if [[ $file != - ]]; then
                blocks1=$(stat -c %b "$file")
                # 4 MiB are 8192 512-byte blocks; allow for partial blocks
                if ((blocks0 - blocks1 >= 7000)); then
                    pass "$label-discard-punched-file"
                else
                    fail "$label-discard-punched-file" "backing file blocks $blocks0 -> $blocks1: the discard did not free space"
                fi
            fi
        fi
        pass "$label-$kind"
    done

    echo 3 >/proc/sys/vm/drop_caches
    if ! run_with_timeout 120 dd if="$dev" of="$got" bs=1M iflag=direct status=none; then
        fail "$label-readback" "reading $dev failed"
    elif cmp -s "$exp" "$got"; then
        pass "$label-readback (zeroes in the ranges, pattern elsewhere)"
    else
        fail "$label-readback" "device content is wrong: $(first_diffs "$exp" "$got")"
    fi
    if [[ $file != - ]]; then
        if cmp -s "$exp" "$file"; then
            pass "$label-backing-file-content"
        else
            fail "$label-backing-file-content" "backing file content is wrong: $(first_diffs "$exp" "$file")"
        fi
    fi
    if dev_del "$id" && wait_until 10 dev_absent "$id"; then pass "$label-del"; else fail "$label-del" "device $id not removed"; fi
    rm -f "$exp" "$got"
}

run_case mem - mem --queues 2 --size ${SIZE_MB}M

truncate -s ${SIZE_MB}M "$T_WORK/backing.img"
run_case loop-tmpfs "$T_WORK/backing.img" loop --queues 2 --file "$T_WORK/backing.img"
rm -f "$T_WORK/backing.img"

if ext4_scratch 80; then
    truncate -s ${SIZE_MB}M "$EXT4_DIR/backing.img"
    run_case loop-ext4 "$EXT4_DIR/backing.img" loop --queues 2 --file "$EXT4_DIR/backing.img"
else
    fail loop-ext4-setup "could not make the scratch ext4"
fi
