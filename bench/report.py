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
    threads vs inline), ✓ when >= 0.80.
RESULTS.png: the same figures as grouped bars (log scale) plus one panel per
ratio table.  Absolute IOPS under QEMU/TCG are noise; only figures from one run
are compared, and the ratios are the point.

Without matplotlib, RESULTS.md is still written and the exit status is 1.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

RWS = ["randread", "randwrite"]
SIZES = [("4k", 64), ("64k", 16), ("512k", 4)]
# (engine, target) rows in display order, with labels; the C examples (engine
# libublk-c) next to the Rust targets they are compared with
SERIES = [
    ("libublk", "null", "libublk null"),
    ("libublk-c", "null", "C null (c-null)"),
    ("libublk", "mem", "libublk mem"),
    ("libublk-c", "ramdisk", "C ramdisk (inline)"),
    ("libublk-c", "threadpool", "C threadpool (2 workers)"),
    ("libublk", "loop", "libublk loop"),
    ("libublk-c", "loop", "C loop (c-loop)"),
    ("rublk", "null", "rublk 0.2.15 null"),
    ("rublk", "loop", "rublk 0.2.15 loop"),
    ("kernel", "null", "kernel null_blk"),
    ("kernel", "loop", "kernel loop (dio)"),
]
# ratio tables: (numerator, denominator, label, goal, colour, hatch)
RATIOS = [
    (("libublk", "null"), ("rublk", "null"), "libublk null / rublk null", 1.0, "#1f4e9c", None),
    (("libublk", "loop"), ("rublk", "loop"), "libublk loop / rublk loop", 1.0, "#9cc3f0", "//"),
]
C_RATIOS = [
    (("libublk-c", "null"), ("libublk", "null"), "C null / libublk null", 0.95, "#2e8b57", None),
    (("libublk-c", "loop"), ("libublk", "loop"), "C loop / libublk loop", 0.95, "#8fd19e", "//"),
    (("libublk-c", "threadpool"), ("libublk-c", "ramdisk"),
     "C threadpool / C ramdisk (worker threads vs inline)", 0.80, "#9575cd", "xx"),
]
GOAL_MARK, MISS_MARK = "✓", "✗"


def load(path):
    with open(path) as f:
        return json.load(f)


def index(rows):
    """(engine, target, rw, bs, iodepth) -> iops (last one wins)."""
    out = {}
    for r in rows:
        out[(r["engine"], r["target"], r["rw"], r["bs"], int(r["iodepth"]))] = float(r["iops"])
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
    return "%.3f" % r if r < goal <= round(r, 2) else "%.2f" % r


def columns():
    return [(rw, bs, qd) for rw in RWS for bs, qd in SIZES]


