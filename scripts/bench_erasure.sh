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
# Each figure is the fastest of 3 runs (each on a fresh copy of the chain).
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
VACUUM ANALYZE erase_peer;
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
