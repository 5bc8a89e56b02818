#!/usr/bin/env bash
# The nbd target (issue 8) against real peers on the loopback: qemu-nbd
# serving a raw file and a qcow2 image (fio randrw crc32c verify 4k..1M on
# several queues and connections, ext4 + fsck, and after `ublk del` the
# image, read back with qemu-img convert, equals the device's last
# contents), every data mode the kernel has, qemu-nbd killed mid-IO and
# restarted (fio's writes resume and verify), qemu-nbd killed for good (IO
# fails with EIO within --timeout, `ublk del` is bounded), the malformed
# server tests/device/nbd_bad_server.py (bad magic, oversized lengths,
# unknown handles, replies for requests not in flight, close mid-payload,
# chunks past the request end, error chunks: the read fails or, when the
# retry gets a good answer, succeeds with the right data; the ublk server
# stays alive, other IO works, `del` works; error chunks, of a known type or
# not, fail the read at once and keep the connection), a server that
# refuses DF reads over 64 KiB (EOVERFLOW: the read is sent again without
# DF), refused handshakes (a trickling server and endless NBD_REP_INFO:
# `add` fails within the bound) and bad command lines, a reconnection
# refused because the export lost FLUSH, and `ublk recover` of an nbd device (refused while
# the export is read-only, then done).
# timeout: 1500
. "$(dirname "$0")/lib.sh"
t_require fio qemu-nbd qemu-img mkfs.ext4 fsck.ext4 python3 cmp sha256sum

BAD=$T_LIBDIR/nbd_bad_server.py
PORT=10811
IMG_MB=192

# listening PORT: a TCP socket listens on 127.0.0.1:PORT (or any address).
listening() { grep -Eq ":$(printf '%04X' "$1") 0+:0000 0A" /proc/net/tcp /proc/net/tcp6 2>/dev/null; }

# qnbd_start FILE FORMAT [ARGS...]: qemu-nbd on $PORT; sets QNBD_PID.
qnbd_start() {
    local f=$1 fmt=$2
    shift 2
    qemu-nbd -f "$fmt" -t -e 8 -b 127.0.0.1 -p "$PORT" "$@" "$f" >>"$T_WORK/qemu-nbd.log" 2>&1 &
    QNBD_PID=$!
    bg_track "$QNBD_PID"
    wait_until 60 listening "$PORT" || { show_file "$T_WORK/qemu-nbd.log"; return 1; }
}

qnbd_stop() {
    kill -TERM "$QNBD_PID" 2>/dev/null
    wait_pid_exit "$QNBD_PID" 30 || kill -KILL "$QNBD_PID" 2>/dev/null
    wait "$QNBD_PID" 2>/dev/null
    wait_until 20 eval '! listening $PORT'
}

# bad_start MODE [ARGS...]: the malformed server on $PORT; sets BAD_PID.
bad_start() {
    python3 "$BAD" --port "$PORT" --mode "$@" >>"$T_WORK/bad.log" 2>&1 &
    BAD_PID=$!
    bg_track "$BAD_PID"
    wait_until 30 listening "$PORT"
}

bad_stop() {
    kill -TERM "$BAD_PID" 2>/dev/null
    wait_pid_exit "$BAD_PID" 10 || kill -KILL "$BAD_PID" 2>/dev/null
    wait "$BAD_PID" 2>/dev/null
    wait_until 20 eval '! listening $PORT'
}

writes_reached() { (($(dev_stat "$1" | awk '{ print $3 }') >= $2)); }

nbd_add() { must_add "$1" nbd --host 127.0.0.1 --port "$PORT" "${@:2}"; }

