#!/usr/bin/env bash
# Scenario (issue 4): zero-copy leases in every data mode the kernel has.
# The modes come from `ublk features` (auto-buf-reg: AUTO_BUF_REG, register:
# ZERO_COPY, user-copy: USER_COPY, copy: always); a mode the kernel lacks is a
# SKIP naming the feature, and asking for it must fail (exit 1, a message
# naming the mode and the feature). `--zero-copy auto` must pick the best mode
# (auto-buf-reg on 7.x, user-copy on 6.12). For each supported mode:
#   - loop (`ublk add loop --zero-copy M`): `ublk list` shows M; fio randrw
#     crc32c verify 4k..1M; the device equals the backing file; the server's
#     stop line says mode=M, copied_bytes=0 in zero-copy modes (auto-buf-reg,
#     register) and > 0 in copy/user-copy, lease_ops > 0;
#   - c-mirror: fio verify; the device (dumped with O_DIRECT) equals both
#     legs; then fio writes at QD 64 fan out to both legs and the mirror is
#     stopped under them (`ublk del` or SIGTERM, alternating by mode):
#     bounded, exit 0, device gone, fio sees errors, stop line as above, and
#     the two legs are byte-identical;
#   - c-stripe over 3 files, 64K or 4K chunks (alternating by mode; IOs of
#     4k..1M span up to 256 chunks, one lease op per piece): fio verify, the
#     device dumped before SIGTERM, each file is exactly its de-striped share;
#   - short reads: a loop device (depth 1) whose backing file is truncated
#     while it runs, and a c-stripe with two of its files truncated: O_DIRECT reads
#     past the new end, into buffers pre-filled with 0xa5, right after reads
#     of non-zero data through the same tag, must give zeroes (never stale
#     data), reads straddling the end give the data then zeroes;
#   - examples/lease_check.rs: the Rust lease rules (EPERM, EINVAL, EALREADY,
#     zero-fill, manual completion, a failing op);
#   - SIGKILL of c-mirror under fio QD 64 writes plus a python writer (8
#     threads, O_DIRECT, each 4K block tagged with its number and a random
#     generation): fio and the writer end in bounded time with errors, `ublk
#     del` removes the dead device, and every write that returned success is
#     in both legs.
# Negative controls (once): lease_check --control must report one failure;
# the de-stripe check with the files swapped, the short-read check against
# the untruncated file and the write check on a damaged leg must fail.
# T_ZC_MODES="m1 m2" (debugging) leaves the other modes out, as skips.
# compat: yes   (compat: the same scenarios on smaller devices)
# timeout: 600
. "$(dirname "$0")/lib.sh"
t_require fio cmp python3 dd truncate
# lib.sh's t_finish takes an exit status of 1 for a normal end: a shell error
# (e.g. an unbound variable under set -u) must not end the script as a pass.
ZC_END=0
# shellcheck disable=SC2154
trap 'zc_rc=$?; ((ZC_END || T_FAIL)) || fail script "ended before its last scenario (exit $zc_rc: a shell error above?)"; (exit $zc_rc); t_finish' EXIT

# c-mirror and c-stripe (and lease_check) come from UBLK_EXAMPLES_DIR if set
B=${UBLK_EXAMPLES_DIR:-$T_REPO/target/release}
LEASE_CHECK=${UBLK_LEASE_CHECK_BIN:-$B/examples/lease_check}
# `python3` in PATH may be a pyenv shim (seconds per start in the VM): the
# system interpreter, without site packages, starts much faster
PY=python3
[[ -x /usr/bin/python3 ]] && PY=/usr/bin/python3
HELPER="$PY -I -S $T_LIBDIR/zc_helper.py"
ALL_MODES=(auto-buf-reg register user-copy copy)
if ((T_COMPAT)); then
    ZSZ=$((16 << 20))   # loop and mirror size; each stripe file is ZSZ/4
else
    ZSZ=$((32 << 20))
fi
BOUND=30                # seconds a kill / stop may take to settle

for bin in "$B/c-mirror" "$B/c-stripe" "$LEASE_CHECK"; do
    [[ -x $bin ]] || { fail build "$bin missing: run make build"; exit 1; }
