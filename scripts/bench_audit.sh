#!/usr/bin/env bash
# Decrypt audit row of `make bench`. Sourced by scripts/bench.sh with the bench
# cluster running (psql_, PORT, N and the sealed table `tok` set up there).
# One client, one decrypt per transaction: the time of a decrypting transaction with
# pgseal.audit_decrypt = on (the decrypt is committed by the audit writer before the
# plaintext is returned, and the count at commit) against the same transaction with
# audit_decrypt = commit (the count at commit only). Both transactions run
# interleaved in one pgbench script, so the drift of fsync latency lands on both.
set -euo pipefail
AUDIT_SECS=${PGSEAL_BENCH_SECONDS:-10}
AW=$(mktemp -d)
cat > "$AW/pair.sql" <<SQL
\\set id random(1, $N)
BEGIN;
SET LOCAL app.tenant_id = 'bench';
SELECT length(pgseal.vault_decrypt(sealed)) AS audited_on FROM tok WHERE i = :id;
COMMIT;
BEGIN;
SET LOCAL pgseal.audit_decrypt = commit;
SET LOCAL app.tenant_id = 'bench';
SELECT length(pgseal.vault_decrypt(sealed)) AS audited_at_commit FROM tok WHERE i = :id;
COMMIT;
SQL
# Mean ms of the on-transaction (statements 2-5) and of the commit one (6-10).
audit_pair() {
    "$(bash "$ROOT/scripts/pg.sh" bindir)/pgbench" -n -h 127.0.0.1 -p "$PORT" -U postgres -M prepared -c 1 -T "$1" -r \
        -f "$AW/pair.sql" postgres 2>/dev/null \
        | awk 'f && $1 ~ /^[0-9.]+$/ { n++; if (n >= 2 && n <= 5) on += $1; if (n >= 6) cm += $1 }
               /statement latencies/ { f = 1 } END { print on, cm }'
}
audit_pair 3 >/dev/null
read -r on_ms commit_ms < <(audit_pair "$AUDIT_SECS")
started=$(psql_ -c "SELECT count(*) FROM pgseal.ledger WHERE event = 'vault.decrypt_started'")
rm -rf "$AW"
python3 - "$on_ms" "$commit_ms" "$started" <<'PY'
import sys
on, cm = map(float, sys.argv[1:3])
print("| decrypt audit figure | measured | peer | ratio | target |")
print("|---|---:|---:|---:|---|")
print("| one decrypt per transaction, 1 client, audit_decrypt = on (ms per txn) | %.3f | audit_decrypt = commit %.3f | %.2f× | ≤ 2.5× |" % (on, cm, on / cm))
print("(%s vault.decrypt_started entries written by the audit writer in this run)" % sys.argv[3])
PY
