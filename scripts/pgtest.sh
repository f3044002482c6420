#!/usr/bin/env bash
# Runs the #[pg_test] tier: cargo pgrx test against the system PostgreSQL 15, as an
# unprivileged user, with a fresh data directory outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/../extension"
TEST_USER=${PGSEAL_TEST_USER:-pgseal-test}
PGDATA_DIR=${PGSEAL_PGTEST_DIR:-/var/tmp/pgseal-pgtest}
rm -rf "$PGDATA_DIR"
install -d -o "$TEST_USER" -m 700 "$PGDATA_DIR"
exec cargo pgrx test pg15 --runas "$TEST_USER" --pgdata "$PGDATA_DIR/data" "$@"
