#!/usr/bin/env bash
# Crash recovery (issue 7), with the CLI and the C example:
# - the state file written at `add --recovery` holds the configuration and the
#   pid; `ublk list` shows STATE, PID and RECOVERY;
# - fio randwrite with crc32c verify on a `loop --recovery reissue` device, the
#   server killed with SIGKILL mid-run: the device waits (QUIESCED, no pid),
#   `ublk recover ID` serves it again (a new pid in the state file), fio
#   finishes and its verify pass reads back every block it wrote;
# - the same 10 times in a row (a short fio verify each time);
# - ext4 on the device: kill -9 + recover while a file is being written, then
#   every file reads back, umount, `fsck -n` clean;
# - the policies: `fail` (IO fails at once while no server runs, works after
#   recover), `wait` (IO issued while no server runs waits, and completes
#   after recover);
# - c-loop -r reissue / -R ID (ublk_dev_recover through the C ABI);
# - refusals: recover of a live device (EBUSY), of a device without recovery
#   (EINVAL), with the state file of an earlier device of that id (ESTALE), of
#   an unknown id, `add mem --recovery` (usage error), bad policy.
# compat: yes
# timeout: 1200
. "$(dirname "$0")/lib.sh"
t_require fio mkfs.ext4 fsck.ext4 cmp

C_DIR=${UBLK_C_DIR:-$T_REPO/target/release}

# list_col ID N: column N of device ID's `ublk list` row (8 STATE, 9 PID, 10 RECOVERY).
list_col() { list_row "$1" | awk -v n="$2" '{ print $n }'; }
state_is() { [[ $(list_col "$1" 8) == "$2" ]]; }

# kill_server LABEL ID [STATE]: SIGKILL the server of device ID; the device
# must then wait in STATE (default QUIESCED) with no pid in `ublk list`.
kill_server() {
    local label=$1 id=$2 want=${3:-QUIESCED} pid
    pid=$(server_pid "$id")
    if ! pid_alive "$pid"; then
        fail "$label-kill" "\`ublk list\` shows no live server for device $id (pid '$pid')"
        return 1
    fi
    kill -KILL "$pid"
    if ! wait_pid_exit "$pid" 30; then
        fail "$label-kill" "server $pid still alive 30 s after SIGKILL"
        return 1
    fi
    if ! wait_until 30 state_is "$id" "$want"; then
        fail "$label-kill" "device $id is not $want after its server died: $(list_row "$id")"
        return 1
    fi
    local p
    p=$(list_col "$id" 9)
    [[ $p == - ]] || { fail "$label-kill" "device $id lists pid '$p' with its server dead"; return 1; }
}

# recover LABEL ID: `ublk recover ID` must print "ID /dev/ublkbID" and serve.
recover() {
    local label=$1 id=$2 out
    out=$(run_with_timeout 90 "$UBLK" recover "$id" 2>"$T_WORK/recover.err")
    local rc=$?
    if ((rc != 0)) || ! parse_add_line "$out" || [[ $DEV_ID != "$id" ]]; then
        show_file "$T_WORK/recover.err"
        dump_server_log
        fail "$label-recover" "\`ublk recover $id\` exited $rc, printed '$out'"
        return 1
    fi
    if ! state_is "$id" LIVE || ! pid_alive "$(server_pid "$id")"; then
        fail "$label-recover" "device $id after recover: $(list_row "$id")"
        return 1
    fi
}

# pattern N: a 1 MiB file of random bytes, $T_WORK/pat.N
pattern() { [[ -f $T_WORK/pat.$1 ]] || head -c 1M /dev/urandom >"$T_WORK/pat.$1"; }
# put DEV MIB N / same DEV MIB N: write / compare pattern N at MiB offset MIB.
put() { pattern "$3" && dd if="$T_WORK/pat.$3" of="$1" bs=1M seek="$2" oflag=direct conv=fsync status=none; }
same() { cmp -s "$T_WORK/pat.$3" <(dd if="$1" bs=1M skip="$2" count=1 iflag=direct status=none); }

