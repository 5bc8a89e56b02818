#!/usr/bin/env bash
# The Go bindings (bindings/go) on a real kernel, with the binaries `make go`
# (part of `make build`) built on the host into target/release/go/:
# - ublk.test (go test -c): every Go test, each reported here: read/write on
#   two queues inline and in goroutines, a Handler completing from goroutines,
#   panicking backends (inline, async, Handler, lease callback) fail only their
#   request with EIO, leases (sub-ranges, callbacks, manual completion, EPERM /
#   EINVAL / EXDEV; a request left to its leases counts as completed, so a
#   late Complete cannot reach the tag's next request), Config.Async ignored
#   for a Handler, Close from Config.OnError (queue thread, Async goroutine)
#   never hangs, DISCARD / WRITE_ZEROES, read-only, context cancellation
#   under IO, Stop/Serve/Close, bad configs; Recover after a child server's
#   SIGKILL (a write issued meanwhile waits and completes, the data reads
#   back), Recover of a served device (EBUSY) or one without a policy (EINVAL);
# - ublk-race.test: the device tests again under the race detector (not in
#   the --compat pass: once is enough);
# - the examples: ramdisk ([]byte backend) inline and -async, loop (*os.File
#   backend) and loop -lease (zero-copy leases): fio crc32c verify, the
#   backing file equals the device, mkfs.ext4 + mount + files + fsck on
#   loop -lease, SIGTERM / `ublk del` stop them (exit 0, device removed),
#   their counters (copied_bytes=0 with leases in a zero-copy mode);
# - crash recovery with the loop example: loop -lease -recovery reissue killed
#   with SIGKILL (the device waits QUIESCED, a write issued meanwhile waits),
#   a copy-mode loop -recover refused for a zero-copy device (which stays for
#   another try), loop -recover ID -lease takes it over (the waiting write
#   completes, data written before and during the outage reads back, fio
#   verify), SIGTERM removes it; the same in copy mode (-recovery wait -async,
#   loop -recover ID -async, `ublk del`).
# Without Go >= 1.21 on the host `make go` leaves target/release/go/SKIPPED and
# this script reports a SKIP.
# timeout: 1200
# compat: yes
. "$(dirname "$0")/lib.sh"
t_require fio mkfs.ext4 fsck.ext4
G=$T_REPO/target/release/go

if [[ -f $G/SKIPPED ]]; then
    skip go-build "$(cat "$G/SKIPPED")"
    exit 0
fi
for b in ramdisk loop ublk.test; do
    [[ -x $G/$b ]] || { fail go-build "$G/$b missing: run \`make build\` (or \`make go\`)"; exit 1; }
done
newer=$(find "$T_REPO/bindings/go" \( -name '*.go' -o -name '*.[ch]' -o -name go.mod \) -newer "$G/ramdisk" | head -n 3 | tr '\n' ' ')
if [[ -n $newer ]]; then
    fail go-build "the Go binaries are older than $newer: run \`make go\`"
    exit 1
fi

# run_go_tests LABEL BIN SECS [TEST FLAGS...]: runs a Go test binary, one result per top-level test.
run_go_tests() {
    local label=$1 bin=$2 secs=$3
    shift 3
    local out=$T_WORK/$label.out rc n=0 t0=$SECONDS
    log "$label: $(basename "$bin") $*"
    (cd "$T_WORK" && UBLK_GO_REQUIRE_DEVICE=1 run_with_timeout "$secs" "$bin" -test.v -test.count=1 \
        -test.timeout "$((secs - 15))s" "$@") >"$out" 2>&1
    rc=$?
    while read -r kind name took; do
        n=$((n + 1))
        case $kind in
            PASS) pass "$label $name $took" ;;
            SKIP) skip "$label $name" "$(grep -A1 -- "--- SKIP: $name " "$out" | tail -n1 | sed 's/^ *//')" ;;
            *) fail "$label $name" "go test failed" ;;
        esac
    done < <(sed -nE 's/^--- (PASS|FAIL|SKIP): ([^ ]+) (\(.*\))$/\1 \2 \3/p' "$out")
    if grep -q 'WARNING: DATA RACE' "$out"; then
        fail "$label-races" "the race detector reported $(grep -c 'WARNING: DATA RACE' "$out") data races"
    fi
    if ((rc != 0 || n == 0)) || grep -q '^--- FAIL' "$out"; then
        show_file "$out" 120
        ((rc != 0 && !(T_FAIL > 0))) && fail "$label" "exited $rc$( ((rc == 124)) && echo ' (timed out)')"
        ((n == 0 && rc == 0)) && fail "$label" "ran no test"
    fi
    log "$label: $n tests, exit $rc, $((SECONDS - t0))s"
}