# image_test FORMAT ADD-ARGS...: fio verify, ext4, dump, del, image == dump.
image_test() {
    local fmt=$1
    shift
    local img=$T_WORK/img.$fmt
    rm -f "$img"
    qemu-img create -q -f "$fmt" "$img" "${IMG_MB}M" || { fail "$fmt-create" "qemu-img create failed"; return; }
    qnbd_start "$img" "$fmt" || { fail "$fmt-qemu-nbd" "qemu-nbd did not listen on $PORT"; return; }
    nbd_add "$fmt-add" "$@" || { qnbd_stop; return; }
    local id=$DEV_ID dev=$DEV_PATH row
    row=$(list_row "$id")
    [[ $(awk '{ print $3, $4 }' <<<"$row") == "nbd ${IMG_MB}M" ]] && pass "$fmt-list" || fail "$fmt-list" "row '$row', want target nbd size ${IMG_MB}M"
    fio_verify "nbd-$fmt" "$dev"
    FIO_EXPECT_FLUSH=1 T_FIO_SIZE=32M fio_verify "nbd-$fmt-fsync" "$dev" --fsync=8 --bsrange=4k-64k
    # ext4 with files, fsck, remount, the files are intact
    local mnt=$T_WORK/mnt
    mkdir -p "$mnt"
    if run_with_timeout 120 mkfs.ext4 -q -F "$dev" && mount "$dev" "$mnt"; then
        mount_track "$mnt"
        local i
        for i in 1 2 3; do head -c $((i * 3 << 20)) /dev/urandom >"$mnt/f$i"; done
        (cd "$mnt" && sha256sum f1 f2 f3) >"$T_WORK/sums"
        umount "$mnt"
        if run_with_timeout 120 fsck.ext4 -n -f "$dev" >"$T_WORK/fsck.out" 2>&1; then pass "$fmt-fsck"; else show_file "$T_WORK/fsck.out"; fail "$fmt-fsck" "fsck.ext4 -n -f found problems"; fi
        if mount "$dev" "$mnt" && (cd "$mnt" && sha256sum -c --quiet "$T_WORK/sums"); then pass "$fmt-ext4-files"; else fail "$fmt-ext4-files" "files differ after remount"; fi
        umount "$mnt"
    else
        fail "$fmt-ext4" "mkfs.ext4 or mount failed"
    fi
    # the device's last contents, then del, then the image read by qemu-img
    run_with_timeout 120 dd if="$dev" of="$T_WORK/dump" bs=1M iflag=direct status=none || fail "$fmt-dump" "reading $dev failed"
    if run_with_timeout 60 "$UBLK" del "$id"; then pass "$fmt-del"; else fail "$fmt-del" "ublk del $id failed"; fi
    wait_until 10 dev_absent "$id" || fail "$fmt-del" "device $id still exists"
    qnbd_stop
    if qemu-img convert -f "$fmt" -O raw "$img" "$T_WORK/back.raw" && cmp "$T_WORK/dump" "$T_WORK/back.raw"; then
        pass "$fmt-image-equals-device"
    else
        fail "$fmt-image-equals-device" "the $fmt image (qemu-img convert) differs from the device's contents"
    fi
    rm -f "$img" "$T_WORK/dump" "$T_WORK/back.raw"
}

log "qemu-nbd: $(qemu-nbd --version | head -n1)"
image_test raw --queues "$Q2" --connections 2
image_test qcow2 --queues 1

# --- every data mode the kernel has ----------------------------------------------
feats=$(run_with_timeout 30 "$UBLK" features | tail -n +2)
declare -A NEED=([auto-buf-reg]=AUTO_BUF_REG [register]=ZERO_COPY [user-copy]=USER_COPY [copy]=)
img=$T_WORK/modes.raw
truncate -s 64M "$img"
qnbd_start "$img" raw || fail modes-qemu-nbd "qemu-nbd did not start"
for mode in auto-buf-reg register user-copy copy; do
    need=${NEED[$mode]}
    if [[ -n $need ]] && ! grep -qx "$need" <<<"$feats"; then
        skip "mode-$mode" "kernel $(uname -r) lacks UBLK_F_$need"
        continue
    fi
    nbd_add "mode-$mode-add" --zero-copy "$mode" || continue
    id=$DEV_ID
    [[ $(list_row "$id" | awk '{ print $7 }') == "$mode" ]] && pass "mode-$mode-list" || fail "mode-$mode-list" "ublk list shows $(list_row "$id")"
    T_FIO_SIZE=32M fio_verify "mode-$mode" "$DEV_PATH" --bsrange=4k-512k
    dev_del "$id" || fail "mode-$mode-del" "ublk del failed"
    wait_until 10 dev_absent "$id"
    line=$(grep "device $id stopped: mode=$mode" "$SERVER_LOG" | tail -n1)
    copied=$(sed -n 's/.* copied_bytes=\([0-9]*\).*/\1/p' <<<"$line")
    if [[ -z $copied ]]; then
        fail "mode-$mode-counters" "no stop line for device $id"
    elif [[ $mode == auto-buf-reg || $mode == register ]] && ((copied != 0)); then
        fail "mode-$mode-counters" "zero copy mode copied $copied bytes: $line"
    else
        pass "mode-$mode-counters ($line)"
    fi
