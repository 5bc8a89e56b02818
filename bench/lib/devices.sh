# bench/lib/devices.sh — sourced by bench/run: setting up and removing the
# devices it measures (our CLI, the C, Python and Go examples, rublk, the
# kernel's null_blk, loop and nbd), their backing files and peers (tmpfs,
# null_blk latency devices, qemu-nbd), and the servers' cpuset.  Uses
# bench/run's settings and state variables; defines functions only.
# shellcheck shell=bash

cleanup_device() {
    STOP_LINE=""
    case $CUR_KIND in
        libublk) local logoff=0 i
                 [ -f "$SERVER_LOG" ] && logoff=$(stat -c %s "$SERVER_LOG" 2>/dev/null || echo 0)
                 if ! timeout -k 5 30 "$UBLK" del "$CUR_ID" >"$TMP/del.out" 2>&1; then
                     loud "'ublk del $CUR_ID' failed: $(tail -c 300 "$TMP/del.out" | tr '\n' ' ')"
                     FAILED+=("libublk: 'ublk del $CUR_ID' failed")
                     # same kernel control commands (STOP_DEV, DEL_DEV): don't leave it behind
                     timeout -k 5 30 "$RUBLK" del -n "$CUR_ID" >/dev/null 2>&1 &&
                         log "removed device $CUR_ID with 'rublk del -n $CUR_ID' instead"
                 fi
                 # the server logs its counters as it stops: a bounded wait for the line
                 for ((i = 0; i < 50; i++)); do
                     STOP_LINE=$(tail -c +$((logoff + 1)) "$SERVER_LOG" 2>/dev/null |
                                 grep -m1 -E "^ublk: device $CUR_ID stopped: ")
                     [ -n "$STOP_LINE" ] && break
                     sleep 0.1
                 done ;;
        rublk)   timeout -k 5 30 "$RUBLK" del -n "$CUR_ID" >/dev/null 2>&1 ||
                     { loud "could not delete rublk device $CUR_ID"; FAILED+=("rublk: 'rublk del -n $CUR_ID' failed"); } ;;
        libublk-c|python|go) stop_c_example ;;
        loop)    losetup -d "$CUR_ID" 2>/dev/null || loud "could not detach $CUR_ID" ;;
        nbd)     timeout -k 5 30 nbd-client -d "$CUR_ID" >/dev/null 2>&1 || loud "could not disconnect $CUR_ID" ;;
        null_blk) modprobe -r null_blk 2>/dev/null || loud "could not unload null_blk"
                  NULLBLK_LOADED=0 ;;
    esac
    CUR_KIND="" CUR_ID="" CUR_PID=""
}

# Stop the running C example (CUR_PID, device CUR_ID): SIGTERM, a bounded wait,
# then 'ublk del' and finally SIGKILL; never leave the device behind.
stop_c_example() {
    local pid=$CUR_PID id=$CUR_ID name=$CUR_NAME rc=""
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null
    if ! wait_exit "$pid" 20; then
        loud "$name (pid $pid) still running 20 s after SIGTERM: trying 'ublk del $id'"
        FAILED+=("libublk-c: $name did not exit on SIGTERM")
        [ -n "$id" ] && timeout -k 5 30 "$UBLK" del "$id" >/dev/null 2>&1
        if ! wait_exit "$pid" 10; then
            loud "$name (pid $pid) still running after 'ublk del $id': SIGKILL"
            kill -KILL "$pid" 2>/dev/null
            wait_exit "$pid" 10 || loud "$name (pid $pid) survives SIGKILL"
        fi
    fi
    if proc_gone "$pid"; then
        wait "$pid" 2>/dev/null
        rc=$?
    fi
    [ -n "$id" ] && STOP_LINE=$(grep -m1 -E "device $id stopped: " "$CUR_ERR" 2>/dev/null)
    if [ "$rc" != 0 ]; then
        loud "$name exited ${rc:-?} (want 0 after SIGTERM); stderr: $(tail -c 600 "$CUR_ERR" 2>/dev/null | tr '\n' '|')"
        FAILED+=("libublk-c: $name exited ${rc:-?} after SIGTERM")
    elif [ -s "$CUR_ERR" ]; then
        log "$name stderr: $(tail -c 300 "$CUR_ERR" | tr '\n' '|')"
    fi
    # the device must be gone: the example deletes it on its way out
    if [ -n "$id" ] && [ -e "/dev/ublkc$id" ]; then
        local i
        for ((i = 0; i < 30; i++)); do [ -e "/dev/ublkc$id" ] || break; sleep 0.1; done
        if [ -e "/dev/ublkc$id" ]; then
            loud "$name left device $id behind: removing it"
            FAILED+=("libublk-c: $name left device $id behind")
            timeout -k 5 30 "$UBLK" del "$id" >/dev/null 2>&1 ||
                timeout -k 5 30 "$RUBLK" del -n "$id" >/dev/null 2>&1 ||
                loud "could not remove ublk device $id"
        fi
    fi
    CUR_PID=""
}