# start_go LABEL BIN TARGET ARGS...: starts the Go example BIN with ARGS in the
# background; `ublk list` must show TARGET and its pid. Sets GPID, ID, DEV.
start_go() {
    local label=$1 bin=$2 target=$3
    shift 3
    "$G/$bin" "$@" >"$T_WORK/$label.out" 2>"$T_WORK/$label.err" &
    GPID=$!
    bg_track "$GPID"
    if ! wait_until 60 grep -q . "$T_WORK/$label.out" || ! parse_add_line "$(head -n1 "$T_WORK/$label.out")"; then
        show_file "$T_WORK/$label.err"
        fail "$label-start" "no '<id> <path>' line: ${ADD_ERR:-nothing printed}"
        return 1
    fi
    ID=$DEV_ID DEV=$DEV_PATH
    local row
    row=$(list_row "$ID")
    if [[ $(awk '{ print $3, $9 }' <<<"$row") == "$target $GPID" ]]; then
        pass "$label-start ($DEV, ublk list: $row)"
    else
        pass "$label-start ($DEV)"
        fail "$label-list" "ublk list row '$row': want target $target and pid $GPID"
    fi
}

# stop_go LABEL term|del: SIGTERM or `ublk del`; the example must exit 0,
# its device must be gone and it must print its stop line (STOP_LINE).
stop_go() {
    local label=$1 how=$2 rc
    STOP_LINE=
    if [[ $how == del ]]; then
        dev_del "$ID" || fail "$label-del" "ublk del $ID failed"
    else
        kill -TERM "$GPID"
    fi
    if ! wait_pid_exit "$GPID" 60; then
        fail "$label-$how" "still running 60s after $how"
        return 1
    fi
    wait "$GPID"
    rc=$?
    STOP_LINE=$(grep -m1 ' stopped: mode=' "$T_WORK/$label.err")
    if ((rc == 0)) && wait_until 10 dev_absent "$ID" && [[ -n $STOP_LINE ]]; then
        pass "$label-$how (exit 0, device $ID removed: ${STOP_LINE#*: })"
    else
        show_file "$T_WORK/$label.err"
        fail "$label-$how" "exit $rc, device $ID $(dev_exists "$ID" && echo still there || echo gone), stop line '$STOP_LINE'"
    fi
}

stat_of() { sed -nE "s/.* $1=([0-9a-z-]+).*/\\1/p" <<<"$STOP_LINE"; }

# 1. the Go tests, then the device tests under the race detector
run_go_tests go-test "$G/ublk.test" 400 -test.skip '^TestNoDriver$'
if ((T_COMPAT)); then
    log "go-race: once, on the main kernel only (not in --compat)"
elif [[ -x $G/ublk-race.test ]]; then
    run_go_tests go-race "$G/ublk-race.test" 500 -test.skip '^(TestNoDriver|TestBadConfig|TestDataModes|TestErrors|TestRecoveryNames|TestRecoverErrors|TestAsyncBinding|TestBadFd|TestRequestAfterClose|TestDevInfoError)$'
else
    skip go-race "no race-detector build ($(head -c 300 "$G/race-build.log" 2>/dev/null))"
fi

# 2. ramdisk: a []byte backend served inline on the queue threads; SIGTERM
if start_go go-ramdisk ramdisk go-ramdisk -size 256M -queues "$Q2"; then
    fio_verify go-ramdisk "$DEV"
    stop_go go-ramdisk term
    [[ $(stat_of mode) == copy && $(stat_of errors) == 0 ]] || fail go-ramdisk-stats "stop line: $STOP_LINE"
fi

# 3. ramdisk -async: each request in its own goroutine; `ublk del` from outside
if start_go go-ramdisk-async ramdisk go-ramdisk -size 256M -queues "$Q2" -async; then
    fio_verify go-ramdisk-async "$DEV"
    stop_go go-ramdisk-async del
fi