# state file -----------------------------------------------------------------------
truncate -s 256M "$T_WORK/loop.img"
if must_add state-add loop --file "$T_WORK/loop.img" --queues 2 --recovery reissue; then
    id=$DEV_ID dev=$DEV_PATH sf=/run/ublk/$DEV_ID.state
    pid=$(server_pid "$id")
    if grep -qx "recovery=reissue" "$sf" && grep -qx "arg.file=$T_WORK/loop.img" "$sf" \
        && grep -qx "pid=$pid" "$sf" && grep -qx "queues=2" "$sf"; then
        pass state-file-written
    else
        show_file "$sf"
        fail state-file-written "$sf lacks recovery=reissue, arg.file, pid=$pid or queues=2"
    fi
    [[ $(list_col "$id" 10) == reissue ]] && pass list-shows-policy || fail list-shows-policy "$(list_row "$id")"
    # a live server's device cannot be taken over
    if out=$(run_with_timeout 60 "$UBLK" recover "$id" 2>&1); then
        fail recover-live-refused "ublk recover of a served device succeeded: $out"
    elif grep -q "still served by pid $pid" <<<"$out"; then
        pass recover-live-refused
    else
        fail recover-live-refused "unexpected message: $out"
    fi

    # fio verify across a kill -9 + recover --------------------------------------------
    fio_out=$T_WORK/fio-kill.out
    fio --name=kill --filename="$dev" --rw=randwrite --bsrange=4k-128k --direct=1 --ioengine=io_uring \
        --iodepth=32 --size=128M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
        >"$fio_out" 2>&1 &
    fio_pid=$!
    bg_track "$fio_pid"
    base=$(dev_stat "$dev" | awk '{ print $1 + $3 }')
    if wait_until 60 _io_moved "$dev" $((base + 300)) && kill_server fio "$id"; then
        sleep 1
        pid_alive "$fio_pid" && pass fio-waits-without-server || fail fio-waits-without-server "fio ended while no server ran"
        if recover fio "$id"; then
            new=$(server_pid "$id")
            grep -qx "pid=$new" "$sf" && pass state-file-new-pid || fail state-file-new-pid "$sf: $(grep ^pid= "$sf")"
            if fio_wait "$fio_pid" "$fio_out" 300; then
                pass "fio-verify-across-kill ($(grep -oE 'WRITE: bw=[^,]*' "$fio_out" | head -n1))"
            else
                show_file "$fio_out" 30
                fail fio-verify-across-kill "fio exited $FIO_RC (124: still ran 300 s after the recovery) or reported errors"
            fi
        fi
    else
        show_file "$fio_out" 20
        fail fio-kill "no IO moved, or the kill failed"
    fi

    # 10 kill/recover cycles in a row, fio verify in each ----------------------------
    ok=0
    for i in $(seq 1 10); do
        out=$T_WORK/fio-cycle.out
        fio --name=cycle --filename="$dev" --rw=randwrite --bs=4k --direct=1 --ioengine=io_uring \
            --iodepth=16 --size=16M --offset=$((i * 16))M --verify=crc32c --do_verify=1 --verify_fatal=1 \
            --verify_state_save=0 >"$out" 2>&1 &
        fp=$!
        bg_track "$fp"
        base=$(dev_stat "$dev" | awk '{ print $1 + $3 }')
        wait_until 60 _io_moved "$dev" $((base + 100)) || { fail "cycle-$i" "no IO moved"; break; }
        kill_server "cycle-$i" "$id" || break
        recover "cycle-$i" "$id" || break
        if ! fio_wait "$fp" "$out" 120; then
            show_file "$out" 30
            fail "cycle-$i" "fio exited $FIO_RC (124: still ran 120 s after the recovery) or reported errors"
            break
        fi
        ok=$((ok + 1))
    done
    ((ok == 10)) && pass "kill-recover-10-cycles"

    # ext4 survives kill + recover, fsck -n clean ----------------------------------------
    mnt=$T_WORK/mnt
    mkdir -p "$mnt"
    if mkfs.ext4 -q -F "$dev" && mount "$dev" "$mnt"; then
        mount_track "$mnt"
        for n in 1 2 3; do pattern "$n" && cp "$T_WORK/pat.$n" "$mnt/f$n"; done
        sync
        dd if=/dev/urandom of="$mnt/big" bs=64k count=800 conv=fsync status=none &
        dd_pid=$!
        bg_track "$dd_pid"
        sleep 1
        if kill_server ext4 "$id" && recover ext4 "$id"; then
            if wait_pid_exit "$dd_pid" 120 && wait "$dd_pid"; then
                pass ext4-write-across-kill
            else
                fail ext4-write-across-kill "the file write failed or hung across the recovery"
            fi
            sync
            good=1
            for n in 1 2 3; do cmp -s "$T_WORK/pat.$n" "$mnt/f$n" || good=0; done
            ((good)) && pass ext4-files-intact || fail ext4-files-intact "a file differs after the recovery"
            sum=$(md5sum <"$mnt/big")
            umount "$mnt"
            if fsck.ext4 -n -f "$dev" >"$T_WORK/fsck.out" 2>&1; then
                pass ext4-fsck-clean
            else
                show_file "$T_WORK/fsck.out" 30
                fail ext4-fsck-clean "fsck -n found problems after kill + recover"
            fi
            mount "$dev" "$mnt" && [[ $(md5sum <"$mnt/big") == "$sum" ]] && pass ext4-remount-same-data \
                || fail ext4-remount-same-data "the big file changed across umount/mount"
            umount "$mnt"
        fi
    else
        fail ext4-mkfs "mkfs.ext4 or mount on $dev failed"
    fi
    dev_del "$id" >/dev/null 2>&1
    [[ ! -e $sf ]] && pass del-removes-state-file || fail del-removes-state-file "$sf left"
