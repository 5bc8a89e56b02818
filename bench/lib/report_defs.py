"""bench/lib/report_defs.py — what bench/report.py reports: the rows (engine,
target) in display order with their labels, and the ratio tables with their
goals (per issue).  A ratio is (numerator, denominator, label, goal, colour,
hatch); a goal is a number, a {block size: number or None} dict, or None
(figures shown, no goal)."""

RWS = ["randread", "randwrite"]
SIZES = [("4k", 64), ("64k", 16), ("512k", 4)]
# (engine, target) rows in display order, with labels; the C examples (engine
# libublk-c) next to the Rust targets they are compared with
SERIES = [
    ("libublk", "null", "libublk null"),
    ("libublk-c", "null", "C null (c-null)"),
    ("libublk", "mem", "libublk mem"),
    ("libublk-c", "ramdisk", "C ramdisk (inline)"),
    ("libublk-c", "threadpool", "C threadpool (worker threads)"),
    ("python", "ramdisk", "Python ramdisk (pyublk)"),
    ("go", "ramdisk", "Go ramdisk (bindings/go)"),
    ("libublk", "loop", "libublk loop"),
    ("libublk-c", "loop", "C loop (c-loop)"),
    ("rublk", "null", "rublk 0.2.15 null"),
    ("rublk", "loop", "rublk 0.2.15 loop"),
    ("kernel", "null", "kernel null_blk"),
    ("kernel", "loop", "kernel loop (dio)"),
    ("libublk", "nbd", "libublk nbd (auto-buf-reg)"),
    ("kernel", "nbd", "kernel nbd (nbd-client)"),
]
# the bar chart shows these (the data-mode matrix has its own ratio panels)
BAR_SERIES = {(e, t) for e, t, _ in SERIES}
# issue 4: data modes of our loop (the CLI), C mirror and C stripe; the loop in
# copy mode is the ("libublk", "loop") row above
MODES = ["auto-buf-reg", "register", "user-copy", "copy"]
ZC_MODES = ["auto-buf-reg", "register"]
MATRIX = ["loop", "mirror", "stripe"]
RUBLK_ZC = ("rublk", "loop-zc")


def mode_key(base, mode):
    """(engine, target) of our `base` device (loop, mirror, stripe; loop-lat and
    mirror-lat: on the latency-bound null_blk devices) in data mode `mode`."""
    if base == "loop-lat":
        return ("libublk", "loop-lat:" + mode)
    if base == "loop":
        return ("libublk", "loop") if mode == "copy" else ("libublk", "loop:" + mode)
    return ("libublk-c", "%s:%s" % (base, mode))


def mode_label(base, mode):
    return {"loop": "libublk loop", "mirror": "C mirror", "stripe": "C stripe",
            "loop-lat": "libublk loop-lat", "mirror-lat": "C mirror-lat",
            "mirror-nullb": "C mirror-nullb"}[base] + " " + mode


_at = SERIES.index(("libublk-c", "loop", "C loop (c-loop)")) + 1
SERIES[_at:_at] = [(k[0], k[1], mode_label(b, m)) for b in MATRIX for m in MODES
                   for k in [mode_key(b, m)] if k != ("libublk", "loop")]
_at = SERIES.index(("libublk", "loop:auto-buf-reg", mode_label("loop", "auto-buf-reg"))) + 1
SERIES[_at:_at] = [("python", "loop:auto-buf-reg", "Python loop auto-buf-reg (pyublk leases)"),
                   ("go", "loop:auto-buf-reg", "Go loop auto-buf-reg (bindings/go leases)"),
                   ("python", "loop-req:auto-buf-reg", "Python loop, per-request route()"),
                   ("go", "loop-req:auto-buf-reg", "Go loop, per-request Handler")]
SERIES += [(k[0], k[1], mode_label(b, m)) for m in MODES for b in ("loop-lat", "mirror-lat")
           for k in [mode_key(b, m)]]
# the mirror on the no-data null_blk legs: zero copy and copy mode only
NULLB_MODES = ZC_MODES + ["copy"]
_at = SERIES.index(("libublk-c", "stripe:copy", mode_label("stripe", "copy"))) + 1
SERIES[_at:_at] = [(k[0], k[1], mode_label("mirror-nullb", m)) for m in NULLB_MODES
                   for k in [mode_key("mirror-nullb", m)]]