def ratio_table(L, idx, cols, ratios, goal_col):
    """Append a markdown ratio table; returns (points met, points wanted)."""
    head = "| ratio | " + ("goal | " if goal_col else "")
    L.append(head + " | ".join("%s %s QD%d" % c for c in cols) + " |")
    L.append("|---|" + ("---:|" if goal_col else "") + "---:|" * len(cols))
    met = total = 0
    for num, den, label, goal, _, _ in ratios:
        cells = []
        for rw, bs, qd in cols:
            r = ratio(idx, num, den, rw, bs, qd)
            if r is None:
                cells.append("—")
                continue
            total += 1
            ok = r >= goal
            met += ok
            cells.append("%s %s" % (fmt_ratio(r, goal), GOAL_MARK if ok else MISS_MARK))
        L.append("| %s | %s%s |" % (label, "≥ %.2f | " % goal if goal_col else "", " | ".join(cells)))
    L.append("")
    want = len(ratios) * len(cols)
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
             "--numjobs=1`, %s s per run, random reads and writes, in one VM run." %
             (meta.get("fio", "?"), meta.get("runtime_s", "?")))
    L.append("")
    L.append("- kernel: `%s` (VM guest, %s vCPUs, CPU: %s)" %
             (meta.get("kernel", "?"), meta.get("cpus", "?"), meta.get("cpu_model", "?") or "?"))
    L.append("- date: %s" % meta.get("date", "?"))
    L.append("- libublk: commit `%s`, CLI `ublk` (`--queues 1 --depth 64`); peer: %s "
             "(`-q 1 -d 64`, copy mode: neither `-z` nor `-u`)" %
             (meta.get("libublk_commit", "?"), meta.get("rublk", "rublk") or "rublk"))
    L.append("- loop targets: %s; kernel loop via `losetup --direct-io=on`; kernel null via "
             "`null_blk` (blk-mq, irqmode=0, 1 queue, depth 64)" %
             meta.get("loop_backing", "1 GiB file on tmpfs"))
    if meta.get("ram_fill"):
        L.append("- RAM disks (libublk mem, C ramdisk, C threadpool): %s, so that no figure "
                 "includes first-touch page faults" % meta["ram_fill"])
    if any(r["engine"] == "libublk-c" for r in rows):
        L.append("- C examples (engine `libublk-c`, through libublk.so's C ABI, copy mode): "
                 "`c-null -s 1G`, `c-loop -f <the same file>`, `c-ramdisk -s 1G` (completes "
                 "inside the callback), `c-threadpool -s 1G -t 2` (completes from 2 worker "
                 "threads), all `-q 1 -d 64`; each runs right after the Rust target it is "
                 "compared with")
    if int(meta.get("rounds", 1) or 1) > 1:
        L.append("- %d rounds over all targets; each figure is the best round (all rounds: "
                 "`samples` in results.json)" % int(meta["rounds"]))
    if meta.get("host_loadavg_before") or meta.get("host_loadavg_after"):
        L.append("- host load average: %s before the run, %s (1/5/15 min) after it; the guest's "
                 "CPUs are emulated on the host's, so other work there skews the figures" %
                 (meta.get("host_loadavg_before", "?"), meta.get("host_loadavg_after", "?")))
    L.append("")
    L.append("Absolute IOPS are emulated-CPU noise; compare only figures from the same run. "
             "The ratios below are the point.")
    L.append("")

    L.append("## libublk vs rublk (copy mode)")
    L.append("")
    L.append("Goal: libublk ≥ rublk (ratio ≥ 1.00, %s) at every size." % GOAL_MARK)
    L.append("")
    met, want = ratio_table(L, idx, cols, RATIOS, goal_col=False)

    L.append("## C examples vs Rust targets")
    L.append("")
    L.append("Goals (issue 3), at every size in the same run: the C examples within 5 %% of the "
             "Rust targets' IOPS (C / Rust ≥ 0.95, %s), and completion from worker threads "
             "within 20 %% of inline completion (c-threadpool / c-ramdisk ≥ 0.80, %s)." %
             (GOAL_MARK, GOAL_MARK))
    L.append("")
    cmet, cwant = ratio_table(L, idx, cols, C_RATIOS, goal_col=True)

    L.append("## IOPS")
    L.append("")
    L.append("| engine | target | " + " | ".join("%s %s QD%d" % c for c in cols) + " |")
    L.append("|---|---|" + "---:|" * len(cols))
    tnames = {("kernel", "null"): "null (null_blk)", ("kernel", "loop"): "loop (losetup, dio)",
              ("libublk-c", "null"): "null (c-null)", ("libublk-c", "loop"): "loop (c-loop)",
              ("libublk-c", "ramdisk"): "ramdisk (c-ramdisk, inline)",
              ("libublk-c", "threadpool"): "threadpool (c-threadpool -t 2)"}
    for engine, target, _ in series_in(rows):
        L.append("| %s | %s | %s |" % (
            "rublk 0.2.15" if engine == "rublk" else engine,
            tnames.get((engine, target), target),
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
    return met, want, cmet, cwant


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


def ratio_panel(ax, idx, cols, ratios, title, ylabel):
    """Grouped bars of the ratios in `ratios` at every point, one dashed line per goal."""
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    n = len(ratios)
    rwidth = 0.8 / n
    goal_styles = ["--", ":", "-."]
    goals = sorted({g for _, _, _, g, _, _ in ratios}, reverse=True)
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
        bars = ax.bar(xs, ys, rwidth * 0.92, label=label, color=color, hatch=hatch,
                      edgecolor="white", linewidth=0.5)
        for b, v in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.02, fmt_ratio(v, goal), ha="center",
                    va="bottom", fontsize=8, color="#1a7f37" if v >= goal else "#b3261e",
                    fontweight="bold")
    for i, g in enumerate(goals):
        ax.axhline(g, color="#b3261e", linestyle=goal_styles[i % len(goal_styles)],
                   linewidth=1.2)
    rs = [ratio(idx, num, den, *c) for num, den, _, _, _, _ in ratios for c in cols]
    rs = [r for r in rs if r is not None]
    ax.set_ylim(0, max([1.5] + [r * 1.35 for r in rs]))
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
        if len(goals) > 1:
            text += " (%s)" % ", ".join(w.split(" / ")[0] for w in who)
        handles.append(Line2D([], [], color="#b3261e", linestyle=goal_styles[i % len(goal_styles)],
                              label=text))
    handles += [Patch(facecolor=c, hatch=h, edgecolor="white", label=l)
                for _, _, l, _, c, h in ratios]
    ax.legend(handles=handles, loc="upper center", ncol=min(len(handles), 3), fontsize=9,
              framealpha=0.9)


def write_png(path, rows, meta):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = index(rows)
    series = series_in(rows)
    fig = plt.figure(figsize=(16, 15), dpi=100)
    gs = fig.add_gridspec(3, 2, height_ratios=[1.5, 1, 1], hspace=0.36, wspace=0.08,
                          top=0.89)
    axes = [fig.add_subplot(gs[0, 0]), fig.add_subplot(gs[0, 1])]
    rax = fig.add_subplot(gs[1, :])
    cax = fig.add_subplot(gs[2, :])

    n = max(len(series), 1)
    width = 0.86 / n
    vals = [v for v in idx.values() if v > 0]
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
               ncol=ncol, bbox_to_anchor=(0.5, 0.955), fontsize=9, frameon=False)

    cols = columns()
    ratio_panel(rax, idx, cols, RATIOS, "libublk vs rublk 0.2.15, copy mode (higher is better)",
                "libublk / rublk (IOPS ratio)")
    ratio_panel(cax, idx, cols, C_RATIOS,
                "C examples (C ABI) vs Rust targets, and worker-thread vs inline completion",
                "IOPS ratio")
    rounds = int(meta.get("rounds", 1) or 1)
    fig.suptitle("fio io_uring direct, 1 job — kernel %s, %s-vCPU VM guest, %s s runs%s, %s"
                 % (meta.get("kernel", "?"), meta.get("cpus", "?"), meta.get("runtime_s", "?"),
                    ", best of %d" % rounds if rounds > 1 else "",
                    (meta.get("date") or "?")[:10]), fontsize=13, y=0.985)
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
    met, want, cmet, cwant = write_md(a.md, rows, meta, png_rel)
    print("[bench/report] %d rows -> %s%s; libublk >= rublk at %d of %d points; "
          "C examples goals met at %d of %d points" %
          (len(rows), a.md, (" and " + a.png) if png_ok else "", met, want, cmet, cwant))
    return 0 if png_ok else 1


if __name__ == "__main__":
    sys.exit(main())
