#!/usr/bin/env bash
# bindings/go/build.sh (`make go`, part of `make build`): go vet, then builds
# the Go examples and test binaries into target/release/go/ for the device
# tests (tests/device/t_go.sh runs them in the VM):
#
#   ramdisk, loop          the examples
#   ublk.test              `go test -c` of package ublk
#   ublk-race.test         the same under the race detector
#
# Needs Go >= 1.21 with cgo and target/release/libublk.so (cargo build
# --release). Without a suitable Go it builds nothing, says so loudly, exits 0
# and leaves target/release/go/SKIPPED with the reason (t_go.sh then reports a
# SKIP, never a pass).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(cd "$HERE/../.." && pwd)/target/release/go
mkdir -p "$OUT"
rm -f "$OUT/SKIPPED"

skip() {
    echo "$1" >"$OUT/SKIPPED"
    {
        echo "************************************************************************"
        echo "SKIP: Go bindings not built: $1"
        echo "************************************************************************"
    } >&2
    exit 0
}

howto="Install Go 1.21 or newer. Debian 12's own golang-go is 1.19: add the bookworm-backports suite to the apt sources, apt-get install -t bookworm-backports golang-1.22-go (or newer) and put /usr/lib/go-1.22/bin first in PATH; or unpack an official Go release tarball into /usr/local/go and put /usr/local/go/bin first in PATH. Then run 'make go'."
command -v go >/dev/null 2>&1 || skip "no \`go\` in PATH. $howto"
ver=$(go env GOVERSION 2>/dev/null || go version | awk '{ print $3 }')
if [[ ! $ver =~ ^go([0-9]+)\.([0-9]+) ]] || ((BASH_REMATCH[1] == 1 && BASH_REMATCH[2] < 21)); then
    skip "found $ver, need Go >= 1.21. $howto"
fi
export GOTOOLCHAIN=local CGO_ENABLED=1 GOFLAGS=${GOFLAGS:--buildvcs=false}
[[ -e $OUT/../libublk.so ]] || { echo "go: $OUT/../libublk.so missing: run cargo build --release first" >&2; exit 1; }

cd "$HERE"
echo "go: $ver: vet, examples, test binaries -> target/release/go/"
go vet ./...
go build -o "$OUT/ramdisk" ./examples/ramdisk
go build -o "$OUT/loop" ./examples/loop
go test -c -o "$OUT/ublk.test" .
if go test -race -c -o "$OUT/ublk-race.test" . 2>"$OUT/race-build.log"; then
    rm -f "$OUT/race-build.log"
else
    rm -f "$OUT/ublk-race.test"
    echo "go: WARNING: the race detector build failed (see $OUT/race-build.log); t_go.sh will report a SKIP for it" >&2
fi