done

# --- the C API: c-examples/nbd.c (ublk_nbd_dev_new) -----------------------------------------
CNBD=${UBLK_CNBD_BIN:-$T_REPO/target/release/c-nbd}
if [[ ! -x $CNBD ]]; then
    fail c-nbd "$CNBD is missing: run \`make build\`"
else
    cout=$T_WORK/c-nbd.out cerr=$T_WORK/c-nbd.err
    "$CNBD" -q "$Q2" -d 32 127.0.0.1 "$PORT" >"$cout" 2>"$cerr" &
    cpid=$!
    bg_track "$cpid"
    if wait_until 60 grep -q . "$cout" && parse_add_line "$(cat "$cout")"; then
        id=$DEV_ID
        [[ $(list_row "$id" | awk '{ print $3, $4 }') == "nbd 64M" ]] && pass c-nbd-list || fail c-nbd-list "row '$(list_row "$id")'"
        T_FIO_SIZE=32M fio_verify c-nbd "$DEV_PATH" --bsrange=4k-256k
        wait_until 30 sig_handlers "$cpid" || fail c-nbd-handlers "no SIGTERM handler"
        kill -TERM "$cpid"
        if wait_pid_exit "$cpid" 60; then
            wait "$cpid"
            rc=$?
            ((rc == 0)) && grep -q "device $id stopped: mode=" "$cerr" && pass "c-nbd-sigterm ($(grep -m1 stopped "$cerr"))" ||
                { show_file "$cerr"; fail c-nbd-sigterm "exit $rc"; }
        else
            fail c-nbd-sigterm "c-nbd did not exit within 60 s of SIGTERM"
        fi
        wait_until 10 dev_absent "$id" || fail c-nbd-removed "device $id still exists"
    else
        show_file "$cerr"
        fail c-nbd-start "c-nbd printed no '<id> <path>' within 60 s"
    fi
    # an unreachable server: exit 1 with the errno named, no device
    if "$CNBD" 127.0.0.1 1 >/dev/null 2>"$cerr"; then fail c-nbd-refused "c-nbd succeeded against port 1"
    elif grep -q ECONNREFUSED "$cerr" && [[ -z $(dev_ids) ]]; then pass c-nbd-refused
    else fail c-nbd-refused "$(head -c 300 "$cerr")"; fi
fi

# --- qemu-nbd killed mid-IO and restarted: the IO resumes -------------------------------
if nbd_add kill-add --queues "$Q2" --timeout 60; then
    id=$DEV_ID dev=$DEV_PATH
    out=$T_WORK/fio-kill.out
    fio --name=kill --filename="$dev" --rw=randwrite --bs=64k --direct=1 --ioengine=io_uring --iodepth=16 \
        --size=48M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 >"$out" 2>&1 &
    fpid=$!
    bg_track "$fpid"
    base=$(dev_stat "$dev" | awk '{ print $3 }')
    if wait_until 60 writes_reached "$dev" $((base + 50)); then
        kill -KILL "$QNBD_PID"
        wait "$QNBD_PID" 2>/dev/null
        t0=$SECONDS
        sleep 2
        qnbd_start "$img" raw || fail kill-restart "qemu-nbd did not restart"
        if fio_wait "$fpid" "$out" 180; then
            pass "kill-restart-fio-resumes (fio verify passed, $((SECONDS - t0))s after the kill)"
        else
            show_file "$out"
            fail "kill-restart-fio-resumes" "fio rc=$FIO_RC after qemu-nbd was restarted"
        fi
        grep -q "reconnected" "$SERVER_LOG" && pass "kill-restart-reconnected" || fail "kill-restart-reconnected" "no reconnect in the server log"
    else
        fail "kill-restart" "fio did not get going"
    fi
    dev_del "$id" || fail "kill-restart-del" "ublk del failed"
