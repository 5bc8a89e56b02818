#!/usr/bin/env python3
"""bench/report.py — turn bench/results.json into bench/RESULTS.md and bench/RESULTS.png.

Runs on the host after `tests/vm/run bench/run`, with the venv that bench/setup
makes ($UBLK_CACHE_DIR/bench-venv, which has matplotlib):

    /opt/libublk-cache/bench-venv/bin/python bench/report.py

RESULTS.md: the IOPS table (rows = engine + target, columns = rw x size) and
the ratios that matter, at every size:
  * libublk vs rublk: our null / rublk null and our loop / rublk loop, ✓ when >= 1.0;
  * C examples vs Rust targets (issue 3): C null / Rust null and C loop / Rust
    loop, ✓ when >= 0.95, and c-threadpool / c-ramdisk (completion from worker
    threads vs inline), ✓ when >= 0.80;
  * data modes (issue 4): each zero-copy mode (auto-buf-reg, register) / copy
    mode for our loop, C mirror and C stripe, ✓ when >= 1.5 at 512k and >= 1.0
    at 4k; our auto-buf-reg loop / rublk -z loop, ✓ when >= 1.0; C mirror
    randwrite / our loop randwrite in the same mode, ✓ when >= 0.8; and the
    bytes copied per IO by mode, from the servers' own counters (meta file); and
    the same zero copy / copy goals for the C mirror on null_blk legs that copy
    nothing (mirror-nullb: the server's copy alone, as over disks doing DMA).
(The rows and ratio tables with their goals are defined in bench/lib/report_defs.py.)
RESULTS.png: the original targets' IOPS as grouped bars (log scale) plus one
panel per ratio table.  Absolute IOPS under QEMU/TCG are noise; only figures
from one run are compared, and the ratios are the point.

Without matplotlib, RESULTS.md is still written and the exit status is 1.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

sys.path.insert(0, os.path.join(HERE, "lib"))
from report_defs import (  # noqa: E402  (bench/lib, on the path above)
    BAR_SERIES, C_RATIOS, GOAL_MARK, GO_RATIOS, MATRIX,
    MIRROR_INFO, MIRROR_RATIOS, MISS_MARK, MODES, NBD_RATIOS,
    PY_RATIOS, RATIOS, RUBLK_ZC, RWS, RZC_RATIOS,
    SERIES, SIZES, ZC_INFO, ZC_NULLB_RATIOS, ZC_RATIOS,
    mode_key, mode_label)


def scheduler_choices(devices):
    """'; the kernel's own choice: ...' from {engine/target: [kernel's, measured]}:
    the most common scheduler in a word, the others by device."""
    if not devices:
        return ""
    by = {}
    for et, wn in sorted(devices.items()):
        by.setdefault(wn[0], []).append(et)
    common = max(by, key=lambda k: len(by[k]))
    rest = ["%s for %s" % (k, ", ".join(v)) for k, v in sorted(by.items()) if k != common]
    if not rest:
        return "; the kernel's own choice: %s for every device" % common
    return "; the kernel's own choice: %s, %s for the other %d devices" % ("; ".join(rest), common, len(by[common]))



def goal_at(goal, bs):
    """The goal of a ratio at block size bs: a number, a {bs: number|None} dict, or None."""
    if isinstance(goal, dict):
        return goal.get(bs)
    return goal


def goal_text(goal):
    if goal is None:
        return "—"
    if isinstance(goal, dict):
        return ", ".join("≥ %.2f at %s" % (g, bs) for bs, g in goal.items() if g is not None)
    return "≥ %.2f" % goal


def load(path):
    with open(path) as f:
        return json.load(f)


def index(rows):
    """(engine, target, rw, bs, iodepth) -> iops (last one wins)."""
    out = {}
    for r in rows:
        out[(r["engine"], r["target"], r["rw"], r["bs"], int(r["iodepth"]))] = float(r["iops"])
    return out


def spread_by_size(rows):
    """[(bs, median, 90th percentile, count)] in size order: the spread (best - worst) / best
    over the runs of one device at one point (rows with 2 or more runs in "samples")."""
    by = {}
    for r in rows:
        smp = [float(x) for x in r.get("samples") or [] if float(x) > 0]
        if len(smp) >= 2:
            by.setdefault(r["bs"], []).append((max(smp) - min(smp)) / max(smp))
    out = []
    for bs in sorted(by, key=lambda b: float(b.rstrip("kKmM")) * (1024 if b[-1] in "mM" else 1)):
        v = sorted(by[bs])
        out.append((bs, v[len(v) // 2], v[min(len(v) - 1, int(len(v) * 0.9))], len(v)))
    return out


def series_in(rows):
    """SERIES entries present in the data, then any unknown (engine, target) pairs."""
    have = {(r["engine"], r["target"]) for r in rows}
    out = [s for s in SERIES if (s[0], s[1]) in have]
    known = {(s[0], s[1]) for s in SERIES}
    for e, t in sorted(have - known):
        out.append((e, t, "%s %s" % (e, t)))
    return out


def fmt_iops(v):
    return "—" if v is None else "{:,.0f}".format(v)


def short(v):
    if v >= 10000:
        return "%.0fk" % (v / 1000)
    if v >= 1000:
        return "%.1fk" % (v / 1000)
    return "%.0f" % v


def ratio(idx, num, den, rw, bs, qd):
    """IOPS of (engine, target) num / den at one point, None when either is missing."""
    a = idx.get(num + (rw, bs, qd))
    b = idx.get(den + (rw, bs, qd))
    if a is None or b is None or b <= 0:
        return None
    return a / b


def fmt_ratio(r, goal):
    """Two decimals, or three when two would round a miss up to the goal (0.949 vs 0.95)."""
    if goal is None:
        return "%.2f" % r
    return "%.3f" % r if r < goal <= round(r, 2) else "%.2f" % r


def columns(rws=RWS):
    return [(rw, bs, qd) for rw in rws for bs, qd in SIZES]


def ratio_table(L, idx, cols, ratios, goal_col):
    """Append a markdown ratio table; returns (points met, points wanted).  A ratio's
    goal is a number, a {bs: number|None} dict or None (figures shown, no goal):
    only the points with a goal get a mark and count."""
    head = "| ratio | " + ("goal | " if goal_col else "")
    L.append(head + " | ".join("%s %s QD%d" % c for c in cols) + " |")
    L.append("|---|" + ("---:|" if goal_col else "") + "---:|" * len(cols))
    met = total = want = 0
    for num, den, label, goal, _, _ in ratios:
        cells = []
        for rw, bs, qd in cols:
            g = goal_at(goal, bs)
            want += g is not None
            r = ratio(idx, num, den, rw, bs, qd)
            if r is None:
                cells.append("—")
                continue
            if g is None:
                cells.append(fmt_ratio(r, None))
                continue
            total += 1
            ok = r >= g
            met += ok
            cells.append("%s %s" % (fmt_ratio(r, g), GOAL_MARK if ok else MISS_MARK))
        L.append("| %s | %s%s |" % (label, goal_text(goal) + " | " if goal_col else "",
                                    " | ".join(cells)))
    L.append("")
    L.append("Goal met at %d of %d points%s." %
             (met, want, "" if total == want else " (%d missing)" % (want - total)))
    L.append("")
    return met, want


def write_md(path, rows, meta, png_name):
    idx = index(rows)
    cols = columns()
    L = []
    L.append("# Benchmark results")
    L.append("")
    L.append("Generated by `make bench` (bench/all): fio %s, `--ioengine=io_uring --direct=1 "
             "--numjobs=1%s`, %s s per run, random reads and writes, in one VM run." %
             (meta.get("fio", "?"), (" --thread" if "--thread" in meta.get("fio_args", "") else "") +
              "".join(" " + a for a in meta.get("fio_args", "").split() if a.startswith("--cpus_allowed")),
              meta.get("runtime_s", "?")))
    L.append("")
    L.append("- kernel: `%s` (VM guest, %s vCPUs, CPU: %s%s)" %
             (meta.get("kernel", "?"), meta.get("cpus", "?"), meta.get("cpu_model", "?") or "?",
              ", emulator: %s" % meta["emulator"] if meta.get("emulator") else ""))
    L.append("- date: %s" % meta.get("date", "?"))
    L.append("- libublk: commit `%s`, CLI `ublk` (`--queues 1 --depth 64`); peer: %s "
             "(`-q 1 -d 64`, copy mode: neither `-z` nor `-u`)" %
             (meta.get("libublk_commit", "?"), meta.get("rublk", "rublk") or "rublk"))
    if meta.get("data_modes"):
        L.append("- data modes: our rows without a mode in their name run in copy mode "
                 "(`--zero-copy copy`, C examples `-z copy`), as before the data modes existed; "
                 "the data-mode rows (`loop:MODE`, `mirror:MODE`, `stripe:MODE`) name theirs; "
                 "`rublk loop-zc` is `rublk add loop -z` (zero copy through auto_buf_reg)")
    if meta.get("mirror_stripe_files"):
        L.append("- C mirror (`c-mirror -f leg0,leg1`: writes go to both legs at once, reads "
                 "alternate) and C stripe (`c-stripe -f leg0,leg1`): %s" %
                 meta["mirror_stripe_files"])
    L.append("- loop targets: %s; kernel loop via `losetup --direct-io=on`; kernel null via "
             "`null_blk` (blk-mq, irqmode=0, 1 queue, depth 64)" %
             meta.get("loop_backing", "1 GiB file on tmpfs"))
    if meta.get("lat_backing"):
        L.append("- latency-bound backing (`loop-lat`, `mirror-lat`, randwrite only): %s" %
                 meta["lat_backing"])
    if meta.get("nodata_backing"):
        L.append("- no-data backing (`mirror-nullb`): %s" % meta["nodata_backing"])
    if meta.get("ram_fill"):
        L.append("- RAM disks (libublk mem, C ramdisk, C threadpool): %s, so that no figure "
                 "includes first-touch page faults" % meta["ram_fill"])
    if any(r["engine"] == "libublk-c" for r in rows):
        L.append("- C examples (engine `libublk-c`, through libublk.so's C ABI, copy mode): "
                 "`c-null -s 1G`, `c-loop -f <the same file>`, `c-ramdisk -s 1G -b` (completes "
                 "inside the callback), `c-threadpool -s 1G -b` (completes from worker "
                 "threads, one per CPU it may run on: here the one CPU of the servers' cpuset), all `-q 1 -d 64`; `-b`: both take the requests of each pass over the "
                 "queue ring in one `handle_batch` call (the ramdisk serves them there, the "
                 "threadpool queues them for its workers with one lock and one wake-up); each is measured in the same group as the Rust "
                 "target it is compared with")
    sch = meta.get("io_scheduler") or {}
    if sch:
        L.append("- I/O scheduler: %s%s" % (sch.get("note", sch.get("setting", "?")),
                                            scheduler_choices(sch.get("devices") or {})))
    if meta.get("grouping"):
        L.append("- grouping: %s (all runs: `samples` in results.json)" % meta["grouping"])
    if meta.get("sessions"):
        L.append("- sessions: %s" % meta["sessions"])
    if meta.get("server_cpus"):
        L.append("- server CPUs: %s" % meta["server_cpus"])
    if int(meta.get("rounds", 1) or 1) > 1:
        L.append("- %d rounds over all targets; each figure is the best round (all rounds: "
                 "`samples` in results.json)" % int(meta["rounds"]))
    if meta.get("host_loadavg_before") or meta.get("host_loadavg_after"):
        L.append("- host load average: %s before the run, %s (1/5/15 min) after it; the guest's "
                 "CPUs are emulated on the host's, so other work there skews the figures" %
                 (meta.get("host_loadavg_before", "?"), meta.get("host_loadavg_after", "?")))
    spread = spread_by_size(rows)
    if spread:
        L.append("- run-to-run spread, (best - worst) / best over the runs of one device at one "
                 "point, measured in this run: %s; a ratio of two figures moves by about as much, "
                 "so goals within a few percent of 1.00 can pass or fail on noise alone" %
                 ", ".join("median %.1f %% (90th percentile %.1f %%) at %s" % (100 * m, 100 * p, bs)
                           for bs, m, p, _ in spread))
    L.append("")
    L.append("Absolute IOPS are emulated-CPU noise; compare only figures from the same run. "
             "The ratios below are the point.")
    L.append("")
    rzc = meta.get("rublk_zero_copy") or ""
    if rzc.startswith("FAILED"):
        L.append("**rublk -z did not run:** %s" % rzc.replace("|", "\\|"))
        L.append("")

    L.append("## libublk vs rublk (copy mode)")
    L.append("")
    L.append("Goal: libublk ≥ rublk (ratio ≥ 1.00, %s) at every size." % GOAL_MARK)
    L.append("")
    L.append("What bounds these ratios here: the servers' one CPU, and on it mostly the "
             "kernel's work, the same for both servers. Measured with `tests/vm/run "
             "bench/cpuio` (CPU time per IO of every thread of the server, from /proc, placed "
             "as here; two VM runs): each server kept the cpuset's CPU busy (0.84-1.00 CPUs "
             "over a run, 0.97-1.00 for the loops), so its IOPS is one over its CPU time per "
             "IO. That time is the ublk driver's copy between the request and the server's "
             "buffer (copy mode), done in the queue thread, and for the loops the backing "
             "file's IO, which io_uring hands to an io-wq worker of the server process because "
             "tmpfs offers no non-blocking IO (likewise for both servers). The servers' own "
             "code, user space, was 3-10 % of the server threads' time at 4k and 0-4 % at 64k "
             "and 512k, for ours and rublk's alike: at 4k the loops' user space took about "
             "1.6-1.9 us (ours) and 0.9-1.8 us (rublk's) of the 33-40 us an IO costs (queue "
             "thread 19-21 us, ours, 18-22 us, rublk's; io-wq worker 15-17 us, 15-18 us), the "
             "nulls' 0.4-1.2 us of 13-21 us. No work of the server's own "
             "can move these ratios by more than a few percent, less than their run-to-run "
             "spread, so at 4k they fall on either side of 1.00 by noise. One difference "
             "was ours: in most probe runs our copy-mode loop had spells in which an IO at "
             "64k cost up to 2-5 times its usual CPU (in the io-wq worker's copy or in the "
             "driver's copy in the queue thread; once 20 ms per IO at 512k reads), which "
             "rublk's copy-mode loop never showed. Our tag buffers were one 32 MiB mapping "
             "per queue, which the guest (transparent huge pages: always) backed with 2 MiB "
             "pages; rublk's are one allocation per tag, in small pages. During the spells "
             "no memory counter of the kernel's (THP, compaction, migration, reclaim) "
             "changed and its memory threads (kcompactd, khugepaged, kdamond) ran 1-3 ms "
             "per 5 s run, as in runs without spells, so the cost is in the copies "
             "themselves, likely the emulator's "
             "address translation of huge pages. The tag buffers now ask for small pages "
             "(MADV_NOHUGEPAGE, which also keeps a queue's resident memory to the pages its "
             "IOs touch: VmRSS 3.8-5.6 MB per server, where the huge pages alone were 32 MiB); "
             "in 6 probe rounds since "
             "(bench/cpuio's order, 5 s per workload) our copy loop read 64k at 2462-3127 "
             "IOPS, rublk's at 2723-3081 in the same rounds, against 2171, 3296 and 2245 "
             "in 3 rounds before.")
    L.append("")
    met, want = ratio_table(L, idx, cols, RATIOS, goal_col=False)

    L.append("## C examples vs Rust targets")
    L.append("")
    L.append("Goals (issue 3), at every size in the same run: the C examples within 5 %% of the "
             "Rust targets' IOPS (C / Rust ≥ 0.95, %s), and completion from worker threads "
             "within 20 %% of inline completion (c-threadpool / c-ramdisk ≥ 0.80, %s)." %
             (GOAL_MARK, GOAL_MARK))
    L.append("")
    L.append("What bounds the threadpool ratio here: every server thread runs on the one CPU of "
             "the servers' cpuset (see server CPUs), so c-threadpool's queue thread and its one "
             "worker take turns on it, and each hand-over between them (a futex wake-up, an "
             "eventfd write, two context switches, about once per 25-40 requests at 4k QD64) is "
             "work that c-ramdisk, completing inside the callback, does not do. Context switches "
             "per IO at 4k QD64 (the whole VM's, `tests/vm/run bench/ctxsw`): c-ramdisk "
             "0.06-0.08, c-threadpool 0.12-0.15 with its one worker, 0.18-0.23 with `-t 2`. "
             "What a worker pays per request besides its copy was cut in d0f31db (CPU time of "
             "the worker thread, 4k randread QD64, one VM run each): `ublk_io_complete_batch` "
             "2.3-2.5 us per request with the channel that carried completions to the queue "
             "thread, 1.7 us with the per-tag result slots and bitmap that replaced it (most of "
             "what is left is the one eventfd write per hand-over), and no accessor calls (the "
             "pool takes each request's description from its batch entry, on the queue thread). "
             "The full runs before it gave 0.77-0.80 at 4k.")
    L.append("")
    cmet, cwant = ratio_table(L, idx, cols, C_RATIOS, goal_col=True)

    L.append("## Zero copy vs copy mode")
    L.append("")
    L.append("Goals (issue 4), in the same run: each zero-copy mode (`auto-buf-reg`, `register`: "
             "the request's pages are lent to the backing file's IO, no copy) ≥ 1.5 × copy "
             "mode's IOPS at 512k and ≥ 1.0 × at 4k (never slower), for our loop (CLI), the C "
             "mirror and the C stripe; same device, same files, only `--zero-copy`/`-z` "
             "differs. Every zero-copy mode counts; 64k and the user-copy rows are shown "
             "without a goal.")
    L.append("")
    L.append("What bounds these ratios here: the files are on tmpfs, where the backing IO is "
             "itself a CPU copy (into or out of the page cache). Per request, copy mode copies "
             "its data twice for the loop and the stripe (request ↔ server buffer, buffer ↔ "
             "tmpfs) and zero copy once; the mirror's writes copy three times (into the buffer, "
             "then once per leg) against twice, its reads (one leg) twice against once. So where "
             "copying is most of the cost (512k) and both kinds of copy cost the same, zero copy "
             "gains about 2× for the loop, the stripe and the mirror's reads, but only about "
             "1.5× for the mirror's writes (under QEMU 7.2's TCG the server's copy cost far more "
             "than the page cache's, and 3-5× were measured); on a device that moves data by "
             "DMA, the server's copy is the only CPU copy there is (next table).")
    L.append("")
    zmet, zwant = ratio_table(L, idx, cols, ZC_RATIOS + ZC_INFO, goal_col=True)

    L.append("### The C mirror on legs that copy nothing")
    L.append("")
    L.append("The same goals for the C mirror with two null_blk devices as its legs (`%s`, "
             "see no-data backing above): there the "
             "backing IO costs no CPU copy, as on disks that move data by DMA, so what the data "
             "modes change is the server's own copy alone: copy mode copies each request once "
             "(request ↔ server buffer; a write's buffer then goes to both legs without another "
             "copy), zero copy not at all. Same devices, same run; only `-z` differs. The tmpfs "
             "rows above stay the goal's measure for this mirror too; this table shows what the "
             "copy-count bound there leaves out." %
             "c-mirror -f /dev/nullb0,/dev/nullb1")
    L.append("")
    znmet, znwant = ratio_table(L, idx, cols, ZC_NULLB_RATIOS, goal_col=True)

    L.append("## Zero-copy loop vs rublk -z")
    L.append("")
    L.append("Goal (issue 4): our zero-copy loop ≥ rublk 0.2.15's `-z` loop at every size "
             "(ratio ≥ 1.00, %s). rublk's `-z` is auto_buf_reg, so the goal row is our loop in "
             "`auto-buf-reg` (what `--zero-copy auto` picks on this kernel); the `register` row "
             "is shown for information." % GOAL_MARK)
    L.append("")
    L.append("What bounds these ratios here: as for libublk vs rublk above (`bench/cpuio`, two "
             "VM runs), both servers kept their one CPU busy (0.97-1.00 CPUs) with the same "
             "kernel work per IO. Our queue thread used 10.9-12.1 us per IO at 4k, 30-33 us at "
             "64k, 143-162 us at 512k; rublk's 10.0-12.0, 29-34 and 141-180 us; the io-wq "
             "worker that does the tmpfs copy from or into the lent request 14-16 us at 4k "
             "and 1.06-1.19 ms at 512k for ours, 15-17 us and 1.02-1.17 ms for rublk's. Of the "
             "queue thread's time, 13-16 % (ours) and 9-14 % (rublk's) was user space: at 4k "
             "about 1.6-1.8 us of the 25-28 us an IO costs, against rublk's 1.2-1.5 us. Our "
             "zero-copy loop and rublk's do the same work, and each point of this goal is "
             "decided by the run-to-run spread.")
    L.append("")
    rmet, rwant = ratio_table(L, idx, cols, RZC_RATIOS, goal_col=True)

    L.append("## Mirror writes vs single loop writes")
    L.append("")
    L.append("Goal (issue 4): the C mirror's random writes (each one goes to both legs, in "
             "parallel, from one lease) ≥ 0.8 × a single loop's random writes in the same data "
             "mode, at every size: proof that the legs run in parallel (one after the other "
             "would give about 0.5). The loop is our CLI's (`libublk loop`, Rust); C loop "
             "vs libublk loop is in the C examples table.")
    L.append("")
    L.append("The goal rows (`-lat`) run on latency-bound backing: %s (timer mode, no data "
             "kept). There the IOs in flight, not the CPU, set the "
             "IOPS, so the ratio shows whether the legs overlap. On the tmpfs files (shown "
             "for information) each mirror write costs two memory copies against the loop's "
             "one, on the VM's %s emulated CPUs, one of which runs fio: that measures CPU "
             "cost, not parallelism." % (meta.get("lat_backing", "a fixed delay"),
                                         meta.get("cpus", "?")))
    L.append("")
    mmet, mwant = ratio_table(L, idx, columns(["randwrite"]), MIRROR_RATIOS + MIRROR_INFO,
                              goal_col=True)

    L.append("## Python (pyublk) vs Rust")
    L.append("")
    L.append("Goals (issue 5), in the same run: the lease-based Python loop "
             "(`python/examples/loop.py`: Python only decides, the engine moves the data, zero "
             "copy) ≥ 0.8 × the Rust loop in the same mode at every size; the Python RAM disk "
             "(data copied by Python code) ≥ 0.5 × the Rust `mem` target at 4k. The loop "
             "decides once, for the whole device (`Device.map`: the engine then lends READ and "
             "WRITE requests to the file without calling Python); the per-request row decides "
             "each request in `route()` (one Python call per batch of requests), shown for what "
             "a Python call costs on these emulated CPUs.")
    L.append("")
    L.append("The RAM disk's ratio at 4k is the cost of Python per request on these emulated "
             "CPUs: pyublk hands each pass over the queue ring to Python in one call "
             "(`handle_batch`), and the target's `read`/`write` copy with memoryview slices; "
             "the Rust `mem` target does the same copy with no interpreter. Under the kernel's "
             "mq-deadline (the runs before 0e09ade) every ublk server here stopped at 16-19k "
             "IOPS at 4k and the ratio was about 1.0; with none the interpreter's cost shows.")
    L.append("")
    pmet, pwant = ratio_table(L, idx, cols, PY_RATIOS, goal_col=True)

    L.append("## Go (bindings/go) vs Rust")
    L.append("")
    L.append("Goals (issue 6), in the same run: the Go lease loop (`bindings/go/examples/loop "
             "-lease`: Go decides, the engine moves the data, zero copy) ≥ 0.9 × the Rust loop "
             "in the same mode at every size; the Go RAM disk (a `[]byte` backend: data copied "
             "by Go code) ≥ 0.7 × the Rust `mem` target at 4k. The loop maps the whole file once "
             "(`Device.Map`: READ and WRITE never reach Go); the per-request row has the Handler "
             "lease each request (one cgo call per request), for information.")
    L.append("")
    gmet, gwant = ratio_table(L, idx, cols, GO_RATIOS, goal_col=True)

    L.append("## NBD: libublk vs the kernel's NBD driver")
    L.append("")
    L.append("Goal (issue 8), in the same run against the same qemu-nbd export (raw file on "
             "tmpfs, loopback TCP, one connection each): our nbd target (`ublk add nbd`, "
             "auto-buf-reg leases on the socket) ≥ the kernel's NBD driver (`nbd-client`) at "
             "every size, ≥ 1.30 at 512k.")
    L.append("")
    L.append("What bounds these ratios here: the kernel's NBD client is zero copy too. It "
             "receives each READ payload from the socket straight into the request's pages "
             "and sends each WRITE payload from them, as our leases do (a fixed-buffer read or write "
             "on the socket, no server buffer); on both sides the only copy of the data "
             "is the socket's own, into or out of its buffers. So at 512k, where copying is "
             "most of the cost, both clients do the same data work against the same server "
             "(qemu-nbd copies each payload twice: file ↔ its buffer ↔ socket), and ratios "
             "near 1 are what to expect; a margin like 1.30 would need the kernel's client to "
             "do work per byte that it does not do. Measured in the VM (8 s runs, CPU time per "
             "thread from /proc): at 512k randread QD4 qemu-nbd used 79-86 % of a CPU, the "
             "kernel's receiving kworker 22-26 %, our queue thread 25-34 %. At 4k and 64k "
             "the cost per request decides instead. There the I/O scheduler mattered more than "
             "either client: with mq-deadline (what the kernel gives both single-queue devices) "
             "each of our requests also went through a kblockd worker (about 40 us of CPU per "
             "IO) and our client made 0.86-0.88 of the kernel's IOPS at 4k randread; with none "
             "on both (as in the table below: see I/O scheduler above) the client side cost "
             "about the same per IO (same method, 4k randread QD64, CPU per IO: the kernel's "
             "client 224 us in fio's context, where it sends, plus 120 us of kworkers; ours "
             "107-123 us in fio plus 236-261 us in its queue thread), and in those profiling "
             "runs ours made 1.03-1.21 of the kernel's IOPS, in a run of the NBD group alone "
             "0.98-1.02 at every point: at 4k and 64k the two clients are level within the "
             "run-to-run spread, which decides each goal's mark there. The export's server "
             "is the bound there too: profiled in the VM (perf, cpu-clock on both CPUs, 10 s of "
             "4k randread QD64 with each client, one run each), qemu-nbd was on a CPU 95 % of "
             "the time with our client (our queue thread 55 %, fio 28 %) and all of it with the "
             "kernel's (its receiving kworker 21 %, fio, which sends, 54 %).")
    L.append("")
    nmet, nwant = ratio_table(L, idx, cols, NBD_RATIOS, goal_col=True)

    copied_section(L, rows, meta)

    L.append("## IOPS")
    L.append("")
    L.append("| engine | target | mode | " + " | ".join("%s %s QD%d" % c for c in cols) + " |")
    L.append("|---|---|---|" + "---:|" * len(cols))
    tnames = {("kernel", "null"): "null (null_blk)", ("kernel", "loop"): "loop (losetup, dio)",
              ("libublk-c", "null"): "null (c-null)", ("libublk-c", "loop"): "loop (c-loop)",
              ("libublk-c", "ramdisk"): "ramdisk (c-ramdisk -b, inline)",
              ("libublk-c", "threadpool"): "threadpool (c-threadpool -b)",
              RUBLK_ZC: "loop-zc (-z)", ("kernel", "nbd"): "nbd (nbd-client)"}
    modes = row_modes(rows)
    for engine, target, _ in series_in(rows):
        L.append("| %s | %s | %s | %s |" % (
            "rublk 0.2.15" if engine == "rublk" else engine,
            tnames.get((engine, target), target), modes.get((engine, target), "?"),
            " | ".join(fmt_iops(idx.get((engine, target, rw, bs, qd))) for rw, bs, qd in cols)))
    L.append("")
    failed = meta.get("failed") or []
    if failed:
        L.append("**Failures in this run** (no figures recorded for these):")
        L.append("")
        for f in failed:
            L.append("- %s" % f.replace("|", "\\|"))
        L.append("")
    if png_name:
        L.append("![IOPS and ratios](%s)" % png_name)
        L.append("")
    with open(path, "w") as f:
        f.write("\n".join(L))
    return {"libublk >= rublk": (met, want), "C examples": (cmet, cwant),
            "zero copy vs copy": (zmet, zwant),
            "zero copy vs copy, null_blk legs": (znmet, znwant), "zero-copy loop vs rublk -z": (rmet, rwant),
            "mirror vs loop writes": (mmet, mwant), "python vs rust": (pmet, pwant),
            "go vs rust": (gmet, gwant), "nbd vs kernel nbd": (nmet, nwant)}


def row_modes(rows):
    """(engine, target) -> the data mode(s) its rows carry."""
    out = {}
    for r in rows:
        k = (r["engine"], r["target"])
        m = r.get("mode", "?")
        if m not in out.get(k, "").split(","):
            out[k] = (out[k] + "," + m) if k in out else m
    return out


def fmt_bytes(v):
    if v is None:
        return "—"
    if v >= 10 * 1024:
        return "%.1f KiB" % (v / 1024)
    return "%.0f B" % v


def copied_section(L, rows, meta):
    """(d) bytes copied per IO by mode, from the servers' counters in the meta file."""
    ctr = meta.get("io_counters")
    L.append("## Bytes copied per IO, by data mode")
    L.append("")
    if not ctr:
        L.append("No counters in the meta file (bench/run before issue 4, or none of our "
                 "devices ran).")
        L.append("")
        return
    L.append("From each of our servers' own counters, read from its stop line when the device "
             "is removed (`copied_bytes`: request data copied between the request and a server "
             "buffer, by the kernel or by us), summed over the device's six fio runs (4k, 64k "
             "and 512k mixed, so per IO is a mix; per byte of data is size-independent), the "
             "RAM disks' fill pass and udev's probe reads. rublk and the kernel's drivers have "
             "no such counters: not measurable there (rublk's copy mode copies every byte by "
             "design).")
    L.append("")
    L.append("| device | " + " | ".join(MODES) + " |")
    L.append("|---|" + "---:|" * len(MODES))
    for b in MATRIX:
        cells = []
        for m in MODES:
            e, t = mode_key(b, m)
            c = ctr.get("%s/%s" % (e, t))
            if not c or c.get("copied_bytes_per_io") is None:
                cells.append("—")
            else:
                cells.append("%s per IO (%.2f × the data)" % (
                    fmt_bytes(c["copied_bytes_per_io"]), c.get("copied_bytes_per_byte") or 0.0))
        L.append("| %s | %s |" % (mode_label(b, "").strip(), " | ".join(cells)))
    L.append("")
    L.append("All our devices in this run:")
    L.append("")
    L.append("| engine/target | mode | IOs | data per IO | copied per IO | copied / data | "
             "lease ops per IO |")
    L.append("|---|---|---:|---:|---:|---:|---:|")
    order = ["%s/%s" % (e, t) for e, t, _ in SERIES]
    for k in sorted(ctr, key=lambda k: order.index(k) if k in order else len(order)):
        c = ctr[k]
        L.append("| %s | %s%s | %s | %s | %s | %s | %s |" % (
            k, c.get("mode", "?"),
            "" if c.get("mode") == c.get("requested_mode") else
            " (asked: %s)" % c.get("requested_mode"),
            "{:,}".format(c.get("ios", 0)), fmt_bytes(c.get("bytes_per_io")),
            fmt_bytes(c.get("copied_bytes_per_io")),
            "—" if c.get("copied_bytes_per_byte") is None else "%.2f" % c["copied_bytes_per_byte"],
            "—" if c.get("lease_ops_per_io") is None else "%.2f" % c["lease_ops_per_io"]))
    L.append("")


