#!/usr/bin/env bash
# Scenario 7 (shapes): queue / depth / IO size combinations each pass a short
# fio crc32c verify (randrw, 4k..1M, direct), and the kernel sees the shape
# asked for (ublk list, /sys/block/ublkbN/mq, max_sectors_kb,
# logical_block_size); and IO at the far end of an 8 GiB device.
# timeout: 420
. "$(dirname "$0")/lib.sh"
t_require fio

NPROC=$(nproc)
T_FIO_SIZE=32M

# shape LABEL QUEUES DEPTH MAXIO_KB|- LBS|- FIO-IODEPTH
shape() {
    local label=$1 q=$2 d=$3 maxio=$4 lbs=$5 iodepth=$6
    local args=(mem --queues "$q" --depth "$d" --size 32M)
    [[ $maxio != - ]] && args+=(--max-io-size "${maxio}K")
    [[ $lbs != - ]] && args+=(--logical-block-size "$lbs")
    must_add "$label-add" "${args[@]}" || return
    local id=$DEV_ID dev=$DEV_PATH n=${DEV_PATH##*/}
    local row why=()
    row=$(list_row "$id")
    read -r _ _ _ _ r_q r_d _ _ _ <<<"$row"
    [[ $r_q == "$q" && $r_d == "$d" ]] || why+=("ublk list: '$row'")
    local nq
    nq=$(find "/sys/block/$n/mq" -mindepth 1 -maxdepth 1 -type d | wc -l)
    ((nq == q)) || why+=("$nq blk-mq hardware queues, want $q")
    local tags
    tags=$(cat "/sys/block/$n/mq/0/nr_tags" 2>/dev/null)
    [[ $tags == "$d" ]] || why+=("mq/0/nr_tags=$tags, want $d")
    if [[ $maxio != - ]]; then
        local ms
        ms=$(cat "/sys/block/$n/queue/max_sectors_kb")
        [[ $ms == "$maxio" ]] || why+=("max_sectors_kb=$ms, want $maxio")
    fi
    if [[ $lbs != - ]]; then
        local l
        l=$(cat "/sys/block/$n/queue/logical_block_size")
        [[ $l == "$lbs" ]] || why+=("logical_block_size=$l, want $lbs")
    fi
    if ((${#why[@]} == 0)); then pass "$label-shape"; else fail "$label-shape" "$(IFS=';'; echo "${why[*]}")"; fi
    fio_verify "$label" "$dev" --iodepth="$iodepth"
    dev_del "$id" && wait_until 10 dev_absent "$id" || fail "$label-del" "device $id not removed"
}

shape q1-d1          1        1    -    -    16
shape "q$NPROC-d4096" "$NPROC" 4096 -    -    128
shape maxio-4k       1        64   4    -    32
shape maxio-1m       "$Q2"    64   1024 -    32
shape lbs-4k         "$Q2"    64   -    4096 32

# Far offsets: the last 32 MiB of an 8 GiB device (sector numbers past 2^24,
# byte offsets past 2^32).
if must_add mem-8g-add mem --queues 2 --size 8G; then
    T_FIO_SIZE=32M fio_verify mem-8g-tail "$DEV_PATH" --offset=$(((8 << 30) - (32 << 20)))
    dev_del "$DEV_ID" || fail mem-8g-del "ublk del $DEV_ID failed"
fi
