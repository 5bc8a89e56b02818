"""bench/lib/write_results.py: run by bench/run at the end; turns its rows and
counters (tab-separated files) into bench/results.json (one row a line) and
bench/results-meta.json.  Arguments: see the unpacking of sys.argv below."""
import datetime, json, os, sys
(rows_f, fails_f, out, meta, runtime, kernel, fio, rublk, commit, ncpu, file_mb, repeat, reps, group_reps, ublk, cex,
 counters_f, leg_mb, chunk, rublk_zc, lat_us, fio_cpu, srv_cpus, sched, scheds_f) = sys.argv[1:]
rows, by_key = [], {}
for line in open(rows_f):
    engine, target, mode, rw, bs, qd, iops = line.rstrip("\n").split("\t")
    key = (engine, target, rw, bs, qd)
    iops = round(float(iops), 1)
    if key in by_key:                   # another run (BENCH_REPS, rounds): keep the best, list them all
        r = by_key[key]
        r["samples"].append(iops)
        r["iops"] = max(r["iops"], iops)
        continue
    r = {"target": target, "engine": engine, "mode": mode, "rw": rw,
         "bs": bs, "iodepth": int(qd), "iops": iops, "samples": [iops]}
    by_key[key] = r
    rows.append(r)
# the groups that ran another number of times than reps (BENCH_GROUP_REPS): "name:N ..."
group_reps = {w.split(":")[0]: int(w.split(":")[1]) for w in group_reps.split()}
if int(repeat) * max([int(reps)] + list(group_reps.values())) == 1:
    for r in rows:
        del r["samples"]
# the servers' own counters, summed over the rounds, per engine/target
counters = {}
for line in open(counters_f):
    engine, target, asked, mode, ios, nbytes, errors, copied, leases = line.rstrip("\n").split("\t")
    c = counters.setdefault("%s/%s" % (engine, target), {
        "mode": mode, "requested_mode": asked, "ios": 0, "bytes": 0, "errors": 0,
        "copied_bytes": 0, "lease_ops": 0, "rounds": 0})
    if mode != c["mode"]:
        c["mode"] += "," + mode
    for k, v in (("ios", ios), ("bytes", nbytes), ("errors", errors), ("copied_bytes", copied),
                 ("lease_ops", leases)):
        c[k] += int(v)
    c["rounds"] += 1
for c in counters.values():
    ios, nbytes = c["ios"], c["bytes"]
    c["copied_bytes_per_io"] = round(c["copied_bytes"] / ios, 1) if ios else None
    c["copied_bytes_per_byte"] = round(c["copied_bytes"] / nbytes, 4) if nbytes else None
    c["lease_ops_per_io"] = round(c["lease_ops"] / ios, 3) if ios else None
    c["bytes_per_io"] = round(nbytes / ios, 1) if ios else None
cpu = ""
try:
    for l in open("/proc/cpuinfo"):
        if l.startswith("model name"):
            cpu = l.split(":", 1)[1].strip(); break
except OSError:
    pass
# the emulator: the host's QEMU, visible in the guest through the shared root
# (its TCG speed decides how much a copy costs: QEMU 10 copies far faster than 7.2)
emulator = ""
try:
    import subprocess
    ver = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True, timeout=20).stdout
    emulator = ver.splitlines()[0].replace("QEMU emulator version", "QEMU").strip() if ver else ""
except (OSError, subprocess.SubprocessError):
    pass
