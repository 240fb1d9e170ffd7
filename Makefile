# Entry points for developers and CI. `make setup` prepares the machine (see scripts/setup).

ARRAKIS ?= ./target/release/arrakis
ARRAKIS_HOME ?= $(HOME)/.cache/arrakis
CARGO ?= cargo

.PHONY: help setup run test lint bench clean-cache

help:
	@echo 'make setup        install host packages, build kernel, image, initramfs and the CLI'
	@echo 'make run          setup, then run a command in a throwaway sandbox'
	@echo 'make test         setup, then the whole test suite: cargo tests, then the Python suite in tests/'
	@echo 'make lint         cargo fmt --check and clippy with warnings denied'
	@echo 'make bench        setup, then scripts/bench'
	@echo 'make clean-cache  delete the built kernels, images and artifacts in $$ARRAKIS_HOME'

setup:
	scripts/setup

run: setup
	$(ARRAKIS) run --rm -- sh -c 'uname -a; cat /etc/os-release | head -2'

# Both suites run even when the first fails; the exit status is 1 if either failed.
test: setup
	@status=0; \
	$(CARGO) test --workspace --release -- --test-threads=2 || status=1; \
	scripts/test-python || status=1; \
	exit $$status

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: setup
	scripts/bench

clean-cache:
	@test -n "$(ARRAKIS_HOME)" || { echo 'ARRAKIS_HOME is empty' >&2; exit 1; }
	rm -rf "$(ARRAKIS_HOME)/kernel" "$(ARRAKIS_HOME)/images" "$(ARRAKIS_HOME)/artifacts"