_at = SERIES.index(("rublk", "loop", "rublk 0.2.15 loop")) + 1
SERIES[_at:_at] = [RUBLK_ZC + ("rublk 0.2.15 loop -z",)]
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
# (a) zero copy vs copy: a goal per size (None: no goal there, the figure is shown)
ZC_GOAL = {"4k": 1.0, "64k": None, "512k": 1.5}
ZC_RATIOS = [(mode_key(b, m), mode_key(b, "copy"), "%s / copy" % mode_label(b, m), ZC_GOAL,
              c, h)
             for b, h in zip(MATRIX, [None, "//", "xx"])
             for m, c in zip(ZC_MODES, ["#1f4e9c", "#c8581a"])]
ZC_INFO = [(mode_key(b, "user-copy"), mode_key(b, "copy"),
            "%s / copy (no goal: user copy still copies)" % mode_label(b, "user-copy"), None,
            "#999999", None) for b in MATRIX]
# (a') the same goals for the C mirror on legs that copy nothing (null_blk,
# no latency, no data kept): the server's copy alone
ZC_NULLB_RATIOS = [(mode_key("mirror-nullb", m), mode_key("mirror-nullb", "copy"),
                    "%s / copy" % mode_label("mirror-nullb", m), ZC_GOAL, c, "..")
                   for m, c in zip(ZC_MODES, ["#6f8ecb", "#e0a27c"])]
# (b) our zero-copy loop vs rublk -z (auto_buf_reg): the like-for-like row has the goal
RZC_RATIOS = [
    (mode_key("loop", "auto-buf-reg"), RUBLK_ZC, "libublk loop auto-buf-reg / rublk loop -z",
     1.0, "#1f4e9c", None),
    (mode_key("loop", "register"), RUBLK_ZC,
     "libublk loop register / rublk loop -z (no goal: another mechanism)", None, "#9cc3f0",
     "//"),
]
# (c) mirror writes vs single loop writes, same data mode: the goal on the
# latency-bound null_blk backing (parallel legs: about 1; one after the other:
# about 0.5), the tmpfs figures (CPU-bound: two copies) for information
MIRROR_RATIOS = [(mode_key("mirror-lat", m), mode_key("loop-lat", m),
                  "C mirror-lat / libublk loop-lat, %s" % m, 0.8, c, h)
                 for m, c, h in zip(MODES, ["#1f4e9c", "#c8581a", "#999999", "#2e8b57"],
                                    [None, "//", "..", "xx"])]
MIRROR_INFO = [(mode_key("mirror", m), mode_key("loop", m),
                "C mirror / libublk loop on tmpfs, %s (no goal: CPU-bound)" % m, None, c, h)
               for m, c, h in zip(MODES, ["#6f8ecb", "#e0a27c", "#cccccc", "#8fd19e"],
                                  [None, "//", "..", "xx"])]
# issue 5: pyublk vs the Rust targets
PY_RATIOS = [
    (("python", "loop:auto-buf-reg"), mode_key("loop", "auto-buf-reg"),
     "Python loop / libublk loop (auto-buf-reg leases)", 0.8, "#3776ab", None),
    (("python", "ramdisk"), ("libublk", "mem"), "Python ramdisk / libublk mem (copy)",
     {"4k": 0.5, "64k": None, "512k": None}, "#ffd43b", "//"),
    (("python", "loop-req:auto-buf-reg"), mode_key("loop", "auto-buf-reg"),
     "Python loop, per-request route() / libublk loop (no goal: a Python call per batch)",
     None, "#9db8d2", "xx"),
]
# issue 6: the Go bindings vs the Rust targets
GO_RATIOS = [
    (("go", "loop:auto-buf-reg"), mode_key("loop", "auto-buf-reg"),
     "Go loop / libublk loop (auto-buf-reg leases)", 0.9, "#00add8", None),
    (("go", "ramdisk"), ("libublk", "mem"), "Go ramdisk / libublk mem (copy)",
     {"4k": 0.7, "64k": None, "512k": None}, "#5dc9e2", "//"),
    (("go", "loop-req:auto-buf-reg"), mode_key("loop", "auto-buf-reg"),
     "Go loop, per-request Handler / libublk loop (no goal: a cgo call per request)",
     None, "#a6dfec", "xx"),
]
# issue 8: our NBD client vs the kernel's NBD driver, same qemu-nbd export
NBD_RATIOS = [
    (("libublk", "nbd"), ("kernel", "nbd"), "libublk nbd / kernel nbd (nbd-client)",
     {"4k": 1.0, "64k": 1.0, "512k": 1.3}, "#8e44ad", None),
]
GOAL_MARK, MISS_MARK = "✓", "✗"
