#!/usr/bin/env bash
# make bench: one run, one table per part; each figure is a ratio against a peer
# measured in the same run (absolute rates are printed as information), and each
# row states its target and whether this run met it (PASS or MISS).
#   vault     vault_decrypt  vs  pgcrypto decrypt_iv (AES-256-CBC), pgp_sym_decrypt
#             and a length() scan, over N sealed 60-byte tokens (this file)
#   audit     a decrypting transaction with audit_decrypt = on  vs  = commit
#             (scripts/bench_audit.sh)
#   ledger    ledger_append with three payloads (a string, a 3-key object, an audit
#             row image), 1 and 16 clients  vs  a plain INSERT; bulk appends  vs
#             INSERT ... SELECT; ledger_verify  vs  a PL/pgSQL verifier and the
#             sha256-per-row floor (scripts/bench_ledger.sh)
#   tenancy   tenant_protect / org_protect  vs  an explicit WHERE with RLS off
#             (scripts/bench_tenancy.sh)
#   jobs      pgseald retention run, rotate tenant, rotate kek with no flags, each at
#             N and 4N (scripts/bench_jobs.sh)
#   erasure   subject_erase of one subject's entries in a chain of N and 4N  vs  the
#             same UPDATE on a plain copy (scripts/bench_erasure.sh)
#   citus     vault_decrypt through a Citus coordinator with two workers  vs  the one
#             node, PostgreSQL 16 and later (scripts/bench_citus.sh)
# PGSEAL_BENCH_PARTS picks parts after vault (default: all of them, in this order).
# Sizes: PGSEAL_BENCH_ROWS (vault, 200000), PGSEAL_BENCH_CHAIN (bulk appends, 200000),
# PGSEAL_BENCH_SECONDS / PGSEAL_BENCH_SECONDS16 (pgbench runs), and each part's own.
# The cluster runs with fsync on, as production does, since the ledger rows commit.
# PostgreSQL PGSEAL_PG (15 or 18; `make bench PG=18`). The PostgreSQL 18 wheel has no
# pgcrypto: there the vault rows compare with the scan floor only.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
. "$ROOT/scripts/pg.sh"
N=${PGSEAL_BENCH_ROWS:-200000}
PARTS=${PGSEAL_BENCH_PARTS:-audit ledger tenancy jobs erasure citus}
PGP_SAMPLE=${PGSEAL_BENCH_PGP_SAMPLE:-2000}
DIR=/var/tmp/pgseal-bench
PORT=54395

(cd "$ROOT/extension" && cargo pgrx install --release --pg-config "$(pg_config_of "$PGSEAL_PG")" \
    --no-default-features --features "pg$PGSEAL_PG" >/dev/null)
echo "PostgreSQL $PGSEAL_PG: $("$(pg_config_of "$PGSEAL_PG")" --version)"
(cd "$ROOT" && cargo build --release -q -p pgseald)
KEYFILE=$(mktemp); trap 'rm -f "$KEYFILE"; bash "$ROOT/scripts/cluster.sh" stop "$DIR"' EXIT
printf '1:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" > "$KEYFILE"
# PGSEAL_BENCH_CONF: extra postgresql.conf lines for a diagnosing run, separated by
# ';' (for example "log_autovacuum_min_duration = 0; log_checkpoints = on"); the
# server log is left in $DIR/server.log.
IFS=';' read -ra extra_conf <<< "${PGSEAL_BENCH_CONF:-}"
bash "$ROOT/scripts/cluster.sh" start "$DIR" "$PORT" "$KEYFILE" "shared_buffers = 512MB" "max_parallel_workers_per_gather = 0" "jit = off" "fsync = on" "max_connections = 40" "${extra_conf[@]}"
psql_() { psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }

HAVE_PGCRYPTO=$(psql_ -c "SELECT count(*) FROM pg_available_extensions WHERE name = 'pgcrypto'")
if [ "$HAVE_PGCRYPTO" = 1 ]; then
    peers="pgcrypto_iv.ct AS cbc, CASE WHEN i <= $PGP_SAMPLE THEN pgp_sym_encrypt(t, 'bench-passphrase') END AS pgp"
    lateral=", LATERAL (SELECT encrypt_iv(convert_to(t, 'utf8'), decode(repeat('ab', 32), 'hex'), decode(repeat('cd', 16), 'hex'), 'aes-cbc') AS ct) pgcrypto_iv"
    psql_ -c "CREATE EXTENSION pgcrypto"
else
    peers="NULL::bytea AS cbc, NULL::bytea AS pgp"; lateral=
