#!/usr/bin/env bash
# Scenario 7 (CLI part): `ublk features`, `ublk list` for live servers of each
# target, `--id`, `--read-only`, and `ublk del --all` removing several
# devices at once (and their servers); `ublk del 999` exits 1 naming the errno;
# loop over a file whose size is not a multiple of 512; a read-only loop.
# compat: yes
# timeout: 240
. "$(dirname "$0")/lib.sh"
t_require blockdev

# --- features ------------------------------------------------------------------
out=$(run_with_timeout 30 "$UBLK" features 2>"$T_WORK/f.err")
rc=$?
if ((rc != 0)); then
    fail features "ublk features exited $rc: $(cat "$T_WORK/f.err")"
else
    hex=$(head -n1 <<<"$out")
    names=$(tail -n +2 <<<"$out")
    log "features on $(uname -r): $hex: $(tr '\n' ' ' <<<"$names")"
    if [[ ! $hex =~ ^0x[0-9a-f]+$ ]]; then
        fail features-format "first line '$hex' is not a hex mask"
    else
        bits=0
        v=$((hex))
        while ((v)); do bits=$((bits + (v & 1))); v=$((v >> 1)); done
        n=$(grep -c . <<<"$names")
        if ((n == bits)) && ! grep -Evq '^[A-Z0-9_]+$|^bit[0-9]+$' <<<"$names"; then
            pass "features-format ($n names for $hex)"
        else
            fail features-format "$n names for $bits bits, or malformed names: $(tr '\n' ' ' <<<"$names")"
        fi
        for f in CMD_IOCTL_ENCODE USER_COPY; do
            grep -qx "$f" <<<"$names" && pass "features-has-$f" || fail "features-has-$f" "$f missing"
        done
        unknown=$(grep -E '^bit[0-9]+$' <<<"$names" | tr '\n' ' ')
        if [[ -z $unknown ]]; then
            pass features-all-named
        elif [[ ${UBLK_KERNEL_SERIES:-} == 7 ]]; then
            fail features-all-named "kernel $(uname -r) reports bits this engine cannot name: $unknown"
        else
            skip features-all-named "kernel $(uname -r) reports unnamed bits: $unknown"
        fi
    fi
fi

# --- list: one device of each target ---------------------------------------------
hdr=$(run_with_timeout 30 "$UBLK" list | head -n1 | tr -s ' ' | sed 's/ $//')
if [[ $hdr == "ID PATH TARGET SIZE QUEUES DEPTH MODE STATE PID RECOVERY" ]]; then pass list-header; else fail list-header "header is '$hdr'"; fi

