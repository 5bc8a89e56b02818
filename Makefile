# libublk — build, test, demo, bench. See README.md.
CARGO ?= cargo
VM    := tests/vm/run

.PHONY: all build test test-host test-vm test-compat demo bench clean

all: build

build:
	$(CARGO) build --release --bins --examples

# Host unit tests, then every device test on kernel 7 in the VM, then a
# smaller compatibility pass on 6.12. Ends with one total line.
test: build
	tests/check

test-host:
	$(CARGO) test

test-vm: build
	$(VM) tests/device/run-all

test-compat: build
	UBLK_TEST_KERNEL=6.12 $(VM) tests/device/run-all --compat

demo: build
	$(VM) scripts/demo

bench: build
	bench/all

clean:
	$(CARGO) clean
