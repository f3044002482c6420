-- pgseal jobs: what pgseald orchestrates. Retention windows and legal holds, the
-- registry of sealed columns that rotation reseals, key usage, and a bounded job
-- history. The daemon calls these as a member of pgseal_admin; deletes and reseals run
-- under each tenant's own context (pgseal.set_tenant), never with BYPASSRLS.

CREATE TABLE pgseal.retention_rules (
    rel         regclass    NOT NULL,
    tenant_id   text        CHECK (tenant_id <> ''),
    keep        interval    NOT NULL CHECK (keep > interval '0'),
    time_column name        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now()
);
-- One default (tenant NULL) and one override per tenant, per table.
CREATE UNIQUE INDEX retention_rules_one ON pgseal.retention_rules (rel, (coalesce(tenant_id, '')));

CREATE TABLE pgseal.retention_holds (
    tenant_id text        PRIMARY KEY CHECK (tenant_id <> ''),
    set_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    set_by    text        NOT NULL DEFAULT session_user
);

-- Registrations point pgseald at application tables. A row of retention_rules or
-- sealed_columns may only name a plain or partitioned table outside pgseal that
-- the role writing the row may DELETE from (retention) or UPDATE (sealing): the
-- check runs as that role, in a trigger, whichever way the row is written.
CREATE FUNCTION pgseal._registration_check() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    need pg_catalog.text := TG_ARGV[0];
    kind pg_catalog."char";
    nsp  pg_catalog.name;