done

# --- which modes the kernel has ----------------------------------------------------

FEATS=$(run_with_timeout 30 "$UBLK" features 2>&1)
if [[ $(head -n1 <<<"$FEATS") != 0x* ]]; then
    fail features "\`ublk features\` printed: $(head -c 300 <<<"$FEATS")"
    exit 1
fi
log "kernel $(uname -r) ublk features: $(tail -n +2 <<<"$FEATS" | tr '\n' ' ')"
has_feat() { grep -qx "$1" <<<"$FEATS"; }
mode_feature() { # MODE: the UBLK_F_ name it needs (nothing for copy)
    case $1 in
        auto-buf-reg) echo AUTO_BUF_REG ;;
        register) echo ZERO_COPY ;;
        user-copy) echo USER_COPY ;;
        *) echo "" ;;
    esac
}
is_zc() { [[ $1 == auto-buf-reg || $1 == register ]]; }

MODES=() MISSING=()
for m in "${ALL_MODES[@]}"; do
    f=$(mode_feature "$m")
    if [[ -z $f ]] || has_feat "$f"; then MODES+=("$m"); else MISSING+=("$m"); fi
done
AUTO_WANT=copy
for m in "${ALL_MODES[@]}"; do
    if [[ " ${MODES[*]} " == *" $m "* ]]; then AUTO_WANT=$m; break; fi
done
log "supported modes: ${MODES[*]}; missing: ${MISSING[*]:-none}; auto should pick $AUTO_WANT"
# The test kernels are known: 7.x has every mode, 6.12 user-copy and copy.
case ${UBLK_KERNEL_SERIES:-} in
    7) [[ $AUTO_WANT == auto-buf-reg ]] || fail kernel-7-modes "kernel 7 should have AUTO_BUF_REG; modes: ${MODES[*]}" ;;
    6.12) [[ $AUTO_WANT == user-copy ]] || fail kernel-6.12-modes "kernel 6.12 should have USER_COPY and no ZERO_COPY; modes: ${MODES[*]}" ;;
esac
if [[ -n ${T_ZC_MODES:-} ]]; then   # debugging: only these modes (the others are skips)
    keep=()
    for m in "${MODES[@]}"; do
        if [[ " $T_ZC_MODES " == *" $m "* ]]; then keep+=("$m"); else skip "mode-$m" "left out by T_ZC_MODES=$T_ZC_MODES"; fi
    done
    MODES=("${keep[@]}")
fi
for m in "${MISSING[@]}"; do
    skip "mode-$m" "kernel $(uname -r) lacks ublk feature $(mode_feature "$m"): data mode $m NOT TESTED (loop, mirror, stripe, short reads, lease_check, kill/stop under IO)"
done

# --- helpers -------------------------------------------------------------------------

log_size() { stat -c %s "$SERVER_LOG" 2>/dev/null || echo 0; }

# check_stop_line LABEL MODE LINE: the "device N stopped: mode=..." line of a
# server: the mode, no copies in zero-copy modes, copies in the others, leases.
check_stop_line() {
    local label=$1 mode=$2 line=$3
    if [[ ! $line =~ mode=([a-z-]+)\ .*copied_bytes=([0-9]+)\ lease_ops=([0-9]+) ]]; then
        fail "$label-stop-line" "no stop line with mode/copied_bytes/lease_ops: '$line'"
        return
    fi
    local got=${BASH_REMATCH[1]} copied=${BASH_REMATCH[2]} leases=${BASH_REMATCH[3]}
    local why=
    [[ $got == "$mode" ]] || why="mode=$got, want $mode"
    ((leases > 0)) || why+="${why:+; }lease_ops=0 after IO"
    if is_zc "$mode"; then
        ((copied == 0)) || why+="${why:+; }copied_bytes=$copied in zero-copy mode $mode (want 0)"
    else
        ((copied > 0)) || why+="${why:+; }copied_bytes=0 in $mode mode after IO (want > 0)"
    fi
    if [[ -z $why ]]; then
        pass "$label-stop-line (mode=$got copied_bytes=$copied lease_ops=$leases)"
    else
        fail "$label-stop-line" "$why: '$line'"
    fi
}