fi
psql_ <<SQL
CREATE EXTENSION pgseal;
BEGIN; SET LOCAL app.tenant_id = 'bench';
CREATE TABLE tok AS
  SELECT i, t AS plain, pgseal.vault_seal(t) AS sealed, $peers
  FROM (SELECT i, rpad('sk-live-' || md5(i::text), 60, 'x') AS t FROM generate_series(1, $N) i) s $lateral;
COMMIT;
VACUUM ANALYZE tok;
SQL

# Fastest of 5 runs of a scan query, in ms: on shared cores, noise only ever adds time.
time_q() {
    local q=$1 best=()
    for _ in 1 2 3 4 5; do
        best+=("$(psql_ -c "SET app.tenant_id = 'bench'" -c '\timing on' -c "$q" | sed -n 's/^Time: \([0-9.]*\) ms.*/\1/p' | tail -1)")
    done
    printf '%s\n' "${best[@]}" | sort -n | head -1
}
floor=$(time_q "SELECT sum(length(sealed)) FROM tok")
vault=$(time_q "SELECT sum(length(pgseal.vault_decrypt(sealed))) FROM tok")
cbc=nan pgp=nan pgp_floor=nan
if [ "$HAVE_PGCRYPTO" = 1 ]; then
    cbc=$(time_q "SELECT sum(length(decrypt_iv(cbc, decode(repeat('ab', 32), 'hex'), decode(repeat('cd', 16), 'hex'), 'aes-cbc'))) FROM tok")
    pgp=$(time_q "SELECT sum(length(pgp_sym_decrypt(pgp, 'bench-passphrase'))) FROM tok WHERE i <= $PGP_SAMPLE")
    pgp_floor=$(time_q "SELECT sum(length(pgp)) FROM tok WHERE i <= $PGP_SAMPLE")
fi
check=$(psql_ -c "SET app.tenant_id = 'bench'" -c "SELECT count(*) FROM tok WHERE pgseal.vault_decrypt(sealed) <> plain")
[ "$check" = "0" ] || { echo "vault_decrypt returned wrong plaintext for $check rows" >&2; exit 1; }

python3 - "$N" "$PGP_SAMPLE" "$floor" "$vault" "$cbc" "$pgp" "$pgp_floor" <<'PY'
import sys
n, sample = int(sys.argv[1]), int(sys.argv[2])
floor, vault, cbc, pgp, pgp_floor = map(float, sys.argv[3:])
# µs per row above the scan floor; NaN (not measured) stays NaN
per = lambda ms, rows, base=0.0: float("nan") if ms != ms else max(ms - base, 0.0) * 1000.0 / rows
rows = [
    ("vault_decrypt", per(vault, n, floor), "per row, %d rows" % n),
    ("pgcrypto decrypt_iv (AES-256-CBC)", per(cbc, n, floor), "per row, %d rows" % n),
    ("pgcrypto pgp_sym_decrypt", per(pgp, sample, pgp_floor * 1.0), "sample of %d, scaled" % sample),
    ("length() scan floor", floor * 1000.0 / n, "per row, whole scan"),
]
v = rows[0][1]
print("| row | µs/row | vault_decrypt ÷ row | measured as |")
print("|---|---:|---:|---|")
for name, us, how in rows:
    ratio = v / us if us > 0 else float("nan")
    print("| %s | %.3f | %.3f× | %s |" % (name, us, ratio, how))
print()
ok = lambda met: "PASS" if met else "MISS"
if cbc == cbc:
    print("vault_decrypt vs decrypt_iv: %.2f× (target ≤ 1.0×) %s" % (v / rows[1][1], ok(v / rows[1][1] <= 1.0)))
    print("pgp_sym_decrypt vs vault_decrypt: %.0f× slower (target ≥ 300×) %s" % (rows[2][1] / v, ok(rows[2][1] / v >= 300)))
else:
    print("vault_decrypt vs pgcrypto: not measured (this PostgreSQL build has no pgcrypto)")
PY
# Where the time goes: each part's seconds, printed after its table.
took() { echo "($1: $((SECONDS - t0)) s)"; t0=$SECONDS; }
t0=0; took "build and vault"
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
if part audit; then echo; source "$ROOT/scripts/bench_audit.sh"; took audit; fi
if part ledger; then echo; source "$ROOT/scripts/bench_ledger.sh"; took ledger; fi
if part tenancy; then echo; source "$ROOT/scripts/bench_tenancy.sh"; took tenancy; fi
if part jobs; then echo; source "$ROOT/scripts/bench_jobs.sh"; took "pgseald jobs"; fi
if part erasure; then echo; source "$ROOT/scripts/bench_erasure.sh"; took erasure; fi
if part citus; then echo; source "$ROOT/scripts/bench_citus.sh"; took citus; fi
echo
echo "(make bench took $((SECONDS / 60)) min $((SECONDS % 60)) s)"
