# tests/device/lib.sh: helpers for the real-kernel device tests.
#
# Sourced by every tests/device/t_*.sh.  The scripts run as root on a kernel
# with ublk_drv (normally inside the VM of tests/vm/run):
#
#     tests/vm/run tests/device/run-all          # every scenario
#     tests/vm/run tests/device/t_discard.sh     # one scenario
#
# Results: `pass NAME`, `fail NAME REASON`, `skip NAME REASON` print one line
# each (PASS:/FAIL:/SKIP:) and, when run-all set T_RESULTS, append it there.
# A script's exit status is 0 only if nothing failed.  On exit (normal, error
# or signal) the cleanup kills what the script started in the background,
# unmounts what it mounted, deletes every ublk device, detaches kernel loop
# devices it made and removes its scratch directory.
#
# Environment:
#   UBLK_BIN             the CLI (default target/release/ublk)
#   UBLK_THREADPOOL_BIN  the example server (default target/release/examples/threadpool)
#   T_RESULTS            file the result lines are appended to (set by run-all)
#   T_COMPAT=1           reduced variant for older kernels (set by run-all --compat)
#   T_FIO_SIZE           bytes of the device fio's verify runs cover (default 128M)

set -uo pipefail

T_LIBDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
T_REPO=$(cd "$T_LIBDIR/../.." && pwd)
UBLK=${UBLK_BIN:-$T_REPO/target/release/ublk}
THREADPOOL=${UBLK_THREADPOOL_BIN:-$T_REPO/target/release/examples/threadpool}
T_NAME=$(basename "$0" .sh)
T_RESULTS=${T_RESULTS:-}
T_COMPAT=${T_COMPAT:-0}
T_FIO_SIZE=${T_FIO_SIZE:-128M}
SERVER_LOG=/run/ublk/server.log
# The kernel caps a device's queues at the CPU count: what `--queues 2` gives.
Q2=$(($(nproc) >= 2 ? 2 : 1))

T_PASS=0
T_FAIL=0
T_SKIP=0
T_START=$SECONDS
T_BG_PIDS=()     # background processes to kill on exit
T_MOUNTS=()      # mount points to unmount on exit (last first)
T_LOOPDEVS=()    # kernel loop devices to detach on exit
T_LOG_OFF=0      # bytes of $SERVER_LOG already shown / present at start
T_CLEANED=0

# Scratch space on tmpfs (/dev/shm); every script gets its own directory.
T_WORK=$(mktemp -d /dev/shm/ublk-t.XXXXXX) || { echo "FAIL: $T_NAME: mktemp failed"; exit 1; }

log() { printf '[%s +%ds] %s\n' "$T_NAME" $((SECONDS - T_START)) "$*"; }

_record() { # KIND NAME [REASON]
    [[ -n $T_RESULTS ]] && printf '%s\t%s\t%s\n' "$1" "$T_NAME: $2" "${3-}" >>"$T_RESULTS"
    return 0
}

pass() {
    T_PASS=$((T_PASS + 1))
    echo "PASS: $T_NAME: $1"
    _record PASS "$1"
}

fail() {
    T_FAIL=$((T_FAIL + 1))
    echo "FAIL: $T_NAME: $1: ${2:-failed}"
    _record FAIL "$1" "${2:-failed}"
    dump_server_log
}

skip() {
    T_SKIP=$((T_SKIP + 1))
    echo "SKIP: $T_NAME: $1: ${2:-skipped}"
    echo "      ^^^^ SKIPPED, NOT PASSED ^^^^"
    _record SKIP "$1" "${2:-skipped}"
}

# check NAME CMD...: pass if CMD succeeds, else fail with its status.
check() {
    local name=$1
    shift
    "$@"
    local rc=$?
    if ((rc == 0)); then pass "$name"; else fail "$name" "\`$*\` exited $rc"; fi
    return $rc
}

# run_with_timeout SECS CMD...: CMD's status, 124 if it ran over (then it is
# sent SIGTERM, and SIGKILL 10 s later).
run_with_timeout() {
    local secs=$1
    shift
    timeout -k 10 "$secs" "$@"
}

# Shows what background servers wrote to $SERVER_LOG since the last call
# (or since the script started).
dump_server_log() {
    [[ -f $SERVER_LOG ]] || return 0
    local size
    size=$(stat -c %s "$SERVER_LOG" 2>/dev/null) || return 0
    ((size > T_LOG_OFF)) || return 0
    echo "----- $SERVER_LOG (new lines) -----"
    tail -c +$((T_LOG_OFF + 1)) "$SERVER_LOG" | tail -n 40
    echo "-----"
    T_LOG_OFF=$size
}