# start_c LABEL NAME ARGS...: starts $B/c-NAME in the background; sets CPID,
# ID, DEV, CERR (its stderr file).
start_c() {
    local label=$1 name=$2
    shift 2
    local out=$T_WORK/$label.out
    CERR=$T_WORK/$label.err
    "$B/c-$name" "$@" >"$out" 2>"$CERR" &
    CPID=$!
    bg_track "$CPID"
    if ! wait_until 60 grep -q . "$out" || ! parse_add_line "$(head -n1 "$out")"; then
        show_file "$CERR"
        fail "$label-start" "c-$name $*: no '<id> <path>' line: ${ADD_ERR:-nothing printed}"
        kill -KILL "$CPID" 2>/dev/null
        return 1
    fi
    ID=$DEV_ID DEV=$DEV_PATH
    return 0
}

# stop_c LABEL [MODE]: SIGTERM; the example must exit 0 and its device go;
# with MODE, checks its stop line.
stop_c() {
    local label=$1 mode=${2-}
    kill -TERM "$CPID"
    if ! wait_pid_exit "$CPID" 60; then
        fail "$label-sigterm" "still running 60s after SIGTERM"
        kill -KILL "$CPID" 2>/dev/null
        return 1
    fi
    wait "$CPID"
    local rc=$?
    if ((rc == 0)) && wait_until 10 dev_absent "$ID"; then
        pass "$label-sigterm (exit 0, device $ID removed)"
    else
        show_file "$CERR"
        fail "$label-sigterm" "exit $rc, device $ID $(dev_exists "$ID" && echo still there || echo gone)"
    fi
    [[ -n $mode ]] && check_stop_line "$label" "$mode" "$(grep 'stopped: mode=' "$CERR" | tail -n1)"
    return 0
}

# show_indented FILE: like show_file, indented (its "N passed, N failed" line
# must not look like a result line of the suite).
show_indented() {
    echo "----- $1 -----"
    sed 's/^/    /' "$1" | tail -n 50
    echo "-----"
}

# dump_dev DEV FILE: the whole device, read with O_DIRECT.
dump_dev() { run_with_timeout 120 dd if="$1" of="$2" bs=1M iflag=direct status=none; }

NEG_DONE=0   # negative controls run once

# --- mode selection -------------------------------------------------------------------

# (each supported mode's own `ublk list` column is checked by loop_mode)
truncate -s 8M "$T_WORK/sel.img"
for m in auto default; do
    args=(--zero-copy "$m")
    want=$m
    [[ $m == auto ]] && want=$AUTO_WANT
    [[ $m == default ]] && args=() && want=$AUTO_WANT
    must_add "select-$m-add" loop --file "$T_WORK/sel.img" "${args[@]}" || continue
    got=$(list_row "$DEV_ID" | awk '{ print $7 }')
    if [[ $got == "$want" ]]; then
        pass "select-$m (ublk list MODE: $got)"
    else
        fail "select-$m" "ublk list shows mode '$got', want $want: $(list_row "$DEV_ID")"
    fi
    if ! { dev_del "$DEV_ID" >/dev/null 2>&1 && wait_until 10 dev_absent "$DEV_ID"; }; then
        fail "select-$m-del" "device $DEV_ID not removed"
    fi
done
# -z is --zero-copy; the mem target copies: auto gives copy, zero-copy modes are a usage error
if must_add select-short-option loop --file "$T_WORK/sel.img" -z copy; then
    got=$(list_row "$DEV_ID" | awk '{ print $7 }')
    if [[ $got == copy ]]; then pass "select-short-option (-z copy: $got)"; else fail select-short-option "mode '$got', want copy"; fi
    dev_del "$DEV_ID" >/dev/null 2>&1
fi
if must_add select-mem-auto mem --size 8M --zero-copy auto; then
    got=$(list_row "$DEV_ID" | awk '{ print $7 }')
    if [[ $got == copy ]]; then pass "select-mem-auto (mem target: $got)"; else fail select-mem-auto "mode '$got', want copy"; fi
    dev_del "$DEV_ID" >/dev/null 2>&1