# proc_gone PID: the process has exited (a zombie child counts: 'wait' reaps it).
# Builtins only: these run in polling loops, and every fork is slow under TCG.
proc_gone() {
    local st
    kill -0 "$1" 2>/dev/null || return 0
    IFS= read -r st <"/proc/$1/stat" 2>/dev/null || return 0
    st=${st##*) }                       # "pid (comm) S ...": the state follows the comm
    [ "${st%% *}" = Z ]
}

wait_exit() { # wait_exit PID SECONDS: 0 once PID is gone, 1 if it still runs after SECONDS
    local end=$((SECONDS + $2))
    while ((SECONDS < end)); do
        proc_gone "$1" && return 0
        sleep 0.1
    done
    proc_gone "$1"
}

# The latency-bound backing of loop-lat and mirror-lat: three null_blk devices
# that complete every IO after BENCH_LAT_US (default 10 ms, timer mode) and
# keep no data (memory_backed=0): at that latency what limits the IOPS is how
# many IOs are in flight, not the CPU, so a mirror whose legs ran one after
# the other would reach half the loop's writes, and one whose legs run in
# parallel all of them.  loop-lat uses nullb0, mirror-lat nullb1 and nullb2.
ensure_lat_devices() {
    [ ${#LAT_DEVS[@]} -eq 3 ] && return 0
    reload_null_blk "latency devices" 3 queue_mode=2 irqmode=2 completion_nsec=$((LAT_US * 1000)) \
        memory_backed=0 submit_queues=1 hw_queue_depth=128 gb=4 || return 1
    LAT_DEVS=(/dev/nullb0 /dev/nullb1 /dev/nullb2)
}

# reload_null_blk WHAT COUNT ARG...: loads null_blk afresh with COUNT devices
# (/dev/nullb0...) and the module arguments ARG (WHAT names them in the log)
reload_null_blk() {
    local what=$1 count=$2 i
    shift 2
    if [ -d /sys/module/null_blk ]; then
        modprobe -r null_blk 2>/dev/null || return 1
    fi
    LAT_DEVS=() NODATA_DEVS=()
    log "$what: modprobe null_blk nr_devices=$count $*"
    modprobe null_blk nr_devices="$count" "$@" 2>"$TMP/modprobe.err" ||
        { loud "modprobe null_blk nr_devices=$count $* failed: $(tr '\n' ' ' <"$TMP/modprobe.err")"; return 1; }
    NULLBLK_LOADED=1
    for ((i = 0; i < count; i++)); do
        wait_blockdev /dev/nullb$i 10 || { loud "/dev/nullb$i did not appear"; return 1; }
    done
}

# The backing of mirror-nullb: two null_blk devices that complete every IO at
# once (irqmode=0) and keep no data (memory_backed=0), so that the backing IO
# costs no CPU copy, as on a device that moves data by DMA: what is left to
# compare between the data modes is the server's own copy (copy mode) against
# none (zero copy).  On the tmpfs legs every leg's write is itself a copy.
ensure_nodata_devices() {
    [ ${#NODATA_DEVS[@]} -eq 2 ] && return 0
    reload_null_blk "no-data devices" 2 queue_mode=2 irqmode=0 memory_backed=0 submit_queues=1 \
        hw_queue_depth=128 gb=4 || return 1
    NODATA_DEVS=(/dev/nullb0 /dev/nullb1)
}

# Unloads null_blk after a group that used the latency or the no-data devices.
release_lat_devices() {
    [ $((${#LAT_DEVS[@]} + ${#NODATA_DEVS[@]})) -gt 0 ] || return 0
    modprobe -r null_blk 2>/dev/null || loud "could not unload null_blk (the latency or no-data devices)"
    NULLBLK_LOADED=0 LAT_DEVS=() NODATA_DEVS=()
}

# qemu-nbd serving the loop file on NBD_PORT (the nbd group): started once,
# stopped before the tmpfs goes
ensure_nbd_server() {
    if [ -n "$NBD_SRV_PID" ] && ! proc_gone "$NBD_SRV_PID"; then return 0; fi
    command -v qemu-nbd >/dev/null || { START_ERR="qemu-nbd missing (package qemu-utils: tests/vm/setup)"; return 1; }
    ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
    log "qemu-nbd -f raw -t -e 4 -b 127.0.0.1 -p $NBD_PORT $BACKING"
    qemu-nbd -f raw -t -e 4 -b 127.0.0.1 -p "$NBD_PORT" "$BACKING" >"$TMP/qemu-nbd.log" 2>&1 </dev/null &
    NBD_SRV_PID=$!
    local i hex
    hex=$(printf '%04X' "$NBD_PORT")
    for ((i = 0; i < 300; i++)); do
        grep -Eq ":$hex 0+:0000 0A" /proc/net/tcp 2>/dev/null && return 0
        proc_gone "$NBD_SRV_PID" && break
        sleep 0.1
    done
    START_ERR="qemu-nbd did not listen on $NBD_PORT: $(tail -c 300 "$TMP/qemu-nbd.log" | tr '\n' ' ')"
    release_nbd_server
    return 1
}

release_nbd_server() {
    [ -n "$NBD_SRV_PID" ] || return 0
    kill -TERM "$NBD_SRV_PID" 2>/dev/null
    wait_exit "$NBD_SRV_PID" 20 || kill -KILL "$NBD_SRV_PID" 2>/dev/null
    wait "$NBD_SRV_PID" 2>/dev/null
    NBD_SRV_PID=""
}

release_tmpfs() {
    release_nbd_server
    if [ -n "$TMPFS" ]; then
        umount "$TMPFS" 2>/dev/null || umount -l "$TMPFS" 2>/dev/null
        rmdir "$TMPFS" 2>/dev/null
        TMPFS="" BACKING="" LEGS=""
    fi
}

# A group's devices: the CUR_* state of the device just started goes into slot
# S (save_slot), and comes back from it to remove that device (load_slot).
save_slot() {
    local s=$1
    S_KIND[s]=$CUR_KIND S_ID[s]=$CUR_ID S_PID[s]=$CUR_PID S_NAME[s]=$CUR_NAME S_ERR[s]=$CUR_ERR
    CUR_KIND="" CUR_ID="" CUR_PID="" CUR_NAME=""
}
load_slot() {
    local s=$1
    CUR_KIND=${S_KIND[s]:-} CUR_ID=${S_ID[s]:-} CUR_PID=${S_PID[s]:-} CUR_NAME=${S_NAME[s]:-}
    CUR_ERR=${S_ERR[s]:-$TMP/c.err}
    S_KIND[s]="" S_ID[s]="" S_PID[s]=""
}

cleanup() {
    cleanup_device
    local s
    for s in "${!S_KIND[@]}"; do
        [ -n "${S_KIND[s]}" ] || continue
        load_slot "$s"
        cleanup_device
    done
    [ "$NULLBLK_LOADED" = 1 ] && modprobe -r null_blk 2>/dev/null
    release_tmpfs
    [ -n "$SRV_CG" ] && rmdir "$SRV_CG" 2>/dev/null
    rm -rf "$TMP"
}

wait_blockdev() { # wait_blockdev PATH [SECONDS]: udev creates the node; bounded wait
    local end=$((SECONDS + ${2:-10}))
    while ((SECONDS < end)); do
        [ -b "$1" ] && return 0
        sleep 0.1
    done
    [ -b "$1" ]
}

ublk_chars() { ls /dev/ublkc* 2>/dev/null | sed 's,/dev/ublkc,,' | sort -n; }

# Remove ublk devices that appeared since BEFORE (a list of ids) after a failed add.
reap_new_ublk() { # reap_new_ublk ENGINE "BEFORE-IDS"
    local id
    for id in $(ublk_chars); do
        case " $2 " in *" $id "*) continue ;; esac
        log "removing leftover ublk device $id"
        if [ "$1" = rublk ]; then
            timeout -k 5 30 "$RUBLK" del -n "$id" >/dev/null 2>&1
        else
            timeout -k 5 30 "$UBLK" del "$id" >/dev/null 2>&1 ||
                timeout -k 5 30 "$RUBLK" del -n "$id" >/dev/null 2>&1
        fi
    done
}

ensure_ublk_drv() {
    [ -c /dev/ublk-control ] && return 0
    modprobe ublk_drv 2>"$TMP/modprobe.err" || { cat "$TMP/modprobe.err" >&2; return 1; }
    local i
    for ((i = 0; i < 50; i++)); do [ -c /dev/ublk-control ] && return 0; sleep 0.1; done
    return 1
}

# One tmpfs for the loop file and the two legs (room for all of them; pages are
# only taken as the files are written).
ensure_tmpfs() {
    [ -n "$TMPFS" ] && return 0
    TMPFS=$(mktemp -d /tmp/ublk-bench-tmpfs.XXXXXX) || return 1
    if ! mount -t tmpfs -o "size=$((FILE_MB + 2 * LEG_MB + 64))m" ublk-bench "$TMPFS"; then
        rmdir "$TMPFS"; TMPFS=""
        return 1
    fi
}

ensure_backing_file() {
    [ -n "$BACKING" ] && [ -f "$BACKING" ] && return 0
    ensure_tmpfs || return 1
    BACKING=$TMPFS/backing.img
    log "writing the ${FILE_MB} MiB loop backing file on tmpfs ($BACKING)..."
    local t0=$SECONDS
    if ! dd if=/dev/zero of="$BACKING" bs=1M count="$FILE_MB" status=none; then
        rm -f "$BACKING"; BACKING=""
        return 1
    fi
    log "backing file ready in $((SECONDS - t0)) s"
}

# the two files of c-mirror (its legs) and c-stripe, fully written like the loop file
ensure_leg_files() {
    [ -n "$LEGS" ] && return 0
    ensure_tmpfs || return 1
    local i f t0=$SECONDS list=""
    log "writing two ${LEG_MB} MiB mirror/stripe files on tmpfs ($TMPFS/leg0.img, leg1.img)..."
    for i in 0 1; do
        f=$TMPFS/leg$i.img
        if ! dd if=/dev/zero of="$f" bs=1M count="$LEG_MB" status=none; then
            rm -f "$f"
            return 1
        fi
        list=$list${list:+,}$f
    done
    LEGS=$list
    log "mirror/stripe files ready in $((SECONDS - t0)) s"
}

# rublk_mode FLAGS: the data mode that rublk's device flags (its "flags 0x..."
# dump) give: UBLK_F_AUTO_BUF_REG (1 << 11), UBLK_F_SUPPORT_ZERO_COPY (1 << 0),
# UBLK_F_USER_COPY (1 << 7), else copy.
rublk_mode() {
    local f=$(($1))
    if ((f & (1 << 11))); then echo auto-buf-reg
    elif ((f & 1)); then echo register
    elif ((f & (1 << 7))); then echo user-copy
    else echo copy; fi
}

# srv_exec CMD...: execs CMD in the servers' cpuset (SRV_CG) when there is one;
# run it in a subshell: (srv_exec CMD ...).  Its children (the daemons the CLI and
# rublk fork) inherit the cgroup.
#
# Why: every server pins its queue thread to one CPU of the queue's affinity set
# (ours: CPU dev_id % nproc, rublk: a random one), and a group runs several
# devices at once, so with 2 CPUs a group's servers land on different CPUs. Under
# TCG that alone decides up to 15 %: two identical `ublk add loop` devices in one
# VM (ids 0 and 1, fio on each in turn) gave 0.84-0.94 for the one on CPU 1 in
# every run. In a cpuset the servers' own sched_setaffinity cannot leave it (an
# affinity outside the set is refused, and both ignore that), so every server of
# every engine runs on the same CPU(s) and fio and the kernel's own workers keep
# the rest.
srv_exec() {
    if [ -n "$SRV_CG" ] && [ "$GROUP_FREE" = 0 ] && ! echo "$BASHPID" >"$SRV_CG/cgroup.procs" 2>/dev/null; then
        echo "bench: could not join $SRV_CG" >&2
        exit 126
    fi
    exec "$@"
}

# setup_srv_cgroup: makes the cgroup v2 cpuset of the servers (BENCH_SRV_CPUS),
# sets SRV_CG; loud and unset when the kernel has no cpuset controller.
setup_srv_cgroup() {
    [ "$SRV_CPUS" = none ] && { log "servers: not in a cpuset (BENCH_SRV_CPUS=none)"; return 0; }
    local root=/sys/fs/cgroup cg=/sys/fs/cgroup/ublk-bench-$$
    if ! grep -qw cpuset "$root/cgroup.controllers" 2>/dev/null ||
       ! echo +cpuset >"$root/cgroup.subtree_control" 2>/dev/null ||
       ! mkdir "$cg" 2>/dev/null; then
        loud "no cgroup v2 cpuset at $root: the servers pin themselves wherever they choose (figures of one group may differ by where each server landed)"
        SRV_CPUS=none
        return 0
    fi
    if ! echo "$SRV_CPUS" >"$cg/cpuset.cpus" 2>/dev/null; then
        rmdir "$cg"
        loud "BENCH_SRV_CPUS=$SRV_CPUS: the cpuset refused it (CPUs here: $(cat "$root/cpuset.cpus.effective" 2>/dev/null))"
        exit 2
    fi
    SRV_CG=$cg
    log "servers: in cgroup $cg, cpuset.cpus $(cat "$cg/cpuset.cpus.effective")"
}

# start_device ENGINE TARGET: sets DEV (block device path), CUR_KIND/CUR_ID, and
# DEV_MODE when the device tells its data mode (rublk).  TARGET is a name of
# ALL_TARGETS without the engine: BASE[:MODE] (our devices: MODE, default copy).
# Returns non-zero (after a loud message) when the device could not be made.
start_device() {
    local engine=$1 target=$2 before out err rc line
    local base=${target%%:*} zmode=copy
    case $target in *:*) zmode=${target#*:} ;; esac
    DEV="" DEV_MODE=""
    out=$TMP/add.out err=$TMP/add.err
    case $engine in
    libublk|rublk)
        local bin=$UBLK
        [ "$engine" = rublk ] && bin=$RUBLK
        [ -x "$bin" ] || { START_ERR="$engine binary not found at $bin$( [ "$engine" = libublk ] && echo ' (cargo build --release first)' || echo ' (run bench/setup)')"; return 1; }
        ensure_ublk_drv || { START_ERR="ublk_drv not available (modprobe ublk_drv failed)"; return 1; }
        local args=()
        if [ "$engine" = libublk ]; then
            case $base in
                null) args=(add null --queues 1 --depth 64) ;;
                mem)  args=(add mem --queues 1 --depth 64 --size 1G) ;;
                loop) ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
                      args=(add loop --queues 1 --depth 64 --file "$BACKING") ;;
                loop-lat) ensure_lat_devices || { START_ERR="could not set up the null_blk latency devices"; return 1; }
                      args=(add loop --queues 1 --depth 64 --file "${LAT_DEVS[0]}") ;;
                nbd)  ensure_nbd_server || return 1
                      [ "$target" = nbd ] && zmode=auto-buf-reg
                      args=(add nbd --host 127.0.0.1 --port "$NBD_PORT" --queues "$NBD_QUEUES" --depth 64)
                      [ "$NBD_CONNS" = 1 ] || args+=(--connections "$NBD_CONNS") ;;
            esac
            args+=(--zero-copy "$zmode")
        else
            case $target in
                null) args=(add null -q 1 -d 64) ;;
                loop|loop-zc)
                      ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
                      args=(add loop -q 1 -d 64 -f "$BACKING")
                      [ "$target" = loop-zc ] && args+=(-z) ;;
            esac
        fi
        before=$(ublk_chars | tr '\n' ' ')
        log "$engine $target: $(basename "$bin") ${args[*]}"
        # stdout goes to a file, not a pipe: a daemon that keeps the pipe open would hang $(...)
        (srv_exec timeout -k 5 60 "$bin" "${args[@]}") >"$out" 2>"$err" </dev/null
        rc=$?
        if [ "$engine" = libublk ]; then
            # contract: exactly one line "<id> <path>", exit 0 once the node exists
            if [ $rc -eq 0 ] && [ "$(grep -c . "$out")" -eq 1 ] &&
               line=$(grep -E '^[0-9]+ /dev/ublkb[0-9]+$' "$out"); then
                CUR_ID=${line%% *} DEV=${line#* }
            fi
        else
            # rublk prints libublk's dump: "dev id N: nr_hw_queues 1 queue_depth 64 ..."
            if [ $rc -eq 0 ] && line=$(grep -m1 -E '^dev id [0-9]+:' "$out"); then
                CUR_ID=$(sed -E 's/^dev id ([0-9]+):.*/\1/' <<<"$line")
                DEV=/dev/ublkb$CUR_ID
                log "rublk: $(grep -m1 -E 'flags 0x' "$out" | sed 's/^[[:space:]]*//')"
                local flags
                flags=$(grep -m1 -o -E 'flags 0x[0-9a-fA-F]+' "$out" | sed 's/^flags //')
                [ -n "$flags" ] && DEV_MODE=$(rublk_mode "$flags")
            fi
        fi
        if [ -z "$DEV" ]; then
            local why="exit $rc"
            if [ $rc -eq 0 ]; then
                if [ "$engine" = libublk ]; then why="exit 0, but stdout is not exactly one line '<id> /dev/ublkbN'"
                else why="exit 0, but no 'dev id N:' line on stdout"; fi
            fi
            START_ERR="'$(basename "$bin") ${args[*]}' failed ($why); stdout: $(head -c 600 "$out" | tr '\n' '|') stderr: $(tail -c 600 "$err" | tr '\n' '|')"
            reap_new_ublk "$engine" "$before"
            return 1
        fi
        CUR_KIND=$engine
        ;;
    libublk-c|python|go)
        local cbase=${base%-lat}
        local bin=$CBIN/c-${cbase%-nullb} name=c-$base args=()
        if [ "$engine" = python ]; then
            bin=$PYTHON name=py-$base
            [ -x "$bin" ] || { START_ERR="pyublk's venv python not found at $bin (make python first)"; return 1; }
        elif [ "$engine" = go ]; then
            bin=$GOBIN/${base%-req} name=go-$base
            [ -x "$bin" ] || { START_ERR="Go example not found at $bin (make build, with Go >= 1.21)"; return 1; }
        else
            [ -x "$bin" ] || { START_ERR="C example not found at $bin (make build first)"; return 1; }
        fi
        ensure_ublk_drv || { START_ERR="ublk_drv not available (modprobe ublk_drv failed)"; return 1; }
        case $engine/$base in
            python/ramdisk) args=("$ROOT/python/examples/ramdisk.py" --size 1G --queues 1 --depth 64) ;;
            python/loop|python/loop-req)
                            ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
                            args=("$ROOT/python/examples/loop.py" --file "$BACKING" --queues 1 --depth 64
                                  --zero-copy "$zmode")
                            [ "$base" = loop-req ] && args+=(--per-request) ;;
            go/ramdisk)     args=(-size 1G -queues 1 -depth 64) ;;
            go/loop|go/loop-req)
                            ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
                            args=(-file "$BACKING" -queues 1 -depth 64 -lease -zero-copy "$zmode")
                            [ "$base" = loop-req ] && args+=(-per-request) ;;
        esac
        [ "$engine" = libublk-c ] && case $base in
            null)       args=(-q 1 -d 64 -s 1G) ;;
            ramdisk)    args=(-q 1 -d 64 -s 1G -b) ;;
            threadpool) args=(-q 1 -d 64 -s 1G -b) ;;
            loop)       ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
                        args=(-q 1 -d 64 -f "$BACKING") ;;
            mirror)     ensure_leg_files || { START_ERR="could not create the tmpfs mirror/stripe files"; return 1; }
                        args=(-q 1 -d 64 -f "$LEGS") ;;
            stripe)     ensure_leg_files || { START_ERR="could not create the tmpfs mirror/stripe files"; return 1; }
                        args=(-q 1 -d 64 -f "$LEGS" -c "$CHUNK") ;;
            mirror-lat) ensure_lat_devices || { START_ERR="could not set up the null_blk latency devices"; return 1; }
                        args=(-q 1 -d 64 -f "${LAT_DEVS[1]},${LAT_DEVS[2]}") ;;
            mirror-nullb) ensure_nodata_devices || { START_ERR="could not set up the null_blk no-data devices"; return 1; }
                        args=(-q 1 -d 64 -f "${NODATA_DEVS[0]},${NODATA_DEVS[1]}") ;;
        esac
        [ "$engine" = libublk-c ] && args+=(-z "$zmode")
        before=$(ublk_chars | tr '\n' ' ')
        log "$engine $target: $name ${args[*]}"
        # Foreground server: run it in the background, stdout to a file, and wait
        # (bounded) for its one line "<id> /dev/ublkbN".  LD_LIBRARY_PATH beats the
        # binary's RUNPATH: it loads our private copy of libublk.so.  (srv_exec
        # execs in place: $! is still the server's pid.)
        # (empty the files first: polling must never see the previous target's line)
        CUR_ERR=$TMP/c-$SLOT.err
        : >"$out"; : >"$CUR_ERR"
        # (pyublk loads the libublk.so installed in its venv by `make python`)
        # setsid: the server gets its own session, as the CLI's and rublk's daemons
        # do (they setsid when they detach). With the kernel's autogroup scheduling
        # (on in Debian's kernels) a session is a scheduling group: left in this
        # script's session, a foreground server would share one group's CPU with
        # fio, and lose up to a third of its IOPS against the daemons for that
        # reason alone. (Not a job-control shell: setsid execs in place, so $! is
        # the server's pid; checked below.)
        (srv_exec env LD_LIBRARY_PATH="${CBIN:-}" setsid "$bin" "${args[@]}") >"$out" 2>"$CUR_ERR" </dev/null &
        local pid=$! end=$((SECONDS + 60)) first
        line=""
        CUR_KIND=$engine CUR_PID=$pid CUR_NAME=$name CUR_ID=""
        while ((SECONDS < end)); do
            # (read succeeds only on a whole line, newline included)
            if IFS= read -r first 2>/dev/null <"$out" && [[ $first =~ ^[0-9]+\ /dev/ublkb[0-9]+$ ]]; then
                line=$first
                break
            fi
            proc_gone "$pid" && break
            sleep 0.1
        done
        [ -n "$line" ] && CUR_ID=${line%% *}
        if [ -n "$line" ] && [ "$(ps -o sid= -p "$pid" 2>/dev/null | tr -d ' ')" != "$pid" ]; then
            log "warning: $name (pid $pid) does not lead its own session: it shares fio's scheduling group"
        fi
        if [ -n "$line" ] && [ "$(grep -c . "$out")" -eq 1 ]; then
            DEV=${line#* }
        else
            local why
            if proc_gone "$pid"; then
                wait "$pid" 2>/dev/null; rc=$?
                why="exited $rc before printing '<id> /dev/ublkbN'"
            elif [ -n "$line" ]; then
                why="stdout is not exactly one line '<id> /dev/ublkbN'"
            else
                why="no '<id> /dev/ublkbN' line within 60 s"
            fi
            START_ERR="'$name ${args[*]}' failed ($why); stdout: $(head -c 600 "$out" | tr '\n' '|') stderr: $(tail -c 600 "$CUR_ERR" | tr '\n' '|')"
            proc_gone "$pid" || stop_c_example      # (stop_c_example reports on it too)
            CUR_KIND="" CUR_ID="" CUR_PID=""
            reap_new_ublk libublk "$before"
            return 1
        fi
        local lib
        lib=$(grep -m1 -o '/[^ ]*libublk\.so[^ ]*' "/proc/$pid/maps" 2>/dev/null)
        case $engine:$lib in
            python:*|libublk-c:"$CBIN"/*|go:"$CBIN"/*) ;;
            *) log "warning: $name loaded libublk from '${lib:-?}', not from our copy in $CBIN" ;;
        esac
        ;;
    kernel)
        case $target in
        null)
            if [ -d /sys/module/null_blk ]; then
                modprobe -r null_blk 2>/dev/null || { START_ERR="null_blk already loaded and cannot be unloaded"; return 1; }
            fi
            LAT_DEVS=() NODATA_DEVS=()
            log "kernel null: modprobe null_blk nr_devices=1 queue_mode=2 irqmode=0 submit_queues=1 hw_queue_depth=64 gb=250"
            modprobe null_blk nr_devices=1 queue_mode=2 irqmode=0 submit_queues=1 \
                hw_queue_depth=64 gb=250 2>"$err" ||
                { START_ERR="modprobe null_blk failed: $(tr '\n' ' ' <"$err")"; return 1; }
            NULLBLK_LOADED=1 CUR_KIND=null_blk CUR_ID=null_blk DEV=/dev/nullb0
            ;;
        loop)
            ensure_backing_file || { START_ERR="could not create the tmpfs backing file"; return 1; }
            [ -e /dev/loop-control ] || modprobe loop 2>/dev/null
            log "kernel loop: losetup --direct-io=on --find --show $BACKING"
            DEV=$(losetup --direct-io=on --find --show "$BACKING" 2>"$err") ||
                { START_ERR="losetup failed: $(tr '\n' ' ' <"$err")"; DEV=""; return 1; }
            CUR_KIND=loop CUR_ID=$DEV
            local dio
            dio=$(losetup -n -O DIO "$DEV" 2>/dev/null | tr -d ' ')
            if [ "$dio" != 1 ]; then
                START_ERR="losetup could not enable direct IO on $DEV (DIO=$dio): not the baseline we want"
                cleanup_device
                return 1
            fi
            ;;
        nbd)
            ensure_nbd_server || return 1
            command -v nbd-client >/dev/null || { START_ERR="nbd-client missing (package nbd-client: tests/vm/setup)"; return 1; }
            [ -e /dev/nbd0 ] || modprobe nbd 2>"$err" || { START_ERR="modprobe nbd failed: $(tr '\n' ' ' <"$err")"; return 1; }
            wait_blockdev /dev/nbd0 10 || { START_ERR="/dev/nbd0 did not appear after modprobe nbd"; return 1; }
            local kconns=$((NBD_CONNS * NBD_QUEUES))
            log "kernel nbd: nbd-client 127.0.0.1 $NBD_PORT /dev/nbd0 -b 512 -C $kconns"
            timeout -k 5 60 nbd-client 127.0.0.1 "$NBD_PORT" /dev/nbd0 -b 512 -C "$kconns" >"$out" 2>"$err" </dev/null ||
                { START_ERR="nbd-client failed: $(tail -c 400 "$err" | tr '\n' ' ')"; return 1; }
            CUR_KIND=nbd CUR_ID=/dev/nbd0 DEV=/dev/nbd0
            local i
            for ((i = 0; i < 100; i++)); do
                [ "$(blockdev --getsize64 /dev/nbd0 2>/dev/null || echo 0)" -gt 0 ] && break
                sleep 0.1
            done
            ;;
        esac
        ;;
    esac
    if ! wait_blockdev "$DEV" 10; then
        START_ERR="block device $DEV did not appear within 10 s"
        cleanup_device
        return 1
    fi
    local size
    size=$(blockdev --getsize64 "$DEV" 2>/dev/null || echo 0)
    if [ "${size:-0}" -le 0 ]; then
        START_ERR="block device $DEV has size ${size:-?}"
        cleanup_device
        return 1
    fi
    log "$engine $target: $DEV ready ($((size >> 20)) MiB)"
}
