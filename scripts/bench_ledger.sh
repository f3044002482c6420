#!/usr/bin/env bash
# Ledger rows of `make bench`. Sourced by scripts/bench.sh with the bench cluster
# running (psql_, PORT, DIR, ROOT and KEYFILE set). Every row runs with each of three
# payloads and is a ratio against a peer measured in the same run:
#   1. ledger_append, 1 client, one transaction each    vs  a plain INSERT of the same
#      payload into plain_ledger (shaped like pgseal.ledger), interleaved in one
#      pgbench script                                      target: ≤ 1.3× its time
#   2. ledger_append, 16 clients over 1,000 tenants     vs  the same plain INSERT, same
#      load; three rounds, the order swapped every round  target: ≥ 0.9× its throughput,
#                                                          every round
#   3. CHAIN appends in one transaction                 vs  INSERT INTO plain_ledger
#      SELECT of the same generated payloads, hash and mac = sha256() of the payload
#      text, one transaction                              target: ≥ 0.8× its throughput
#   4. ledger_verify of that chain                      vs  a PL/pgSQL verifier
#                                                          target: ≥ 3× faster
#                                                      vs  sha256(convert_to(payload::text,
#      'UTF8')) per entry over the same entries (the hashing floor)
#                                                          target: ≤ 1.5× its time
# Every peer row fills the columns an entry fills (ROW_TAIL), so both sides write
# rows of the same width; the bulk row prints both widths. The rows run in the order
# 3, 4, 1, 2, so that every verified chain is laid out alike (below, before row 3).
# The payloads (payload n; the pgbench scripts of rows 1-2 carry payload 1 as a literal,
# rows 3-4 generate payloads 1..CHAIN):
#   string  the JSON string "order-<n>"
#   object  {"order": n, "amount": 129.95, "status": "paid"}            (3 keys)
#   audit   an audit row image: a 12-column orders row before and after an UPDATE, with
#           text, numeric, timestamptz, boolean and NULL values (~640 bytes of text;
#           printed)
set -euo pipefail
shopt -s inherit_errexit  # a failing query inside $(...) fails the bench (unset at the end)
SECS=${PGSEAL_BENCH_SECONDS:-10}
SECS16=${PGSEAL_BENCH_SECONDS16:-5}
CHAIN=${PGSEAL_BENCH_CHAIN:-200000}
PGBENCH=$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench
W=$(mktemp -d); trap 'rm -rf "$W" "$KEYFILE"; bash "$ROOT/scripts/cluster.sh" stop "$DIR"' EXIT
KINDS="string object audit"
ZERO32="'\\x$(printf '0%.0s' {1..64})'"
# The columns a format-2 entry fills after mac (fmt, db_role, subjects, salt,
# commitment: docs/FORMAT.md), so that every peer row is as wide as the entry the
# append writes: the format, the session's role, no subjects and a 32-byte salt (a
# constant: the peer does not draw one). The append stores no commitment.
ROW_TAIL="2, 'postgres', '{}', $ZERO32, NULL"

# Payload n of each kind, as SQL over a bigint column g.
declare -A PAYLOAD=(
    [string]="to_jsonb('order-' || g)"
    [object]="jsonb_build_object('order', g, 'status', 'paid', 'amount', 129.95)"
    [audit]="jsonb_build_object('op', 'UPDATE', 'table', 'public.orders',
        'old', to_jsonb(ROW(g, 'cus_' || left(md5(g::text), 14), 'c' || g || '@example.com', 'pending',
                            1299.95 + g % 100, 'EUR', 207.99, '12 Rue de la Paix, Paris',
                            '2026-11-30 09:15:27+00', NULL, false, NULL)::orders),
        'new', to_jsonb(ROW(g, 'cus_' || left(md5(g::text), 14), 'c' || g || '@example.com', 'paid',
                            1299.95 + g % 100, 'EUR', 207.99, '12 Rue de la Paix, Paris',
                            '2026-11-30 09:15:27+00', '2026-12-01 10:02:11.5+00', true, 'card 4242')::orders))"
)

psql_ <<'SQL'
CREATE TABLE plain_ledger (LIKE pgseal.ledger INCLUDING DEFAULTS INCLUDING CONSTRAINTS);
ALTER TABLE plain_ledger ADD PRIMARY KEY (tenant_id, seq);
CREATE SEQUENCE plain_seq;
-- The row type of the audit payload: an application's 12-column orders table.
CREATE TABLE orders (id bigint PRIMARY KEY, customer text NOT NULL, email text, status text NOT NULL,
    amount numeric(12,2), currency text, tax numeric(12,2), ship_to text,
    created_at timestamptz NOT NULL, paid_at timestamptz, paid boolean NOT NULL, note text);
