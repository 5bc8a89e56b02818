# bench/lib/probe.sh: the fio run of the explanatory probes (bench/ctxsw,
# bench/cpuio), with bench/run's options and placement (fio on CPU 1, the
# servers on CPU 0).  Sourced, not run.

# probe_iops DEV RW BS QD RUNTIME: runs fio (RW randread or randwrite) and
# prints its IOPS; non-zero when fio fails.
probe_iops() {
    local out
    out=$(fio --name=m --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" --ioengine=io_uring \
          --direct=1 --time_based --runtime="$5" --numjobs=1 --thread --disk_util=0 \
          --norandommap --randrepeat=0 --cpus_allowed=1 --output-format=terse --terse-version=3) ||
        return 1
    # terse v3: field 8 is the read IOPS, 49 the write IOPS
    if [ "$2" = randread ]; then echo "$out" | cut -d';' -f8; else echo "$out" | cut -d';' -f49; fi
}