# Shows a file (foreground server stderr, fio output) with a header.
show_file() { # FILE [LINES]
    [[ -s $1 ]] || return 0
    echo "----- $1 -----"
    tail -n "${2:-30}" "$1"
    echo "-----"
}

if [[ -f $SERVER_LOG ]]; then T_LOG_OFF=$(stat -c %s "$SERVER_LOG" 2>/dev/null || echo 0); fi

# --- processes -----------------------------------------------------------------

# pid_alive PID: the process exists and is not a zombie.
pid_alive() {
    local st
    [[ -n ${1-} ]] || return 1
    st=$(awk '{ s = $0; sub(/^.*\) /, "", s); split(s, f, " "); print f[1] }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# wait_until SECS CMD...: polls CMD every 0.2 s; 0 once it succeeds, 1 after SECS.
wait_until() {
    local secs=$1
    shift
    local end=$((SECONDS + secs))
    while ! "$@"; do
        ((SECONDS >= end)) && return 1
        sleep 0.2
    done
    return 0
}

pid_gone() { ! pid_alive "$1"; }

# wait_pid_exit PID SECS: 0 once PID has exited.
wait_pid_exit() { wait_until "$2" pid_gone "$1"; }

# sig_blocked_all PID: SIGINT and SIGTERM are blocked in every thread of PID.
# Prints the threads that do not block them.
sig_blocked_all() {
    local t m bad=()
    for t in /proc/$1/task/*; do
        m=$(awk '/^SigBlk:/ { print $2 }' "$t/status" 2>/dev/null) || continue
        [[ -n $m ]] || continue
        (((16#$m & 0x4002) == 0x4002)) || bad+=("${t##*/}($(cat "$t/comm" 2>/dev/null))")
    done
    ((${#bad[@]} == 0)) && return 0
    echo "${bad[*]}"
    return 1
}

# sig_ready PID: a SIGINT/SIGTERM sent to PID now cannot kill it by the
# default action: it has handlers for both (serve_until_signal installs them
# while serving), or every thread blocks both (they stay pending until then).
# Prints why not.
sig_ready() {
    local cgt why
    cgt=$(awk '/^SigCgt:/ { print $2 }' "/proc/$1/status" 2>/dev/null)
    [[ -n $cgt ]] || { echo "no such process"; return 1; }
    (((16#$cgt & 0x4002) == 0x4002)) && return 0
    why=$(sig_blocked_all "$1") && return 0
    echo "no SIGINT/SIGTERM handler (SigCgt=$cgt) and these threads do not block them: $why"
    return 1
}

# sig_handlers PID: the process has handlers for SIGINT and SIGTERM.
sig_handlers() {
    local cgt
    cgt=$(awk '/^SigCgt:/ { print $2 }' "/proc/$1/status" 2>/dev/null)
    [[ -n $cgt ]] && (((16#$cgt & 0x4002) == 0x4002))
}

# bg_track PID: kill PID on exit if it is still running.
bg_track() { T_BG_PIDS+=("$1"); }

kill_bg() {
    local p
    for p in "${T_BG_PIDS[@]}"; do pid_alive "$p" && kill -TERM "$p" 2>/dev/null; done
    for p in "${T_BG_PIDS[@]}"; do wait_pid_exit "$p" 5 || kill -KILL "$p" 2>/dev/null; done
    T_BG_PIDS=()
}

# --- ublk devices ----------------------------------------------------------------

# Ids of the ublk devices that exist now.
dev_ids() {
    local d
    for d in /sys/class/ublk-char/ublkc*; do
        [[ -e $d ]] && echo "${d##*/ublkc}"
    done
    return 0
}

dev_exists() { [[ -e /sys/class/ublk-char/ublkc$1 ]]; }
dev_absent() { ! dev_exists "$1" && [[ ! -e /sys/block/ublkb$1 ]]; }

# parse_add_line TEXT: checks that TEXT is exactly one line `<id> /dev/ublkb<id>`;
# sets DEV_ID and DEV_PATH, or ADD_ERR and returns 1.
parse_add_line() {
    local text=$1
    DEV_ID= DEV_PATH= ADD_ERR=
    if [[ -z $text || $(printf '%s\n' "$text" | wc -l) -ne 1 ]]; then
        ADD_ERR="expected exactly one line, got: $(printf '%q' "$text")"
        return 1
    fi
    if [[ ! $text =~ ^([0-9]+)\ (/dev/ublkb([0-9]+))$ ]]; then
        ADD_ERR="expected \`<id> /dev/ublkb<id>\`, got: $(printf '%q' "$text")"
        return 1
    fi
    if [[ ${BASH_REMATCH[1]} != "${BASH_REMATCH[3]}" ]]; then
        ADD_ERR="id ${BASH_REMATCH[1]} does not match path ${BASH_REMATCH[2]}"
        return 1
    fi
    DEV_ID=${BASH_REMATCH[1]}
    DEV_PATH=${BASH_REMATCH[2]}
}

# dev_add ARGS...: `ublk add ARGS` (bounded); on success sets DEV_ID, DEV_PATH
# and checks the node is a block device; else sets ADD_ERR and returns 1.
dev_add() {
    local out err=$T_WORK/add.err rc
    out=$(run_with_timeout 90 "$UBLK" add "$@" 2>"$err")
    rc=$?
    if ((rc != 0)); then
        DEV_ID= DEV_PATH=
        ADD_ERR="\`ublk add $*\` exited $rc: $(head -c 600 "$err")"
        return 1
    fi
    parse_add_line "$out" || return 1
    if [[ ! -b $DEV_PATH ]]; then
        ADD_ERR="ublk add printed $DEV_PATH but it is not a block device"
        return 1
    fi
    return 0
}

# must_add NAME ARGS...: dev_add, recording a failure under NAME if it fails.
must_add() {
    local name=$1
    shift
    dev_add "$@" && return 0
    fail "$name" "$ADD_ERR"
    return 1
}

# dev_del ID: `ublk del ID`, bounded.
dev_del() { run_with_timeout 60 "$UBLK" del "$1"; }

# list_row ID: the `ublk list` line of device ID (nothing if absent).
list_row() { run_with_timeout 30 "$UBLK" list | awk -v id="$1" 'NR > 1 && $1 == id'; }

# server_pid ID: the PID column of device ID in `ublk list`.
server_pid() { list_row "$1" | awk '{ print $9 }'; }

# dev_stat DEV: "read_ios read_sectors write_ios write_sectors discard_ios
# flush_ios" of a /dev/ublkbN from sysfs.
dev_stat() {
    local n=${1##*/}
    awk '{ print $1, $3, $5, $7, ($12 == "" ? 0 : $12), ($16 == "" ? 0 : $16) }' "/sys/block/$n/stat"
}

# --- mounts, loop devices, scratch filesystems -----------------------------------

mount_track() { T_MOUNTS+=("$1"); }

umount_all() {
    local i m
    for ((i = ${#T_MOUNTS[@]} - 1; i >= 0; i--)); do
        m=${T_MOUNTS[i]}
        if mountpoint -q "$m" 2>/dev/null; then
            run_with_timeout 30 umount "$m" 2>/dev/null || run_with_timeout 30 umount -l "$m" 2>/dev/null
        fi
    done
    T_MOUNTS=()
}

# ext4_scratch SIZE_MB: makes an ext4 image on tmpfs, mounts it through the
# kernel loop driver and sets EXT4_DIR to the mount point.  A file there is a
# file on a real disk file system (O_DIRECT, FALLOC_FL_ZERO_RANGE and
# FALLOC_FL_PUNCH_HOLE all supported), unlike tmpfs.
ext4_scratch() {
    local img=$T_WORK/scratch-ext4.img
    EXT4_DIR=$T_WORK/scratch-ext4
    modprobe loop 2>/dev/null
    modprobe ext4 2>/dev/null
    mkdir -p "$EXT4_DIR" || return 1
    truncate -s "${1}M" "$img" || return 1
    mkfs.ext4 -q -F -b 4096 "$img" || { echo "mkfs.ext4 of the scratch image failed"; return 1; }
    local ld
    ld=$(losetup -f --show "$img") || { echo "losetup failed"; return 1; }
    T_LOOPDEVS+=("$ld")
    mount -t ext4 "$ld" "$EXT4_DIR" || { echo "mount of the scratch ext4 failed"; return 1; }
    mount_track "$EXT4_DIR"
}

# --- fio ---------------------------------------------------------------------------

# to_bytes 128M: 134217728 (K/M/G suffixes, powers of 1024).
to_bytes() {
    local v=$1
    case $v in
        *K) echo $((${v%K} << 10)) ;;
        *M) echo $((${v%M} << 20)) ;;
        *G) echo $((${v%G} << 30)) ;;
        *) echo "$v" ;;
    esac
}

# fio_job_args: two jobs, each on its own half of the first $T_FIO_SIZE bytes
# and (with 2+ CPUs) pinned to its own CPU, so that IO is submitted from
# several CPUs and reaches several of the device's queues.
fio_job_args() {
    local half=$(($(to_bytes "$T_FIO_SIZE") / 2))
    echo "--numjobs=2 --size=$half --offset_increment=$half"
    (($(nproc) >= 2)) && echo "--cpus_allowed=0-$(($(nproc) - 1)) --cpus_allowed_policy=split"
}

# fio_verify LABEL DEV [FIO ARGS...]: randrw with crc32c verify over the first
# $T_FIO_SIZE bytes of DEV (direct IO, io_uring, depth 32, block sizes 4k..1M,
# two jobs as in fio_job_args; extra args override).  Passes only if fio exits 0, reports no
# error and the device's sysfs counters show the data went through it (reads
# and writes; only reads with FIO_EXPECT=r).
fio_verify() {
    local label=$1 dev=$2
    shift 2
    local out=$T_WORK/fio-$label.out rc before after
    before=$(dev_stat "$dev")
    log "fio $label on $dev: $*"
    # shellcheck disable=SC2046
    run_with_timeout "${FIO_TIMEOUT:-240}" fio --name="$label" --filename="$dev" \
        --rw=randrw --bsrange=4k-1M --direct=1 --ioengine=io_uring --iodepth=32 \
        $(fio_job_args) --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --verify_state_save=0 --group_reporting "$@" >"$out" 2>&1
    rc=$?
    after=$(dev_stat "$dev")
    if ((rc != 0)); then
        show_file "$out" 40
        fail "fio-$label" "fio exited $rc$( ((rc == 124)) && echo ' (timed out)')"
        return 1
    fi
    if grep -Eq 'err= *[1-9]|verify: bad|crc32c: verify failed|bad magic|io_u error' "$out"; then
        show_file "$out" 40
        fail "fio-$label" "fio reported errors"
        return 1
    fi
    # the device saw reads and writes (the verify phase alone reads what was written)
    local b a
    read -r -a b <<<"$before"
    read -r -a a <<<"$after"
    local wmin=2048
    [[ ${FIO_EXPECT:-rw} == r ]] && wmin=0
    if ((a[1] - b[1] < 2048 || a[3] - b[3] < wmin)); then
        show_file "$out" 40
        fail "fio-$label" "device counters barely moved (before: $before, after: $after)"
        return 1
    fi
    # with FIO_EXPECT_FLUSH=1 (fio --fsync=N), FLUSH requests reached the device
    if [[ ${FIO_EXPECT_FLUSH:-0} == 1 ]] && ((a[5] <= b[5])); then
        show_file "$out" 40
        fail "fio-$label" "no FLUSH reached the device (flush counter ${b[5]} -> ${a[5]})"
        return 1
    fi
    log "fio $label: $(grep -E '^ +(READ|WRITE):' "$out" | sed -E 's/ +/ /g; s/\(.*\)//' | tr '\n' ';')"
    pass "fio-$label"
}

# fio_verify_must_fail LABEL DEV [FIO ARGS...]: a negative control: the same
# verify run must FAIL with a verify error (e.g. on a device that does not
# keep data), proving the checks can fail at all.
fio_verify_must_fail() {
    local label=$1 dev=$2
    shift 2
    local out=$T_WORK/fio-$label.out rc
    # shellcheck disable=SC2046
    run_with_timeout "${FIO_TIMEOUT:-240}" fio --name="$label" --filename="$dev" \
        --rw=randrw --bsrange=4k-1M --direct=1 --ioengine=io_uring --iodepth=32 \
        $(fio_job_args) --verify=crc32c --do_verify=1 --verify_fatal=1 \
        --verify_state_save=0 --group_reporting "$@" >"$out" 2>&1
    rc=$?
    local re='verify: bad|bad magic|verify failed|crc32c: wanted'
    if ((rc != 0 && rc != 124)) && grep -Eqi "$re" "$out"; then
        pass "$label (fio detected bad data: $(grep -Eim1 "$re" "$out" | head -c 100))"
    else
        show_file "$out" 20
        fail "$label" "the negative control did not fail as it must (fio rc=$rc)"
    fi
}

# fio_bg LABEL DEV [FIO ARGS...]: starts a long (time-based) randrw fio at QD 64
# on DEV in the background; sets FIO_PID and FIO_OUT.  Returns once the
# device's IO counters move (1 if they do not within 60 s).
fio_bg() {
    local label=$1 dev=$2
    shift 2
    FIO_OUT=$T_WORK/fio-$label.out
    fio --name="$label" --filename="$dev" --rw=randrw --bs=4k --direct=1 --ioengine=io_uring \
        --iodepth=64 --time_based --runtime=600 --size=64M "$@" >"$FIO_OUT" 2>&1 &
    FIO_PID=$!
    bg_track "$FIO_PID"
    local base
    base=$(dev_stat "$dev" | awk '{ print $1 + $3 }')
    wait_until 60 _io_moved "$dev" $((base + 200))
}
_io_moved() { [[ -e /sys/block/${1##*/}/stat ]] && (($(dev_stat "$1" | awk '{ print $1 + $3 }') >= $2)); }

# add_under_io LABEL ADD-ARGS...: adds a device with the CLI, checks that
# `ublk list` names its live server, starts fio_bg on it and lets IO run for
# 2 s. Sets DEV_ID, DEV_PATH, SERVER_PID (and FIO_PID, FIO_OUT); returns 1
# after recording a failure.
add_under_io() {
    local label=$1
    shift
    must_add "$label-add" "$@" || return 1
    SERVER_PID=$(server_pid "$DEV_ID")
    if ! pid_alive "$SERVER_PID" || [[ $(cat "/proc/$SERVER_PID/comm" 2>/dev/null) != ublk ]]; then
        fail "$label-server-pid" "\`ublk list\` PID '$SERVER_PID' is not a live ublk process"
        return 1
    fi
    if ! fio_bg "$label" "$DEV_PATH"; then
        show_file "$FIO_OUT"
        fail "$label-fio-start" "fio did not get IO going on $DEV_PATH"
        return 1
    fi
    sleep 2
}

# fio_wait PID OUT SECS: waits at most SECS for a background fio writing to
# OUT; FIO_RC is its exit status (124 when it still ran: it is killed then).
# Returns 0 when it exited 0 and OUT shows no IO or verify error.
fio_wait() {
    if ! wait_pid_exit "$1" "$3"; then
        kill -KILL "$1" 2>/dev/null
        FIO_RC=124
        return 1
    fi
    wait "$1"
    FIO_RC=$?
    ((FIO_RC == 0)) && ! grep -Eq 'err= *[1-9]|verify: bad|verify failed|bad magic|io_u error' "$2"
}

# fio_errored FILE RC: fio's run ended with an IO error (status or output).
fio_errored() {
    (($2 != 0)) && return 0
    grep -Eq 'err= *[1-9]|io_u error|Input/output error|No such device' "$1"
}

# --- cleanup -------------------------------------------------------------------------

t_cleanup() {
    ((T_CLEANED)) && return 0
    T_CLEANED=1
    kill_bg
    umount_all
    if [[ -n $(dev_ids) ]]; then
        run_with_timeout 60 "$UBLK" del --all >/dev/null 2>&1
        wait_until 10 test -z "$(dev_ids)"
    fi
    local ld
    for ld in "${T_LOOPDEVS[@]}"; do losetup -d "$ld" 2>/dev/null; done
    T_LOOPDEVS=()
    rm -rf "$T_WORK"
}

t_finish() {
    local rc=$?
    trap - EXIT
    # a script that died (a shell error under set -u, a crash) without having
    # recorded a failure must not count as passed
    if ((rc != 0 && T_FAIL == 0)); then
        fail "script" "exited with status $rc without recording a failure (a shell error?)"
    fi
    t_cleanup
    echo "$T_NAME: $T_PASS passed, $T_FAIL failed, $T_SKIP skipped ($((SECONDS - T_START))s)"
    if ((T_FAIL > 0)); then exit 1; fi
    if ((rc != 0 && rc != 1)); then exit "$rc"; fi
    exit 0
}

t_on_signal() {
    echo "$T_NAME: interrupted by signal $1"
    fail "script" "interrupted by SIG$1"
    trap - EXIT
    t_cleanup
    echo "$T_NAME: $T_PASS passed, $T_FAIL failed, $T_SKIP skipped (interrupted)"
    exit 1
}

trap t_finish EXIT
trap 't_on_signal TERM' TERM
trap 't_on_signal INT' INT

# --- preconditions ---------------------------------------------------------------------

t_require() {
    if [[ $(id -u) -ne 0 ]]; then
        fail "preconditions" "must run as root (use tests/vm/run)"
        exit 1
    fi
    if [[ ! -c /dev/ublk-control ]]; then
        fail "preconditions" "/dev/ublk-control is missing (no ublk_drv; use tests/vm/run)"
        exit 1
    fi
    if [[ ! -x $UBLK ]]; then
        fail "preconditions" "$UBLK is missing: run \`cargo build --release && cargo build --release --examples\` first"
        exit 1
    fi
    local c
    for c in "$@"; do
        if ! command -v "$c" >/dev/null 2>&1; then
            fail "preconditions" "required tool \`$c\` is missing"
            exit 1
        fi
    done
}