fi

# --- qemu-nbd killed for good: IO fails within --timeout, del is bounded --------------------
if nbd_add gone-add --timeout 5; then
    id=$DEV_ID dev=$DEV_PATH
    pid=$(server_pid "$id")
    kill -KILL "$QNBD_PID"
    wait "$QNBD_PID" 2>/dev/null
    t0=$SECONDS
    if run_with_timeout 60 dd if="$dev" of=/dev/null bs=4k count=1 skip=1000 iflag=direct 2>"$T_WORK/dd.err"; then
        fail "gone-read-fails" "a read succeeded with the server gone"
    elif ((SECONDS - t0 > 30)); then
        fail "gone-read-fails" "the read failed only after $((SECONDS - t0))s (timeout 5 s)"
    else
        pass "gone-read-fails (after $((SECONDS - t0))s: $(head -n1 "$T_WORK/dd.err" | head -c 100))"
    fi
    # del while disconnected, with IO waiting
    fio --name=gone --filename="$dev" --rw=randread --bs=4k --direct=1 --ioengine=io_uring --iodepth=8 \
        --time_based --runtime=60 >"$T_WORK/fio-gone.out" 2>&1 &
    fpid=$!
    bg_track "$fpid"
    sleep 1
    t0=$SECONDS
    if run_with_timeout 60 "$UBLK" del "$id"; then pass "gone-del ($((SECONDS - t0))s)"; else fail "gone-del" "ublk del failed or hung"; fi
    wait_until 10 dev_absent "$id" || fail "gone-del" "device still there"
    wait_pid_exit "$pid" 30 && pass "gone-server-exits" || fail "gone-server-exits" "server $pid still running"
    wait_pid_exit "$fpid" 30 || kill -KILL "$fpid"
fi

# --- refusals ---------------------------------------------------------------------------
qnbd_start "$img" raw -x disk
expect_add_fails() { # NAME CODE PATTERN ADD-ARGS...
    local name=$1 code=$2 pat=$3
    shift 3
    local out rc
    out=$(run_with_timeout 60 "$UBLK" add "$@" 2>&1)
    rc=$?
    if ((rc == code)) && grep -Eq "$pat" <<<"$out" && [[ -z $(dev_ids) ]]; then
        pass "$name"
    else
        fail "$name" "exit $rc (want $code), output '$(head -c 300 <<<"$out")', devices: $(dev_ids)"
        run_with_timeout 60 "$UBLK" del --all >/dev/null 2>&1
    fi
}
expect_add_fails refuse-no-export 1 'ENOENT.*|no export' nbd --host 127.0.0.1 --port "$PORT" --export nope
expect_add_fails refuse-refused 1 ECONNREFUSED nbd --host 127.0.0.1 --port 1
expect_add_fails refuse-no-host 2 'no host' nbd --port "$PORT"
expect_add_fails refuse-bad-host 1 'resolve' nbd --host no-such-host.invalid
expect_add_fails refuse-connections 2 'connections' nbd --host 127.0.0.1 --port "$PORT" --connections 0
expect_add_fails refuse-timeout 2 'timeout' nbd --host 127.0.0.1 --port "$PORT" --timeout 0
expect_add_fails refuse-flags-on-loop 2 'only for the nbd target' loop --file "$img" --host x
expect_add_fails refuse-size 2 'size' nbd --host 127.0.0.1 --port "$PORT" --export disk --size 1M
qnbd_stop
qnbd_start "$img" raw -e 1 2>/dev/null
# shellcheck disable=SC2086
if ((Q2 > 1)); then
    expect_add_fails refuse-multi-conn 1 'CAN_MULTI_CONN' nbd --host 127.0.0.1 --port "$PORT" --queues 2
