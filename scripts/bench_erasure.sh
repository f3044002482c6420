#!/usr/bin/env bash
# Erasure rows of `make bench` (issue 19). Sourced by scripts/bench.sh with the bench
# cluster running (psql_, PORT set).
#
# A tenant's chain of E entries, each an audit-row-sized payload (a customer row
# before and after a change: text, numeric, timestamp, boolean and NULL values, ~600
# bytes) naming one of 4 subjects; `subject_erase` of one subject erases E/4 of them.
# Measured at E and 4E (cost must grow linearly with the entries erased).
# The peer, in the same run: the same UPDATE on a copy of the same rows (payload and
# salt set NULL, a SHA-256 in commitment) without what erasure adds: reading each
# entry back, canonicalising its payload and recomputing its hash before erasing it.
# Both the chain and its copy are vacuumed and analysed before either is measured.
# Each figure is the fastest of 3 runs (each on a fresh copy of the chain).
# Then offboarding (below): rows offboarded per second at N and 4N.
set -euo pipefail
E=${PGSEAL_BENCH_ERASE_ENTRIES:-40000}

# Builds tenant $1's chain of $2 entries and a plain copy of it.
erase_setup() {
    psql_ <<SQL
BEGIN;
SET LOCAL app.tenant_id = '$1';
SELECT count(*) FROM generate_series(1, $2) g, LATERAL pgseal.ledger_append('crm.contact_changed',
    jsonb_build_object('table', 'public.contacts', 'op', 'UPDATE', 'key', jsonb_build_object('id', g),
        'before', jsonb_build_object('id', g, 'name', 'Customer ' || g, 'email', 'c' || g || '@example.com',
            'phone', '+33 1 42 68 53 00', 'street', '12 Rue de la Paix', 'city', 'Paris', 'balance', 1299.95 + g % 100,
            'created_at', '2026-11-30T09:15:27+00:00', 'verified', false, 'note', NULL),
        'after', jsonb_build_object('id', g, 'name', 'Customer ' || g, 'email', 'c' || g || '@example.org',
            'phone', '+33 1 42 68 53 01', 'street', '14 Rue de la Paix', 'city', 'Paris', 'balance', 1309.95 + g % 100,
            'created_at', '2026-11-30T09:15:27+00:00', 'verified', true, 'note', 'moved')),
    NULL, ARRAY['subject-' || (g % 4)]) a;
COMMIT;
DROP TABLE IF EXISTS erase_peer;
CREATE TABLE erase_peer AS SELECT * FROM pgseal.ledger WHERE tenant_id = '$1';
ALTER TABLE erase_peer ADD PRIMARY KEY (tenant_id, seq);
-- Both tables as a subject's entries are when an erasure comes, days after they were
-- written: vacuumed (hint bits set, the visibility map current), analysed.
VACUUM ANALYZE erase_peer;
VACUUM ANALYZE pgseal.ledger;
CHECKPOINT;
SQL
}

# ms of one statement, run in tenant $1's context.
erase_time() {
    psql_ -c "SET app.tenant_id = '$1'" -c '\timing on' -c "$2" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1
}

