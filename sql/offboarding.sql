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
-- table, committed with each batch. Written only by pgseal's functions (as the
-- extension owner); pgseal_admin reads it.
CREATE TABLE pgseal.tenant_offboardings (
    tenant_id    text        PRIMARY KEY CHECK (tenant_id <> ''),
    requested_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    due_at       timestamptz NOT NULL,
    requested_by text        NOT NULL DEFAULT session_user,
    step         text        NOT NULL DEFAULT 'scheduled'
                 CHECK (step IN ('scheduled', 'exported', 'deleted', 'shredded', 'erased', 'receipted', 'done')),
    step_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    export_file  text,
    deleted      jsonb       NOT NULL DEFAULT '{}'
);

COMMENT ON TABLE pgseal.tenant_offboardings IS
    'Tenants being offboarded and the last step done (pgseal.tenant_offboard(); pgseald carries the steps out).';

REVOKE ALL ON pgseal.tenant_offboardings FROM PUBLIC;
GRANT SELECT ON pgseal.tenant_offboardings TO pgseal_admin;
SELECT pg_catalog.pg_extension_config_dump('pgseal.tenant_offboardings', '');

-- The tables whose rows an offboarding deletes: plain or partitioned, permanent
-- tables outside pgseal with a text tenant_id column that are registered
-- (subject_register, vault_register_column, retention_set) or protected by pgseal's
-- policies (tenant_protect, org_protect); a partition only through its root.
CREATE FUNCTION pgseal._offboard_tables() RETURNS SETOF regclass
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT c.oid::pg_catalog.regclass
      FROM pg_catalog.pg_class c
      JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.relkind IN ('r', 'p') AND c.relpersistence OPERATOR(pg_catalog.<>) 't' AND NOT c.relispartition
       AND n.nspname NOT IN ('pgseal', 'pg_catalog', 'information_schema')
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attname OPERATOR(pg_catalog.=) 'tenant_id'
                      AND NOT a.attisdropped
                      AND a.atttypid IN ('pg_catalog.text'::pg_catalog.regtype, 'pg_catalog.varchar'::pg_catalog.regtype))
       AND (EXISTS (SELECT 1 FROM pgseal.subject_columns x WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) c.oid)
            OR EXISTS (SELECT 1 FROM pgseal.sealed_columns x WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) c.oid)
            OR EXISTS (SELECT 1 FROM pgseal.retention_rules x WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) c.oid)
            OR EXISTS (SELECT 1 FROM pg_catalog.pg_policy p
                        WHERE p.polrelid OPERATOR(pg_catalog.=) c.oid
                          AND pg_catalog.starts_with(p.polname::pg_catalog.text, 'pgseal_')))
     ORDER BY n.nspname, c.relname
$$;