BEGIN
    SELECT c.relkind, n.nspname INTO kind, nsp
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) NEW.rel;
    IF kind IS NULL OR kind NOT IN ('r', 'p') THEN
        RAISE EXCEPTION 'only a plain or partitioned table can be registered' USING ERRCODE = '42809';
    END IF;
    IF nsp OPERATOR(pg_catalog.=) 'pgseal' THEN
        RAISE EXCEPTION 'pgseal''s own tables cannot be registered' USING ERRCODE = '42501';
    END IF;
    IF NOT pg_catalog.has_table_privilege(NEW.rel, need) THEN
        RAISE EXCEPTION 'permission denied: registering a table needs % on it', need USING ERRCODE = '42501';
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION pgseal.retention_set(rel regclass, keep interval, time_column name DEFAULT 'created_at', tenant text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF rel IS NULL OR keep IS NULL OR time_column IS NULL THEN
        RAISE EXCEPTION 'rel, keep and time_column must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF keep <= interval '0' THEN
        RAISE EXCEPTION 'keep must be a positive interval' USING ERRCODE = '22023';
    END IF;
    IF tenant = '' THEN
        RAISE EXCEPTION 'tenant must not be empty; NULL sets the default' USING ERRCODE = '22023';
    END IF;
    PERFORM pgseal._check_tenant_arg(tenant);
    PERFORM pgseal._check_table(rel);
    -- _column_type raises 42703 for a missing column.
    IF pgseal._column_type(rel, time_column)
       NOT IN ('timestamp with time zone', 'timestamp without time zone', 'date') THEN
        RAISE EXCEPTION 'column % of % is not a timestamp or date', time_column, rel USING ERRCODE = '42804';
    END IF;
    PERFORM pgseal._column_type(rel, 'tenant_id');
    INSERT INTO pgseal.retention_rules AS r (rel, tenant_id, keep, time_column)
    VALUES (rel, tenant, keep, time_column)
    ON CONFLICT (rel, (coalesce(tenant_id, ''))) DO UPDATE
        SET keep = excluded.keep, time_column = excluded.time_column, updated_at = now();
END
$$;

CREATE FUNCTION pgseal.retention_hold(tenant text, "on" boolean) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF tenant IS NULL OR "on" IS NULL THEN
        RAISE EXCEPTION 'tenant and on must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF tenant = '' THEN
        RAISE EXCEPTION 'tenant must not be empty' USING ERRCODE = '22023';
    END IF;
    PERFORM pgseal._check_tenant_arg(tenant);
    IF "on" THEN
        INSERT INTO pgseal.retention_holds (tenant_id) VALUES (tenant) ON CONFLICT DO NOTHING;
    ELSE
        DELETE FROM pgseal.retention_holds h WHERE h.tenant_id = tenant;
    END IF;
END
$$;

-- Every rule, with whether its tenant is on hold (a default rule's tenant is NULL).
CREATE VIEW pgseal.retention_policies AS
    SELECT r.rel, r.tenant_id, r.keep, r.time_column,
           (r.tenant_id IS NOT NULL AND EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id = r.tenant_id)) AS on_hold,
           r.updated_at
    FROM pgseal.retention_rules r;

-- Sealed columns that rotation reseals.
CREATE TABLE pgseal.sealed_columns (
    rel     regclass NOT NULL,
    col     name     NOT NULL,
    context text,
    PRIMARY KEY (rel, col)
);

CREATE FUNCTION pgseal.vault_register_column(rel regclass, col name, context text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_column
BEGIN
    IF octet_length(context) > 1024 THEN
        RAISE EXCEPTION 'context is longer than 1024 bytes' USING ERRCODE = '54000';
    END IF;
    IF pgseal._column_type(rel, col) <> 'text' THEN
        RAISE EXCEPTION 'column % of % is not text', col, rel USING ERRCODE = '42804';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid OPERATOR(pg_catalog.=) rel AND i.indisprimary) THEN
        RAISE EXCEPTION '% has no primary key; resealing needs one', rel USING ERRCODE = '42P10';
    END IF;
    INSERT INTO pgseal.sealed_columns VALUES (rel, col, context)
    ON CONFLICT (rel, col) DO UPDATE SET context = excluded.context;
END
$$;

-- How many registered values each key still seals. Scans every registered column.
CREATE FUNCTION pgseal._key_usage() RETURNS TABLE (key_id text, tenant_id text, state text, rows bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    parts text := '';
    c record;
BEGIN
    -- Only registrations that are still a plain or partitioned table with a text
    -- column: nothing else (a view, a function, a user type's operators) is read as
    -- the owner.
    FOR c IN SELECT s.rel, s.col FROM pgseal.sealed_columns s
               JOIN pg_catalog.pg_class r ON r.oid OPERATOR(pg_catalog.=) s.rel
               JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.rel
                    AND a.attname OPERATOR(pg_catalog.=) s.col AND NOT a.attisdropped
              WHERE r.relkind IN ('r', 'p') AND a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.text'::pg_catalog.regtype LOOP
        parts := parts || pg_catalog.format(' UNION ALL SELECT pg_catalog.split_part(%I, '':'', 2) AS k FROM %s WHERE %I OPERATOR(pg_catalog.~~) ''v2:%%''', c.col, c.rel, c.col);
    END LOOP;
    RETURN QUERY EXECUTE format(
        'WITH used AS (SELECT NULL::text AS k WHERE false%s)
         SELECT t.key_id, t.tenant_id, t.state, coalesce(u.n, 0)::bigint
         FROM pgseal.tenant_keys t
         LEFT JOIN (SELECT k, count(*) AS n FROM used GROUP BY k) u ON u.k = t.key_id
         WHERE t.purpose = ''dek''
         ORDER BY t.tenant_id, t.created_at', parts);
END
$$;

CREATE VIEW pgseal.key_usage AS SELECT * FROM pgseal._key_usage();

-- Job history, bounded: each insert trims the table to pgseal_job_runs_keep rows.
CREATE TABLE pgseal.job_runs (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job         text        NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    finished_at timestamptz,
    status      text        NOT NULL CHECK (status IN ('running', 'ok', 'failed')),
    detail      jsonb       NOT NULL DEFAULT '{}'
);

CREATE FUNCTION pgseal._job_runs_trim() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    DELETE FROM pgseal.job_runs WHERE id <= NEW.id - 1000;
    RETURN NULL;
END
$$;
CREATE TRIGGER job_runs_trim AFTER INSERT ON pgseal.job_runs FOR EACH ROW EXECUTE FUNCTION pgseal._job_runs_trim();

CREATE TRIGGER retention_rules_check BEFORE INSERT OR UPDATE ON pgseal.retention_rules
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check('DELETE');
CREATE TRIGGER sealed_columns_check BEFORE INSERT OR UPDATE ON pgseal.sealed_columns
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check('UPDATE');
ALTER TABLE pgseal.retention_rules ENABLE ALWAYS TRIGGER retention_rules_check;
ALTER TABLE pgseal.sealed_columns ENABLE ALWAYS TRIGGER sealed_columns_check;

-- Retention rules and legal holds are evidence: 'retention.set' / 'retention.removed'
-- (in the rule's tenant's chain; a default rule's in the tenant context's, else the
-- system chain '_pgseal') and 'retention.held' / 'retention.released' (the tenant's
-- chain), whichever way the row is written (extension/src/ledger/evidence.rs). A C
-- trigger function, executable by no role.
CREATE FUNCTION pgseal._retention_record() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'retention_record_trigger';
CREATE TRIGGER retention_rules_record AFTER INSERT OR UPDATE OR DELETE ON pgseal.retention_rules
    FOR EACH ROW EXECUTE FUNCTION pgseal._retention_record();
CREATE TRIGGER retention_holds_record AFTER INSERT OR UPDATE OR DELETE ON pgseal.retention_holds
    FOR EACH ROW EXECUTE FUNCTION pgseal._retention_record();
ALTER TABLE pgseal.retention_rules ENABLE ALWAYS TRIGGER retention_rules_record;
ALTER TABLE pgseal.retention_holds ENABLE ALWAYS TRIGGER retention_holds_record;

REVOKE ALL ON pgseal.retention_rules, pgseal.retention_holds, pgseal.sealed_columns, pgseal.job_runs FROM PUBLIC;
-- retention_set and vault_register_column run as the caller (the trigger above
-- checks what they write).
GRANT SELECT, INSERT, UPDATE ON pgseal.retention_rules, pgseal.sealed_columns TO pgseal_admin;
GRANT SELECT ON pgseal.retention_policies, pgseal.key_usage, pgseal.sealed_columns, pgseal.retention_holds TO pgseal_admin;
GRANT SELECT, INSERT, UPDATE ON pgseal.job_runs TO pgseal_admin;
SELECT pg_catalog.pg_extension_config_dump('pgseal.retention_rules', '');
SELECT pg_catalog.pg_extension_config_dump('pgseal.retention_holds', '');
SELECT pg_catalog.pg_extension_config_dump('pgseal.sealed_columns', '');

-- The distinct tenants of a table (a loose index scan over its tenant_id), for the
-- retention run's default rules. The scan runs as the owner, so that discovering
-- tenants needs no tenant context or BYPASSRLS; _tenants_scan first checks, as the
-- caller, that rel is a plain or partitioned table outside pgseal that the caller
-- owns or may DELETE from (extension/src/jobs.rs).
CREATE FUNCTION pgseal._tenants_of(rel regclass) RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$ SELECT * FROM pgseal._tenants_scan(rel::pg_catalog.oid) $$;

-- Tenants whose active data key is due for rotation: older than max_age, or past
-- 90% of pgseal.dek_max_encryptions. For pgseald's rotation job.
CREATE FUNCTION pgseal._rotation_due(max_age interval) RETURNS SETOF text
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT k.tenant_id FROM pgseal.tenant_keys k
    WHERE k.purpose = 'dek' AND k.state = 'active'
      AND (k.created_at < now() - max_age
           OR k.encryptions >= current_setting('pgseal.dek_max_encryptions')::bigint * 9 / 10)
    ORDER BY k.tenant_id
$$;