fi
run_with_timeout 30 "$UBLK" add mem --size 8M --zero-copy register >/dev/null 2>"$T_WORK/mem.err"
rc=$?
if ((rc == 2)) && grep -q 'copy' "$T_WORK/mem.err" && [[ -z $(dev_ids) ]]; then
    pass "select-mem-register-refused (exit 2: $(head -n1 "$T_WORK/mem.err" | head -c 120))"
else
    fail select-mem-register-refused "exit $rc, devices: $(dev_ids | tr '\n' ' '): $(head -c 300 "$T_WORK/mem.err")"
fi

# modes the kernel lacks: refused with exit 1 and a message naming mode and feature
for m in "${MISSING[@]}"; do
    f=$(mode_feature "$m")
    run_with_timeout 60 "$UBLK" add loop --file "$T_WORK/sel.img" --zero-copy "$m" >"$T_WORK/un.out" 2>"$T_WORK/un.err"
    rc=$?
    if ((rc == 1)) && grep -q -- "$m" "$T_WORK/un.err" && grep -q "$f" "$T_WORK/un.err" && [[ -z $(dev_ids) ]]; then
        pass "unsupported-$m-refused (exit 1: $(head -n1 "$T_WORK/un.err" | head -c 160))"
    else
        fail "unsupported-$m-refused" "exit $rc, stdout '$(head -c 100 "$T_WORK/un.out")', devices '$(dev_ids | tr '\n' ' ')': $(head -c 300 "$T_WORK/un.err")"
        run_with_timeout 60 "$UBLK" del --all >/dev/null 2>&1
    fi
    run_with_timeout 60 "$B/c-mirror" -f "$T_WORK/sel.img,$T_WORK/sel.img" -z "$m" >"$T_WORK/un.out" 2>"$T_WORK/un.err"
    rc=$?
    if ((rc == 1)) && grep -q "$f" "$T_WORK/un.err" && [[ -z $(dev_ids) ]]; then
        pass "unsupported-$m-refused-c (c-mirror exit 1: $(head -n1 "$T_WORK/un.err" | head -c 160))"
    else
        fail "unsupported-$m-refused-c" "c-mirror -z $m: exit $rc, devices '$(dev_ids | tr '\n' ' ')': $(head -c 300 "$T_WORK/un.err")"
        run_with_timeout 60 "$UBLK" del --all >/dev/null 2>&1
    fi
