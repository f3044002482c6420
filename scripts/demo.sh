#!/usr/bin/env bash
# The pgseal demo: a throwaway cluster on 127.0.0.1:54390 with a generated
# DEVELOPMENT-ONLY master key, two tenants, sealed tokens, a key rotation, and the
# ledger entries that the decrypts left.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=/var/tmp/pgseal-demo
PORT=${PGSEAL_DEMO_PORT:-54390}
bash "$ROOT/scripts/cluster.sh" stop "$DIR" 2>/dev/null || true

KEYFILE=$(mktemp)
trap 'rm -f "$KEYFILE"' EXIT
printf '1:%s\n' "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')" > "$KEYFILE"
echo "== A DEVELOPMENT-ONLY master key was generated into $DIR/master.keys (mode 600)."
echo "   Never use a key kept next to the data in production; see docs/SECURITY.md."
bash "$ROOT/scripts/cluster.sh" start "$DIR" "$PORT" "$KEYFILE"

psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PORT" -U postgres -d postgres "$@"; }
run() { echo; echo "-- $1"; shift; psql_ -c "$@"; }

psql_ -c "CREATE EXTENSION pgseal" -c "CREATE TABLE integrations (tenant_id text, name text, token text)"
run "vault status (versions only, never key bytes)" "SELECT * FROM pgseal.vault_status()"
psql_ <<'SQL'
BEGIN; SET LOCAL app.tenant_id = 'acme';
INSERT INTO integrations VALUES ('acme', 'shopify', pgseal.vault_seal('shpat_acme_0123456789abcdef', 'integrations.token'));
COMMIT;
BEGIN; SET LOCAL app.tenant_id = 'globex';
INSERT INTO integrations VALUES ('globex', 'xero', pgseal.vault_seal('xero_globex_fedcba9876543210', 'integrations.token'));
COMMIT;
SQL
run "what the table holds: envelopes naming their key" "SELECT tenant_id, name, token FROM integrations"
run "decrypt as tenant acme: works" "BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT name, pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE tenant_id = 'acme'; COMMIT;"
echo; echo "-- decrypt globex's token as tenant acme: refused (SQLSTATE 42501)"
psql_ -v VERBOSITY=verbose -c "BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE tenant_id = 'globex';" 2>&1 | grep -E "ERROR" || true
run "a redacted display value" "BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT name, pgseal.vault_redact(token, 4, 'integrations.token') AS shown FROM integrations WHERE tenant_id = 'acme'; COMMIT;"
run "rotate acme's data key: the old value still decrypts" "SELECT pgseal.tenant_key_rotate('acme') AS new_key_id"
run "rewrap acme's token under the new key, then decrypt" "BEGIN; SET LOCAL app.tenant_id = 'acme'; UPDATE integrations SET token = pgseal.vault_rewrap(token, 'integrations.token') WHERE tenant_id = 'acme'; SELECT name, split_part(token, ':', 2) AS key_id, pgseal.vault_decrypt(token, 'integrations.token') FROM integrations WHERE tenant_id = 'acme'; COMMIT;"
run "keys: wrapped only, one active per tenant and purpose (data key, ledger MAC key)" "SELECT key_id, tenant_id, purpose, state, kek_version, encryptions FROM pgseal.tenant_keys ORDER BY tenant_id, purpose, created_at"
run "acme's ledger: each decrypting transaction left one signed, hash-chained entry" "SELECT seq, event, actor, payload->>'count' AS decrypts, left(encode(hash, 'hex'), 16) || '…' AS hash FROM pgseal.ledger WHERE tenant_id = 'acme' ORDER BY seq"
run "verify acme's chain" "BEGIN; SET LOCAL app.tenant_id = 'acme'; SELECT * FROM pgseal.ledger_verify(); COMMIT;"
"$ROOT/target/debug/pgseald" status --database-url "postgres://postgres@127.0.0.1:$PORT/postgres" || true

cat <<EOF

The demo cluster is still running. Connect with:
    psql -h 127.0.0.1 -p $PORT -U postgres postgres
Stop it with:
    PGSEAL_PG=${PGSEAL_PG:-15} bash scripts/cluster.sh stop $DIR
EOF
