-- pgseal tenant offboarding (issue 19): the end of a tenant, scheduled by
-- pgseal.tenant_offboard() and carried out by pgseald after the grace period
-- (extension/src/offboard.rs, daemon/src/job/offboarding.rs). Included after
-- subjects.sql.

-- One row per tenant being offboarded. `step` is the last step done, in order:
-- scheduled → exported (the export file written) → deleted (the tenant's rows in
-- every protected or registered table) → shredded (its data keys) → erased (its
-- ledger payloads) → receipted ('tenant.offboarded') → done (a signed checkpoint of
-- the final chain). pgseald resumes a tenant from its step after any crash; every
-- step is idempotent up to its own commit. `deleted` counts the rows deleted per
-- table, committed with each batch. `export_tables` are the tables the export read
-- and every table under them, `export_rows` the table rows it held, `export_xact`
-- its transaction (set by the export, in that transaction, which must also record
-- the step). The deletes take only rows the export held, as it read them
-- (pgseal.offboard_export_rows). Rows left beyond those send the offboarding back
-- to exporting while nothing is deleted, and stop it (55000) once rows were deleted
-- or `past_export` (set when it first passed deleting).
-- export_tables is cleared at 'done'. Written only by pgseal's functions (as the
-- extension owner); pgseal_admin reads it.
CREATE TABLE pgseal.tenant_offboardings (
    tenant_id    text        PRIMARY KEY CHECK (tenant_id <> ''),
    requested_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    due_at       timestamptz NOT NULL,
    requested_by text        NOT NULL DEFAULT session_user,
    -- The role that scheduled it (current_user of tenant_offboard): the exports
    -- and deletes need its SELECT and DELETE on each table, as well as pgseald's.
    scheduled_by regrole     NOT NULL,
    step         text        NOT NULL DEFAULT 'scheduled'
                 CHECK (step IN ('scheduled', 'exported', 'deleted', 'shredded', 'erased', 'receipted', 'done')),
    step_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    export_file  text,
    export_sha256 text       CHECK (export_sha256 ~ '^[0-9a-f]{64}$'),
    deleted      jsonb       NOT NULL DEFAULT '{}',
    export_tables regclass[],
    export_rows  int8,
    export_xact  xid8,
    past_export  boolean     NOT NULL DEFAULT false,
    -- The seqs of the entries of the audit chain _pgseal_audit recording the
    -- tenant's decrypts whose payloads the erase step erased (listed in the
    -- receipt; a hold on the tenant keeps them from ledger_prune).
    audit_erased int8[]      NOT NULL DEFAULT '{}'
);

COMMENT ON TABLE pgseal.tenant_offboardings IS
    'Tenants being offboarded and the last step done (pgseal.tenant_offboard(); pgseald carries the steps out).';

REVOKE ALL ON pgseal.tenant_offboardings FROM PUBLIC;
GRANT SELECT ON pgseal.tenant_offboardings TO pgseal_admin;
SELECT pg_catalog.pg_extension_config_dump('pgseal.tenant_offboardings', '');

-- The first entry of a chain that a retention hold keeps, or NULL when a hold
-- keeps none: a held tenant's whole chain; in the audit writer's chain
-- _pgseal_audit, the first record of a held tenant's decrypt (its payload names
-- the tenant, or the tenant's offboarding erased it and lists it in audit_erased
-- above). ledger_prune refuses to prune past it and pgseald's ledger pruning
-- stops before it: the one statement of what a hold keeps in the ledger. Runs as
-- the caller (pgseal_admin reads these tables).
CREATE FUNCTION pgseal._ledger_held_from(chain text) RETURNS bigint
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT CASE
        WHEN EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id = chain)
            THEN (SELECT min(l.seq) FROM pgseal.ledger l WHERE l.tenant_id = chain)
        WHEN chain = '_pgseal_audit'
            THEN LEAST(
                (SELECT min(l.seq) FROM pgseal.ledger l
                   JOIN pgseal.retention_holds h ON h.tenant_id = l.payload ->> 'tenant'
                  WHERE l.tenant_id = chain),
                (SELECT min(l.seq) FROM pgseal.retention_holds h
                   JOIN pgseal.tenant_offboardings o ON o.tenant_id = h.tenant_id
                   CROSS JOIN LATERAL unnest(o.audit_erased) AS e(seq)
                   JOIN pgseal.ledger l ON l.tenant_id = chain AND l.seq = e.seq))
    END
$$;

-- The rows a tenant's export held, as it read them: per chunk of a table's cursor,
-- `keys` holds each row's table, place and inserting transaction (14 bytes, as
-- pgseal._offboard_row_key packs them),
-- `root` the registered table it was read through and `horizon` the first
-- transaction the table's cursor could not see (its snapshot's xmax, read once it
-- was open): a row inserted at or after it was not exported, whatever its key. Written by the export in its transaction; each batch of the deletes
-- takes (removes) the keys it deletes by, and deletes a row only while it is still
-- the version exported (same place, same inserting transaction): a row updated,
-- replaced or written since never matches (extension/src/offboard/exported.rs).
-- Not dumped: after a restore nothing is recorded, and the offboarding exports
-- again or stops rather than delete unexported.
CREATE TABLE pgseal.offboard_export_rows (
    tenant_id text NOT NULL,
    chunk     int4 NOT NULL,
    root      oid  NOT NULL,
    keys      bytea[] NOT NULL,
    horizon   xid8 NOT NULL,
    PRIMARY KEY (tenant_id, chunk)
);
REVOKE ALL ON pgseal.offboard_export_rows FROM PUBLIC;

-- The lines of a tenant's export (pgseald's export step). A C function of pgseal's
-- library in materialize mode, so that the whole export runs in one call
-- (extension/src/offboard.rs says why): declared here, under the name pgrx gave it
-- when it was one of its set-returning functions, so that 0.2.0 installs and
-- upgrades declare it alike.
CREATE FUNCTION pgseal."_offboard_export"("tenant" text) RETURNS SETOF text
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_offboard_export_wrapper';