fi
qnbd_stop
for m in bad-greeting no-fixed; do
    bad_start "$m" || { fail "handshake-$m" "bad server did not start"; continue; }
    expect_add_fails "handshake-$m" 1 'EPROTO|EOPNOTSUPP' nbd --host 127.0.0.1 --port "$PORT"
    bad_stop
done
# the whole handshake is bounded: a server that trickles a byte a second
# (never long enough for a per-read timeout) fails within --timeout 3, one
# that sends NBD_REP_INFO without end is refused after a few
for m in trickle:'ETIMEDOUT.*|did not finish within 3s' endless-info:'EPROTO.*|NBD_REP_INFO'; do
    bad_start "${m%%:*}" || { fail "handshake-${m%%:*}" "bad server did not start"; continue; }
    t0=$SECONDS
    expect_add_fails "handshake-${m%%:*}" 1 "${m#*:}" nbd --host 127.0.0.1 --port "$PORT" --timeout 3
    if ((SECONDS - t0 > 10)); then fail "handshake-${m%%:*}-bounded" "add took $((SECONDS - t0))s (handshake bound 3 s)"; else pass "handshake-${m%%:*}-bounded ($((SECONDS - t0))s)"; fi
    bad_stop
done

# --- the malformed server ------------------------------------------------------------------
# bad_case NAME EXPECT(fail|fail-keep|ok) SERVER-ARGS...: a 4 KiB read in the
# trap region. fail-keep: the read fails with EIO within 10 s although the
# timeout is 30 s (not by timing out after retries) and the connection is
# never dropped.
bad_case() {
    local name=$1 expect=$2 timeout=3
    shift 2
    [[ $expect == fail-keep ]] && timeout=30
    bad_start "$@" || { fail "bad-$name" "the bad server did not start"; return; }
    if ! nbd_add "bad-$name-add" --timeout "$timeout"; then bad_stop; return; fi
    local id=$DEV_ID dev=$DEV_PATH pid t0 rc log0
    pid=$(server_pid "$id")
    log0=$(wc -l <"$SERVER_LOG")
    # 16 KiB of data just before the trap region, then one dd reads it and
    # the first 16 KiB of the trap (zeroes) through the same buffer: stale
    # data must not survive a hole
    head -c 16384 /dev/urandom >"$T_WORK/before"
    run_with_timeout 60 dd if="$T_WORK/before" of="$dev" bs=16k seek=511 oflag=direct status=none ||
        fail "bad-$name-write" "writing before the trap failed"
    cat "$T_WORK/before" <(head -c 16384 /dev/zero) >"$T_WORK/want"
    t0=$SECONDS
    run_with_timeout 60 dd if="$dev" of="$T_WORK/trap.out" bs=16k count=2 skip=511 iflag=direct 2>"$T_WORK/dd.err"
    rc=$?
    if [[ $expect == fail* ]]; then
        if ((rc != 0 && rc != 124)) && grep -qi 'Input/output error' "$T_WORK/dd.err"; then
            pass "bad-$name-read-fails (EIO after $((SECONDS - t0))s)"
        else
            fail "bad-$name-read-fails" "dd rc=$rc: $(head -c 200 "$T_WORK/dd.err")"
        fi
        if [[ $expect == fail-keep ]]; then
            local drops
            drops=$(tail -n +$((log0 + 1)) "$SERVER_LOG" | grep -c "dropping the connection")
            if ((SECONDS - t0 <= 10 && drops == 0)); then
                pass "bad-$name-connection-kept"
            else
                fail "bad-$name-connection-kept" "EIO after $((SECONDS - t0))s, $drops connection drop(s) in the server log"
            fi
        fi
    else
        if ((rc == 0)) && cmp -s "$T_WORK/trap.out" "$T_WORK/want"; then
            pass "bad-$name-read-ok ($((SECONDS - t0))s)"
        else
            fail "bad-$name-read-ok" "dd rc=$rc: $(head -c 200 "$T_WORK/dd.err")"
        fi
    fi
    pid_alive "$pid" && pass "bad-$name-server-alive" || fail "bad-$name-server-alive" "the ublk server $pid died"
    # IO outside the trap still works (after a reconnect if the connection was dropped)
    if run_with_timeout 60 dd if=/dev/urandom of="$T_WORK/pat" bs=4k count=4 status=none &&
        run_with_timeout 60 dd if="$T_WORK/pat" of="$dev" bs=4k seek=100 oflag=direct status=none &&
        run_with_timeout 60 dd if="$dev" of="$T_WORK/pat.back" bs=16k skip=25 count=1 iflag=direct status=none &&
        cmp -s "$T_WORK/pat" "$T_WORK/pat.back"; then
        pass "bad-$name-other-io"
    else
        fail "bad-$name-other-io" "IO outside the trap failed"
    fi
    if run_with_timeout 60 "$UBLK" del "$id" && wait_until 10 dev_absent "$id"; then pass "bad-$name-del"; else fail "bad-$name-del" "ublk del failed"; fi
    wait_pid_exit "$pid" 30 || fail "bad-$name-del" "server $pid did not exit"
    bad_stop
}
bad_case good ok good
bad_case good-simple ok good --simple
bad_case split ok split
bad_case bad-magic fail bad-magic
bad_case oversized fail oversized
bad_case oversized-simple fail oversized --simple
bad_case unknown-handle fail unknown-handle
bad_case never-sent ok never-sent
bad_case close-mid-payload fail close-mid-payload
bad_case close-mid-payload-once ok close-mid-payload --once
bad_case close-mid-payload-simple-once ok close-mid-payload --simple --once
bad_case chunk-past-end fail chunk-past-end
bad_case error-chunk fail-keep error-chunk
bad_case error-simple fail-keep error-chunk --simple
bad_case unknown-error fail-keep unknown-error
grep -q "NBD protocol violation" "$SERVER_LOG" && pass "violations-logged" || fail "violations-logged" "no protocol violation in the server log"

