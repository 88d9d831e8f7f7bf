# The test command of the README and of CI: Rust checks and tests, the extension built in
# the quick dev profile, Python lint and tests, and the benchmarks once at a tiny size.
PY ?= python3
PYDIRS = python tests benches examples

.PHONY: test lint rust-test py-install py-test bench-smoke bench capi capi-build capi-test header \
	c-example c-example-bin cxx-header c-sanitize rust-doc rust-example

test: lint rust-test capi py-install py-test bench-smoke

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

rust-test:
	cargo test -p gmem-core

py-install:
	$(PY) -m pip install -q -e '.[test]' --config-settings=build-args='--profile=dev'
	$(PY) -m ruff check $(PYDIRS)
	$(PY) -m ruff format --check $(PYDIRS)

stubtest:
	$(PY) -m mypy.stubtest gmem._gmem

py-test: stubtest
	$(PY) -m pytest tests -q

bench-smoke:
	GMEM_BENCH_SMALL=1 $(PY) -m pytest benches -q --benchmark-disable

# Full benchmarks on the release build (see BENCHMARKS.md).
bench:
	$(PY) -m pip install -q '.[test]'
	$(PY) -m pytest benches --benchmark-json=bench.json

# The embedding surface (docs/embedding.md): libgmem and its header, the C example (plain,
# as C++ syntax, under ASan/UBSan where the compiler has them), the Rust example, the docs.
CC ?= cc
CXX ?= c++
CAPI_LIB = target/debug/libgmem.a
# What a Rust static library needs from the C runtime on Linux.
CAPI_LDLIBS = -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
C_OUT = target/c

capi: capi-test c-example cxx-header c-sanitize rust-example rust-doc

capi-build:
	cargo build -q -p gmem-capi

# Unit tests, and include/gmem.h checked against what cbindgen makes of the crate now.
capi-test:
	cargo test -q -p gmem-capi

# Regenerate include/gmem.h after changing the C API.
header:
	GMEM_BLESS=1 cargo test -q -p gmem-capi --test header

c-example-bin: capi-build
	mkdir -p $(C_OUT)
	$(CC) -std=c11 -Wall -Wextra -Werror -Iinclude examples/c/example.c $(CAPI_LIB) \
		$(CAPI_LDLIBS) -o $(C_OUT)/example

c-example: c-example-bin
	$(C_OUT)/example > $(C_OUT)/example.out

cxx-header:
	$(CXX) -fsyntax-only -Wall -Wextra -Werror -x c++ include/gmem.h

# Skipped (with a message) where the compiler cannot build and run a sanitized program.
c-sanitize: capi-build
	mkdir -p $(C_OUT)
	@if echo 'int main(void){return 0;}' | $(CC) -fsanitize=address,undefined -x c - \
		-o $(C_OUT)/probe 2>/dev/null && $(C_OUT)/probe; then \
		$(CC) -std=c11 -Wall -Werror -g -fsanitize=address,undefined -fno-sanitize-recover=all \
			-Iinclude examples/c/example.c $(CAPI_LIB) $(CAPI_LDLIBS) -o $(C_OUT)/example-san && \
		$(C_OUT)/example-san > /dev/null && echo "c-sanitize: ASan/UBSan clean"; \
	else echo "c-sanitize: skipped (no ASan/UBSan in $(CC))"; fi

rust-example:
	cargo run -q -p gmem-core --example embed > /dev/null

rust-doc:
	RUSTDOCFLAGS="-D warnings" cargo doc -q -p gmem-core --no-deps