COLORS = {
    ("libublk", "null"): "#1f4e9c",
    ("libublk", "mem"): "#4a86d8",
    ("libublk", "loop"): "#9cc3f0",
    ("libublk-c", "null"): "#2e8b57",
    ("libublk-c", "loop"): "#8fd19e",
    ("libublk-c", "ramdisk"): "#5e35b1",
    ("libublk-c", "threadpool"): "#b39ddb",
    ("rublk", "null"): "#c8581a",
    ("rublk", "loop"): "#f3a46b",
    ("kernel", "null"): "#4d4d4d",
    ("kernel", "loop"): "#a8a8a8",
}
HATCH = {"loop": "//", "mem": "..", "ramdisk": "..", "threadpool": "xx"}


def ratio_panel(ax, idx, cols, ratios, title, ylabel, cap=None, ncol=3, fontsize=9,
                headroom=1.35):
    """Grouped bars of the ratios in `ratios` at every point, one dashed line per goal
    (per-size goals: a segment over each group that has it).  cap: the y axis
    ends there at most, and taller bars are cut at it (their figure is printed)."""
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    n = len(ratios)
    rwidth = 0.8 / n
    goal_styles = ["--", ":", "-."]
    goals = sorted({goal_at(g, bs) for _, _, _, g, _, _ in ratios for _, bs, _ in cols} - {None},
                   reverse=True)
    per_size = any(isinstance(g, dict) for _, _, _, g, _, _ in ratios)
    for k, (num, den, label, goal, color, hatch) in enumerate(ratios):
        xs, ys = [], []
        off = (k - (n - 1) / 2) * rwidth
        for j, (rw, bs, qd) in enumerate(cols):
            r = ratio(idx, num, den, rw, bs, qd)
            if r is not None:
                xs.append(j + off)
                ys.append(r)
            else:
                ax.text(j + off, 0.03, "n/a", ha="center", va="bottom", fontsize=8,
                        color="#777777", rotation=90 if n > 2 else 0)
        shown = [min(v, cap) if cap else v for v in ys]
        bars = ax.bar(xs, shown, rwidth * 0.92, label=label, color=color, hatch=hatch,
                      edgecolor="white", linewidth=0.5)
        gs = [goal_at(goal, cols[int(round(x - off))][1]) for x in xs]
        for b, v, g, h in zip(bars, ys, gs, shown):
            ax.text(b.get_x() + b.get_width() / 2, h + 0.02, fmt_ratio(v, g), ha="center",
                    va="bottom", fontsize=8 if n <= 4 else 6,
                    color="#555555" if g is None else "#1a7f37" if v >= g else "#b3261e",
                    fontweight="bold", rotation=0 if n <= 4 else 90)
    for i, g in enumerate(goals):
        if per_size:
            # a goal segment over each group of bars that has this goal
            for j, (_, bs, _) in enumerate(cols):
                if any(goal_at(gg, bs) == g for _, _, _, gg, _, _ in ratios):
                    ax.hlines(g, j - 0.45, j + 0.45, color="#b3261e",
                              linestyle=goal_styles[i % len(goal_styles)], linewidth=1.2)
        else:
            ax.axhline(g, color="#b3261e", linestyle=goal_styles[i % len(goal_styles)],
                       linewidth=1.2)
    rs = [ratio(idx, num, den, *c) for num, den, _, _, _, _ in ratios for c in cols]
    rs = [r for r in rs if r is not None]
    top = max([1.5] + [r * headroom for r in rs])
    ax.set_ylim(0, min(top, cap * headroom) if cap else top)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(["%s\n%s QD%d" % c for c in cols])
    ax.set_xlim(-0.6, len(cols) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=12, fontweight="bold")
    ax.grid(axis="y", alpha=0.35)
    ax.set_axisbelow(True)
    handles = []
    for i, g in enumerate(goals):
        who = [lab.split(" (")[0] for _, _, lab, gg, _, _ in ratios if gg == g]
        text = "goal: ≥ %.2f" % g
        if per_size:
            text += " at %s" % ", ".join(bs for bs, _ in SIZES
                                         if any(goal_at(r[3], bs) == g for r in ratios))
        elif len(goals) > 1:
            text += " (%s)" % ", ".join(w.split(" / ")[0] for w in who)
        handles.append(Line2D([], [], color="#b3261e", linestyle=goal_styles[i % len(goal_styles)],
                              label=text))
    handles += [Patch(facecolor=c, hatch=h, edgecolor="white",
                      label=l if g is not None else l.split(" (")[0] + " (no goal)")
                for _, _, l, g, c, h in ratios]
    ax.legend(handles=handles, loc="upper center", ncol=min(len(handles), ncol),
              fontsize=fontsize, framealpha=0.9)


