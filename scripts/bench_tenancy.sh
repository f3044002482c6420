#!/usr/bin/env bash
# Tenancy rows of `make bench`. Sourced by scripts/bench.sh with the bench cluster
# running (psql_, PORT set). One table of 2 M rows across 1,000 tenants (uuid keys),
# measured under three policies in turn:
#   1. tenant_protect: count and indexed lookup  vs  explicit WHERE with RLS off
#   2. a naive per-row policy current_setting()::uuid = tenant_id  (peer row)
#   3. org_protect: a membership-filtered query
# Per-statement latency comes from pgbench -r. A protected query and its explicit-WHERE
# peer run in the same pgbench run, their transactions interleaved (see pair()), and
# each side reports its median over 10 runs: noise on the shared cores lands on both.
set -euo pipefail
ROWS=${PGSEAL_BENCH_TENANCY_ROWS:-2000000}
TXNS=${PGSEAL_BENCH_TENANCY_TXNS:-2000}
PGBENCH=$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench
T=$(mktemp -d)
TENANT=00000000-0000-0000-0000-000000000007

psql_ <<SQL
CREATE ROLE bench_app;
-- The explicit-WHERE peers run as a role that bypasses RLS but is otherwise an
-- ordinary role like bench_app, so both sides pay the same privilege checks (a
-- superuser skips those) and differ only in RLS.
CREATE ROLE bench_peer BYPASSRLS;
CREATE TABLE items (id bigint NOT NULL, tenant_id uuid NOT NULL, owner_id text, org_id text, body text);
INSERT INTO items
SELECT g, lpad(to_hex(g % 1000), 32, '0')::uuid, 'user-' || (g % 37), 'org-' || (g % 50), 'item ' || g
FROM generate_series(1, $ROWS) g;
ALTER TABLE items ADD PRIMARY KEY (tenant_id, id);
CREATE INDEX items_tenant_org ON items (tenant_id, org_id);
VACUUM ANALYZE items;
GRANT SELECT ON items TO bench_app, bench_peer;
CHECKPOINT;
SELECT pgseal.tenant_protect('items');
-- user-1 is a viewer in 5 of the tenant's 50 organisations.
INSERT INTO pgseal.org_members
SELECT lpad(to_hex(t), 32, '0')::uuid::text, 'org-' || o, 'user-1', 'viewer'
FROM generate_series(0, 999) t, generate_series(0, 4) o;
SQL

# Mean latency in ms of the one statement on items in one pgbench run of a script.
run_once() {
    "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c 1 -t "$TXNS" -r -f "$1" postgres 2>/dev/null \
        | awk '/FROM items/ { print $1 }'
}
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# "A B": the latencies of the statements on items in one pgbench run of a script that
# holds two measured transactions, in script order.
run_both() {
    "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c 1 -t "$TXNS" -r -f "$1" postgres 2>/dev/null \
        | awk '/FROM items/ { v[++n] = $1 } END { print v[1], v[2] }'
}
# "A B": the median latencies of two scripts measured together. Each pgbench run
# executes A's and B's transactions in turn within one script (each draws its own
# ids), so both see the same moment of the machine; the order flips every run.
# One warm-up run, then 5 runs in each order.
pair() {
    local ab="$1.then-peer" ba="$1.peer-first" ra=() rb=() x y
    cat "$1" "$2" > "$ab"; cat "$2" "$1" > "$ba"
    run_both "$ab" >/dev/null
    for _ in 1 2 3 4 5; do
        read -r x y < <(run_both "$ab"); ra+=("$x"); rb+=("$y")
        read -r y x < <(run_both "$ba"); ra+=("$x"); rb+=("$y")
    done
    echo "$(printf '%s\n' "${ra[@]}" | median) $(printf '%s\n' "${rb[@]}" | median)"
}
# One script alone: the median of 3 runs after a warm-up run.
latency() {
    run_once "$1" >/dev/null
    for _ in 1 2 3; do run_once "$1"; done | median
}
as_role() { sed "s/^BEGIN;/BEGIN; SET LOCAL ROLE $1;/" "$2" > "$2.$1"; echo "$2.$1"; }
as_app() { as_role bench_app "$1"; }
as_peer() { as_role bench_peer "$1"; }

cat > "$T/count_rls.sql" <<SQL
BEGIN;
SELECT pgseal.set_tenant('$TENANT', 'user-1');
SELECT count(*) FROM items; -- measured
COMMIT;
SQL
cat > "$T/count_where.sql" <<SQL
BEGIN;
SELECT pgseal.set_tenant('$TENANT', 'user-1');
SELECT count(*) FROM items WHERE tenant_id = '$TENANT'; -- measured
COMMIT;
SQL
cat > "$T/lookup_rls.sql" <<SQL
\set id random(1, $ROWS)
BEGIN;
SELECT pgseal.set_tenant('$TENANT', 'user-1');
SELECT body FROM items WHERE id = :id; -- measured
COMMIT;
SQL
cat > "$T/lookup_where.sql" <<SQL
\set id random(1, $ROWS)
BEGIN;
SELECT pgseal.set_tenant('$TENANT', 'user-1');
SELECT body FROM items WHERE tenant_id = '$TENANT' AND id = :id; -- measured
COMMIT;
SQL

# The explicit-WHERE peers run as bench_peer (BYPASSRLS), the protected queries as bench_app.
read -r count_rls count_where < <(pair "$(as_app "$T/count_rls.sql")" "$(as_peer "$T/count_where.sql")")
read -r lookup_rls lookup_where < <(pair "$(as_app "$T/lookup_rls.sql")" "$(as_peer "$T/lookup_where.sql")")

# The naive policy, in place of pgseal_tenant.
psql_ -c "DROP POLICY pgseal_tenant ON items" \
      -c "CREATE POLICY naive ON items USING (current_setting('app.tenant_id')::uuid = tenant_id)"
count_naive=$(latency "$(as_app "$T/count_rls.sql")")

# Organisation membership: owner_id = user OR org_id in the user's organisations.
psql_ -c "DROP POLICY naive ON items" -c "SELECT pgseal.org_protect('items', 'owner_id', 'org_id')"
org_ms=$(latency "$(as_app "$T/count_rls.sql")")
org_rows=$(psql_ -c "BEGIN" -c "SET LOCAL ROLE bench_app" -c "SELECT pgseal.set_tenant('$TENANT', 'user-1')" \
    -c "SELECT count(*) FROM items" -c "COMMIT" | tail -1)
rm -rf "$T"

python3 - "$ROWS" "$count_rls" "$count_where" "$lookup_rls" "$lookup_where" "$count_naive" "$org_ms" "$org_rows" <<'PY'
import sys
rows = int(sys.argv[1]); cr, cw, lr, lw, cn, org = map(float, sys.argv[2:8]); org_rows = sys.argv[8]
print("| tenancy figure (%d rows, 1,000 tenants) | ms | explicit WHERE, RLS off (ms) | ratio | target |" % rows)
print("|---|---:|---:|---:|---|")
print("| tenant_protect: count(*) of one tenant | %.3f | %.3f | %.2f× | ≤ 1.10× |" % (cr, cw, cr / cw))
print("| tenant_protect: lookup by id | %.3f | %.3f | %.2f× | ≤ 1.10× |" % (lr, lw, lr / lw))
print("| naive policy current_setting()::uuid = tenant_id: count(*) | %.3f | %.3f | %.2f× | reported |" % (cn, cw, cn / cw))
print("| org_protect: count(*) of a viewer's rows (%s rows) | %.3f | — | — | ≤ 5 ms |" % (org_rows, org))
PY