# 4. loop over an *os.File (copy mode; FLUSH -> fsync): device == file
truncate -s 512M "$T_WORK/loop.img"
if start_go go-loop loop go-loop -file "$T_WORK/loop.img" -queues "$Q2"; then
    FIO_EXPECT_FLUSH=1 fio_verify go-loop "$DEV" --fsync=64
    if run_with_timeout 60 cmp -n $((64 << 20)) "$DEV" "$T_WORK/loop.img"; then
        pass "go-loop-backing-file (device == file)"
    else
        fail go-loop-backing-file "device and backing file differ"
    fi
    stop_go go-loop term
fi

# 5. loop -lease: zero-copy leases; ext4 on it
rm -f "$T_WORK/loop.img"
truncate -s 512M "$T_WORK/lease.img"
if start_go go-loop-lease loop go-loop-lease -file "$T_WORK/lease.img" -queues "$Q2" -lease; then
    FIO_EXPECT_FLUSH=1 fio_verify go-loop-lease "$DEV" --fsync=64
    if run_with_timeout 60 cmp -n $((64 << 20)) "$DEV" "$T_WORK/lease.img"; then
        pass "go-loop-lease-backing-file (device == file)"
    else
        fail go-loop-lease-backing-file "device and backing file differ"
    fi
    mnt=$T_WORK/mnt
    mkdir -p "$mnt"
    if run_with_timeout 120 mkfs.ext4 -q -F "$DEV" && mount "$DEV" "$mnt"; then
        mount_track "$mnt"
        mkdir -p "$T_WORK/files"
        for i in 1 2 3; do head -c $((i * 3))M /dev/urandom >"$T_WORK/files/f$i"; done
        cp -r "$T_WORK/files" "$mnt/" && sync
        sums=$(cd "$T_WORK/files" && sha256sum f1 f2 f3)
        umount "$mnt" && T_MOUNTS=()
        echo 3 >/proc/sys/vm/drop_caches
        if run_with_timeout 120 fsck.ext4 -n -f "$DEV" >"$T_WORK/fsck.out" 2>&1 && mount "$DEV" "$mnt" \
            && mount_track "$mnt" && [[ $(cd "$mnt/files" && sha256sum f1 f2 f3) == "$sums" ]]; then
            pass "go-loop-lease-ext4 (mkfs, files, umount, fsck -n clean, remount, sha256 equal)"
        else
            show_file "$T_WORK/fsck.out"
            fail go-loop-lease-ext4 "fsck or read-back failed"
        fi
        umount_all
    else
        fail go-loop-lease-ext4 "mkfs/mount failed"
    fi
    stop_go go-loop-lease term
    mode=$(stat_of mode)
    if [[ $mode == auto-buf-reg || $mode == register ]] && [[ $(stat_of copied_bytes) != 0 ]]; then
        fail go-loop-lease-counters "mode $mode copied $(stat_of copied_bytes) bytes"
    elif [[ $(stat_of lease_ops) == 0 || -z $mode ]]; then
        fail go-loop-lease-counters "no lease ops counted: $STOP_LINE"
    else
        pass "go-loop-lease-counters (mode $mode, copied_bytes $(stat_of copied_bytes), lease_ops $(stat_of lease_ops))"
    fi
fi

# 6. crash recovery: loop -lease -recovery reissue, kill -9, loop -recover ID -lease
# list_col ID N: column N of device ID's `ublk list` row (7 MODE, 8 STATE, 9 PID, 10 RECOVERY).
list_col() { list_row "$1" | awk -v n="$2" '{ print $n }'; }
state_is() { [[ $(list_col "$1" 8) == "$2" ]]; }
# pattern N: 1 MiB of random bytes in $T_WORK/pat.N; put DEV MIB N / same DEV
# MIB N: write / compare pattern N at MiB offset MIB of DEV (O_DIRECT).
pattern() { [[ -f $T_WORK/pat.$1 ]] || head -c 1M /dev/urandom >"$T_WORK/pat.$1"; }
put() { pattern "$3" && run_with_timeout 120 dd if="$T_WORK/pat.$3" of="$1" bs=1M seek="$2" oflag=direct conv=fsync status=none; }
same() { cmp -s "$T_WORK/pat.$3" <(run_with_timeout 60 dd if="$1" bs=1M skip="$2" count=1 iflag=direct status=none); }

