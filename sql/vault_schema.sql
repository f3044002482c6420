-- pgseal vault: roles and the tenant key table.
-- Included by extension/src/lib.rs with extension_sql_file!(…, bootstrap), so it runs
-- before the generated function definitions. This directory holds the SQL API
-- sources; upgrade scripts, once there is a release to upgrade from, go in
-- extension/sql/ (cargo-pgrx installs only that directory).

DO $roles$
BEGIN
    -- Roles are cluster-wide and outlive the extension; create them once.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgseal_seal') THEN
        CREATE ROLE pgseal_seal NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgseal_decrypt') THEN
        CREATE ROLE pgseal_decrypt NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgseal_admin') THEN
        CREATE ROLE pgseal_admin NOLOGIN;
    END IF;
END
$roles$;

-- Whoever may decrypt may also seal and redact.
GRANT pgseal_seal TO pgseal_decrypt;

GRANT USAGE ON SCHEMA pgseal TO PUBLIC;

-- Tenant keys, stored only wrapped under a master key version (docs/FORMAT.md).
CREATE TABLE pgseal.tenant_keys (
    key_id       text        PRIMARY KEY CHECK (key_id ~ '^[A-Za-z0-9_-]{1,64}$'),
    tenant_id    text        NOT NULL CHECK (tenant_id <> ''),
    purpose      text        NOT NULL DEFAULT 'dek' CHECK (purpose IN ('dek', 'ledger')),
    state        text        NOT NULL CHECK (state IN ('active', 'retired', 'destroyed')),
    kek_version  integer     CHECK (kek_version > 0),
    wrapped      bytea       CHECK (octet_length(wrapped) = 60),
    encryptions  bigint      NOT NULL DEFAULT 0,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    retired_at   timestamptz,
    destroyed_at timestamptz,
    -- A destroyed key keeps its row (so decrypt can say "destroyed") but no key bytes.
    CHECK ((state = 'destroyed') = (wrapped IS NULL)),
    CHECK ((wrapped IS NULL) = (kek_version IS NULL))
);

COMMENT ON TABLE pgseal.tenant_keys IS
    'Tenant data and ledger keys, AES-256-GCM wrapped under a master key version. Readable by no application role.';

-- One active key per tenant and purpose: concurrent first seals converge on one.
CREATE UNIQUE INDEX tenant_keys_one_active ON pgseal.tenant_keys (tenant_id, purpose) WHERE state = 'active';
-- kek_rewrap finds keys still under an old master key version: range scans below and
-- above the active version in (kek_version, key_id) order, which stop after a batch and
-- never pass the keys already rewrapped.
CREATE INDEX tenant_keys_kek_version ON pgseal.tenant_keys (kek_version, key_id) WHERE state <> 'destroyed';

REVOKE ALL ON pgseal.tenant_keys FROM PUBLIC;

-- pg_dump must carry the keys, or a restored database could never decrypt.
SELECT pg_catalog.pg_extension_config_dump('pgseal.tenant_keys', '');