done
((${#MISSING[@]})) || log "every mode is supported here: the refusal of a missing mode is checked on 6.12 (--compat)"
rm -f "$T_WORK/sel.img"

# --- per mode -----------------------------------------------------------------------------

# loop_mode MODE: fio verify on loop, device == file, list column, stop line.
loop_mode() {
    local m=$1 f=$T_WORK/loop-$1.img
    truncate -s "$ZSZ" "$f"
    local mark
    mark=$(log_size)
    must_add "loop-$m-add" loop --queues "$Q2" --file "$f" --zero-copy "$m" || return
    local id=$DEV_ID dev=$DEV_PATH pid
    pid=$(server_pid "$id")
    local got
    got=$(list_row "$id" | awk '{ print $7 }')
    if [[ $got == "$m" ]]; then
        pass "loop-$m-list-mode (ublk list MODE: $got)"
    else
        fail "loop-$m-list-mode" "ublk list shows '$got', want $m: $(list_row "$id")"
    fi
    T_FIO_SIZE=$ZSZ fio_verify "loop-$m" "$dev" --bsrange=4k-1M
    if cmp <(dd if="$dev" bs=1M iflag=direct status=none) "$f" >/dev/null 2>"$T_WORK/cmp.err"; then
        pass "loop-$m-device-equals-file"
    else
        fail "loop-$m-device-equals-file" "device $dev and $f differ: $(head -c 300 "$T_WORK/cmp.err")"
    fi
    if dev_del "$id" >/dev/null 2>&1 && wait_pid_exit "$pid" 30 && wait_until 10 dev_absent "$id"; then
        check_stop_line "loop-$m" "$m" "$(tail -c +$((mark + 1)) "$SERVER_LOG" | grep "device $id stopped:" | tail -n1)"
    else
        fail "loop-$m-del" "device $id not removed or server $pid still alive"
    fi
    rm -f "$f"
}

# mirror_mode MODE HOW: c-mirror: fio verify; the device (dumped) equals both
# legs; then fio writes at QD 64 fan out to both legs and the mirror is
# stopped under them (HOW: `ublk del` or SIGTERM): bounded, exit 0, device
# gone, fio sees errors, stop line; the legs are byte-identical afterwards.
mirror_mode() {
    local m=$1 how=$2 l0=$T_WORK/m0.img l1=$T_WORK/m1.img
    local label=mirror-$m
    rm -f "$l0" "$l1"
    truncate -s "$ZSZ" "$l0" "$l1"
    start_c "$label" mirror -f "$l0,$l1" -z "$m" -q "$Q2" || return
    local id=$ID dev=$DEV pid=$CPID
    T_FIO_SIZE=$ZSZ fio_verify "$label" "$dev" --bsrange=4k-1M
    dump_dev "$dev" "$T_WORK/mdump" || fail "$label-dump" "reading $dev failed"
    if cmp "$l0" "$T_WORK/mdump" >"$T_WORK/cmp.err" 2>&1 && cmp "$l1" "$T_WORK/mdump" >>"$T_WORK/cmp.err" 2>&1; then
        pass "$label-legs-equal-device"
    else
        fail "$label-legs-equal-device" "$(head -c 300 "$T_WORK/cmp.err")"
    fi
    rm -f "$T_WORK/mdump"

    # stop while writes fan out. Two jobs on disjoint halves and no two
    # writes in flight overlap: else the legs could legitimately differ
    # (overlapping writes land in any order on each leg).
    local fout=$T_WORK/stop-fio.out
    fio --name="stop-$m" --filename="$dev" --rw=randwrite --bsrange=4k-512k --direct=1 --ioengine=io_uring \
        --iodepth=64 --numjobs=2 --size=$((ZSZ / 2)) --offset_increment=$((ZSZ / 2)) --serialize_overlap=1 \
        --time_based --runtime=300 >"$fout" 2>&1 &
    local fpid=$!
    bg_track "$fpid"
    local base
    base=$(dev_stat "$dev" | awk '{ print $1 + $3 }')
    if ! wait_until 60 _io_moved "$dev" $((base + 200)); then
        show_file "$fout"
        fail "$label-stop-$how-fio-start" "fio did not get IO going"
        kill -KILL "$fpid" 2>/dev/null
        kill -TERM "$pid"
        return
    fi
    sleep 1
    local t0=$SECONDS rc=0 inflight
    inflight=$(awk '{ print $9 }' "/sys/block/${dev##*/}/stat")
    log "$label: $how under fio writes ($inflight requests in flight)"
    if [[ $how == del ]]; then
        run_with_timeout $((BOUND + 30)) "$UBLK" del "$id" >"$T_WORK/del.out" 2>&1
        rc=$?
    else
        kill -TERM "$pid"
    fi
    if wait_pid_exit "$pid" "$BOUND" && ((rc == 0)); then
        wait "$pid"
        local prc=$?
        if ((prc == 0)) && wait_until 10 dev_absent "$id"; then
            pass "$label-stop-$how-under-writes (server exit 0, device gone in $((SECONDS - t0))s)"
        else
            show_file "$CERR"
            fail "$label-stop-$how-under-writes" "server exit $prc, device $id $(dev_exists "$id" && echo still there || echo gone)"
        fi
    else
        show_file "$T_WORK/del.out"
        fail "$label-stop-$how-under-writes" "stop rc $rc, server $pid $(pid_alive "$pid" && echo "still alive after ${BOUND}s" || echo exited)"
        kill -KILL "$pid" 2>/dev/null
    fi
    if wait_pid_exit "$fpid" "$BOUND"; then
        wait "$fpid"
        fio_errored "$fout" $? || { show_file "$fout"; fail "$label-stop-$how-fio" "fio exited 0 with no error"; }
    else
        fail "$label-stop-$how-fio" "fio still runs ${BOUND}s after the stop"
        kill -KILL "$fpid" 2>/dev/null
    fi
    check_stop_line "$label" "$m" "$(grep 'stopped: mode=' "$CERR" | tail -n1)"
    if cmp "$l0" "$l1" >"$T_WORK/cmp.err" 2>&1; then
        pass "$label-legs-identical-after-stop"
    else
        fail "$label-legs-identical-after-stop" "$(head -c 300 "$T_WORK/cmp.err")"
    fi
    rm -f "$l0" "$l1"
}

# stripe_mode MODE CHUNK: fio verify on c-stripe over 3 files, dump, SIGTERM, de-stripe check.
stripe_mode() {
    local m=$1 chunk=$2 files=() i
    for i in 0 1 2; do
        files+=("$T_WORK/s$i.img")
        rm -f "$T_WORK/s$i.img"
        truncate -s $((ZSZ / 4)) "$T_WORK/s$i.img"
    done
    local list
    list=$(IFS=,; echo "${files[*]}")
    local label=stripe-$m-$((chunk >> 10))k
    start_c "$label" stripe -f "$list" -c "$chunk" -z "$m" -q "$Q2" || return
    local size
    size=$(($(cat "/sys/block/${DEV##*/}/size") * 512))
    if ((size != 3 * ZSZ / 4)); then
        fail "$label-size" "device size $size, want $((3 * ZSZ / 4)) (3 files of $((ZSZ / 4)))"
    fi
    T_FIO_SIZE=$size fio_verify "$label" "$DEV" --bsrange=4k-1M
    dump_dev "$DEV" "$T_WORK/sdump" || fail "$label-dump" "reading $DEV failed"
    stop_c "$label" "$m"
    # with the negative control (once): files 0 and 1 swapped must fail the check
    local ctl=
    ((NEG_DONE)) || ctl=control
    if $HELPER destripe "$T_WORK/sdump" "$chunk" "$list" $ctl >"$T_WORK/destripe.out" 2>&1; then
        pass "$label-layout (each file is its de-striped share of the device${ctl:+; swapped files fail the check})"
    else
        show_file "$T_WORK/destripe.out"
        fail "$label-layout" "the files do not hold the striped layout (or the control did not fail)"
    fi
    rm -f "${files[@]}" "$T_WORK/sdump"
}

# short_loop MODE: loop at depth 1 over a 1M file, truncated while it runs
# (to 512K, then to 256K+1000: an end that is not 4K-aligned); each read
# right after one that filled the tag's buffer with non-zero data.
short_loop() {
    local m=$1 f=$T_WORK/short.img
    rm -f "$f"
    head -c 1M /dev/urandom | tr '\0' '\1' >"$f"   # no zero byte anywhere
    cp "$f" "$T_WORK/short.orig"
    must_add "short-loop-$m-add" loop --file "$f" --depth 1 --queues 1 --zero-copy "$m" || return
    local id=$DEV_ID dev=$DEV_PATH
    local K=1024
    local items=(0:$((64 * K)) "trunc:$f:$((512 * K))"
        0:$((64 * K)) $((768 * K)):$((64 * K)) 0:$((256 * K)) $((480 * K)):$((64 * K))
        $((64 * K)):$((128 * K)) $((512 * K)):$((512 * K)) $((128 * K)):4096 $((1020 * K)):4096
        "trunc:$f:$((256 * K + 1000))"
        0:$((256 * K)) $((252 * K)):8192 $((256 * K)):4096 $((320 * K)):$((64 * K)) 0:8192 $((255 * K)):4096)
    # negative control: past the end the device is not the untruncated file
    ((NEG_DONE)) || items+=("control:$((768 * K)):$((64 * K)):loop:$T_WORK/short.orig")
    if $HELPER reads "$dev" "loop:$f" "${items[@]}" >"$T_WORK/short.out" 2>&1; then
        pass "short-loop-$m (zeroes past the end, data then zeroes across it; truncated to 512K, then 256K+1000)"
    else
        show_file "$T_WORK/short.out" 40
        fail "short-loop-$m" "reads past the new end of the backing file did not give zeroes"
    fi
    if ! { dev_del "$id" >/dev/null 2>&1 && wait_until 10 dev_absent "$id"; }; then
        fail "short-loop-$m-del" "device $id not removed"
    fi
    rm -f "$f" "$T_WORK/short.orig"
}

# short_stripe MODE: c-stripe (depth 1, 64K chunks) over 3 files of 256K; file 1
# truncated to 128K, file 2 to 160K+512 while it runs.
short_stripe() {
    local m=$1 i files=()
    for i in 0 1 2; do
        files+=("$T_WORK/ss$i.img")
        head -c 256K /dev/urandom | tr '\0' '\1' >"$T_WORK/ss$i.img"
    done
    local list
    list=$(IFS=,; echo "${files[*]}")
    start_c "short-stripe-$m" stripe -f "$list" -c 64K -d 1 -q 1 -z "$m" || return
    # device chunk k: file k%3 at (k/3)*64K; after the truncation chunks 7, 10
    # (file 1) are past its end, chunk 8 is partly in file 2, chunk 11 past it
    local C=65536
    local items=(0:$((3 * C)) "trunc:${files[1]}:$((2 * C))" "trunc:${files[2]}:$((160 * 1024 + 512))"
        $((6 * C)):$((3 * C)) $((3 * C)):$((3 * C)) $((9 * C)):$((3 * C)) $((7 * C)):"$C" $((8 * C)):"$C" $((6 * C + 4096)):$((2 * C)))
    if $HELPER reads "$DEV" "stripe:$C:$list" "${items[@]}" >"$T_WORK/short.out" 2>&1; then
        pass "short-stripe-$m (pieces past a file's end read as zeroes within one request)"
    else
        show_file "$T_WORK/short.out"
        fail "short-stripe-$m" "reads over truncated stripe files are wrong"
    fi
    stop_c "short-stripe-$m"
    rm -f "${files[@]}"
}

# lease_check_mode MODE: the Rust lease rules.
lease_check_mode() {
    local m=$1 out=$T_WORK/lease_check.out
    if run_with_timeout 60 "$LEASE_CHECK" "$m" >"$out" 2>&1; then
        pass "lease-check-$m ($(grep -E '^[0-9]+ passed' "$out" | tail -n1))"
    else
        show_indented "$out"
        fail "lease-check-$m" "lease_check $m failed: $(grep -E '^FAIL' "$out" | head -n3 | tr '\n' ' ')"
    fi
    if ((!NEG_DONE)); then
        run_with_timeout 60 "$LEASE_CHECK" "$m" --control >"$out" 2>&1
        local rc=$?
        if ((rc == 1)) && grep -Eq '^[0-9]+ passed, 1 failed$' "$out"; then
            pass "lease-check-negative-control (--control: exit 1, $(grep -m1 '^FAIL' "$out" | head -c 100))"
        else
            show_indented "$out"
            fail "lease-check-negative-control" "--control must fail exactly one check (exit $rc)"
        fi
    fi
}

# kill_mode MODE: SIGKILL c-mirror under fio QD 64 writes and the python writer.
kill_mode() {
    local m=$1 l0=$T_WORK/k0.img l1=$T_WORK/k1.img
    rm -f "$l0" "$l1"
    truncate -s "$ZSZ" "$l0" "$l1"
    start_c "kill-$m" mirror -f "$l0,$l1" -z "$m" -q "$Q2" || return
    local id=$ID dev=$DEV pid=$CPID half=$((ZSZ / 2))
    disown "$pid"   # no "Killed" line from bash when it dies (still killed on exit if alive)
    local fout=$T_WORK/kill-fio.out state=$T_WORK/kill.json ready=$T_WORK/kill.ready
    rm -f "$state" "$ready"
    fio --name="kill-$m" --filename="$dev" --rw=randwrite --bsrange=4k-256k --direct=1 --ioengine=io_uring \
        --iodepth=64 --offset=0 --size="$half" --time_based --runtime=300 >"$fout" 2>&1 &
    local fpid=$!
    bg_track "$fpid"
    $HELPER writer "$dev" "$half" $((half / 4096)) 8 "$state" "$ready" >"$T_WORK/writer.out" 2>&1 &
    local wpid=$!
    bg_track "$wpid"
    if ! wait_until 60 test -e "$ready"; then
        show_file "$T_WORK/writer.out"
        fail "kill-$m-writer-start" "the writer did not get 200 writes done in 60 s"
        kill -KILL "$pid" "$wpid" "$fpid" 2>/dev/null
        return
    fi
    sleep 1
    local inflight
    inflight=$(awk '{ print $9 }' "/sys/block/${dev##*/}/stat")
    log "kill-$m: SIGKILL to c-mirror $pid (device $id, $inflight requests in flight)"
    kill -KILL "$pid"
    local t0=$SECONDS
    if wait_pid_exit "$fpid" "$BOUND" && wait_pid_exit "$wpid" "$BOUND"; then
        wait "$fpid"
        local frc=$?
        if fio_errored "$fout" "$frc"; then
            pass "kill-$m-io-ends (fio and the writer ended in $((SECONDS - t0))s with errors)"
        else
            show_file "$fout"
            fail "kill-$m-io-ends" "fio exited 0 with no error although its server was killed"
        fi
    else
        fail "kill-$m-io-ends" "fio or the writer still runs ${BOUND}s after SIGKILL (hung IO?)"
        head -n 10 "/proc/$fpid/stack" 2>/dev/null
        kill -KILL "$fpid" "$wpid" 2>/dev/null
    fi
    wait_pid_exit "$pid" 10
    t0=$SECONDS
    if dev_exists "$id"; then
        if run_with_timeout $((BOUND + 30)) "$UBLK" del "$id" >"$T_WORK/del.out" 2>&1 && ((SECONDS - t0 <= BOUND)) \
            && wait_until 10 dev_absent "$id"; then
            pass "kill-$m-del-dead-device ($((SECONDS - t0))s)"
        else
            show_file "$T_WORK/del.out"
            fail "kill-$m-del-dead-device" "ublk del $id failed or took $((SECONDS - t0))s"
        fi
    else
        pass "kill-$m-del-dead-device (the kernel removed it)"
    fi
    local ctl=
    ((NEG_DONE)) || ctl=control   # negative control: a lost write must be flagged
    if [[ ! -s $state ]]; then
        show_file "$T_WORK/writer.out"
        fail "kill-$m-writes-kept" "the writer left no record"
    elif $HELPER check-writes "$state" "$half" "$l0" "$l1" $ctl >"$T_WORK/check.out" 2>&1; then
        pass "kill-$m-writes-kept ($(tail -n1 "$T_WORK/writer.out" | cut -d';' -f1); every successful write is in both legs${ctl:+; a lost write is detected})"
    else
        show_file "$T_WORK/writer.out"
        show_file "$T_WORK/check.out"
        fail "kill-$m-writes-kept" "a write reported successful is missing from a leg (or the control did not fail)"
    fi
    rm -f "$l0" "$l1"
}

# step FUNC ARGS...: runs one scenario, logs how long it took.
step() {
    local t0=$SECONDS
    "$@"
    log "step $* took $((SECONDS - t0))s"
}

i=0
for m in "${MODES[@]}"; do
    t0=$SECONDS
    log "===== mode $m"
    step lease_check_mode "$m"
    step loop_mode "$m"
    step short_loop "$m"
    step short_stripe "$m"
    # alternating by mode: the mirror stopped by `ublk del` or SIGTERM, the
    # stripe chunk 64K or 4K (IOs of 4k..1M span up to 256 chunks)
    if ((i % 2 == 0)); then step mirror_mode "$m" del; else step mirror_mode "$m" sigterm; fi
    if ((i % 2 == 0)); then step stripe_mode "$m" $((64 << 10)); else step stripe_mode "$m" 4096; fi
    step kill_mode "$m"
    NEG_DONE=1
    i=$((i + 1))
    log "===== mode $m done in $((SECONDS - t0))s"
done
# shellcheck disable=SC2034
ZC_END=1