fi

# policies -------------------------------------------------------------------------
# wait: IO issued while no server runs waits for the next one
if must_add wait-add loop --file "$T_WORK/loop.img" --recovery wait; then
    id=$DEV_ID dev=$DEV_PATH
    put "$dev" 3 1
    if kill_server wait "$id"; then
        dd if="$dev" of="$T_WORK/wait.read" bs=1M skip=3 count=1 iflag=direct status=none &
        rd=$!
        bg_track "$rd"
        sleep 2
        pid_alive "$rd" && pass wait-io-waits || fail wait-io-waits "a read finished while no server ran"
        if recover wait "$id"; then
            if wait_pid_exit "$rd" 60 && wait "$rd" && cmp -s "$T_WORK/wait.read" "$T_WORK/pat.1"; then
                pass wait-io-done-after-recover
            else
                fail wait-io-done-after-recover "the waiting read failed or returned other data"
            fi
        fi
    fi
    dev_del "$id" >/dev/null 2>&1
fi

# fail: while no server runs, IO fails at once
if ! "$UBLK" features | grep -qx USER_RECOVERY_FAIL_IO; then
    skip policy-fail "SKIPPED: this kernel ($(uname -r)) lacks UBLK_F_USER_RECOVERY_FAIL_IO (Linux 6.13+)"
elif must_add fail-add loop --file "$T_WORK/loop.img" --recovery fail; then
    id=$DEV_ID dev=$DEV_PATH
    put "$dev" 5 2
    if kill_server fail "$id" FAIL_IO; then
        if run_with_timeout 20 dd if="$dev" of=/dev/null bs=4k count=1 skip=7 iflag=direct status=none 2>/dev/null; then
            fail fail-io-fails "a read succeeded while no server ran"
        else
            rc=$?
            ((rc == 124)) && fail fail-io-fails "a read hung instead of failing" || pass fail-io-fails
        fi
        if recover fail "$id"; then
            same "$dev" 5 2 && pass fail-data-after-recover || fail fail-data-after-recover "data differs after recover"
        fi
    fi
    dev_del "$id" >/dev/null 2>&1
fi

# C ABI: c-loop -r reissue, kill -9, c-loop -R ID ----------------------------------
c_start() { # LOG ARGS...: starts c-loop in the background; sets C_PID, DEV_ID, DEV_PATH
    local log=$1
    shift
    "$C_DIR/c-loop" "$@" >"$log" 2>"$log.err" &
    C_PID=$!
    bg_track "$C_PID"
    wait_until 60 grep -q ublkb "$log" && parse_add_line "$(cat "$log")"
}
if [[ ! -x $C_DIR/c-loop ]]; then
    fail c-loop "$C_DIR/c-loop missing: run make"