# --- DF reads refused with EOVERFLOW: sent again without DF ---------------------------------
if bad_start df-overflow && nbd_add df-add --timeout 10; then
    id=$DEV_ID dev=$DEV_PATH
    head -c $((2 << 20)) /dev/urandom >"$T_WORK/dfpat"
    if run_with_timeout 60 dd if="$T_WORK/dfpat" of="$dev" bs=512k seek=2 oflag=direct status=none &&
        run_with_timeout 60 dd if="$dev" of="$T_WORK/dfback" bs=512k skip=2 count=4 iflag=direct status=none 2>"$T_WORK/dd.err" &&
        cmp -s "$T_WORK/dfpat" "$T_WORK/dfback"; then
        pass "df-overflow-512k-reads"
    else
        fail "df-overflow-512k-reads" "512 KiB reads failed or differ: $(head -c 200 "$T_WORK/dd.err")"
    fi
    # DF was sent and refused, and given up for good (no DF on the later reads)
    grep -q "trap: df-overflow" "$T_WORK/bad.log" && grep -q "READs go without DF" "$SERVER_LOG" &&
        pass "df-overflow-fallback ($(grep -c 'trap: df-overflow' "$T_WORK/bad.log") refused)" ||
        fail "df-overflow-fallback" "no refused DF read in the bad server's log, or no fallback in the server log"
    n0=$(grep -c "trap: df-overflow" "$T_WORK/bad.log")
    run_with_timeout 60 dd if="$dev" of=/dev/null bs=512k count=8 iflag=direct status=none
    (($(grep -c "trap: df-overflow" "$T_WORK/bad.log") == n0)) && pass "df-overflow-no-df-after" || fail "df-overflow-no-df-after" "READs still carry DF"
    dev_del "$id" || fail "df-overflow-del" "ublk del failed"
else
    fail "df-overflow" "the bad server or the device did not start"
fi
bad_stop

