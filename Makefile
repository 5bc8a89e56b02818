# libublk — build, test, demo, bench, install. See README.md.
CARGO   ?= cargo
CC      ?= cc
CFLAGS  ?= -O2 -g -Wall -Wextra -Werror
PREFIX  ?= /usr/local
VM      := tests/vm/run
OUT     := target/release
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

C_EXAMPLES := null ramdisk loop threadpool mirror stripe nbd
C_BINS     := $(C_EXAMPLES:%=$(OUT)/c-%) $(OUT)/c-errors $(OUT)/c-errors-asan
C_LINK      = -L$(OUT) -lublk -lpthread -Wl,-rpath,$(abspath $(OUT))

.PHONY: all build rust c go header check-header check-abi test test-host test-vm test-compat fuzz \
        demo bench install clean python

all: build

build: rust
	$(MAKE) --no-print-directory c
	$(MAKE) --no-print-directory go

rust:
	$(CARGO) build --release --lib --bins --examples
	ln -sf libublk.so $(OUT)/libublk.so.0

c: $(C_BINS)

$(OUT)/c-%: c-examples/%.c c-examples/common.h include/ublk.h $(OUT)/libublk.so
	$(CC) $(CFLAGS) -Iinclude -o $@ $< $(C_LINK)

$(OUT)/c-errors: tests/c/errors.c include/ublk.h $(OUT)/libublk.so
	$(CC) $(CFLAGS) -Iinclude -o $@ $< $(C_LINK)

# The same test with AddressSanitizer/UBSan/LeakSanitizer: valgrind cannot run
# it on a device (it does not let other threads run while one blocks in
# io_uring_enter), so the device suite runs this build.
$(OUT)/c-errors-asan: tests/c/errors.c include/ublk.h $(OUT)/libublk.so
	$(CC) $(CFLAGS) -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -Iinclude -o $@ $< $(C_LINK)

# Go bindings (bindings/go): go vet, the examples and the test binaries into
# target/release/go/ (tests/device/t_go.sh runs them in the VM). Without Go >=
# 1.21 it says so loudly and skips (t_go.sh then reports a SKIP).
go:
	bindings/go/build.sh

# include/ublk.h is generated from src/ffi by the pinned cbindgen and committed.
header:
	tools/cbindgen --config cbindgen.toml --output include/ublk.h src/ffi/mod.rs

check-header:
	tools/cbindgen --config cbindgen.toml --output $(OUT)/ublk.h.fresh src/ffi/mod.rs
	@diff -u include/ublk.h $(OUT)/ublk.h.fresh || \
	    { echo "include/ublk.h is stale: run 'make header' and commit it" >&2; exit 1; }

# The C ABI on the host: header fresh, only ublk_* exported, soname, the
# installed library usable through pkg-config, the C error-path test.
check-abi: build
	tests/c/check-abi

# Host unit tests, then every device test on kernel 7 in the VM, then a
# smaller compatibility pass on 6.12. Ends with one total line.
test: build python
	tests/check

# pyublk: libublk.so copied into python/pyublk, `pip install ./python` into the
# test venv ($(UBLK_CACHE_DIR)/py-venv, with pytest).
python: rust
	python/setup

# cargo-fuzz on the CLI and state-file parsing, FUZZ_SECONDS per target (not in CI).
fuzz:
	tools/fuzz

test-host:
	$(CARGO) test --release

test-vm: build
	$(VM) tests/device/run-all

test-compat: build
	UBLK_TEST_KERNEL=6.12 $(VM) tests/device/run-all --compat

demo: build
	$(VM) scripts/demo

bench: build
	bench/all

install: rust
	install -d $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/bin
	install -m 755 $(OUT)/libublk.so $(DESTDIR)$(PREFIX)/lib/libublk.so.$(VERSION)
	ln -sf libublk.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/libublk.so.0
	ln -sf libublk.so.0 $(DESTDIR)$(PREFIX)/lib/libublk.so
	install -m 644 $(OUT)/libublk.a $(DESTDIR)$(PREFIX)/lib/libublk.a
	install -m 644 include/ublk.h $(DESTDIR)$(PREFIX)/include/ublk.h
	install -m 755 $(OUT)/ublk $(DESTDIR)$(PREFIX)/bin/ublk
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@VERSION@|$(VERSION)|' ublk.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/ublk.pc
	install -d $(DESTDIR)$(PREFIX)/lib/udev/rules.d
	sed -e 's|@BINDIR@|$(PREFIX)/bin|' udev/90-ublk.rules.in > $(DESTDIR)$(PREFIX)/lib/udev/rules.d/90-ublk.rules

clean:
	$(CARGO) clean
