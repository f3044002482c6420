# pgseal — the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
PG_CONFIG := /usr/lib/postgresql/15/bin/pg_config

.PHONY: setup demo test test-core test-pg test-format test-cluster install bench daemon fuzz

setup:
	bash scripts/setup.sh

# Installs the extension (debug build) into the system PostgreSQL 15.
install: setup
	cd extension && cargo pgrx install --pg-config $(PG_CONFIG)

daemon:
	cargo build -p pgseald

demo: install daemon
	bash scripts/demo.sh

test-core:
	cargo test -p pgseal-core

test-format:
	/usr/bin/python3 tests/format_check.py

test-pg: setup
	bash scripts/pgtest.sh

test-cluster: install daemon
	cargo test --tests -p pgseal-tests -p pgseald

# Every tier: core unit/property tests, the Python format check, #[pg_test]s,
# then out-of-process tests against real clusters.
test: setup
	$(MAKE) test-core test-format test-pg test-cluster

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