-- RFC 8785 (JCS) text of a jsonb value, as the ledger hashes payloads: keys sorted,
-- no whitespace, numbers in their shortest double form. Enough for the payloads
-- here (ASCII keys; numbers below 10^15, where float8's text is ECMAScript's).
CREATE FUNCTION plpgsql_jcs(j jsonb) RETURNS text LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    CASE jsonb_typeof(j)
    WHEN 'object' THEN
        RETURN '{' || coalesce((SELECT string_agg(to_json(k)::text || ':' || plpgsql_jcs(v), ',' ORDER BY k COLLATE "C")
                                FROM jsonb_each(j) AS e(k, v)), '') || '}';
    WHEN 'array' THEN
        RETURN '[' || coalesce((SELECT string_agg(plpgsql_jcs(v), ',' ORDER BY n)
                                FROM jsonb_array_elements(j) WITH ORDINALITY AS a(v, n)), '') || ']';
    WHEN 'number' THEN
        RETURN j::text::float8::text;
    ELSE
        RETURN j::text;  -- a string (jsonb escapes as JCS does), true, false or null
    END CASE;
END $$;
-- The PL/pgSQL peer: the same hash encoding (docs/FORMAT.md, ledger entries v2, the
-- format every new entry has; subjects are empty here) with PostgreSQL's built-in
-- sha256(), and HMAC-SHA-256 from it with the key pads computed once (PostgreSQL
-- 18's wheel has no pgcrypto, and the peer must be the same on 15 and 18). It checks
-- commitments (over plpgsql_jcs of the payload), hashes and links for real; it
-- computes the HMAC with a stand-in key (it cannot unwrap the tenant's), so that
-- work is counted.
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
        c := sha256('pgseal:v2:payload'::bytea || '\x00'::bytea || r.salt || convert_to(plpgsql_jcs(r.payload), 'UTF8'));
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

# Payload 1 of a kind as a SQL literal for a pgbench script. pgbench reads ':name' in
# a script as a variable, so a colon inside a JSON string (the timestamps) is written
# as the JSON escape \u003a; jsonb reads the literal back to the same value (checked).
literal() {
    local lit
    lit=$(psql_ -c "SELECT quote_literal(regexp_replace((${PAYLOAD[$1]})::text, ':(\S)', '\\\\u003a\\1', 'g')) FROM (SELECT 1::bigint AS g) s")
    [ "$(psql_ -c "SELECT $lit::jsonb = ${PAYLOAD[$1]} FROM (SELECT 1::bigint AS g) s")" = t ] \
        || { echo "the $1 payload's pgbench literal does not read back" >&2; exit 1; }
    echo "$lit"
}
for k in $KINDS; do
    lit=$(literal "$k")
    cat > "$W/append1_$k.sql" <<SQL
SELECT set_config('app.tenant_id', 'solo', false);
SELECT seq FROM pgseal.ledger_append('order.update', $lit);
SQL
    cat > "$W/insert1_$k.sql" <<SQL
SELECT set_config('app.tenant_id', 'solo', false);
INSERT INTO plain_ledger VALUES ('solo', nextval('plain_seq'), now(), 'bench', 'order.update', $lit, $ZERO32, $ZERO32, $ZERO32, $ROW_TAIL);
SQL
    cat > "$W/append16_$k.sql" <<SQL
\\set t random(1, 1000)
SELECT set_config('app.tenant_id', 'm' || :t, false);
SELECT seq FROM pgseal.ledger_append('order.update', $lit);
SQL
    cat > "$W/insert16_$k.sql" <<SQL
\\set t random(1, 1000)
SELECT set_config('app.tenant_id', 'm' || :t, false);
INSERT INTO plain_ledger VALUES ('m' || :t, nextval('plain_seq'), now(), 'bench', 'order.update', $lit, $ZERO32, $ZERO32, $ZERO32, $ROW_TAIL);
SQL
done
sizes=$(for k in $KINDS; do psql_ -c "SELECT '$k=' || octet_length((${PAYLOAD[$k]})::text) FROM (SELECT 1::bigint AS g) s"; done | tr '\n' ' ')

# Rows 3 and 4 run first, into a ledger that holds only the audit part's few entries
# (make bench's first part), none deleted. Rows 1 and 2 leave
# pages part-filled by the row sizes of each payload (an audit entry leaves room
# for two or three string entries on a page); a chain appended after them fills
# those gaps first and is then scattered over up to nine times the pages of the
# others (measured: the string chain over 71,312 pages, the object chain over
# 7,985), and its verification and its peers time page reads, not the verifiers.
# The row prints the heap pages each chain spans.

# 3. Bulk: CHAIN appends in one transaction against the plain INSERT ... SELECT of the
# same payloads. Each side runs twice (append, insert, insert, append), each after a
# CHECKPOINT, into a tenant of its own; the fastest of each side counts (on shared
# cores, noise only ever adds time). The first append's chain is verified below.
ms_of() { psql_ -c '\timing on' -c "$1" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | awk '{ s += $1 } END { print s }'; }
bulk_append() {
    psql_ -c "CHECKPOINT" >/dev/null
    ms_of "BEGIN; SET LOCAL app.tenant_id = '$1';
      SELECT count(*) FROM generate_series(1, $CHAIN) g, LATERAL pgseal.ledger_append('e', ${PAYLOAD[$2]}) a; COMMIT;"
}
bulk_insert() {
    psql_ -c "CHECKPOINT" >/dev/null
    ms_of "BEGIN;
      INSERT INTO plain_ledger (tenant_id, seq, recorded_at, actor, event, payload, prev_hash, hash, mac,
                                fmt, db_role, subjects, salt, commitment)
      SELECT '$1', g, now(), 'bench', 'e', p, $ZERO32, sha256(t), sha256(t), $ROW_TAIL
      FROM (SELECT g, p, convert_to(p::text, 'UTF8') AS t
            FROM (SELECT g, ${PAYLOAD[$2]} AS p FROM generate_series(1, $CHAIN) g OFFSET 0) s OFFSET 0) s; COMMIT;"
}
bulk=""
for k in $KINDS; do
    a1=$(bulk_append "bulk_$k" "$k"); i1=$(bulk_insert "bulk_$k" "$k")
    i2=$(bulk_insert "bulk_${k}_2" "$k"); a2=$(bulk_append "bulk_${k}_2" "$k")
    # The mean row width (pg_column_size of the row) of each side.
    w=$(psql_ -c "SELECT (SELECT avg(pg_column_size(l.*))::int FROM pgseal.ledger l WHERE tenant_id = 'bulk_$k')
                  || '/' || (SELECT avg(pg_column_size(l.*))::int FROM plain_ledger l WHERE tenant_id = 'bulk_$k')")
    bulk="$bulk $k:$(printf '%s\n' "$a1" "$a2" | sort -n | head -1):$(printf '%s\n' "$i1" "$i2" | sort -n | head -1):$w"
done

# 4. Verify the first bulk chain of each payload, and its two peers: the fastest of 3
# runs (of 2 for the PL/pgSQL verifier, the slowest by far).
best() { for _ in $(seq 1 "${2:-3}"); do ms_of "$1"; done | sort -n | head -1; }
verify=""
for k in $KINDS; do
    ok=$(psql_ -c "SELECT ok AND checked = $CHAIN FROM pgseal.ledger_verify('bulk_$k')")
    [ "$ok" = "t" ] || { echo "ledger_verify did not verify the $k bulk chain" >&2; exit 1; }
    ver=$(best "SELECT checked FROM pgseal.ledger_verify('bulk_$k') WHERE ok")
    plp=$(best "SELECT plpgsql_verify('bulk_$k')" 2)
    # The floor reads the entries as ledger_verify does, by the primary key in seq
    # order (the planner would otherwise scan the whole ledger and sort).
    hashing=$(best "SET enable_seqscan = off; SET enable_bitmapscan = off;
                    SELECT sum(length(sha256(convert_to(payload::text, 'UTF8'))))
                    FROM (SELECT payload FROM pgseal.ledger WHERE tenant_id = 'bulk_$k' ORDER BY seq) e")
    pages=$(psql_ -c "SELECT count(DISTINCT (ctid::text::point)[0]) FROM pgseal.ledger WHERE tenant_id = 'bulk_$k'")
    verify="$verify $k:$ver:$plp:$hashing:$pages"
done

# Rows 3 and 4 left about 2.4 million new rows in the two tables: vacuum and analyse
# them now (which moves no row), so that autovacuum does not run beside the rows
# measured next.
psql_ -c "VACUUM (ANALYZE) pgseal.ledger, pgseal.ledger_heads, plain_ledger" -c "CHECKPOINT" >/dev/null

# 1. One client: the append and the plain insert interleaved in one pgbench script
# (each statement its own transaction), so the drift of fsync latency over a run lands
# on both; their mean latencies (ms) come from pgbench -r. One warm-up run, then one
# run in each order, averaged. Prints "append_ms insert_ms".
latency_pair() {
    local ab="$W/pair1_ab_$1.sql" ba="$W/pair1_ba_$1.sql" a1 i1 a2 i2
    cat "$W/append1_$1.sql" "$W/insert1_$1.sql" > "$ab"; cat "$W/insert1_$1.sql" "$W/append1_$1.sql" > "$ba"
    run1() {
        "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c 1 -T "$2" -r -f "$1" postgres 2>/dev/null \
            | awk '/pgseal.ledger_append\(/ { a = $1 } /INSERT INTO plain_ledger/ { i = $1 } END { print a, i }'
    }
    run1 "$ab" 3 >/dev/null
    read -r a1 i1 < <(run1 "$ab" "$SECS")
    read -r a2 i2 < <(run1 "$ba" "$SECS")
    python3 -c "import sys; a1, i1, a2, i2 = map(float, sys.argv[1:]); print((a1 + a2) / 2, (i1 + i2) / 2)" "$a1" "$i1" "$a2" "$i2"
}
one=""
for k in $KINDS; do
    read -r a i < <(latency_pair "$k")
    one="$one $k:$a:$i"
done

# 2. Sixteen clients. pgbench transactions per second over the second half of a run
# twice as long: the first half warms the backends' plan and key caches (pgbench
# connects once per run). Three rounds of one run of each side, the order swapped
# every round, each run after a CHECKPOINT, so neither side always runs first or takes
# the other's checkpoint. This host's throughput drifts by 10-15% between runs; the
# row reports every round.
tps() {
    "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c 16 -j 2 -T $((2 * SECS16)) -P 1 \
        -f "$1" postgres 2>&1 >/dev/null \
        | awk -v from="$SECS16" '/^progress:/ { t = $2 + 0; if (t > from) { s += $4; n++ } } END { printf "%.0f\n", (n ? s / n : 0) }'
}
sixteen=""
for k in $KINDS; do
    rounds=""
    for round in 1 2 3; do
        order="insert append"; [ "$round" = 2 ] && order="append insert"
        for side in $order; do
            psql_ -c "CHECKPOINT" >/dev/null
            printf -v "$side" '%s' "$(tps "$W/${side}16_$k.sql")"
        done
        rounds="$rounds,$append/$insert"
    done
    sixteen="$sixteen $k:${rounds#,}"
done

python3 - "$CHAIN" "$sizes" "$one" "$sixteen" "$bulk" "$verify" <<'PY'
import statistics, sys
chain = int(sys.argv[1])
size = dict(s.split("=") for s in sys.argv[2].split())
parse = lambda arg: [s.split(":") for s in arg.split()]
ok = lambda met: "PASS" if met else "MISS"
print("Payloads (octet_length of payload 1's text): " + ", ".join("%s %s bytes" % kv for kv in size.items()))
print()
print("| ledger figure | payload | measured | peer | ratio | target | result |")
print("|---|---|---:|---:|---:|---|---|")
for k, a, i in parse(sys.argv[3]):
    a, i = float(a), float(i)
    print("| ledger_append, 1 client, 1 txn each (ms per txn, interleaved) | %s | %.3f | plain INSERT %.3f | %.2f× its time | ≤ 1.3× | %s |"
          % (k, a, i, a / i, ok(a / i <= 1.3)))
for k, rounds in parse(sys.argv[4]):
    pairs = [tuple(map(float, r.split("/"))) for r in rounds.split(",")]
    ratios = [a / i if i else 0.0 for a, i in pairs]
    print("| ledger_append, 16 clients, 1,000 tenants (tps per round, append/INSERT) | %s | %s | plain INSERT | rounds %s (median %.2f×) | ≥ 0.9× every round | %s |"
          % (k, ", ".join("%.0f/%.0f" % p for p in pairs), ", ".join("%.2f×" % r for r in ratios),
             statistics.median(ratios), ok(min(ratios) >= 0.9)))
for k, a, i, w in parse(sys.argv[5]):
    ra, ri = chain / float(a) * 1000, chain / float(i) * 1000
    wa, wi = w.split("/")
    print("| %d appends in one transaction (rows/s; row bytes) | %s | %.0f; %s B | INSERT … SELECT %.0f; %s B | %.2f× its throughput | ≥ 0.8× | %s |"
          % (chain, k, ra, wa, ri, wi, ra / ri, ok(ra / ri >= 0.8)))
for k, v, p, h, pages in parse(sys.argv[6]):
    v, p, h = float(v), float(p), float(h)
    print("| ledger_verify, %d entries (entries/s; heap pages) | %s | %.0f; %s | PL/pgSQL verifier %.0f | %.2f× faster | ≥ 3× | %s |"
          % (chain, k, chain / v * 1000, pages, chain / p * 1000, p / v, ok(p / v >= 3)))
    print("| ledger_verify, %d entries (ms) | %s | %.1f | sha256-per-row scan %.1f | %.2f× its time | ≤ 1.5× | %s |"
          % (chain, k, v, h, v / h, ok(v / h <= 1.5)))
PY
shopt -u inherit_errexit
