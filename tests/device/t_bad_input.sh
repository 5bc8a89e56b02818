#!/usr/bin/env bash
# Scenario 6: bad input.  Every bad `ublk` command line exits 2 with a clear
# message on stderr (starting `ublk:` and naming the problem), prints nothing
# on stdout and leaves no device, server or state file behind.  A refused
# kernel command (`ublk del 999`) exits 1 naming the errno.
# (not in the compat subset: kernel-independent CLI parsing)
# timeout: 180
. "$(dirname "$0")/lib.sh"
t_require

EMPTY=$T_WORK/empty.img
SMALL=$T_WORK/small.img
: >"$EMPTY"
truncate -s 1M "$SMALL"

# bad NAME WANT-STATUS KEYWORD-REGEX ARGS...
bad() {
    local name=$1 want=$2 re=$3
    shift 3
    local out=$T_WORK/bad.out err=$T_WORK/bad.err rc
    run_with_timeout 60 "$UBLK" "$@" >"$out" 2>"$err"
    rc=$?
    local first
    first=$(head -n1 "$err")
    local why=()
    ((rc == want)) || why+=("exit $rc, want $want")
    [[ -s $out ]] && why+=("stdout not empty: $(head -c 200 "$out")")
    [[ $first == ublk:* ]] || why+=("stderr does not start with 'ublk:': $(printf '%q' "$first")")
    grep -Eqi -- "$re" <<<"$first" || why+=("the message does not mention /$re/: $(printf '%q' "$first")")
    [[ -z $(dev_ids) ]] || why+=("devices left behind: $(dev_ids | tr '\n' ' ')")
    compgen -G '/run/ublk/*.state' >/dev/null && why+=("state files left: $(ls /run/ublk/*.state)")
    if ((${#why[@]} == 0)); then
        pass "$name: \`ublk $*\` -> $rc: $first"
    else
        fail "$name" "\`ublk $*\`: $(IFS=';'; echo "${why[*]}")"
        [[ -z $(dev_ids) ]] || run_with_timeout 60 "$UBLK" del --all >/dev/null 2>&1
    fi
}

bad zero-size          2 'size'                 add mem --size 0
bad zero-size-loop     2 'size'                 add loop --file "$SMALL" --size 0
bad depth-0            2 'depth'                add mem --depth 0
bad depth-4097         2 'depth'                add mem --depth 4097
bad depth-huge         2 'depth|invalid'        add null --depth 70000
bad queues-0           2 'queue'                add mem --queues 0
bad unaligned-size     2 'size|multiple'        add mem --size 1000
bad unaligned-size-4k  2 'size|multiple'        add null --size 6K --logical-block-size 4096
bad missing-file       2 '--file'               add loop
bad nonexistent-file   2 'nonexistent|no such'  add loop --file /nonexistent/ublk-test.img
bad directory-file     2 'regular file|block device|directory' add loop --file "$T_WORK"
bad empty-file         2 'empty'                add loop --file "$EMPTY"
bad size-beyond-file   2 'larger'               add loop --file "$SMALL" --size 2M
bad file-for-mem       2 'loop'                 add mem --file "$SMALL"
bad unknown-target     2 'unknown target'       add disk --size 1M
bad no-target          2 'target'               add
bad unknown-option     2 'unknown option'       add mem --bogus
bad option-no-value    2 'needs a value'        add mem --queues
bad queues-not-number  2 'invalid number'       add mem --queues two
bad depth-not-number   2 'invalid number'       add mem --depth 1x
bad size-not-number    2 'invalid size'         add mem --size lots
bad size-bad-suffix    2 'suffix|invalid size'  add mem --size 12Q
bad size-negative      2 'invalid size'         add mem --size -1M
bad id-not-number      2 'invalid number'       add mem --id me
bad max-io-too-small   2 'max IO size'          add null --max-io-size 1K
bad lbs-not-pow2       2 'logical block size'   add null --logical-block-size 1000
bad unknown-command    2 'unknown command'      frobnicate
bad no-command         2 'no command'
bad del-no-id          2 'device id|--all'      del
bad del-bad-id         2 'invalid device id'    del zero
bad del-two-ids        2 'too many'             del 1 2
bad list-extra-arg     2 'unexpected argument'  list now
bad features-extra-arg 2 'unexpected argument'  features please
# refused by the kernel: exit 1 with the errno name
bad del-999            1 'ENODEV|ENOENT'        del 999

# After all that, a good command still works (nothing wedged).
if must_add good-after-bad mem --size 16M; then
    pass good-after-bad
    dev_del "$DEV_ID" || fail good-after-bad-del "ublk del $DEV_ID failed"
fi
