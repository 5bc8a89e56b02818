#!/usr/bin/env bash
# Scenario 4: `ublk del ID` while fio runs randrw at QD 64 (mem and loop).
# Within bounds: `ublk del` succeeds, fio ends with an IO error, the server
# process exits, `ublk list` no longer shows the device, sysfs has no trace
# of it.  Nothing may hang.  Also: a server killed by SIGKILL under fio makes
# the IO fail (no hang), and `ublk del` removes the dead device.
# compat: yes
# timeout: 300
. "$(dirname "$0")/lib.sh"
t_require fio

DEL_BOUND=30   # seconds `ublk del` may take
END_BOUND=30   # seconds fio and the server may take to end after it

# del_case LABEL ADD-ARGS...
del_case() {
    local label=$1
    shift
    add_under_io "$label" "$@" || return
    local id=$DEV_ID dev=$DEV_PATH pid=$SERVER_PID
    log "$label: deleting device $id (server pid $pid) under fio"
    local t0=$SECONDS rc
    run_with_timeout $((DEL_BOUND + 30)) "$UBLK" del "$id" >"$T_WORK/del.out" 2>&1
    rc=$?
    local took=$((SECONDS - t0))
    if ((rc == 0 && took <= DEL_BOUND)); then
        pass "$label-del-succeeds (${took}s)"
    else
        show_file "$T_WORK/del.out"
        fail "$label-del-succeeds" "ublk del $id exited $rc after ${took}s (bound ${DEL_BOUND}s)"
    fi
    if wait_pid_exit "$FIO_PID" "$END_BOUND"; then
        wait "$FIO_PID"
        local frc=$?
        if fio_errored "$FIO_OUT" "$frc"; then
            pass "$label-fio-errors (rc=$frc, $(grep -m1 -oE 'err= *-?[0-9]+[^)]*|io_u error[^:]*: [^:]*' "$FIO_OUT" | head -n1))"
        else
            show_file "$FIO_OUT"
            fail "$label-fio-errors" "fio exited 0 with no error although the device was deleted under it"
        fi
    else
        fail "$label-fio-ends" "fio still runs ${END_BOUND}s after the delete (hung IO?)"
        kill -KILL "$FIO_PID" 2>/dev/null
    fi
    if wait_pid_exit "$pid" "$END_BOUND"; then
        pass "$label-server-exits"
    else
        fail "$label-server-exits" "server pid $pid still alive ${END_BOUND}s after the delete"
        cat "/proc/$pid/stack" 2>/dev/null | head -n 20
    fi
    if [[ -z $(list_row "$id") ]] && wait_until 10 dev_absent "$id"; then
        pass "$label-gone-from-list"
    else
        fail "$label-gone-from-list" "device $id still listed: $(list_row "$id")"
    fi
}

del_case mem mem --queues 2 --size 64M
truncate -s 64M "$T_WORK/backing.img"
del_case loop loop --queues 2 --file "$T_WORK/backing.img"

# The engine can create a new device afterwards (nothing stuck in the driver).
if must_add readd mem --size 16M; then
    id=$DEV_ID
    if run_with_timeout 30 dd if=/dev/zero of="$DEV_PATH" bs=1M count=4 oflag=direct status=none; then pass readd-io; else fail readd-io "IO on a new device failed"; fi
    dev_del "$id" && wait_until 10 dev_absent "$id" && pass readd-del || fail readd-del "could not delete device $id"
fi

# --- a server that dies (SIGKILL) under fio: IO fails, the dead device can be deleted
if must_add sigkill-add mem --queues 2 --size 64M; then
    id=$DEV_ID dev=$DEV_PATH
    pid=$(server_pid "$id")
    if ! pid_alive "$pid"; then
        fail sigkill-server-pid "\`ublk list\` PID '$pid' is not live"
    elif ! fio_bg sigkill "$dev"; then
        show_file "$FIO_OUT"
        fail sigkill-fio-start "fio did not get IO going on $dev"
    else
        sleep 2
        log "sigkill: SIGKILL to server pid $pid of device $id under fio"
        kill -KILL "$pid"
        if wait_pid_exit "$FIO_PID" "$END_BOUND"; then
            wait "$FIO_PID"
            frc=$?
            if fio_errored "$FIO_OUT" "$frc"; then pass "sigkill-fio-errors (rc=$frc)"; else show_file "$FIO_OUT"; fail sigkill-fio-errors "fio ended without an error although its server died"; fi
        else
            fail sigkill-fio-ends "fio still runs ${END_BOUND}s after the server died (IO hung)"
            kill -KILL "$FIO_PID" 2>/dev/null
        fi
        row=$(list_row "$id")
        log "sigkill: after the server died: $row"
        if [[ -n $row && $(awk '{ print $9 }' <<<"$row") == - ]]; then
            pass "sigkill-listed-without-server ($(awk '{ print $8 }' <<<"$row"))"
        else
            fail sigkill-listed-without-server "row '$row', want the device listed with PID -"
        fi
        t0=$SECONDS
        if run_with_timeout $((DEL_BOUND + 30)) "$UBLK" del "$id" >"$T_WORK/del.out" 2>&1 && ((SECONDS - t0 <= DEL_BOUND)) \
            && wait_until 10 dev_absent "$id" && [[ -z $(list_row "$id") ]]; then
            pass "sigkill-del-dead-device ($((SECONDS - t0))s)"
        else
            show_file "$T_WORK/del.out"
            fail sigkill-del-dead-device "ublk del $id of the dead device failed, took $((SECONDS - t0))s, or left it"
        fi
        [[ ! -e /run/ublk/$id.state ]] && pass sigkill-state-file-removed || fail sigkill-state-file-removed "/run/ublk/$id.state left behind"
    fi
fi