# --- a reconnection to an export that lost FLUSH is refused, with backoff; one whose
# minimum block size grew to the device's logical block size (4096, asked of the kernel) is used
if bad_start good && nbd_add noflush-add --queues 1 --timeout 5 --logical-block-size 4096; then
    id=$DEV_ID dev=$DEV_PATH
    log0=$(wc -l <"$SERVER_LOG")
    bad_stop
    acc0=$(grep -c "^accepted" "$T_WORK/bad.log")
    t0=$SECONDS
    bad_start good --no-flush
    if run_with_timeout 60 dd if="$dev" of=/dev/null bs=4k count=1 skip=300 iflag=direct 2>/dev/null; then
        fail "noflush-refused" "a read succeeded through an export without FLUSH"
    else
        tail -n +$((log0 + 1)) "$SERVER_LOG" | grep -q "no longer offers NBD_FLAG_SEND_FLUSH" && pass "noflush-refused" ||
            fail "noflush-refused" "no refusal naming FLUSH in the server log"
    fi
    bad_stop
    # refused attempts back off (100 ms doubling to 5 s): a handful in these
    # seconds, not one every 100 ms
    n=$(($(grep -c "^accepted" "$T_WORK/bad.log") - acc0))
    ((n >= 1 && n <= 12)) && pass "noflush-backoff ($n attempts in $((SECONDS - t0))s)" || fail "noflush-backoff" "$n attempts in $((SECONDS - t0))s"
    log1=$(wc -l <"$SERVER_LOG")
    bad_start good --min-block 4096
    wait_until 30 eval 'tail -n +$((log1 + 1)) "$SERVER_LOG" | grep -q reconnected' ||
        { tail -n +$((log1 + 1)) "$SERVER_LOG" | tail -n 5; fail "noflush-back" "no reconnection to the export with FLUSH and minimum block size 4096"; }
    if run_with_timeout 60 dd if="$dev" of=/dev/null bs=4k count=1 skip=300 iflag=direct 2>/dev/null; then
        pass "noflush-back (the export with FLUSH is used again; minimum block 4096 = the device's)"
    else
        fail "noflush-back" "IO failed once the export had FLUSH again"
    fi
    dev_del "$id" || fail "noflush-del" "ublk del failed"
else
    fail "noflush" "the bad server or the device did not start"
fi
bad_stop

# --- recovery: the state file names the export; a new server takes over ------------------------
truncate -s 64M "$img"
qnbd_start "$img" raw
if nbd_add recover-add --recovery reissue --export ""; then
    id=$DEV_ID dev=$DEV_PATH
    pid=$(server_pid "$id")
    if grep -q 'arg.host=127.0.0.1' "/run/ublk/$id.state" && grep -q "arg.port=$PORT" "/run/ublk/$id.state"; then
        pass recover-state-file
    else
        fail recover-state-file "the state file does not name the export: $(head -c 400 "/run/ublk/$id.state")"
    fi
    head -c 1M /dev/urandom >"$T_WORK/rpat"
    dd if="$T_WORK/rpat" of="$dev" bs=1M oflag=direct status=none
    kill -KILL "$pid"
    wait_pid_exit "$pid" 30
    # the export came back read-only: recovering the writable device is refused
    # before any queue connects, and the device waits for another try
    qnbd_stop
    qnbd_start "$img" raw -r
    if out=$(run_with_timeout 120 "$UBLK" recover "$id" 2>&1); then
        fail recover-readonly "ublk recover took a read-only export for a writable device: $out"
    elif grep -q "read-only" <<<"$out"; then
        pass "recover-readonly (refused: ${out:0:160})"
    else
        fail recover-readonly "refused without saying why: $out"
    fi
    qnbd_stop
    qnbd_start "$img" raw
    if out=$(run_with_timeout 120 "$UBLK" recover "$id" 2>&1); then
        dd if="$dev" of="$T_WORK/rback" bs=1M count=1 iflag=direct status=none
        cmp -s "$T_WORK/rpat" "$T_WORK/rback" && pass "recover (data back through the new server)" || fail recover "data differs after recover"
    else
        fail recover "ublk recover failed: $out"
    fi
    dev_del "$id" || fail recover-del "ublk del failed"
fi
qnbd_stop
