#!/usr/bin/env bash
# Scenario 8: deferred completion from other threads (examples/threadpool.rs):
# every request is handed by the queue thread to a pool of worker threads
# (ctx.defer), which copy the data and complete it (Completion::complete),
# with random completion delays so completions come back out of order.
# fio crc32c verify on 2 queues, write-zeroes, then SIGTERM mid-IO: the
# device is removed, the example exits 0, and its counters show the workers
# completed the requests.
# timeout: 300
. "$(dirname "$0")/lib.sh"
t_require fio

if [[ ! -x $THREADPOOL ]]; then
    fail build "$THREADPOOL is missing: run \`cargo build --release --examples\`"
    exit 1
fi

out=$T_WORK/tp.out err=$T_WORK/tp.err
"$THREADPOOL" --queues 2 --depth 64 --size 128M --workers 4 --delay-us 100 >"$out" 2>"$err" &
TP=$!
bg_track "$TP"
if ! wait_until 60 grep -q . "$out"; then
    show_file "$err"
    fail start "threadpool printed nothing within 60s"
    exit 1
fi
if ! parse_add_line "$(cat "$out")"; then
    fail start "$ADD_ERR"
    exit 1
fi
pass start
ID=$DEV_ID DEV=$DEV_PATH

row=$(list_row "$ID")
read -r _ _ r_target r_size r_q _ r_mode r_state r_pid _ <<<"$row"
if [[ "$r_target $r_size $r_q $r_mode $r_state $r_pid" == "threadpool 128M $Q2 copy LIVE $TP" ]]; then
    pass "list: $row"
else
    fail list "row '$row', want target threadpool, 128M, 2 queues, copy, LIVE, pid $TP"
fi

fio_verify threadpool "$DEV" --iodepth=32

# write-zeroes and discard go through the pool too
head -c 4M /dev/urandom >"$T_WORK/pat"
cp "$T_WORK/pat" "$T_WORK/exp"
dd if=/dev/zero of="$T_WORK/exp" bs=512 seek=$(((1 << 20) / 512 + 1)) count=$((1024 + 3)) conv=notrunc status=none
if run_with_timeout 60 dd if="$T_WORK/pat" of="$DEV" bs=1M oflag=direct status=none \
    && run_with_timeout 60 blkdiscard -z -o $(((1 << 20) + 512)) -l $(((1024 + 3) * 512)) "$DEV" \
    && run_with_timeout 60 dd if="$DEV" of="$T_WORK/got" bs=1M count=4 iflag=direct status=none \
    && cmp -s "$T_WORK/exp" "$T_WORK/got"; then
    pass write-zeroes
else
    fail write-zeroes "zeroing [1M+512, +515K) did not read back as expected"
fi

# SIGTERM in the middle of IO
if ! wait_until 30 sig_handlers "$TP"; then
    fail sigterm-handler "the example never installed SIGTERM/SIGINT handlers (not in serve_until_signal?): $(sig_ready "$TP")"
elif ! fio_bg tp "$DEV"; then
    show_file "$FIO_OUT"
    fail fio-start "fio did not get IO going on $DEV"
else
    sleep 2
    log "SIGTERM to threadpool pid $TP (device $ID)"
    kill -TERM "$TP"
    if wait_pid_exit "$TP" 30; then
        wait "$TP"
        rc=$?
        if ((rc == 0)); then pass sigterm-exit-0; else show_file "$err"; fail sigterm-exit-0 "threadpool exited $rc"; fi
    else
        fail sigterm-exit "threadpool still alive 30s after SIGTERM"
        cat "/proc/$TP/stack" 2>/dev/null | head -n 20
    fi
    if wait_until 30 dev_absent "$ID" && [[ -z $(list_row "$ID") ]]; then
        pass sigterm-device-removed
    else
        fail sigterm-device-removed "device $ID still exists: $(list_row "$ID")"
    fi
    if wait_pid_exit "$FIO_PID" 30; then
        wait "$FIO_PID"
        frc=$?
        if fio_errored "$FIO_OUT" "$frc"; then pass "sigterm-fio-errors (rc=$frc)"; else show_file "$FIO_OUT"; fail sigterm-fio-errors "fio ended without an error"; fi
    else
        fail sigterm-fio-ends "fio still runs 30s after SIGTERM"
    fi
    # threadpool: deferred=N completed_by_workers=N per_worker=[...] errors=0 complete_failed=0
    stats=$(grep -E '^threadpool: deferred=' "$err")
    log "$stats"
    if [[ $stats =~ deferred=([0-9]+)\ completed_by_workers=([0-9]+)\ per_worker=\[([0-9, ]+)\]\ errors=([0-9]+)\ complete_failed=([0-9]+) ]]; then
        deferred=${BASH_REMATCH[1]} done=${BASH_REMATCH[2]} per=${BASH_REMATCH[3]} errs=${BASH_REMATCH[4]} cf=${BASH_REMATCH[5]}
        busy=$(tr ',' '\n' <<<"$per" | awk '$1 > 0' | wc -l)
        if ((done > 1000 && done == deferred && errs == 0 && cf == 0 && busy >= 2)); then
            pass "workers-completed ($done requests, $busy workers busy)"
        else
            fail workers-completed "$stats (want every deferred request completed by >= 2 workers, no errors)"
        fi
    else
        show_file "$err"
        fail workers-completed "no counters line on the example's stderr"
    fi
    # threadpool: queue_ios=[a, b]: both queues served requests
    qios=$(sed -nE 's/^threadpool: queue_ios=\[([0-9, ]*)\]$/\1/p' "$err")
    if [[ $(tr ',' '\n' <<<"$qios" | awk '$1 > 0' | wc -l) -eq $Q2 ]]; then
        pass "both-queues-served (requests per queue: $qios)"
    else
        show_file "$err"
        fail both-queues-served "requests per queue: '$qios' (want $Q2 queues, each > 0)"
    fi
fi
