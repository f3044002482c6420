#!/usr/bin/env bash
# Ledger rows of `make bench`. Sourced by scripts/bench.sh with the bench cluster
# running (psql_, PORT and ROOT set). Each figure is measured against a peer in the
# same run and printed as a ratio.
#   1. ledger_append, 1 client, one transaction each  vs  plain INSERT, same shape
#   2. ledger_append, 16 clients over 1,000 tenants    vs  plain INSERT, same load
#      (three rounds, alternating; the median ratio)
#   3. appends inside one transaction (per second)
#   4. ledger_verify                                   vs  a PL/pgSQL verifier (built-in sha256())
set -euo pipefail
SECS=${PGSEAL_BENCH_SECONDS:-10}
CHAIN=${PGSEAL_BENCH_CHAIN:-200000}
PGBENCH=$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench
W=$(mktemp -d); trap 'rm -rf "$W" "$KEYFILE"; bash "$ROOT/scripts/cluster.sh" stop "$DIR"' EXIT

psql_ <<'SQL'
CREATE TABLE plain_ledger (LIKE pgseal.ledger INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE plain_ledger ADD PRIMARY KEY (tenant_id, seq);
CREATE SEQUENCE plain_seq;
-- The PL/pgSQL peer: the same hash encoding (docs/FORMAT.md, ledger entries v2, the
-- format every new entry has; subjects are empty here) with PostgreSQL's built-in
-- sha256(), and HMAC-SHA-256 from it with the key pads computed once (PostgreSQL
-- 18's wheel has no pgcrypto, and the peer must be the same on 15 and 18). It checks
-- commitments, hashes and links for real; it computes the HMAC with a stand-in key
-- (it cannot unwrap the tenant's), so that work is counted.
CREATE FUNCTION plpgsql_verify(t text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    r record; prev bytea := decode(repeat('00', 32), 'hex'); h bytea; c bytea; bad bigint := 0; n bigint := 0;
    lp_t bytea := int4send(octet_length(convert_to(t, 'UTF8'))) || convert_to(t, 'UTF8');
    k bytea := '\x0102'::bytea || decode(repeat('00', 62), 'hex'); ipad bytea := k; opad bytea := k;
BEGIN
    FOR i IN 0..63 LOOP
        ipad := set_byte(ipad, i, get_byte(k, i) # 54);
        opad := set_byte(opad, i, get_byte(k, i) # 92);
    END LOOP;
    FOR r IN SELECT * FROM pgseal.ledger WHERE tenant_id = t ORDER BY seq LOOP
        c := sha256('pgseal:v2:payload'::bytea || '\x00'::bytea || r.salt || convert_to(r.payload::text, 'UTF8'));
        h := sha256('pgseal:v2:ledger'::bytea || '\x00'::bytea || r.prev_hash || lp_t || int8send(r.seq)
                    || int8send((extract(epoch FROM r.recorded_at) * 1000000)::bigint)
                    || int4send(octet_length(convert_to(r.actor, 'UTF8'))) || convert_to(r.actor, 'UTF8')
                    || int4send(octet_length(convert_to(r.db_role, 'UTF8'))) || convert_to(r.db_role, 'UTF8')
                    || int4send(octet_length(convert_to(r.event, 'UTF8'))) || convert_to(r.event, 'UTF8')
                    || int4send(coalesce(cardinality(r.subjects), 0)) || c);
        IF h <> r.hash OR r.prev_hash <> prev THEN bad := bad + 1; END IF;
        PERFORM sha256(opad || sha256(ipad || h)) = r.mac;
        prev := r.hash; n := n + 1;
    END LOOP;
    IF bad > 0 THEN RAISE EXCEPTION 'plpgsql_verify found % bad entries of %', bad, n; END IF;
    RETURN n;
END $$;
SQL

# pgbench transactions per second of a script with C clients, over the second half
# of a run twice as long: the first half warms the backends' plan and key caches
# (pgbench connects once per run). Both sides of each ratio are measured the same way.
tps() {
    local script=$1 clients=$2
    "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c "$clients" -j 2 -T $((2 * SECS)) -P 1 \
        -f "$script" postgres 2>&1 >/dev/null \
        | awk -v from="$SECS" '/^progress:/ { t = $2 + 0; if (t > from) { s += $4; n++ } } END { printf "%.0f\n", (n ? s / n : 0) }'
}
cat > "$W/append1.sql" <<'SQL'
SELECT set_config('app.tenant_id', 'solo', false);
SELECT seq FROM pgseal.ledger_append('order.update', '{"order": 1, "status": "paid"}');
SQL
cat > "$W/insert1.sql" <<'SQL'
SELECT set_config('app.tenant_id', 'solo', false);
INSERT INTO plain_ledger VALUES ('solo', nextval('plain_seq'), now(), 'bench', 'order.update',
  '{"order": 1, "status": "paid"}', '\x0000000000000000000000000000000000000000000000000000000000000000',
  '\x0000000000000000000000000000000000000000000000000000000000000000', '\x0000000000000000000000000000000000000000000000000000000000000000');
SQL
cat > "$W/append16.sql" <<'SQL'
\set t random(1, 1000)
SELECT set_config('app.tenant_id', 'm' || :t, false);
SELECT seq FROM pgseal.ledger_append('order.update', '{"order": 1, "status": "paid"}');
SQL
cat > "$W/insert16.sql" <<'SQL'
\set t random(1, 1000)
SELECT set_config('app.tenant_id', 'm' || :t, false);
INSERT INTO plain_ledger VALUES ('m' || :t, nextval('plain_seq'), now(), 'bench', 'order.update',
  '{"order": 1, "status": "paid"}', '\x0000000000000000000000000000000000000000000000000000000000000000',
  '\x0000000000000000000000000000000000000000000000000000000000000000', '\x0000000000000000000000000000000000000000000000000000000000000000');
SQL

# One client: the append and the plain insert interleaved in one pgbench script (each
# statement its own transaction), so the drift of fsync latency over a run lands on
# both; their mean latencies (ms) come from pgbench -r. One warm-up run, then one run
# in each order, averaged.
latency_pair() {
    local ab="$W/pair1_ab.sql" ba="$W/pair1_ba.sql" a1 i1 a2 i2
    cat "$W/append1.sql" "$W/insert1.sql" > "$ab"; cat "$W/insert1.sql" "$W/append1.sql" > "$ba"
    run1() {
        "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c 1 -T "$2" -r -f "$1" postgres 2>/dev/null \
            | awk '/pgseal.ledger_append\(/ { a = $1 } /INSERT INTO plain_ledger/ { i = $1 } END { print a, i }'
    }
    run1 "$ab" 3 >/dev/null
    read -r a1 i1 < <(run1 "$ab" "$SECS")
    read -r a2 i2 < <(run1 "$ba" "$SECS")
    python3 -c "import sys; a1, i1, a2, i2 = map(float, sys.argv[1:]); print((a1 + a2) / 2, (i1 + i2) / 2)" "$a1" "$i1" "$a2" "$i2"
}
read -r app1 ins1 < <(latency_pair)
# 16 clients: three rounds of one run of each, the order swapped every round, each run
# after a CHECKPOINT, so neither side always runs first or takes the other's
# checkpoint. This host's throughput drifts by 10-15% between runs; the row reports
# every round and the median of the rounds' ratios.
rounds16=""
for round in 1 2 3; do
    order="insert16 append16"; [ "$round" = 2 ] && order="append16 insert16"
    for side in $order; do
        psql_ -c "CHECKPOINT" >/dev/null
        printf -v "$side" '%s' "$(tps "$W/$side.sql" 16)"
    done
    rounds16="$rounds16 $append16:$insert16"
done
# The rounds leave about a million new rows and as many dead heads versions: vacuum
# them now, so that autovacuum does not run beside the rows measured next.
psql_ -c "VACUUM (ANALYZE) pgseal.ledger, pgseal.ledger_heads, plain_ledger" -c "CHECKPOINT" >/dev/null

# Appends inside one transaction; then verify that chain both ways (fastest of 3).
ms_of() { psql_ -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1; }
bulk=$(ms_of "BEGIN; SET LOCAL app.tenant_id = 'bulk';
  SELECT count(*) FROM generate_series(1, $CHAIN) g, LATERAL pgseal.ledger_append('e', to_jsonb('order-' || g)) a; COMMIT;" | sort -n | tail -1)
best() { for _ in 1 2 3; do ms_of "$1"; done | sort -n | head -1; }
ver=$(best "SELECT checked FROM pgseal.ledger_verify('bulk') WHERE ok")
peer=$(best "SELECT plpgsql_verify('bulk')")
ok=$(psql_ -c "SELECT ok AND checked = $CHAIN FROM pgseal.ledger_verify('bulk')")
[ "$ok" = "t" ] || { echo "ledger_verify did not verify the bulk chain" >&2; exit 1; }

python3 - "$ins1" "$app1" "$rounds16" "$CHAIN" "$bulk" "$ver" "$peer" <<'PY'
import statistics, sys
ins1, app1 = map(float, sys.argv[1:3])
rounds = [tuple(map(float, r.split(":"))) for r in sys.argv[3].split()]
chain = int(sys.argv[4]); bulk, ver, peer = map(float, sys.argv[5:8])
print("| ledger figure | measured | peer | ratio | target |")
print("|---|---:|---:|---:|---|")
print("| ledger_append, 1 client, 1 txn each (ms per txn, interleaved) | %.3f | plain INSERT %.3f | %.2f× the INSERT's time | ≤ 1.3× |" % (app1, ins1, app1 / ins1))
each = ", ".join("%.0f/%.0f" % r for r in rounds)
ratio = statistics.median(a / i for a, i in rounds)
print("| ledger_append, 16 clients, 1,000 tenants (tps, 3 rounds: append/INSERT) | %s | plain INSERT | %.2f× its throughput (median; rounds %s) | ≥ 0.75× |"
      % (each, ratio, ", ".join("%.2f" % (a / i) for a, i in rounds)))
print("| appends inside one transaction (%d) | %.0f /s | — | — | ≥ 150k/s |" % (chain, chain / bulk * 1000))
print("| ledger_verify (%d entries) | %.0f /s | PL/pgSQL %.0f /s | %.1f× faster | ≥ 1 M/s and ≥ 3× |" % (chain, chain / ver * 1000, chain / peer * 1000, peer / ver))
PY