m = {
    "kernel": kernel,
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "runtime_s": int(runtime),
    "rounds": int(repeat),
    "reps": int(reps),
    "group_reps": group_reps,
    "grouping": "the devices that are compared are set up together and measured in turn at "
                "each point, %s run(s) each%s, alternating the order; each figure is the best "
                "of its runs (contention only ever slows a run down)"
                % (reps, " (%s)" % ", ".join("%s group: %d" % kv for kv in group_reps.items())
                   if group_reps else ""),
    "sessions": "every server runs in its own session, as a daemon does: the CLI's and rublk's "
                "detach with setsid, the foreground servers (C, Python, Go) are started with "
                "setsid(1); with the kernel's autogroup scheduling a session is a CPU "
                "scheduling group, so none shares fio's",
    "server_cpus": ("every server (ours, rublk, the C, Python and Go examples) runs in a cgroup "
                    "v2 cpuset of CPU(s) %s; a queue thread pinning itself elsewhere is refused, "
                    "so the servers of a group share the same CPU and none gains from landing "
                    "on another; the kernel's devices are not confined, fio runs as fio_args "
                    "says; except the nbd group (libublk/nbd, kernel/nbd): our NBD client "
                    "is not confined and fio not pinned there, like the kernel's NBD client, "
                    "which sends from fio's context and receives in unbound kworkers" % srv_cpus
                    if srv_cpus != "none" else "not confined: each server pins its queue thread "
                    "where it chooses (ours: CPU dev_id % nproc, rublk: a random one)"),
    "fio": fio,
    "rublk": rublk,
    "libublk_commit": commit,
    "ublk_cli": ublk,
    "c_examples": cex,
    "cpus": int(ncpu),
    "cpu_model": cpu,
    "emulator": emulator,
    "loop_backing": "%s MiB file on tmpfs" % file_mb,
    "mirror_stripe_files": "2 x %s MiB files on the same tmpfs: c-mirror's legs, and c-stripe's "
                           "files with -c %s" % (leg_mb, chunk),
    "data_modes": "our rows without a ':MODE' suffix run --zero-copy copy / -z copy; "
                  "rublk loop-zc is 'rublk add loop -z'",
    "rublk_zero_copy": rublk_zc,
    "lat_backing": "null_blk devices completing each IO after %s us (irqmode=2 timer, "
                   "memory_backed=0), loop-lat on nullb0, mirror-lat's legs on nullb1 and nullb2"
                   % lat_us,
    "nodata_backing": "2 null_blk devices completing each IO at once (irqmode=0) and keeping no "
                      "data (memory_backed=0): mirror-nullb's legs, nullb0 and nullb1",
    "ram_fill": "one unmeasured sequential write pass (fio --rw=write --bs=1M --iodepth=8) before the measurements",
    "fio_args": "--ioengine=io_uring --direct=1 --time_based --numjobs=1 --thread --disk_util=0 "
                "--norandommap --randrepeat=0 "
                + ("--cpus_allowed=%s (not in the nbd group: see server_cpus)" % fio_cpu
                   if fio_cpu else "(fio not pinned)"),
    "io_scheduler": {
        "setting": sched,
        "note": ("every measured device's queue/scheduler set to %s (BENCH_SCHED), whatever "
                 "the kernel gave it" % sched if sched != "kernel" else
                 "each device keeps the scheduler the kernel gave it (BENCH_SCHED=kernel)"),
        # engine/target -> [the kernel's choice, the one measured] (last round)
        "devices": {et: [was, now] for et, was, now in
                    (l.rstrip("\n").split("\t") for l in open(scheds_f) if l.strip())},
    },
    "failed": [l.rstrip("\n") for l in open(fails_f) if l.strip()],
    "io_counters_note": "from each of our servers' stop line (summed over its six fio runs, "
                        "udev's probe reads and the RAM disks' fill pass, and over the rounds): "
                        "copied_bytes = request data copied between the request and a server "
                        "buffer; rublk and the kernel have no such counters",
    "io_counters": counters,
}
if not any("-lat" in r["target"] for r in rows):
    del m["lat_backing"]
if not any("-nullb" in r["target"] for r in rows):
    del m["nodata_backing"]
def write(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
# one row per line: easy to read and to diff
write(out, "[\n" + ",\n".join("  " + json.dumps(r) for r in rows) + ("\n" if rows else "") + "]\n")
write(meta, json.dumps(m, indent=1) + "\n")
