#!/usr/bin/env bash
# Scenario 5: signals to the server in the middle of IO.
#  - SIGTERM to a background server (pid from the PID column of `ublk list`)
#    while fio runs randrw at QD 64: the server removes the device and exits
#    within a bound, fio ends with an IO error, nothing hangs.
#  - SIGINT to a --foreground server (started with SIGINT at its default
#    disposition, as from a terminal), same checks, and the foreground
#    `ublk add` exits 0.
# compat: yes
# timeout: 300
. "$(dirname "$0")/lib.sh"
t_require fio

BOUND=30

# after_signal LABEL ID PID: the common checks once the signal was sent.
after_signal() {
    local label=$1 id=$2 pid=$3
    if wait_pid_exit "$pid" "$BOUND"; then
        pass "$label-server-exits"
    else
        fail "$label-server-exits" "server pid $pid still alive ${BOUND}s after the signal"
        cat "/proc/$pid/stack" 2>/dev/null | head -n 20
    fi
    if wait_until "$BOUND" dev_absent "$id" && [[ -z $(list_row "$id") ]]; then
        pass "$label-device-removed"
    else
        fail "$label-device-removed" "device $id still exists: $(list_row "$id")"
    fi
    if [[ ! -e /run/ublk/$id.state ]]; then
        pass "$label-state-file-removed"
    else
        fail "$label-state-file-removed" "/run/ublk/$id.state is left behind"
    fi
    if wait_pid_exit "$FIO_PID" "$BOUND"; then
        wait "$FIO_PID"
        local frc=$?
        if fio_errored "$FIO_OUT" "$frc"; then
            pass "$label-fio-errors (rc=$frc)"
        else
            show_file "$FIO_OUT"
            fail "$label-fio-errors" "fio exited 0 with no error although its device went away"
        fi
    else
        fail "$label-fio-ends" "fio still runs ${BOUND}s after the server was signalled"
        kill -KILL "$FIO_PID" 2>/dev/null
    fi
}

# --- SIGTERM to a background server, mem and loop ---------------------------------
term_case() {
    local label=$1
    shift
    add_under_io "$label" "$@" || return
    local id=$DEV_ID dev=$DEV_PATH pid=$SERVER_PID
    local why
    if why=$(sig_ready "$pid"); then
        pass "$label-signal-safe"
    else
        fail "$label-signal-safe" "a SIGTERM would kill server $pid by the default action: $why"
    fi
    log "$label: SIGTERM to server pid $pid of device $id"
    kill -TERM "$pid"
    after_signal "$label" "$id" "$pid"
}

term_case sigterm-mem mem --queues 2 --size 64M
truncate -s 64M "$T_WORK/backing.img"
term_case sigterm-loop loop --queues 2 --file "$T_WORK/backing.img"

# --- SIGINT to a --foreground server ---------------------------------------------
out=$T_WORK/fg.out err=$T_WORK/fg.err
env --default-signal=INT "$UBLK" add mem --queues 2 --size 64M --foreground >"$out" 2>"$err" &
FG=$!
bg_track "$FG"
if ! wait_until 60 grep -q . "$out"; then
    show_file "$err"
    fail sigint-fg-add "the foreground server printed nothing within 60s"
elif ! parse_add_line "$(cat "$out")"; then
    fail sigint-fg-add "$ADD_ERR"
else
    pass sigint-fg-add
    id=$DEV_ID dev=$DEV_PATH
    lp=$(server_pid "$id")
    if [[ $lp == "$FG" ]]; then pass sigint-fg-list-pid; else fail sigint-fg-list-pid "ublk list says PID '$lp', the foreground server is $FG"; fi
    if ! wait_until 30 sig_ready "$FG" >/dev/null; then
        fail sigint-fg-signal-safe "a SIGINT would kill the server by the default action: $(sig_ready "$FG")"
    elif ! fio_bg sigint-fg "$dev"; then
        show_file "$FIO_OUT"
        fail sigint-fg-fio-start "fio did not get IO going on $dev"
    else
        sleep 2
        log "sigint-fg: SIGINT to foreground server pid $FG of device $id"
        kill -INT "$FG"
        after_signal sigint-fg "$id" "$FG"
        if ! pid_alive "$FG"; then
            wait "$FG"
            rc=$?
            if ((rc == 0)); then
                pass sigint-fg-exit-status
            else
                show_file "$err"
                fail sigint-fg-exit-status "foreground ublk add exited $rc after SIGINT (want 0)"
            fi
        fi
    fi
fi

# --- SIGTERM during setup, and at once after `ublk add` returned ------------------
# A server signalled while it sets its device up (state file written, queues
# starting) or right after `ublk add` returned must still remove the device:
# it may not die by the default action and leave a dead device behind.
for i in 1 2 3; do
    rm -f "$T_WORK/setup.out"
    "$UBLK" add mem --queues 2 --size 64M >"$T_WORK/setup.out" 2>&1 &
    add=$!
    bg_track "$add"
    # Poll with shell builtins only (no forks), to catch the setup window.
    pid= end=$((SECONDS + 30))
    while [[ -z $pid ]] && ((SECONDS < end)); do
        for f in /run/ublk/*.state; do
            [[ -e $f ]] || continue
            while IFS='=' read -r k v; do [[ $k == pid ]] && pid=$v; done <"$f"
        done
    done
    if [[ -z $pid ]]; then
        fail "sigterm-during-setup-$i" "no state file with a pid appeared within 30s"
        continue
    fi
    kill -TERM "$pid"
    wait_pid_exit "$add" 60
    wait "$add"
    arc=$?
    if wait_pid_exit "$pid" "$BOUND" && wait_until "$BOUND" test -z "$(dev_ids)"; then
        pass "sigterm-during-setup-$i (add exited $arc: $(head -c 100 "$T_WORK/setup.out"))"
    else
        fail "sigterm-during-setup-$i" "SIGTERM to server $pid during setup: add exited $arc ($(head -c 200 "$T_WORK/setup.out")); server alive=$(pid_alive "$pid" && echo yes || echo no); devices left: $(run_with_timeout 20 "$UBLK" list | tail -n +2)"
        run_with_timeout 60 "$UBLK" del --all >/dev/null 2>&1
    fi
done

for i in 1 2 3; do
    must_add "sigterm-at-once-$i-add" null --size 16M || continue
    id=$DEV_ID
    pid=
    while IFS='=' read -r k v; do [[ $k == pid ]] && pid=$v; done <"/run/ublk/$id.state"
    if ! pid_alive "$pid"; then
        fail "sigterm-at-once-$i" "no live server pid in /run/ublk/$id.state"
        continue
    fi
    kill -TERM "$pid"
    if wait_pid_exit "$pid" "$BOUND" && wait_until "$BOUND" dev_absent "$id"; then
        pass "sigterm-at-once-$i"
    else
        fail "sigterm-at-once-$i" "after SIGTERM right after add: server alive=$(pid_alive "$pid" && echo yes || echo no), device $id exists=$(dev_exists "$id" && echo yes || echo no)"
        dev_del "$id" >/dev/null 2>&1
    fi
done