# kill_go LABEL: SIGKILL the example GPID; its device ID must then wait in
# state QUIESCED with no live server in `ublk list` (PID "-"; Linux 6.12
# keeps the dead server's pid there).
kill_go() {
    local label=$1
    kill -KILL "$GPID"
    if ! wait_pid_exit "$GPID" 30; then
        fail "$label-kill" "pid $GPID still alive 30 s after SIGKILL"
        return 1
    fi
    wait "$GPID" 2>/dev/null
    if wait_until 30 state_is "$ID" QUIESCED && ! pid_alive "$(list_col "$ID" 9 | tr -d -)"; then
        pass "$label-kill (SIGKILL; ublk list: $(list_row "$ID"))"
    else
        fail "$label-kill" "device $ID after its server's SIGKILL: '$(list_row "$ID")', want QUIESCED and no live pid"
        return 1
    fi
}

# recover_go LABEL TARGET ARGS...: start_go of `loop -recover $ID ARGS`; it
# must take over device ID.
recover_go() {
    local label=$1 target=$2 id=$ID
    shift 2
    start_go "$label" loop "$target" -recover "$id" "$@" || return 1
    if [[ $ID != "$id" ]]; then
        fail "$label-id" "loop -recover $id serves device $ID"
        return 1
    fi
}

truncate -s 256M "$T_WORK/rec.img"
if start_go go-rec loop go-loop-lease -file "$T_WORK/rec.img" -queues "$Q2" -lease -recovery reissue; then
    rid=$ID mode=$(list_col "$ID" 7)
    [[ $(list_col "$rid" 10) == reissue ]] && pass go-rec-policy-listed || fail go-rec-policy-listed "ublk list: $(list_row "$rid")"
    put "$DEV" 1 1 || fail go-rec-write "dd to $DEV failed"
    if kill_go go-rec; then
        # reissue: a write issued while no server runs waits for the next one
        put "$DEV" 9 2 &
        wpid=$!
        bg_track "$wpid"
        sleep 2
        pid_alive "$wpid" && pass go-rec-io-waits || fail go-rec-io-waits "a write finished while no server ran"
        # a copy-mode backend cannot serve a zero-copy device: refused, the device stays
        if [[ $mode == copy ]]; then
            skip go-rec-wrong-backend "the device runs in copy mode (the kernel has no zero copy), which both backends serve"
        else
            out=$(run_with_timeout 90 "$G/loop" -recover "$rid" 2>&1)
            rc=$?
            if ((rc == 1)) && grep -q 'copy mode' <<<"$out" && state_is "$rid" QUIESCED && pid_alive "$wpid"; then
                pass "go-rec-wrong-backend (loop -recover without -lease refused for a $mode device, which stays QUIESCED)"
            else
                fail go-rec-wrong-backend "rc=$rc, '$out', ublk list: $(list_row "$rid")"
            fi
        fi
        if recover_go go-rec2 go-loop-lease -lease; then
            if wait_pid_exit "$wpid" 60 && wait "$wpid"; then
                pass go-rec-waiting-write-done
            else
                fail go-rec-waiting-write-done "the write issued while no server ran failed or still waits"
            fi
            if same "$DEV" 1 1 && same "$DEV" 9 2; then
                pass "go-rec-data (written before and during the outage: both read back)"
            else
                fail go-rec-data "data differs after loop -recover"
            fi
            FIO_TIMEOUT=180 T_FIO_SIZE=64M fio_verify go-rec "$DEV"
            stop_go go-rec2 term
        fi
    fi
fi

# 7. the same in copy mode (*os.File backend in goroutines), policy wait, `ublk del`
if start_go go-rec-copy loop go-loop -file "$T_WORK/rec.img" -queues "$Q2" -async -recovery wait; then
    [[ $(list_col "$ID" 10) == wait ]] && pass go-rec-copy-policy-listed || fail go-rec-copy-policy-listed "ublk list: $(list_row "$ID")"
    put "$DEV" 17 3 || fail go-rec-copy-write "dd to $DEV failed"
    if kill_go go-rec-copy && recover_go go-rec-copy2 go-loop -async; then
        same "$DEV" 17 3 && pass go-rec-copy-data || fail go-rec-copy-data "data differs after loop -recover"
        FIO_TIMEOUT=180 T_FIO_SIZE=64M fio_verify go-rec-copy "$DEV"
        stop_go go-rec-copy2 del
    fi
fi
rm -f "$T_WORK/rec.img"

t_finish
