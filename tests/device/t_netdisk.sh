#!/usr/bin/env bash
# Lease send/recv on sockets (examples/netdisk.rs): a disk whose READs are
# received from and WRITEs sent to a socket per tag (the "remote" is a thread
# keeping the blocks in memory; a WRITE completes after the remote's
# acknowledgement, through Lease::complete_manually and backing IO).
# In every data mode the kernel supports (the others are skipped, loudly):
# fio crc32c verify over the whole device on 2 queues, `ublk list` shows the
# mode, SIGTERM removes the device and the example exits 0, and its counters
# show the data went through leases: copied_bytes=0 in the zero-copy modes,
# > 0 in copy and user-copy.
# compat: yes   (6.12 has user-copy and copy only)
# timeout: 360
. "$(dirname "$0")/lib.sh"
t_require fio

NETDISK=${UBLK_NETDISK_BIN:-$T_REPO/target/release/examples/netdisk}
if [[ ! -x $NETDISK ]]; then
    fail build "$NETDISK is missing: run \`cargo build --release --examples\`"
    exit 1
fi

feats=$(run_with_timeout 30 "$UBLK" features | tail -n +2)
declare -A NEED=([auto-buf-reg]=AUTO_BUF_REG [register]=ZERO_COPY [user-copy]=USER_COPY [copy]=)

for mode in auto-buf-reg register user-copy copy; do
    need=${NEED[$mode]}
    if [[ -n $need ]] && ! grep -qx "$need" <<<"$feats"; then
        skip "$mode" "kernel $(uname -r) lacks UBLK_F_$need: data mode $mode cannot run here"
        continue
    fi
    out=$T_WORK/nd-$mode.out err=$T_WORK/nd-$mode.err
    "$NETDISK" --zero-copy "$mode" --queues 2 --depth 16 --size 64M >"$out" 2>"$err" &
    pid=$!
    bg_track "$pid"
    if ! wait_until 60 grep -q . "$out" || ! parse_add_line "$(cat "$out")"; then
        show_file "$err"
        fail "$mode-start" "netdisk printed no '<id> <path>' within 60s"
        kill -KILL "$pid" 2>/dev/null
        continue
    fi
    id=$DEV_ID dev=$DEV_PATH
    row=$(list_row "$id")
    read -r _ _ r_target _ _ _ r_mode r_state _ <<<"$row"
    if [[ "$r_target $r_mode $r_state" == "netdisk $mode LIVE" ]]; then
        pass "$mode-list"
    else
        fail "$mode-list" "row '$row', want target netdisk, mode $mode, LIVE"
    fi
    T_FIO_SIZE=64M fio_verify "netdisk-$mode" "$dev" --iodepth=16 --bsrange=4k-512k
    wait_until 30 sig_handlers "$pid" || fail "$mode-handlers" "no SIGTERM handler: $(sig_ready "$pid")"
    kill -TERM "$pid"
    if wait_pid_exit "$pid" 60; then
        wait "$pid"
        rc=$?
        ((rc == 0)) && pass "$mode-sigterm-exit-0" || { show_file "$err"; fail "$mode-sigterm-exit-0" "netdisk exited $rc"; }
    else
        fail "$mode-sigterm-exit-0" "netdisk did not exit within 60s of SIGTERM"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait_until 10 dev_absent "$id" && pass "$mode-device-removed" || fail "$mode-device-removed" "device $id still exists"
    line=$(grep -m1 "stopped: mode=" "$err")
    copied=$(sed -n 's/.* copied_bytes=\([0-9]*\).*/\1/p' <<<"$line")
    leases=$(sed -n 's/.* lease_ops=\([0-9]*\).*/\1/p' <<<"$line")
    if [[ -z $copied || -z $leases ]]; then
        fail "$mode-counters" "no counters line in the example's stderr: $(head -c 300 "$err")"
    elif ((leases == 0)); then
        fail "$mode-counters" "lease_ops=0: the IO did not go through leases ($line)"
    elif [[ $mode == auto-buf-reg || $mode == register ]] && ((copied != 0)); then
        fail "$mode-counters" "zero-copy mode copied $copied bytes ($line)"
    elif [[ $mode == user-copy || $mode == copy ]] && ((copied == 0)); then
        fail "$mode-counters" "$mode mode reports no copied bytes ($line)"
    else
        pass "$mode-counters ($line)"
    fi
done
