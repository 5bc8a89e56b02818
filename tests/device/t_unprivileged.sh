#!/usr/bin/env bash
# Unprivileged devices (UBLK_F_UNPRIVILEGED_DEV, issue 7) with real non-root
# accounts (nobody, and uid 65533 as "another user"):
# - setup as documented: /dev/ublk-control opened to users (chmod 0666), the
#   udev rule of udev/90-ublk.rules.in (runs `ublk owner`) in /run/udev/rules.d;
# - the user adds a loop device with the CLI: it is unprivileged (copy mode),
#   its nodes belong to the user (0600), the user runs fio crc32c verify on it,
#   `ublk list` (the user's) shows it, the state file is in /tmp/ublk-<uid>;
# - another user cannot open it, not even with the node made 0666 (the kernel
#   lets only the owner open an unprivileged disk), nor delete it;
# - the user cannot see or delete root's device, cannot ask for recovery or a
#   zero-copy mode: each refused with a clear message;
# - a state directory made in advance by another user is refused (EPERM);
# - the user deletes the device; nodes, server and state file are gone.
# compat: yes
# timeout: 600
. "$(dirname "$0")/lib.sh"
t_require fio setpriv udevadm

USER_A=65534   # nobody
USER_B=65533
as_user() { # UID CMD...: runs CMD as UID:UID with no capabilities and no groups
    local u=$1
    shift
    setpriv --reuid="$u" --regid="$u" --clear-groups --inh-caps=-all --bounding-set=-all \
        env -i PATH="$PATH" HOME=/tmp "$@"
}

rules=/run/udev/rules.d/90-ublk-test.rules
ctl_mode=$(stat -c %a /dev/ublk-control)
restore() {
    chmod "$ctl_mode" /dev/ublk-control
    rm -f "$rules"
    udevadm control --reload 2>/dev/null
}
trap 'restore; t_finish' EXIT

mkdir -p /run/udev/rules.d
sed "s|@BINDIR@|$(dirname "$UBLK")|" "$T_REPO/udev/90-ublk.rules.in" >"$rules"
udevadm control --reload
chmod 0666 /dev/ublk-control

share=$T_WORK/shared
mkdir -p "$share"
chmod 0755 "$T_WORK"
chmod 0777 "$share"
truncate -s 128M "$share/a.img"
chown "$USER_A:$USER_A" "$share/a.img"

# a device of root's, which the users must not see or touch
must_add root-add null --size 64M && root_id=$DEV_ID

out=$(as_user $USER_A "$UBLK" add loop --file "$share/a.img" 2>"$T_WORK/a-add.err")
rc=$?
if ((rc != 0)) || ! parse_add_line "$out"; then
    show_file "$T_WORK/a-add.err"
    fail user-add "\`ublk add loop\` as uid $USER_A exited $rc: $out"
    exit 1
fi
id=$DEV_ID dev=$DEV_PATH
pass "user-add (device $id)"
udevadm settle -t 10
row=$(list_row "$id")
if [[ $(awk '{ print $7 }' <<<"$row") == copy ]] && [[ $(awk '{ print $8 }' <<<"$row") == LIVE ]]; then
    pass user-device-copy-mode
else
    fail user-device-copy-mode "root's list row: $row"
fi
for n in "/dev/ublkc$id" "$dev"; do
    if wait_until 10 test "$(stat -c '%u:%g %a' "$n" 2>/dev/null)" = "$USER_A:$USER_A 600"; then
        pass "node-owned-by-user ${n##*/}"
    else
        fail "node-owned-by-user ${n##*/}" "$(stat -c '%u:%g %a' "$n") (udev rule: $(cat "$rules"))"
    fi
done
sf=/tmp/ublk-$USER_A/$id.state
[[ -f $sf ]] && grep -q "^pid=" "$sf" && pass user-state-file || fail user-state-file "$sf missing"

# the owner uses it
fout=$T_WORK/fio-user.out
if as_user $USER_A fio --name=user --filename="$dev" --rw=randrw --bsrange=4k-256k --direct=1 \
    --ioengine=io_uring --iodepth=16 --size=64M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 >"$fout" 2>&1 && ! grep -Eq 'err= *[1-9]|verify: bad|io_u error' "$fout"; then
    pass user-fio-verify
