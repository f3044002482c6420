#!/usr/bin/env bash
# Runs the #[pg_test] tier: cargo pgrx test against PostgreSQL PGSEAL_PG (15 when
# unset, or 18; see pg.sh), as an unprivileged user, with a fresh data directory
# outside the checkout.
set -euo pipefail
. "$(dirname "$0")/pg.sh"
cd "$(dirname "$0")/../extension"
TEST_USER=${PGSEAL_TEST_USER:-pgseal-test}
PGDATA_DIR=${PGSEAL_PGTEST_DIR:-/var/tmp/pgseal-pgtest-$PGSEAL_PG}
rm -rf "$PGDATA_DIR"
install -d -o "$TEST_USER" -m 700 "$PGDATA_DIR"
# One test at a time: the tests share one database and some table names, and each
# holds its locks until its transaction ends, pgseal's chain locks included (a
# registration made outside a tenant context is recorded in the system chain); two
# at once could wait on each other's tables and chains and deadlock. (About 20 s
# longer than two at a time on this machine kind.)
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-1}
exec cargo pgrx test "pg$PGSEAL_PG" --no-default-features --runas "$TEST_USER" --pgdata "$PGDATA_DIR/data" "$@"
