#!/usr/bin/env bash
# Citus rows of `make bench` (docs/SCALING.md). Sourced by scripts/bench.sh with the
# bench cluster running (psql_, PORT, N, ROOT, KEYFILE set): that one node is the peer.
# On PostgreSQL 16 and later with Citus installed (scripts/citus.sh build), it starts a
# coordinator and two workers on this machine with the bench cluster's settings and
# pgseal's keys distributed (pgseal.citus_distribute()), and measures, as ratios
# against the one node:
#   1. vault_decrypt over N sealed tokens of one tenant, one statement (the tenant's
#      shard is on one worker, where the decrypts run; the sum comes back): µs per
#      row, through the coordinator ÷ on the one node        target: ≤ 1.5×
#   2. a transaction that decrypts one token of one of 1,000 tenants (set_tenant, one
#      SELECT by primary key, commit; audit_decrypt = on, the default), 1 client:
#      ms per transaction through the coordinator ÷ on the one node   target: ≤ 3×
#      and the same sent to the worker that holds the rows (no hop; the key is read
#      again each transaction on Citus), for what the hop itself costs.
#   3. ledger appends of 1,000 tenants by 16 clients (pgbench, one transaction per
#      append: set_tenant, ledger_append of a small object, commit): transactions/s
#      on the one node ÷ through the coordinator (where the ledger is kept)
#                                                                    target: ≤ 1.5×
#   4. the same with the business write each entry records: an order row inserted
#      into a table distributed by tenant (on the one node, a plain table) and its
#      entry, one transaction; through the coordinator Citus commits it in two
#      phases (the order on a worker, the entry on the coordinator)  target: ≤ 3×
#   5, 6. rows 3 and 4 sent to the workers, 8 clients on each (a worker's
#      ledger_append is appended on the coordinator, in two phases)      reported
#   7. what org_protect's Citus form costs every read: a member's count of the
#      tenant's N documents it may see (its own, its organisation's; a quarter are
#      other users' personal ones) through the coordinator, on a table with the
#      offboarding policies of that form (`_offboard_visible_in`, called for rows
#      the member's policies do not show) ÷ the same table without them, read
#      in turns (with, without; without, with; …) for 7 rounds: the median of the
#      rounds' ratios (one read's spread between runs is as large as the cost)
#                                                                    target: ≤ 1.2×
set -euo pipefail
CITUS_SECS=${PGSEAL_BENCH_SECONDS:-10}
if [ "$PGSEAL_PG" -lt 16 ]; then
    echo "Citus rows: skipped on PostgreSQL $PGSEAL_PG (Citus 14 supports 16 to 18; make bench PG=18)"
    return 0
fi
citus_rc=0
bash "$ROOT/scripts/citus.sh" build >/dev/null 2>&1 || citus_rc=$?
if [ "$citus_rc" = 3 ]; then
    echo "Citus rows: skipped (no vendored Citus source; see scripts/citus.sh)"
    return 0
elif [ "$citus_rc" != 0 ]; then
    echo "scripts/citus.sh build failed ($citus_rc)" >&2
    return "$citus_rc"
fi

CW=$(mktemp -d)
CPORTS=(54396 54397 54398)
trap 'rm -rf "$CW" "$KEYFILE"; for p in 0 1 2; do bash "$ROOT/scripts/cluster.sh" stop "$DIR-citus$p" >/dev/null 2>&1 || true; done; bash "$ROOT/scripts/cluster.sh" stop "$DIR"' EXIT
for i in 0 1 2; do
    bash "$ROOT/scripts/cluster.sh" start "$DIR-citus$i" "${CPORTS[$i]}" "$KEYFILE" \
        "shared_preload_libraries = 'citus,pgseal'" "max_prepared_transactions = 100" \
        "shared_buffers = 512MB" "max_parallel_workers_per_gather = 0" "jit = off" "fsync = on" "max_connections = 60"