else
    show_file "$fout" 30
    fail user-fio-verify "fio as the owner failed"
fi
lst=$(as_user $USER_A "$UBLK" list 2>"$T_WORK/a-list.err")
if awk -v id="$id" 'NR > 1 && $1 == id' <<<"$lst" | grep -q LIVE \
    && { [[ -z ${root_id-} ]] || { ! awk -v id="$root_id" 'NR > 1 && $1 == id' <<<"$lst" | grep -q . \
        && grep -q "device $root_id: not shown, it is not yours" "$T_WORK/a-list.err"; }; }; then
    pass user-list-own-only
else
    fail user-list-own-only "list: $lst / stderr: $(cat "$T_WORK/a-list.err")"
fi
as_user $USER_A "$UBLK" features >/dev/null 2>&1 && pass user-features || fail user-features "ublk features as a user failed"

# another user
if as_user $USER_B dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null; then
    fail other-user-cannot-open "uid $USER_B read $dev"
else
    pass other-user-cannot-open
fi
chmod 0666 "$dev"
if as_user $USER_B dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct 2>"$T_WORK/b-dd.err"; then
    fail other-user-refused-by-kernel "uid $USER_B read $dev once it was 0666"
else
    pass "other-user-refused-by-kernel ($(head -c 80 "$T_WORK/b-dd.err"))"
fi
chmod 0600 "$dev"
out=$(as_user $USER_B "$UBLK" del "$id" 2>&1)
rc=$?
if ((rc == 1)) && grep -q "not yours" <<<"$out" && dev_exists "$id"; then
    pass other-user-cannot-delete
else
    fail other-user-cannot-delete "rc=$rc: $out"
fi
if [[ -n ${root_id-} ]]; then
    out=$(as_user $USER_A "$UBLK" del "$root_id" 2>&1)
    rc=$?
    ((rc == 1)) && grep -q "not yours" <<<"$out" && dev_exists "$root_id" && pass user-cannot-delete-roots \
        || fail user-cannot-delete-roots "rc=$rc: $out"
fi

# what only root may have
out=$(as_user $USER_A "$UBLK" add loop --file "$share/a.img" --recovery reissue 2>&1)
rc=$?
((rc != 0)) && grep -q "recovery is not available for unprivileged devices" <<<"$out" \
    && pass user-recovery-refused || fail user-recovery-refused "rc=$rc: $out"
out=$(as_user $USER_A "$UBLK" add loop --file "$share/a.img" --zero-copy register 2>&1)
rc=$?
((rc != 0)) && grep -qi "unprivileged" <<<"$out" && pass user-zero-copy-refused || fail user-zero-copy-refused "rc=$rc: $out"

# a state directory made in advance by another user is refused, before any device stays
bdir=/tmp/ublk-$USER_B
rm -rf "$bdir"
as_user $USER_A mkdir -m 0700 "$bdir"
out=$(as_user $USER_B "$UBLK" add null --size 64M 2>&1)
rc=$?
if ((rc != 0)) && grep -q "refusing the state directory $bdir: it belongs to uid $USER_A" <<<"$out"; then
    pass "user-state-dir-of-another-refused (${out:0:150})"
else
    fail user-state-dir-of-another-refused "rc=$rc: $out"
    parse_add_line "$out" && dev_del "$DEV_ID" >/dev/null 2>&1
fi
rm -rf "$bdir"

# the owner deletes it
pid=$(server_pid "$id")
if as_user $USER_A "$UBLK" del "$id" >"$T_WORK/a-del.out" 2>&1 && wait_until 20 dev_absent "$id" \
    && wait_pid_exit "$pid" 20 && [[ ! -e $sf ]]; then
    pass user-del
else
    show_file "$T_WORK/a-del.out"
    fail user-del "device $id, server $pid or $sf still there after the owner's del"
fi
[[ -n ${root_id-} ]] && dev_del "$root_id" >/dev/null 2>&1
