#!/usr/bin/env bash
# pyublk (issue 5) on a real device: python/tests/run device (pytest, as
# root): the examples ramdisk.py, loop.py (leases; auto and copy modes) and
# async_remote.py under fio crc32c verify, mkfs.ext4 + mount + fsck on
# loop.py, an exception in a callback failing one IO with EIO while the
# device keeps serving, a kept buffer raising ValueError, lease rules (EPERM,
# EINVAL) from Python, completion from another thread and twice (EALREADY);
# crash recovery: loop.py --recovery killed with SIGKILL and taken over by
# loop.py --recover (data back, a write issued meanwhile completes), the
# fail policy, Device.recover refusals.
# Each pytest case is reported as a pass/fail/skip here. Needs `make python`
# (the venv with pyublk installed by pip) on the host first.
# compat: yes
# timeout: 600
. "$(dirname "$0")/lib.sh"
t_require fio python3

out=$T_WORK/pytest.out
PYUBLK_TEST_WORK=$T_WORK run_with_timeout 560 "$T_REPO/python/tests/run" device >"$out" 2>&1
rc=$?
n=0
while read -r _ kind name msg; do
    n=$((n + 1))
    case $kind in
        PASS) pass "$name" ;;
        FAIL) fail "$name" "$msg" ;;
        SKIP) skip "$name" "$msg" ;;
    esac
done < <(grep '^RESULT ' "$out")
if ((n == 0)); then
    show_file "$out" 60
    fail pytest "no test results (exit $rc)"
elif ((rc != 0)); then
    show_file "$out" 80
    grep -q '^RESULT FAIL' "$out" || fail pytest "pytest exited $rc"
fi