def write_png(path, rows, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(rows)
    series = series_in(rows)
    # the bars: the original targets (the data-mode matrix has its ratio panels),
    # or everything when the run had none of them
    series = [x for x in series if (x[0], x[1]) in BAR_SERIES] or series
    # issue 4's panels, when the run has figures for them
    cols = columns()
    have = lambda ratios, cs: any(ratio(idx, num, den, *c) is not None
                                  for num, den, *_ in ratios for c in cs)
    zc = have(ZC_RATIOS + ZC_NULLB_RATIOS, cols)
    low = have(RZC_RATIOS, cols) or have(MIRROR_RATIOS, columns(["randwrite"]))
    heights = [1.5, 1, 1] + ([1.1] if zc else []) + ([1] if low else [])
    H = 15 + 5.5 * zc + 5 * low
    top = 1 - 1.65 / H               # the same room (inches) for title and legend
    fig = plt.figure(figsize=(16, H), dpi=100)
    gs = fig.add_gridspec(len(heights), 2, height_ratios=heights, hspace=0.36 * 15 / H * len(heights) / 3,
                          wspace=0.08 if not low else 0.12, top=top)
    axes = [fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])]
    rax = fig.add_subplot(gs[1, :])
    cax = fig.add_subplot(gs[2, :])

    n = max(len(series), 1)
    width = 0.86 / n
    vals = [idx[k] for k in idx if (k[0], k[1]) in {(e, t) for e, t, _ in series} and idx[k] > 0]
    ymin = min(vals) / 2.5 if vals else 1
    ymax = max(vals) * 3 if vals else 10
    for ax, rw in zip(axes, RWS):
        for i, (engine, target, label) in enumerate(series):
            xs, ys = [], []
            for j, (bs, qd) in enumerate(SIZES):
                v = idx.get((engine, target, rw, bs, qd))
                if v is not None and v > 0:
                    xs.append(j - 0.43 + width * (i + 0.5))
                    ys.append(v)
            bars = ax.bar(xs, ys, width * 0.92, label=label,
                          color=COLORS.get((engine, target), None),
                          hatch=HATCH.get(target), edgecolor="white", linewidth=0.5)
            for b, v in zip(bars, ys):
                ax.text(b.get_x() + b.get_width() / 2, v * 1.07, short(v), ha="center",
                        va="bottom", fontsize=7, rotation=90)
        ax.set_yscale("log")
        ax.set_ylim(ymin, ymax)
        ax.set_xticks(range(len(SIZES)))
        ax.set_xticklabels(["%s QD%d" % s for s in SIZES])
        ax.set_title(rw, fontsize=12, fontweight="bold")
        ax.grid(axis="y", which="major", alpha=0.35)
        ax.set_axisbelow(True)
        ax.set_xlim(-0.5, len(SIZES) - 0.5)
        for j in range(1, len(SIZES)):
            ax.axvline(j - 0.5, color="#cccccc", linewidth=0.8)
    axes[0].set_ylabel("IOPS (log scale)")
    axes[1].tick_params(labelleft=False)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    # matplotlib fills legend columns first: reorder so that the rows read left to
    # right in the order of the bars
    ncol = min(len(labels), 6) or 1
    nrow = -(-len(labels) // ncol)
    order = [r * ncol + c for c in range(ncol) for r in range(nrow) if r * ncol + c < len(labels)]
    fig.legend([handles[i] for i in order], [labels[i] for i in order], loc="upper center",
               ncol=ncol, bbox_to_anchor=(0.5, 1 - 0.675 / H), fontsize=9, frameon=False)

    ratio_panel(rax, idx, cols, RATIOS, "libublk vs rublk 0.2.15, copy mode (higher is better)",
                "libublk / rublk (IOPS ratio)")
    ratio_panel(cax, idx, cols, C_RATIOS,
                "C examples (C ABI) vs Rust targets, and worker-thread vs inline completion",
                "IOPS ratio")
    row = 3
    if zc:
        ratio_panel(fig.add_subplot(gs[row, :]), idx, cols, ZC_RATIOS + ZC_NULLB_RATIOS,
                    "Zero copy vs copy mode: each zero-copy mode / copy, same device (mirror-nullb: null_blk legs)",
                    "IOPS ratio", cap=6, headroom=1.6)
        row += 1
    if low:
        ratio_panel(fig.add_subplot(gs[row, 0]), idx, cols, RZC_RATIOS,
                    "Zero-copy loop vs rublk 0.2.15 -z", "IOPS ratio", cap=4, ncol=1,
                    fontsize=8, headroom=1.6)
        ratio_panel(fig.add_subplot(gs[row, 1]), idx, columns(["randwrite"]), MIRROR_RATIOS,
                    "C mirror writes / single loop writes, same mode", "IOPS ratio", cap=4,
                    ncol=2, fontsize=8, headroom=1.8)
    nr = int(meta.get("rounds", 1) or 1)
    rounds = nr * int(meta.get("reps", 1) or 1)
    more = sorted(set(nr * int(n) for n in (meta.get("group_reps") or {}).values()) - {rounds})
    best = "/".join(str(n) for n in [rounds] + more)
    fig.suptitle("fio io_uring direct, 1 job — kernel %s, %s-vCPU VM guest, %s s runs%s, %s"
                 % (meta.get("kernel", "?"), meta.get("cpus", "?"), meta.get("runtime_s", "?"),
                    ", best of %s" % best if rounds > 1 or more else "",
                    (meta.get("date") or "?")[:10]), fontsize=13, y=1 - 0.225 / H)
    fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=os.path.join(HERE, "results.json"))
    ap.add_argument("--meta", default=None, help="default: <results>-meta.json")
    ap.add_argument("--md", default=os.path.join(HERE, "RESULTS.md"))
    ap.add_argument("--png", default=os.path.join(HERE, "RESULTS.png"))
    a = ap.parse_args()
    meta_path = a.meta or (os.path.splitext(a.results)[0] + "-meta.json")
    rows = load(a.results)
    for r in rows:
        missing = {"target", "engine", "rw", "bs", "iodepth", "iops"} - set(r)
        if missing:
            sys.exit("report.py: row %r lacks %s" % (r, sorted(missing)))
    meta = load(meta_path) if os.path.exists(meta_path) else {}

    png_ok = True
    try:
        write_png(a.png, rows, meta)
    except ImportError as e:
        print("[bench/report] ERROR: no matplotlib (%s): run bench/setup and use its venv" % e,
              file=sys.stderr)
        png_ok = False
    png_rel = os.path.relpath(a.png, os.path.dirname(os.path.abspath(a.md))) if png_ok else None
    goals = write_md(a.md, rows, meta, png_rel)
    print("[bench/report] %d rows -> %s%s; goals met: %s" %
          (len(rows), a.md, (" and " + a.png) if png_ok else "",
           "; ".join("%s %d/%d" % (k, m, w) for k, (m, w) in goals.items())))
    return 0 if png_ok else 1


if __name__ == "__main__":
    sys.exit(main())