done
cpsql() { local p=$1; shift; psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$p" -U postgres -d postgres "$@"; }
for p in "${CPORTS[@]}"; do cpsql "$p" -c "CREATE EXTENSION citus"; done
cpsql "${CPORTS[0]}" -c "SELECT citus_set_coordinator_host('127.0.0.1', ${CPORTS[0]})" \
    -c "SELECT citus_add_node('127.0.0.1', ${CPORTS[1]})" -c "SELECT citus_add_node('127.0.0.1', ${CPORTS[2]})" >/dev/null
cpsql "${CPORTS[0]}" -c "CREATE EXTENSION pgseal" -c "SELECT pgseal.citus_distribute()" >/dev/null

# The same data on both sides: N tokens of tenant 'bench' (row 1) and 1,000 tenants
# with 20 tokens each (row 2), sealed by their tenants.
load() {
    local p=$1 dist=$2
    cpsql "$p" <<SQL
CREATE TABLE ctok (tenant_id text NOT NULL, i int NOT NULL, sealed text, PRIMARY KEY (tenant_id, i));
$dist
BEGIN; SELECT pgseal.set_tenant('bench');
INSERT INTO ctok SELECT 'bench', i, pgseal.vault_seal(rpad('sk-live-' || md5(i::text), 60, 'x'), 'ctok') FROM generate_series(1, $N) i;
COMMIT;
SQL
    for t in $(seq 1 1000); do
        printf "BEGIN; SELECT pgseal.set_tenant('t%s'); INSERT INTO ctok SELECT 't%s', i, pgseal.vault_seal(rpad('sk-live-' || md5(i::text), 60, 'x'), 'ctok') FROM generate_series(1, 20) i; COMMIT;\n" "$t" "$t"
    done | cpsql "$p" >/dev/null
    cpsql "$p" -c "VACUUM ANALYZE ctok"
}
load "$PORT" ""
# Citus evaluates vault_seal on the coordinator for INSERT ... SELECT from
# generate_series, then routes the rows.
load "${CPORTS[0]}" "SELECT create_distributed_table('ctok', 'tenant_id');" >/dev/null
W1=${CPORTS[1]}

# Row 1: fastest of 5 runs of the one-statement decrypt, ms.
time_at() {
    local p=$1 q=$2 best=()
    for _ in 1 2 3 4 5; do
        # set_tenant: Citus sends the tenant to the worker only as a SET LOCAL.
        best+=("$(cpsql "$p" -c BEGIN -c "SELECT pgseal.set_tenant('bench')" -c '\timing on' -c "$q" -c COMMIT \
            | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | head -1)")
    done
    printf '%s\n' "${best[@]}" | sort -n | head -1
}
Q1="SELECT sum(length(pgseal.vault_decrypt(sealed, 'ctok'))) FROM ctok WHERE tenant_id = 'bench'"
F1="SELECT sum(length(sealed)) FROM ctok WHERE tenant_id = 'bench'"
one_ms=$(time_at "$PORT" "$Q1"); one_floor=$(time_at "$PORT" "$F1")
co_ms=$(time_at "${CPORTS[0]}" "$Q1"); co_floor=$(time_at "${CPORTS[0]}" "$F1")
[ "$(cpsql "${CPORTS[0]}" -c BEGIN -c "SELECT pgseal.set_tenant('bench')" -c "SELECT count(*) FROM ctok WHERE tenant_id = 'bench' AND pgseal.vault_decrypt(sealed, 'ctok') <> rpad('sk-live-' || md5(i::text), 60, 'x')" -c COMMIT | sed -n 2p)" = 0 ] \
    || { echo "vault_decrypt through the coordinator returned wrong plaintext" >&2; exit 1; }

# Row 2: one decrypting transaction per tenant drawn at random, pgbench, 1 client;
# mean ms per transaction. The worker run uses the tenants whose rows it holds.
cat > "$CW/one.sql" <<'SQL'
\set t random(1, 1000)
\set i random(1, 20)
BEGIN;
SELECT pgseal.set_tenant('t' || :t);
SELECT length(pgseal.vault_decrypt(sealed, 'ctok')) FROM ctok WHERE tenant_id = 't' || :t AND i = :i;
COMMIT;
SQL
# Each run's statement latencies (pgbench -r) are kept in $CW/txn-<port>.out.
txn_ms() {
    "$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench" -n -r -h 127.0.0.1 -p "$1" -U postgres -M prepared -c 1 -T "$2" \
        -f "$3" postgres 2>/dev/null > "$CW/txn-$1.out"
    sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$CW/txn-$1.out"
}
# The statement latencies of row 2's script (ms): BEGIN, set_tenant, the decrypt, COMMIT.
stmt_ms() {
    awk '/statement latencies/ { on = 1; next } on && NF >= 3 && $1 ~ /^[0-9.]+$/ && !/\\set/ { printf "%s%s", sep, $1; sep = "/" }' "$CW/txn-$1.out"
}
txn_ms "$PORT" 2 "$CW/one.sql" >/dev/null
one_txn=$(txn_ms "$PORT" "$CITUS_SECS" "$CW/one.sql")
co_txn=$(txn_ms "${CPORTS[0]}" "$CITUS_SECS" "$CW/one.sql")
# On the worker: only tenants whose shard it holds (read from its own placements).
wk_tenants=$(cpsql "${CPORTS[0]}" -c "SELECT string_agg(r.result, ',') FROM run_command_on_placements('ctok', 'SELECT string_agg(DISTINCT substr(tenant_id, 2), '','') FROM %s WHERE tenant_id LIKE ''t%%''') r WHERE r.nodeport = $W1 AND r.result <> ''")
cat > "$CW/worker.sql" <<SQL
\\set k random(1, $(echo "$wk_tenants" | tr ',' '\n' | grep -c .))
\\set i random(1, 20)
BEGIN;
SELECT pgseal.set_tenant('t' || (('{$wk_tenants}'::int[])[:k]));
SELECT length(pgseal.vault_decrypt(sealed, 'ctok')) FROM ctok WHERE tenant_id = 't' || (('{$wk_tenants}'::int[])[:k]) AND i = :i;
COMMIT;
SQL
wk_txn=$(txn_ms "$W1" "$CITUS_SECS" "$CW/worker.sql")
txn_stmts="one node $(stmt_ms "$PORT"), coordinator $(stmt_ms "${CPORTS[0]}"), worker $(stmt_ms "$W1")"

# Rows 3 and 4: 16 clients, 1,000 tenants; every tenant's ledger key made first.
for p in "$PORT" "${CPORTS[0]}"; do
    dist=""
    [ "$p" = "$PORT" ] || dist="SELECT create_distributed_table('corders', 'tenant_id');"
    cpsql "$p" -c "CREATE TABLE corders (tenant_id text NOT NULL, n int NOT NULL, amount numeric NOT NULL, placed_at timestamptz NOT NULL DEFAULT now())" \
        -c "${dist:-SELECT 1}" -c "CREATE INDEX ON corders (tenant_id)" -c "SELECT pgseal.tenant_protect('corders')" >/dev/null
    for t in $(seq 1 1000); do
        printf "BEGIN; SELECT pgseal.set_tenant('t%s'); SELECT pgseal.ledger_append('bench.start'); COMMIT;\n" "$t"
    done | cpsql "$p" >/dev/null
done
cat > "$CW/append.sql" <<'SQL'
\set t random(1, 1000)
\set n random(1, 1000000)
BEGIN;
SELECT pgseal.set_tenant('t' || :t);
SELECT seq FROM pgseal.ledger_append('order.placed', jsonb_build_object('order', (:n)::int, 'amount', 19.90, 'currency', 'EUR'));
COMMIT;
SQL
cat > "$CW/order.sql" <<'SQL'
\set t random(1, 1000)
\set n random(1, 1000000)
BEGIN;
SELECT pgseal.set_tenant('t' || :t);
INSERT INTO corders (tenant_id, n, amount) VALUES ('t' || :t, :n, 19.90);
SELECT seq FROM pgseal.ledger_append('order.placed', jsonb_build_object('order', (:n)::int, 'amount', 19.90, 'currency', 'EUR'));
COMMIT;
SQL
tps16() {
    "$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench" -n -h 127.0.0.1 -p "$1" -U postgres -M prepared -c 16 -j 2 -T "$2" \
        -f "$3" postgres 2>/dev/null | sed -n 's/^tps = \([0-9.]*\) .*/\1/p'
}
# Rows 5 and 6: the same through the workers, 8 clients on each at once (a
# worker's ledger_append is appended on the coordinator, in the worker's
# transaction, committed in two phases); the sum of both runs' tps.
tps16_workers() {
    local bin
    bin="$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench"
    "$bin" -n -h 127.0.0.1 -p "${CPORTS[1]}" -U postgres -M prepared -c 8 -j 1 -T "$1" -f "$2" postgres > "$CW/w1.out" 2>/dev/null &
    "$bin" -n -h 127.0.0.1 -p "${CPORTS[2]}" -U postgres -M prepared -c 8 -j 1 -T "$1" -f "$2" postgres > "$CW/w2.out" 2>/dev/null
    wait
    sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$CW/w1.out" "$CW/w2.out" | awk '{ s += $1 } END { print s + 0 }'
}
one_app=$(tps16 "$PORT" "$CITUS_SECS" "$CW/append.sql")
co_app=$(tps16 "${CPORTS[0]}" "$CITUS_SECS" "$CW/append.sql")
wk_app=$(tps16_workers "$CITUS_SECS" "$CW/append.sql")
one_ord=$(tps16 "$PORT" "$CITUS_SECS" "$CW/order.sql")
co_ord=$(tps16 "${CPORTS[0]}" "$CITUS_SECS" "$CW/order.sql")
wk_ord=$(tps16_workers "$CITUS_SECS" "$CW/order.sql")
for p in "$PORT" "${CPORTS[0]}"; do
    bad=$(cpsql "$p" -c "SELECT count(*) FROM (SELECT DISTINCT tenant_id FROM pgseal.ledger) t, pgseal.ledger_verify(t.tenant_id) v WHERE NOT v.ok" 2>/dev/null || echo "?")
    [ "$bad" = 0 ] || { echo "a chain fails verification after the append rows (port $p): $bad" >&2; exit 1; }
done

# Row 7: as a role the policies bind, member of one organisation of tenant 'bench'.
docs_table() {
    cat <<SQL
CREATE TABLE $1 (id int, tenant_id text NOT NULL, owner_id text, org_id text, body text, PRIMARY KEY (tenant_id, id));
SELECT create_distributed_table('$1', 'tenant_id');
SELECT pgseal.org_protect('$1', 'owner_id', 'org_id');
INSERT INTO $1 SELECT i, 'bench', CASE WHEN i % 4 = 0 THEN 'reader' ELSE 'u' || (i % 97) END,
                      CASE WHEN i % 4 IN (1, 2) THEN 'org1' END, 'document ' || i
                 FROM generate_series(1, $N) i;
GRANT SELECT ON $1 TO creader;
SQL
}
cpsql "${CPORTS[0]}" >/dev/null <<SQL
CREATE ROLE creader LOGIN;
INSERT INTO pgseal.org_members VALUES ('bench', 'org1', 'reader', 'member');
$(docs_table cdocs)
$(docs_table cdocs_peer)
DROP POLICY pgseal_offboard_select ON cdocs_peer;
DROP POLICY pgseal_offboard_delete ON cdocs_peer;
VACUUM ANALYZE cdocs, cdocs_peer;
SQL
read_ms() {
    psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "${CPORTS[0]}" -U creader -d postgres \
        -c BEGIN -c "SELECT pgseal.set_tenant('bench', 'reader')" -c '\timing on' \
        -c "SELECT count(*), sum(length(body)) FROM $1" -c COMMIT \
        | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | head -1
}
seen=$(psql -X -q -At -h 127.0.0.1 -p "${CPORTS[0]}" -U creader -d postgres -c BEGIN \
    -c "SELECT pgseal.set_tenant('bench', 'reader')" -c "SELECT count(*) FROM cdocs" -c COMMIT | sed -n 2p)
[ "$seen" = $((N * 3 / 4)) ] || { echo "the member saw $seen of cdocs's rows, not $((N * 3 / 4))" >&2; exit 1; }
read_ms cdocs >/dev/null; read_ms cdocs_peer >/dev/null
# Rounds in turns, each side first in every other round; each round's ratio, and
# each side's median time for the table.
rounds=()
for r in 1 2 3 4 5 6 7; do
    if [ $((r % 2)) = 1 ]; then a=$(read_ms cdocs); b=$(read_ms cdocs_peer)
    else b=$(read_ms cdocs_peer); a=$(read_ms cdocs); fi
    rounds+=("$a:$b")
done
org_rounds=$(IFS=,; echo "${rounds[*]}")

python3 - "$N" "$one_ms" "$one_floor" "$co_ms" "$co_floor" "$one_txn" "$co_txn" "$wk_txn" \
    "$one_app" "$co_app" "$one_ord" "$co_ord" "$wk_app" "$wk_ord" "$org_rounds" "$txn_stmts" <<'PY'
import statistics, sys
n = int(sys.argv[1])
(one_ms, one_floor, co_ms, co_floor, one_txn, co_txn, wk_txn, one_app, co_app, one_ord, co_ord,
 wk_app, wk_ord) = map(float, sys.argv[2:-2])
org_rounds = [tuple(map(float, r.split(":"))) for r in sys.argv[-2].split(",")]
txn_stmts = sys.argv[-1]
ok = lambda met: "PASS" if met else "MISS"
one_us = one_ms * 1000.0 / n
co_us = co_ms * 1000.0 / n
print("| Citus figure | through the coordinator | one node | ratio | target |")
print("|---|---:|---:|---:|---|")
r1 = co_us / one_us
print("| vault_decrypt, %d rows of one tenant in one statement (µs/row; scan alone: %.3f / %.3f) | %.3f | %.3f | %.2f× | ≤ 1.5× %s |"
      % (n, co_floor * 1000.0 / n, one_floor * 1000.0 / n, co_us, one_us, r1, ok(r1 <= 1.5)))
r2 = co_txn / one_txn
print("| one decrypting transaction, 1 of 1,000 tenants, 1 client (ms/txn) | %.3f | %.3f | %.2f× | ≤ 3× %s |"
      % (co_txn, one_txn, r2, ok(r2 <= 3.0)))
print("(the same transaction sent to the worker holding the rows: %.3f ms, %.2f× the one node; the hop through the coordinator adds %.3f ms)"
      % (wk_txn, wk_txn / one_txn, co_txn - wk_txn))
print("(row 2's statements, BEGIN/set_tenant/decrypt/COMMIT, ms: %s)" % txn_stmts)
r3 = one_app / co_app
print("| ledger appends, 1,000 tenants × 16 clients (txn/s; the ledger is on the coordinator) | %.0f | %.0f | %.2f× | ≤ 1.5× %s |"
      % (co_app, one_app, r3, ok(r3 <= 1.5)))
r4 = one_ord / co_ord
print("| an order row and its ledger entry, 1,000 tenants × 16 clients (txn/s; two-phase commit through Citus) | %.0f | %.0f | %.2f× | ≤ 3× %s |"
      % (co_ord, one_ord, r4, ok(r4 <= 3.0)))
print("(per transaction at 16 clients: an append costs %.3f ms more through the coordinator, an order with its entry %.3f ms more)"
      % (16e3 / co_app - 16e3 / one_app, 16e3 / co_ord - 16e3 / one_ord))
r5 = one_app / wk_app if wk_app else float("inf")
print("| ledger appends through the workers, 8 clients on each (txn/s; appended on the coordinator, two-phase commit) | %.0f | %.0f | %.2f× | reported |"
      % (wk_app, one_app, r5))
r6 = one_ord / wk_ord if wk_ord else float("inf")
print("| an order row and its ledger entry through the workers, 8 clients on each (txn/s) | %.0f | %.0f | %.2f× | reported |"
      % (wk_ord, one_ord, r6))
r7 = statistics.median(a / b for a, b in org_rounds)
print("| a member's read of %d org_protect rows, with the offboarding policies ÷ without (ms, medians of %d rounds in turns; the ratio is the rounds' median) | %.1f | %.1f | %.2f× | ≤ 1.2× %s |"
      % (n, len(org_rounds), statistics.median(a for a, _ in org_rounds),
         statistics.median(b for _, b in org_rounds), r7, ok(r7 <= 1.2)))
print("(row 7's rounds, with ÷ without: %s)" % ", ".join("%.2f" % (a / b) for a, b in org_rounds))
PY
