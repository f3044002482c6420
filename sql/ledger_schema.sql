-- pgseal ledger: the per-tenant hash chain and its heads.
-- Included by extension/src/lib.rs after vault_schema.sql; the byte format is in
-- docs/FORMAT.md ("Ledger entries"). Guards, policies and the public wrappers that
-- need the extension's functions are in ledger_api.sql.

DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'pgseal_ledger') THEN
        CREATE ROLE pgseal_ledger NOLOGIN;
    END IF;
END
$roles$;

-- No CHECK constraints: only the extension writes here, it validates every field,
-- and verification checks every byte. (PostgreSQL re-reads a table's CHECK
-- expressions on every INSERT it plans, which was a third of an append's cost.)
-- `fmt` says how the hash is computed (docs/FORMAT.md, "Ledger entries"): 1 for
-- entries written before format 2 (db_role, subjects, salt and commitment NULL), 2
-- for every entry pgseal writes now (commitment NULL unless the entry is erased:
-- then payload and salt are NULL and commitment holds the payload commitment).
-- The format 2 columns come last, so a row written with the first nine columns
-- only is a format 1 row.
CREATE TABLE pgseal.ledger (
    tenant_id   text        NOT NULL,
    seq         bigint      NOT NULL,
    recorded_at timestamptz NOT NULL,
    actor       text        NOT NULL,
    event       text        NOT NULL,
    payload     jsonb,
    prev_hash   bytea       NOT NULL,
    hash        bytea       NOT NULL,
    mac         bytea       NOT NULL,
    fmt         smallint    NOT NULL DEFAULT 1,
    db_role     text,
    subjects    text[],
    salt        bytea,
    commitment  bytea,
    PRIMARY KEY (tenant_id, seq)
);

COMMENT ON TABLE pgseal.ledger IS
    'Per-tenant tamper-evident ledger: SHA-256 hash chain, HMAC-SHA256 per entry. Append with pgseal.ledger_append().';

-- One row per tenant: an entry the chain has reached (appends move the row when it
-- is 64 entries behind the last, and pruning moves it), and the anchor left by
-- pruning. Verification walks at least to it and through its (seq, hash); the
-- head appenders link to is the last entry (docs/SECURITY.md, "Sequencing").
-- No CHECK constraints, for the reason given above.
CREATE TABLE pgseal.ledger_heads (
    tenant_id   text   PRIMARY KEY,
    seq         bigint NOT NULL,
    hash        bytea  NOT NULL,
    anchor_seq  bigint NOT NULL DEFAULT 0,
    anchor_hash bytea  NOT NULL DEFAULT pg_catalog.decode(pg_catalog.repeat('00', 32), 'hex')
);

-- Every checkpoint ledger_checkpoint() signed (docs/FORMAT.md, "Checkpoints", v2),
-- as it signed it. Each names the tenant's previous one, so they form a chain:
-- unique on (tenant, prev_seq), no two can extend the same checkpoint. Written only
-- by ledger_checkpoint(); never updated or deleted (guards in ledger_api.sql).
CREATE TABLE pgseal.ledger_checkpoints (
    tenant_id   text    NOT NULL,
    seq         bigint  NOT NULL,
    hash        bytea   NOT NULL,
    signed_at   text    NOT NULL,
    key_version integer NOT NULL,
    prev_seq    bigint  NOT NULL,
    prev_hash   bytea   NOT NULL,
    signature   bytea   NOT NULL,
    PRIMARY KEY (tenant_id, seq),
    UNIQUE (tenant_id, prev_seq),
    CHECK (prev_seq >= 0 AND prev_seq < seq)
);

COMMENT ON TABLE pgseal.ledger_checkpoints IS
    'Signed ledger checkpoints, each extending the tenant''s previous one. Written by pgseal.ledger_checkpoint().';

REVOKE ALL ON pgseal.ledger, pgseal.ledger_heads, pgseal.ledger_checkpoints FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('pgseal.ledger', '');
SELECT pg_catalog.pg_extension_config_dump('pgseal.ledger_heads', '');
SELECT pg_catalog.pg_extension_config_dump('pgseal.ledger_checkpoints', '');
