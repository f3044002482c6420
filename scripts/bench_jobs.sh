#!/usr/bin/env bash
# pgseald rows of `make bench`. Sourced by scripts/bench.sh with the bench cluster
# running (psql_, PORT, DIR, ROOT, KEYFILE set); it needs target/release/pgseald.
# Every job runs as a user runs it: no flags but --database-url, so with pgseald's
# defaults. Each job runs at N and at 4N rows (or tenants); its rate at both sizes
# and their ratio show whether its cost grows linearly (target: within 20%).
#   1. pgseald retention run: N expired rows among 2N (100 tenants), then 4N among 8N
#      in a second table; target ≥ 100k rows/s at both sizes, and no batch transaction
#      over 200 ms. Beside each sweep, an insert load (200/s, 2 clients) into the
#      swept table, in WINDOW-second pgbench windows (400 inserts each: a window's
#      p99 is its 4th-slowest insert, its latency counted from when pgbench scheduled
#      it; N is large enough that the 4N sweep spans several): the p99 during the 4N sweep (the
#      median of its windows' p99) against the p99 of the same load alone (the median
#      of 5 windows just before it); target ≤ 2×. Beside it, for reading the p99: the
#      same load's p99 while the same rows of a third table built alike are deleted
#      by hand (a plain batched DELETE, `peer_delete`).
#   2. pgseald rotate tenant: one tenant's N sealed values, then another's 4N;
#      target ≥ 100k rows/s at both sizes; and the 4N run against its peer, the same
#      values in a table built alike rewritten by plain batched UPDATEs: target ≤ 1.5×
#      its time.
#   3. pgseald rotate kek: N tenants' keys after a second master key version is
#      added; then 3N tenants more and a third version, so 4N tenants' keys;
#      target at 4N = 100,000 tenants: ≤ 10 s.
# Sizes: PGSEAL_BENCH_SWEEP_ROWS (N = 500,000), PGSEAL_BENCH_RESEAL_ROWS (N = 100,000),
# PGSEAL_BENCH_KEYS (N = 25,000). PGSEAL_BENCH_RETENTION_FLAGS adds flags to the
# retention runs, for a diagnosing run only (the recorded rows use none).
set -euo pipefail
shopt -s inherit_errexit  # a failing pgseald inside $(...) fails the bench
SWEEP=${PGSEAL_BENCH_SWEEP_ROWS:-500000}
RESEAL=${PGSEAL_BENCH_RESEAL_ROWS:-100000}
KEYS=${PGSEAL_BENCH_KEYS:-25000}
WINDOW=2
PGBENCH=$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench
PGSEALD="$ROOT/target/release/pgseald"
URL="host=127.0.0.1 port=$PORT user=postgres dbname=postgres"
J=$(mktemp -d)
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(float(sys.argv[2]) - float(sys.argv[1]))" "$1" "$2"; }

