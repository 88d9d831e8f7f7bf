# The test command of the README and of CI: Rust checks and tests, the extension built in
# the quick dev profile, Python lint and tests, and the benchmarks once at a tiny size.
PY ?= python3
PYDIRS = python tests benches examples

.PHONY: test lint rust-test py-install py-test bench-smoke bench

test: lint rust-test py-install py-test bench-smoke

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
