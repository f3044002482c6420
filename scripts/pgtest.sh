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
exec cargo pgrx test "pg$PGSEAL_PG" --no-default-features --runas "$TEST_USER" --pgdata "$PGDATA_DIR/data" "$@"