elif c_start "$T_WORK/c1.out" -f "$T_WORK/loop.img" -r reissue -q 2; then
    id=$DEV_ID dev=$DEV_PATH
    put "$dev" 9 3
    if kill_server c "$id" && c_start "$T_WORK/c2.out" -R "$id" && [[ $DEV_ID == "$id" ]]; then
        same "$dev" 9 3 && pass c-recover-data || fail c-recover-data "data differs after c-loop -R"
        FIO_TIMEOUT=180 T_FIO_SIZE=64M fio_verify c-recovered "$dev"
        kill -TERM "$C_PID"
        if wait_pid_exit "$C_PID" 30 && wait_until 10 dev_absent "$id"; then
            pass c-recovered-stops
        else
            fail c-recovered-stops "c-loop -R did not stop and remove the device on SIGTERM"
        fi
    else
        show_file "$T_WORK/c2.out.err"
        fail c-recover "c-loop -R $id did not serve the device"
    fi
else
    show_file "$T_WORK/c1.out.err"
    fail c-loop-add "c-loop -r reissue did not start"
fi

# refusals ----------------------------------------------------------------------------
if must_add norec-add loop --file "$T_WORK/loop.img"; then
    id=$DEV_ID
    kill -KILL "$(server_pid "$id")"
    wait_until 30 state_is "$id" DEAD
    out=$(run_with_timeout 60 "$UBLK" recover "$id" 2>&1)
    rc=$?
    ((rc == 1)) && grep -q "not added with recovery" <<<"$out" && pass recover-without-policy-refused \
        || fail recover-without-policy-refused "rc=$rc: $out"
    dev_del "$id" >/dev/null 2>&1
fi
# a state file left by an earlier device with the same id (deleted by hand, or
# kept in a --state-dir `ublk del` does not know) is refused (ESTALE), not served
sdir=/run/ublk
if must_add stale-old loop --file "$T_WORK/loop.img" --recovery reissue --queues 1 --depth 32; then
    id=$DEV_ID
    cp "$sdir/$id.state" "$T_WORK/old.state"
    dev_del "$id" >/dev/null 2>&1
    if must_add stale-new null --size 64M --recovery reissue --queues 1 --depth 32 --id "$id"; then
        kill_server stale "$id"
        cp "$sdir/$id.state" "$T_WORK/new.state"
        cp "$T_WORK/old.state" "$sdir/$id.state"
        out=$(run_with_timeout 90 "$UBLK" recover "$id" 2>&1)
        rc=$?
        if ((rc == 1)) && grep -q "ESTALE" <<<"$out" && grep -q "earlier device" <<<"$out" && state_is "$id" QUIESCED; then
            pass "stale-state-file-refused (${out:0:140})"
        else
            fail stale-state-file-refused "rc=$rc: $out; $(list_row "$id")"
        fi
        cp "$T_WORK/new.state" "$sdir/$id.state"
        recover stale "$id" && pass stale-own-state-file-recovers
        dev_del "$id" >/dev/null 2>&1
    fi
fi
out=$(run_with_timeout 60 "$UBLK" recover 999 2>&1)
rc=$?
((rc == 1)) && grep -q "999" <<<"$out" && pass recover-unknown-id || fail recover-unknown-id "rc=$rc: $out"
out=$(run_with_timeout 60 "$UBLK" add mem --recovery reissue 2>&1)
rc=$?
((rc == 2)) && grep -q "mem target" <<<"$out" && pass add-mem-recovery-refused || fail add-mem-recovery-refused "rc=$rc: $out"
out=$(run_with_timeout 60 "$UBLK" add null --recovery later 2>&1)
rc=$?
((rc == 2)) && grep -q "unknown recovery policy" <<<"$out" && pass add-bad-policy || fail add-bad-policy "rc=$rc: $out"
out=$(run_with_timeout 60 "$UBLK" recover 2>&1)
(($? == 2)) && pass recover-no-id || fail recover-no-id "$out"