# "erase_ms peer_ms erased" at $1 entries: the fastest of 3 runs of each.
erase_at() {
    local n=$1 best_e= best_p= erased= t e p ok
    for run in 1 2 3; do
        t="erase-$n-$run"
        erase_setup "$t" "$n" > /dev/null
        e=$(erase_time "$t" "SELECT pgseal.subject_erase('$t', 'subject-1')")
        p=$(erase_time "$t" "UPDATE erase_peer SET payload = NULL, salt = NULL, commitment = sha256(salt)
                             WHERE tenant_id = '$t' AND subjects @> ARRAY['subject-1'] AND salt IS NOT NULL")
        erased=$(psql_ -c "SELECT count(*) FROM pgseal.ledger WHERE tenant_id = '$t' AND salt IS NULL")
        ok=$(psql_ -c "SET app.tenant_id = '$t'" -c "SELECT ok AND erased = $erased FROM pgseal.ledger_verify()" | tail -1)
        [ "$ok" = t ] || { echo "erasure bench: the chain of $t does not verify after the erasure" >&2; exit 1; }
        best_e=$(printf '%s\n' $best_e "$e" | sort -n | head -1)
        best_p=$(printf '%s\n' $best_p "$p" | sort -n | head -1)
    done
    echo "$best_e $best_p $erased"
}

read -r e1 p1 n1 < <(erase_at "$E")
read -r e4 p4 n4 < <(erase_at "$((4 * E))")

python3 - "$E" "$e1" "$p1" "$n1" "$e4" "$p4" "$n4" <<'PY'
import sys
E = int(sys.argv[1]); e1, p1 = map(float, sys.argv[2:4]); n1 = int(sys.argv[4])
e4, p4 = map(float, sys.argv[5:7]); n4 = int(sys.argv[7])
ok = lambda c: "PASS" if c else "MISS"
print("| erasure figure (subject_erase of one subject of 4) | entries erased | erase ms | entries/s | plain UPDATE ms | ratio | target |")
print("|---|---:|---:|---:|---:|---:|---|")
for chain, n, e, p in ((E, n1, e1, p1), (4 * E, n4, e4, p4)):
    print("| chain of %d entries | %d | %.0f | %.0f | %.0f | %.2f× | ≤ 3× %s |" % (chain, n, e, n / e * 1000, p, e / p, ok(e / p <= 3)))
lin = (e4 / n4) / (e1 / n1)
print("| cost per erased entry, 4N ÷ N | | | | | %.2f× | within 20%% %s |" % (lin, ok(0.8 <= lin <= 1.2)))
PY

# Offboarding: `pgseald offboard run` (no flags but the export directory) of a tenant
# with R rows in each of two registered tables (the second also protected, which alone
# would offboard it too), among as many rows of each of three other tenants (rows of
# the four interleaved, as a shared table holds them), and R/4 ledger entries,
# at R and 4R; against the peer, the same rows deleted by two plain DELETEs in one
# transaction (no export, no batches, no shred or erasure).
OFF_R=${PGSEAL_BENCH_OFFBOARD_ROWS:-50000}
OFF_DIR=$(mktemp -d)
offboard_at() {
    local r=$1 t="off-$1" began ended secs peer
    psql_ >/dev/null <<SQL
CREATE TABLE IF NOT EXISTS off_users (id bigint, tenant_id text NOT NULL, email text, PRIMARY KEY (tenant_id, id));
CREATE TABLE IF NOT EXISTS off_orders (id bigint, tenant_id text NOT NULL, total numeric, note text, PRIMARY KEY (tenant_id, id));
SELECT pgseal.subject_register('off_users', 'id') WHERE NOT EXISTS (SELECT 1 FROM pgseal.subject_columns WHERE rel = 'off_users'::regclass);
SELECT pgseal.tenant_protect('off_orders') WHERE NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = 'off_orders'::regclass);
SELECT pgseal.subject_register('off_orders', 'id') WHERE NOT EXISTS (SELECT 1 FROM pgseal.subject_columns WHERE rel = 'off_orders'::regclass);
BEGIN;
SELECT pgseal.set_tenant('$t');
INSERT INTO off_users SELECT g / 4, CASE g % 4 WHEN 0 THEN '$t' ELSE '$t-by' || g % 4 END, 'user' || g || '@example.com' FROM generate_series(4, 4 * $r + 3) g;
INSERT INTO off_orders SELECT g / 4, CASE g % 4 WHEN 0 THEN '$t' ELSE '$t-by' || g % 4 END, g * 1.5, 'order note ' || g FROM generate_series(4, 4 * $r + 3) g;
SELECT count(*) FROM generate_series(1, $r / 4) g, LATERAL pgseal.ledger_append('order.paid', jsonb_build_object('order', g, 'total', g * 1.5)) a;
COMMIT;
CREATE TABLE off_peer_u AS SELECT * FROM off_users WHERE tenant_id = '$t';
CREATE TABLE off_peer_o AS SELECT * FROM off_orders WHERE tenant_id = '$t';
ALTER TABLE off_peer_u ADD PRIMARY KEY (tenant_id, id);
ALTER TABLE off_peer_o ADD PRIMARY KEY (tenant_id, id);
VACUUM ANALYZE off_users, off_orders, off_peer_u, off_peer_o;
SELECT pgseal.tenant_offboard('$t', '0');
CHECKPOINT;
SQL
    began=$(date +%s.%N)
    "$ROOT/target/release/pgseald" offboard run --export-dir "$OFF_DIR" --tenant "$t" \
        --database-url "host=127.0.0.1 port=$PORT user=postgres dbname=postgres" > /dev/null
    ended=$(date +%s.%N)
    secs=$(python3 -c "print($ended - $began)")
    [ "$(psql_ -c "SELECT step FROM pgseal.tenant_offboardings WHERE tenant_id = '$t'")" = done ] \
        || { echo "offboarding bench: $t is not done" >&2; exit 1; }
    # The figure counts both tables' rows: each must have none of the tenant's left.
    [ "$(psql_ -c "SELECT (SELECT count(*) FROM off_users WHERE tenant_id = '$t') + (SELECT count(*) FROM off_orders WHERE tenant_id = '$t')")" = 0 ] \
        || { echo "offboarding bench: rows of $t are left" >&2; exit 1; }
    peer=$(psql_ -c '\timing on' -c "BEGIN" -c "DELETE FROM off_peer_u WHERE tenant_id = '$t'" \
        -c "DELETE FROM off_peer_o WHERE tenant_id = '$t'" -c "COMMIT" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' \
        | awk '{ s += $1 } END { print s / 1000 }')
    psql_ -c "DROP TABLE off_peer_u, off_peer_o" >/dev/null
    echo "$secs $peer"
}
read -r os1 op1 < <(offboard_at "$OFF_R")
read -r os4 op4 < <(offboard_at "$((4 * OFF_R))")
rm -rf "$OFF_DIR"
python3 - "$OFF_R" "$os1" "$op1" "$os4" "$op4" <<'PY'
import sys
r = int(sys.argv[1]); s1, p1, s4, p4 = map(float, sys.argv[2:6])
ok = lambda c: "PASS" if c else "MISS"
print()
print("| offboarding figure (pgseald offboard run, no flags) | rows | s | rows/s | plain DELETEs (s) | ratio | target |")
print("|---|---:|---:|---:|---:|---:|---|")
for rows, s, p in ((2 * r, s1, p1), (8 * r, s4, p4)):
    print("| %d rows in 2 tables, %d entries | %d | %.2f | %.0f | %.2f | %.2f× | reported |" % (rows, rows // 8, rows, s, rows / s, p, s / p))
lin = (s4 / (8 * r)) / (s1 / (2 * r))
print("| cost per row, 4N ÷ N | | | | | %.2f× | within 20%% %s |" % (lin, ok(0.8 <= lin <= 1.2)))
PY