# the mode `auto` resolves to: the best the kernel offers (mem always copies)
AUTO=copy
for f in USER_COPY:user-copy ZERO_COPY:register AUTO_BUF_REG:auto-buf-reg; do
    grep -qx "${f%%:*}" <<<"${names:-}" && AUTO=${f#*:}
done
log "auto data mode on this kernel: $AUTO"

truncate -s 48M "$T_WORK/backing.img"
declare -A WANT
ids=()
pids=()
if must_add add-mem mem --queues 2 --depth 32 --size 64M; then
    ids+=("$DEV_ID"); WANT[$DEV_ID]="mem 64M $Q2 32 copy"
fi
if must_add add-loop loop --queues 1 --depth 16 --file "$T_WORK/backing.img"; then
    ids+=("$DEV_ID"); WANT[$DEV_ID]="loop 48M 1 16 $AUTO"
fi
if must_add add-null null --queues 2 --depth 64; then
    ids+=("$DEV_ID"); WANT[$DEV_ID]="null 1G $Q2 64 $AUTO"
fi
for id in "${ids[@]}"; do
    row=$(list_row "$id")
    read -r r_id r_path r_target r_size r_q r_d r_mode r_state r_pid r_rec <<<"$row"
    read -r w_target w_size w_q w_d w_mode <<<"${WANT[$id]}"
    got="$r_path $r_target $r_size $r_q $r_d $r_mode $r_state $r_rec"
    want="/dev/ublkb$id $w_target $w_size $w_q $w_d $w_mode LIVE none"
    if [[ $got == "$want" ]] && pid_alive "$r_pid" && [[ $(cat "/proc/$r_pid/comm" 2>/dev/null) == ublk ]]; then
        pass "list-$w_target: $row"
        pids+=("$r_pid")
    else
        fail "list-$w_target" "row '$row', want '$id $want' with a live ublk pid before the recovery policy"
    fi
done
# each device has its own server process
if ((${#pids[@]} == 3)) && (($(printf '%s\n' "${pids[@]}" | sort -u | wc -l) == 3)); then
    pass list-distinct-servers
else
    fail list-distinct-servers "server pids: ${pids[*]}"
fi
# the devices serve IO (a quick smoke test each)
for id in "${ids[@]}"; do
    if run_with_timeout 60 dd if=/dev/urandom of="$T_WORK/chunk" bs=64K count=16 status=none \
        && run_with_timeout 60 dd if="$T_WORK/chunk" of="/dev/ublkb$id" bs=64K oflag=direct status=none \
        && run_with_timeout 60 dd if="/dev/ublkb$id" of="$T_WORK/back" bs=64K count=16 iflag=direct status=none; then
        if [[ ${WANT[$id]} == null* ]] || cmp -s "$T_WORK/chunk" "$T_WORK/back"; then
            pass "io-${WANT[$id]%% *}"
        else
            fail "io-${WANT[$id]%% *}" "read back differs from what was written on /dev/ublkb$id"
        fi
    else
        fail "io-${WANT[$id]%% *}" "dd on /dev/ublkb$id failed"
    fi
done

# --- del --all --------------------------------------------------------------------
t0=$SECONDS
if run_with_timeout 90 "$UBLK" del --all >"$T_WORK/delall.out" 2>&1; then
    pass "del-all (${#ids[@]} devices, $((SECONDS - t0))s)"
else
    show_file "$T_WORK/delall.out"
    fail del-all "ublk del --all failed"
fi
left=$(dev_ids | tr '\n' ' ')
rows=$(run_with_timeout 30 "$UBLK" list | tail -n +2)
if [[ -z $left && -z $rows ]]; then pass del-all-none-left; else fail del-all-none-left "left: '$left', list: '$rows'"; fi
alive=()
for p in "${pids[@]}"; do wait_pid_exit "$p" 20 || alive+=("$p"); done
if ((${#alive[@]} == 0)); then pass del-all-servers-exit; else fail del-all-servers-exit "servers still alive: ${alive[*]}"; fi
if ! compgen -G '/run/ublk/*.state' >/dev/null; then pass del-all-state-files; else fail del-all-state-files "left: $(ls /run/ublk/*.state)"; fi
# del --all with nothing to delete is fine
if run_with_timeout 30 "$UBLK" del --all; then pass del-all-empty; else fail del-all-empty "ublk del --all with no devices failed"; fi

# --- --id and --read-only -----------------------------------------------------------
if must_add add-id mem --size 16M --id 7; then
    if [[ $DEV_ID == 7 && $DEV_PATH == /dev/ublkb7 ]]; then pass add-id; else fail add-id "asked for id 7, got $DEV_ID $DEV_PATH"; fi
    dev_del "$DEV_ID"
fi
if must_add add-read-only mem --size 16M --read-only; then
    id=$DEV_ID dev=$DEV_PATH
    ro=$(blockdev --getro "$dev" 2>/dev/null)
    if run_with_timeout 30 dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
        fail read-only "a write to the read-only $dev succeeded"
    elif [[ $ro != 1 ]]; then
        fail read-only "blockdev --getro $dev says '$ro'"
    elif ! run_with_timeout 30 dd if="$dev" of=/dev/null bs=4k count=16 iflag=direct status=none; then
        fail read-only "reading the read-only $dev failed"
    else
        pass read-only
    fi
    dev_del "$id"
fi

# --- a command the kernel refuses: exit 1, errno named --------------------------------
run_with_timeout 30 "$UBLK" del 999 >"$T_WORK/del999.out" 2>"$T_WORK/del999.err"
rc=$?
if ((rc == 1)) && grep -Eq 'ENODEV|ENOENT' "$T_WORK/del999.err" && [[ ! -s $T_WORK/del999.out ]]; then
    pass "del-nonexistent: $(head -n1 "$T_WORK/del999.err")"
else
    fail del-nonexistent "ublk del 999 exited $rc: $(head -c 300 "$T_WORK/del999.err")"
fi

# --- loop: a file whose size is not a multiple of 512, and --read-only --------------------
ODD=$T_WORK/odd.img
head -c $(((10 << 20) + 100)) /dev/urandom >"$ODD"
cp "$ODD" "$T_WORK/odd.orig"
if must_add loop-odd-add loop --file "$ODD"; then
    id=$DEV_ID dev=$DEV_PATH
    bytes=$(blockdev --getsize64 "$dev")
    if [[ $bytes == $((10 << 20)) ]]; then pass "loop-odd-size-rounds-down ($bytes)"; else fail loop-odd-size-rounds-down "device has $bytes bytes, want $((10 << 20))"; fi
    # the last sector of the device is the file's last whole sector
    if cmp -s <(dd if="$dev" bs=512 skip=$(((10 << 20) / 512 - 1)) count=1 iflag=direct status=none) \
        <(dd if="$ODD" bs=512 skip=$(((10 << 20) / 512 - 1)) count=1 status=none); then
        pass loop-odd-last-sector
    else
        fail loop-odd-last-sector "the device's last sector differs from the file's"
    fi
    # writing the last sector leaves the 100-byte tail of the file alone
    head -c 512 /dev/urandom >"$T_WORK/sector"
    if run_with_timeout 30 dd if="$T_WORK/sector" of="$dev" bs=512 seek=$(((10 << 20) / 512 - 1)) oflag=direct conv=fsync status=none \
        && cmp -s <(tail -c 612 "$ODD" | head -c 512) "$T_WORK/sector" \
        && cmp -s <(tail -c 100 "$ODD") <(tail -c 100 "$T_WORK/odd.orig") \
        && [[ $(stat -c %s "$ODD") == $(((10 << 20) + 100)) ]]; then
        pass loop-odd-write-last-sector
    else
        fail loop-odd-write-last-sector "writing the last sector did not land exactly in the file"
    fi
    dev_del "$id"
fi
if must_add loop-ro-add loop --file "$ODD" --read-only; then
    id=$DEV_ID dev=$DEV_PATH
    sum0=$(sha256sum <"$ODD")
    if run_with_timeout 30 dd if=/dev/zero of="$dev" bs=4k count=1 oflag=direct status=none 2>/dev/null; then
        fail loop-read-only "a write to the read-only $dev succeeded"
    elif [[ $(blockdev --getro "$dev") != 1 ]]; then
        fail loop-read-only "blockdev --getro $dev is not 1"
    elif ! cmp -s <(dd if="$dev" bs=1M count=10 iflag=direct status=none) <(head -c $((10 << 20)) "$ODD"); then
        fail loop-read-only "reading the read-only loop device does not give the file"
    elif [[ $(sha256sum <"$ODD") != "$sum0" ]]; then
        fail loop-read-only "the backing file changed"
    else
        pass loop-read-only
    fi
    dev_del "$id"
fi

# --- add/IO/del cycles: nothing accumulates ------------------------------------------------
ok=1 ids_seen=()
for i in $(seq 1 10); do
    if ! dev_add mem --queues 2 --size 16M; then ok=0; echo "cycle $i: $ADD_ERR"; break; fi
    ids_seen+=("$DEV_ID")
    if ! run_with_timeout 30 dd if=/dev/urandom of="$DEV_PATH" bs=64k count=4 oflag=direct status=none; then ok=0; echo "cycle $i: IO failed"; fi
    if ! dev_del "$DEV_ID" || ! wait_until 10 dev_absent "$DEV_ID"; then ok=0; echo "cycle $i: del failed"; break; fi
done
if ((ok)) && [[ -z $(dev_ids) ]] && (($(printf '%s\n' "${ids_seen[@]}" | sort -u | wc -l) == 1)); then
    pass "add-io-del-cycles (10, id ${ids_seen[0]} reused each time)"
else
    fail add-io-del-cycles "ids: ${ids_seen[*]}; left: $(dev_ids | tr '\n' ' ')"
fi