# --- 1. Retention --------------------------------------------------------------------
# A table of 2 x $2 rows over 100 tenants: even ids are a year old (expired), odd
# ids new; its retention window is 30 days.
sweep_table() {
    psql_ <<SQL
CREATE TABLE $1 (id bigint GENERATED ALWAYS AS IDENTITY, tenant_id text NOT NULL, created_at timestamptz NOT NULL, body text);
INSERT INTO $1 (tenant_id, created_at, body)
SELECT 't' || (g % 100), CASE WHEN g % 2 = 0 THEN now() - interval '365 days' ELSE now() END, 'row ' || g
FROM generate_series(1, 2 * $2) g;
CREATE INDEX ON $1 (tenant_id, created_at);
VACUUM ANALYZE $1;
SQL
    [ "${3:-}" = peer ] || psql_ -c "SELECT pgseal.retention_set('$1', '30 days')" >/dev/null
    cat > "$J/insert_$1.sql" <<SQL
\\set t random(0, 99)
INSERT INTO $1 (tenant_id, created_at, body) VALUES ('t' || :t, now(), 'new');
SQL
}
# p99 of per-transaction latency (µs) of one window's pgbench -l log.
p99() { cat "$1"/pgbench_log.* | awk '{ print $3 }' | sort -n | awk '{ a[NR] = $1 } END { print a[int(NR * 0.99)] }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# One window of the insert load into table $1; prints "end-time p99".
load_window() {
    local d; d=$(mktemp -d -p "$J")
    (cd "$d" && "$PGBENCH" -n -h 127.0.0.1 -p "$PORT" -U postgres -c 2 -j 1 -T "$WINDOW" -R 200 -l \
        -f "$J/insert_$1.sql" postgres >/dev/null 2>&1)
    echo "$(now) $(p99 "$d")"
}
# `pgseald retention run` (or, with "peer" as $2, `peer_delete` of table $1) with
# the load into table $1 beside it, window after window until the run ends. Sets
# sweep_s, and leaves the p99 of every window that ended within the run in $J/$1.p99
# (or of the one window, for a run shorter than a window).
#
# Each table is checkpointed after it is built and before anything is measured on it
# (`settle`). Expired rows are old: their pages have seen many checkpoints since they
# last changed, so a real sweep writes a full-page image of each page it first
# touches, as a sweep after a checkpoint does. The checkpoint also recycles the WAL
# segments the table's construction wrote, so the sweep finds segments to reuse;
# without it the sweep ran beside the checkpoint that construction set off, with none,
# zero-filling a new one every 16 MB while the inserts waited: 37-148 times their p99
# alone (docs/BENCHMARKS.md, "What sets the insert p99 during a retention sweep"),
# which is what a large first sweep on a quiet server with few spare segments meets.
settle() { psql_ -c "CHECKPOINT" >/dev/null; }
sweep() {
    local start end pid
    start=$(now)
    # shellcheck disable=SC2086 # PGSEAL_BENCH_RETENTION_FLAGS: words, for a diagnosing run
    ( if [ "${2:-}" = peer ]; then peer_delete "$1"; else
          "$PGSEALD" retention run --database-url "$URL" ${PGSEAL_BENCH_RETENTION_FLAGS:-} > "$J/$1.out" 2> "$J/$1.err" || { cat "$J/$1.err" >&2; exit 1; }
      fi
      now > "$J/$1.end" ) &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do load_window "$1"; done > "$J/$1.windows"
    wait "$pid"
    end=$(cat "$J/$1.end")
    sweep_s=$(elapsed "$start" "$end")
    awk -v end="$end" '$1 <= end { print $2 }' "$J/$1.windows" > "$J/$1.p99"
    [ -s "$J/$1.p99" ] || awk '{ print $2 }' "$J/$1.windows" > "$J/$1.p99"
}

# The peer of the 4N sweep: what a user would write by hand to delete the same rows,
# every tenant at once, in one pass over the table by ctid (a TID range scan, which
# reads in ctid order and stops at the LIMIT; an ORDER BY would sort the rest of the
# table every batch), 10,000 rows a transaction, paced to the 4N sweep's rate
# ($PEER_RATE rows/s; unpaced it deletes several times faster than any per-tenant
# sweep and is over within one window).
peer_delete() {
    psql_ -c "DO \$\$ DECLARE last tid := '(0,0)'; ids tid[]; t0 timestamptz; BEGIN LOOP
                t0 := clock_timestamp();
                ids := ARRAY(SELECT ctid FROM $1 WHERE ctid > last AND created_at < now() - interval '30 days' LIMIT 10000);
                EXIT WHEN cardinality(ids) = 0;
                DELETE FROM $1 WHERE ctid = ANY (ids);
                last := (SELECT max(t) FROM unnest(ids) t);
                COMMIT;
                PERFORM pg_sleep(greatest(0, 10000.0 / $PEER_RATE - extract(epoch FROM clock_timestamp() - t0)));
              END LOOP; END \$\$" >/dev/null
}

sweep_table sweep_n "$SWEEP"; settle
sweep sweep_n; sweep_n_s=$sweep_s
# The 4N run sweeps only the second table: the first one's rule goes.
psql_ -c "DELETE FROM pgseal.retention_rules WHERE rel = 'sweep_n'::regclass"
psql_ -c "VACUUM sweep_n" >/dev/null
sweep_table sweep_4n $((4 * SWEEP)); settle
for _ in 1 2 3 4 5; do load_window sweep_4n; done | awk '{ print $2 }' > "$J/alone.p99"
sweep sweep_4n; sweep_4n_s=$sweep_s
# The peer: a third table built and checkpointed as the 4N one was (after the 4N
# table's dead rows are vacuumed), with load-alone windows of its own.
PEER_RATE=$(python3 -c "import sys; print(max(1, int(4 * int(sys.argv[1]) / float(sys.argv[2]))))" "$SWEEP" "$sweep_4n_s")
psql_ -c "VACUUM sweep_4n" >/dev/null
sweep_table sweep_peer $((4 * SWEEP)) peer; settle
for _ in 1 2 3 4 5; do load_window sweep_peer; done | awk '{ print $2 }' > "$J/peer_alone.p99"
sweep sweep_peer peer; peer_s=$sweep_s
for t in sweep_n sweep_4n sweep_peer; do
    left=$(psql_ -c "SELECT count(*) FROM $t WHERE created_at < now() - interval '30 days'")
    [ "$left" = 0 ] || { echo "retention run left $left expired rows in $t" >&2; exit 1; }
done
# Each batch is one transaction; its BEGIN-to-COMMIT time bounds every lock it held.
# pgseald records the longest of a run in pgseal.job_runs.
longest=$(psql_ -c "SELECT max((detail->>'longest_batch_ms')::float8) FROM pgseal.job_runs WHERE detail ? 'longest_batch_ms'")
alone_p99=$(median < "$J/alone.p99")
during_p99=$(median < "$J/sweep_4n.p99")
during_windows=$(wc -l < "$J/sweep_4n.p99")
peer_p99=$(median < "$J/sweep_peer.p99")
peer_alone_p99=$(median < "$J/peer_alone.p99")
peer_windows=$(wc -l < "$J/sweep_peer.p99")
# Every window of the 4N sweep, for reading beside the server's log: when it ended
# and its p99.
echo "4N sweep's load windows (end time UTC, p99 ms):" \
    $(awk '{ printf "%s %.2f;", strftime("%H:%M:%S", $1, 1), $2 / 1000 }' "$J/sweep_4n.windows")

# The peer leaves 4N dead rows and the WAL of deleting them: vacuum them and
# checkpoint now, so that neither autovacuum nor a checkpoint the sweeps set off runs
# beside the jobs measured next (one did in a run of 704a5cc: reseal at N measured
# 16k rows/s beside a 12 s checkpoint and the vacuum of sweep_4n, 62k/s alone).
psql_ -c "VACUUM (ANALYZE) sweep_n, sweep_4n, sweep_peer" -c "CHECKPOINT" >/dev/null

# --- 2. Reseal -----------------------------------------------------------------------
# Tenant r1 has N sealed values, r4 has 4N, in one registered table keyed by tenant.
psql_ <<SQL
CREATE TABLE creds (tenant_id text NOT NULL, id int NOT NULL, token text, PRIMARY KEY (tenant_id, id));
BEGIN; SELECT pgseal.set_tenant('r1');
INSERT INTO creds SELECT 'r1', g, pgseal.vault_seal(rpad('sk-live-' || g, 60, 'x'), 'creds.token') FROM generate_series(1, $RESEAL) g;
COMMIT;
BEGIN; SELECT pgseal.set_tenant('r4');
INSERT INTO creds SELECT 'r4', g, pgseal.vault_seal(rpad('sk-live-' || g, 60, 'x'), 'creds.token') FROM generate_series(1, 4 * $RESEAL) g;
COMMIT;
SQL
psql_ -c "VACUUM (ANALYZE) creds" -c "SELECT pgseal.vault_register_column('creds', 'token', 'creds.token')" -c "CHECKPOINT" >/dev/null
reseal() {
    local start; start=$(now)
    "$PGSEALD" rotate tenant "$1" --database-url "$URL" > "$J/reseal_$1.out" 2> "$J/reseal_$1.err" \
        || { cat "$J/reseal_$1.err" >&2; exit 1; }
    elapsed "$start" "$(now)"
}
reseal_n_s=$(reseal r1); reseal_4n_s=$(reseal r4)
reseal_left=$(psql_ -c "SELECT coalesce(sum(rows), 0) FROM pgseal.key_usage WHERE tenant_id IN ('r1', 'r4') AND state <> 'active'")
# The peer: the same 4N values in a table of their own, built as creds was (the same
# sealed values, vacuumed and checkpointed), rewritten by plain UPDATEs (the value
# itself, no crypto) in transactions of 4,000 rows (about the size pgseald's batches
# reach). Both start on full pages, and each page's first change writes a full page
# image into the WAL. (An earlier version rewrote the peer's rows in creds after the
# reseal, so that the peer ran on pages the reseal's vacuum had emptied and with the
# reseal's WAL segments to recycle, where the reseal zero-filled new ones.) What the
# reseal costs beyond it is the crypto, the batches' key reads and pgseald's round
# trips.
psql_ -c "VACUUM (ANALYZE) creds" -c "CREATE TABLE creds_peer (LIKE creds INCLUDING ALL)" \
      -c "INSERT INTO creds_peer SELECT * FROM creds WHERE tenant_id = 'r4'" \
      -c "VACUUM (ANALYZE) creds_peer" -c "CHECKPOINT" >/dev/null
start=$(now)
psql_ -c "DO \$\$ DECLARE lo int := 0; BEGIN WHILE lo < 4 * $RESEAL LOOP
            UPDATE creds_peer SET token = token || '' WHERE tenant_id = 'r4' AND id > lo AND id <= lo + 4000;
            COMMIT; lo := lo + 4000; END LOOP; END \$\$" >/dev/null
rewrite_4n_s=$(elapsed "$start" "$(now)")

# --- 3. KEK rotation -----------------------------------------------------------------
# Tenants k$1..k$2 with one data key each. Committed every 1,000 tenants: each first
# seal takes its tenant's advisory lock until commit, and one transaction cannot hold
# 100,000 locks.
tenants() {
    psql_ -c "DO \$\$ BEGIN FOR i IN $1..$2 LOOP PERFORM set_config('app.tenant_id', 'k' || i, true); PERFORM pgseal.vault_seal('x'); IF i % 1000 = 0 THEN COMMIT; END IF; END LOOP; END \$\$"
}
stale_keys() {
    psql_ -c "SELECT count(*) FROM pgseal.tenant_keys WHERE state <> 'destroyed' AND kek_version <> (SELECT active_version FROM pgseal.vault_status())"
}
# A new master key version $1, then `pgseald rotate kek`; prints "keys seconds".
kek() {
    local start keys
    printf '%s:%s\n' "$1" "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" >> "$DIR/master.keys"
    # The keys just made, vacuumed now rather than by autovacuum during the rewrap.
    psql_ -c "VACUUM (ANALYZE) pgseal.tenant_keys" >/dev/null
    bash "$ROOT/scripts/cluster.sh" restart "$DIR"
    keys=$(stale_keys)
    start=$(now)
    "$PGSEALD" rotate kek --database-url "$URL" > "$J/kek_$1.out" 2> "$J/kek_$1.err" \
        || { cat "$J/kek_$1.err" >&2; exit 1; }
    echo "$keys $(elapsed "$start" "$(now)")"
}
tenants 1 "$KEYS"
out=$(kek 2); read -r kek_n_keys kek_n_s <<< "$out"
tenants $((KEYS + 1)) $((4 * KEYS))
out=$(kek 3); read -r kek_4n_keys kek_4n_s <<< "$out"
kek_left=$(stale_keys)
rm -rf "$J"
# The parts after this one start without these tables: left behind (about 1.5 GB with
# their indexes), they pushed the erasure part's tables out of shared buffers and
# its ratios past their targets (subject_erase 3.9× where it measures 2.6× alone).
psql_ -c "SET client_min_messages = warning" -c "DROP TABLE sweep_n, sweep_4n, sweep_peer, creds, creds_peer" -c "CHECKPOINT" >/dev/null

# Every expired row went (checked above), so each run deleted its N or 4N rows.
python3 - "$SWEEP" "$sweep_n_s" $((4 * SWEEP)) "$sweep_4n_s" "${longest:-nan}" \
    "$alone_p99" "$during_p99" "$during_windows" "$peer_p99" "$peer_windows" "$peer_s" "$peer_alone_p99" \
    "$RESEAL" "$reseal_n_s" "$reseal_4n_s" "$reseal_left" "$rewrite_4n_s" \
    "$KEYS" "$kek_n_keys" "$kek_n_s" "$kek_4n_keys" "$kek_4n_s" "$kek_left" <<'PY'
import sys
a = sys.argv[1:]
(sw_n, sw_n_s, sw_4n, sw_4n_s, longest, alone, during, windows, peer, peer_windows, peer_s, peer_alone,
 rs, rs_n_s, rs_4n_s, rs_left, rw_4n_s, tenants, kk_n, kk_n_s, kk_4n, kk_4n_s, kk_left) = a
sw_n, sw_4n, windows, peer_windows, rs, tenants, kk_n, kk_4n = map(int, (sw_n, sw_4n, windows, peer_windows, rs, tenants, kk_n, kk_4n))
sw_n_s, sw_4n_s, longest, alone, during, peer, peer_s, peer_alone, rs_n_s, rs_4n_s, rw_4n_s, kk_n_s, kk_4n_s = map(
    float, (sw_n_s, sw_4n_s, longest, alone, during, peer, peer_s, peer_alone, rs_n_s, rs_4n_s, rw_4n_s, kk_n_s, kk_4n_s))
ok = lambda met: "PASS" if met else "MISS"
linear = lambda r: ok(0.8 <= r <= 1.2)
print("| pgseald job, no flags | at N | at 4N | 4N ÷ N (rows/s) | target | result |")
print("|---|---|---|---:|---|---|")
r_n, r_4n = sw_n / sw_n_s, sw_4n / sw_4n_s
print("| retention run: expired rows deleted (of twice as many), rows/s | %d: %.0f/s (%.1f s) | %d: %.0f/s (%.1f s) | %.2f× | ≥ 100k rows/s at both; 4N ÷ N within 20%% | %s, %s |"
      % (sw_n, r_n, sw_n_s, sw_4n, r_4n, sw_4n_s, r_4n / r_n, ok(min(r_n, r_4n) >= 100000), linear(r_4n / r_n)))
print("| retention run: longest batch transaction (the longest any of its locks was held) | — | %.0f ms (of both runs) | — | ≤ 200 ms | %s |"
      % (longest, ok(longest <= 200)))
print("| retention run: concurrent inserts' p99 during the 4N sweep ÷ alone (median of windows) | — | %.2f ms (%d window%s) ÷ %.2f ms (5 windows): %.2f× | — | ≤ 2× | %s |"
      % (during / 1000, windows, "" if windows == 1 else "s", alone / 1000, during / alone, ok(during / alone <= 2)))
print("| (the same p99 during the peer: the same rows of a table built alike deleted by a plain batched DELETE at the sweep's rate, %.0f rows/s) | — | %.2f ms (%d window%s) ÷ %.2f ms alone: %.2f×; the sweep's p99 ÷ the peer's: %.2f× | — | information | — |"
      % (sw_4n / peer_s, peer / 1000, peer_windows, "" if peer_windows == 1 else "s", peer_alone / 1000, peer / peer_alone, during / peer))
r_n, r_4n = rs / rs_n_s, 4 * rs / rs_4n_s
print("| rotate tenant: sealed values resealed, rows/s | %d: %.0f/s (%.1f s) | %d: %.0f/s (%.1f s) | %.2f× | ≥ 100k rows/s at both; 4N ÷ N within 20%% | %s, %s |"
      % (rs, r_n, rs_n_s, 4 * rs, r_4n, rs_4n_s, r_4n / r_n, ok(min(r_n, r_4n) >= 100000), linear(r_4n / r_n)))
print("| (values left under old keys after both runs) | | %s | | 0 | %s |" % (rs_left, ok(rs_left == "0")))
print("| rotate tenant ÷ the same values in a table built alike rewritten by plain UPDATEs of 4,000 (peer, same run) | — | %.1f s ÷ %.1f s (%.0f rows/s): %.2f× | — | ≤ 1.5× | %s |"
      % (rs_4n_s, rw_4n_s, 4 * rs / rw_4n_s, rs_4n_s / rw_4n_s, ok(rs_4n_s / rw_4n_s <= 1.5)))
r_n, r_4n = kk_n / kk_n_s, kk_4n / kk_4n_s
print("| rotate kek: tenant keys rewrapped, keys/s | %d tenants, %d keys: %.0f/s (%.1f s) | %d tenants, %d keys: %.0f/s (%.1f s) | %.2f× | ≤ 10 s for 100,000 tenants (scaled: %.1f s); 4N ÷ N within 20%% | %s, %s |"
      % (tenants, kk_n, r_n, kk_n_s, 4 * tenants, kk_4n, r_4n, kk_4n_s, r_4n / r_n, kk_4n_s * 100000 / (4 * tenants),
         ok(kk_4n_s * 100000 / (4 * tenants) <= 10), linear(r_4n / r_n)))
print("| (keys left under an old master key version) | | %s | | 0 | %s |" % (kk_left, ok(kk_left == "0")))
PY
