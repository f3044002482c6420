-- pgseal jobs: what pgseald orchestrates. Retention windows and legal holds, the
-- registry of sealed columns that rotation reseals, key usage, and a bounded job
-- history. The daemon calls these as a member of pgseal_admin; deletes and reseals run
-- under each tenant's own context (pgseal.set_tenant), never with BYPASSRLS.

-- A registration names its table by OID (rel, a regclass: renames and SET SCHEMA
-- keep it) and its column by attribute number (time_attnum here, attnum in
-- sealed_columns: RENAME COLUMN keeps it). The name beside it (time_column, col) is
-- the column's current name: written by whoever registers, resolved to the number by
-- _registration_check, and renamed along with the column by
-- _registrations_follow_renames. pg_dump carries the name, and a restore (whose
-- tables have no dropped columns, so their numbers may differ) resolves it again.
-- Dropping the table or the column removes the registration
-- (_registrations_follow_drops).
CREATE TABLE pgseal.retention_rules (
    rel         regclass    NOT NULL,
    tenant_id   text        CHECK (tenant_id <> ''),
    keep        interval    NOT NULL CHECK (keep > interval '0'),
    time_column name        NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    time_attnum int2        NOT NULL
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
-- check runs as that role, in a trigger, whichever way the row is written. It then
-- sets the column's number from its name (42703 when the table has no such column):
-- the number is never taken from the writer, and a restored row, whose number may
-- be stale, gets its column's number in the restored table. Resolving the dumped
-- name is right because every rename of a column is followed by the name
-- (_registrations_follow_renames), and pg_dump leaves out a row whose name is not
-- its column's (the pg_extension_config_dump conditions below): a stale name, which
-- would resolve to another column, is never restored. During a restore
-- (pgseal.restore = on, superuser-only) a row that fails a check is skipped with a
-- WARNING (the trigger returns NULL) instead of failing the COPY, which would lose
-- every registration of every table.
CREATE FUNCTION pgseal._registration_check() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    need pg_catalog.text := TG_ARGV[0];
    kind pg_catalog."char";
    nsp  pg_catalog.name;
    col  pg_catalog.name;
    num  pg_catalog.int2;
    msg  pg_catalog.text;
    code pg_catalog.text;
BEGIN
    -- A registration never moves to another table: that would remove it from its
    -- table without the removal's check (_registration_check_delete).
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' AND OLD.rel IS DISTINCT FROM NEW.rel THEN
        RAISE EXCEPTION 'a registration cannot move to another table: remove it and register the other'
            USING ERRCODE = '0A000';
    END IF;
    SELECT c.relkind, n.nspname INTO kind, nsp
      FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
     WHERE c.oid OPERATOR(pg_catalog.=) NEW.rel;
    IF TG_RELID OPERATOR(pg_catalog.=) 'pgseal.retention_rules'::pg_catalog.regclass THEN
        col := NEW.time_column;
    ELSE
        col := NEW.col;
    END IF;
    IF kind IS NULL OR kind NOT IN ('r', 'p') THEN
        msg := 'only a plain or partitioned table can be registered';
        code := '42809';
    ELSIF nsp OPERATOR(pg_catalog.=) 'pgseal' THEN
        msg := 'pgseal''s own tables cannot be registered';
        code := '42501';
    ELSIF NOT pg_catalog.has_table_privilege(NEW.rel, need) THEN
        msg := pg_catalog.format('permission denied: registering a table needs %s on it', need);
        code := '42501';
    ELSE
        SELECT a.attnum INTO num FROM pg_catalog.pg_attribute a
         WHERE a.attrelid OPERATOR(pg_catalog.=) NEW.rel AND a.attname OPERATOR(pg_catalog.=) col
           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
        IF num IS NULL THEN
            msg := pg_catalog.format('column %s of %s does not exist', pg_catalog.quote_ident(col), NEW.rel);
            code := '42703';
        END IF;
    END IF;
    IF msg IS NOT NULL THEN
        IF TG_OP OPERATOR(pg_catalog.=) 'INSERT'
           AND pg_catalog.current_setting('pgseal.restore', true) OPERATOR(pg_catalog.=) 'on' THEN
            RAISE WARNING 'pgseal: restore skipped a registration of % (column %): %',
                NEW.rel, pg_catalog.quote_ident(col), msg;
            RETURN NULL;
        END IF;
        RAISE EXCEPTION '%', msg USING ERRCODE = code;
    END IF;
    IF TG_RELID OPERATOR(pg_catalog.=) 'pgseal.retention_rules'::pg_catalog.regclass THEN
        NEW.time_attnum := num;
    ELSE
        NEW.attnum := num;
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
-- time_column is the column's name now (NULL if it is gone), read by its number.
CREATE VIEW pgseal.retention_policies AS
    SELECT r.rel, r.tenant_id, r.keep,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) r.rel::pg_catalog.oid
               AND a.attnum OPERATOR(pg_catalog.=) r.time_attnum AND NOT a.attisdropped) AS time_column,
           (r.tenant_id IS NOT NULL AND EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id = r.tenant_id)) AS on_hold,
           r.updated_at
    FROM pgseal.retention_rules r;

-- Sealed columns that rotation reseals.
CREATE TABLE pgseal.sealed_columns (
    rel     regclass NOT NULL,
    col     name     NOT NULL,
    context text,
    attnum  int2     NOT NULL,
    PRIMARY KEY (rel, attnum)
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
    -- attnum is set from col by _registration_check.
    INSERT INTO pgseal.sealed_columns (rel, col, context) VALUES (rel, col, context)
    ON CONFLICT (rel, attnum) DO UPDATE SET col = excluded.col, context = excluded.context;
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
    pinned text[];
    uncounted boolean := false;
BEGIN
    -- Registered tables in Citus are read on the workers as the owner.
    PERFORM pgseal._citus_owner_check();
    -- Only registrations that are still a plain or partitioned table with a text
    -- column: nothing else (a view, a function, a user type's operators) is read as
    -- the owner.
    FOR c IN SELECT s.rel, s.attnum, a.attname AS col FROM pgseal.sealed_columns s
               JOIN pg_catalog.pg_class r ON r.oid OPERATOR(pg_catalog.=) s.rel
               JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) s.rel
                    AND a.attnum OPERATOR(pg_catalog.=) s.attnum AND NOT a.attisdropped
              WHERE r.relkind IN ('r', 'p') AND r.relpersistence OPERATOR(pg_catalog.<>) 't'
                AND a.atttypid OPERATOR(pg_catalog.=) 'pg_catalog.text'::pg_catalog.regtype LOOP
        -- A Citus table: each node that holds its shards counts theirs, each shard
        -- checked in that node's catalog (extension/src/jobs.rs); a row with no key
        -- when a node could not.
        IF EXISTS (SELECT 1 FROM pgseal._citus_tables() d WHERE d.rel OPERATOR(pg_catalog.=) c.rel::pg_catalog.oid) THEN
            parts := parts || pg_catalog.format(' UNION ALL SELECT x.k, x.n FROM pgseal._citus_key_counts(%s::pg_catalog.oid, %s::pg_catalog.int2) x',
                                                c.rel::pg_catalog.oid, c.attnum);
            CONTINUE;
        END IF;
        -- Planning a scan of it would run code its owner wrote, as this function's
        -- owner: not counted (docs/SECURITY.md, "Privilege boundary"), and so no
        -- key's count is known.
        IF pgseal._planning_runs_owner_code(c.rel::pg_catalog.oid) THEN
            RAISE WARNING 'pgseal: key_usage does not count %: planning a query on it would run code its owner wrote (an index, statistics, partition key or constraint expression calling a function outside the system catalogs, or a foreign table)', c.rel;
            uncounted := true;
            CONTINUE;
        END IF;
        -- The table's name, pinned to it until the transaction ends (a schema
        -- renamed meanwhile could otherwise put another relation under it), and the
        -- column's, both read after the lock, once the column is seen to be text
        -- still (one renamed or retyped meanwhile is never used by its old name).
        pinned := pgseal._pinned_name(c.rel::pg_catalog.oid, c.attnum);
        parts := parts || pg_catalog.format(' UNION ALL SELECT pg_catalog.split_part(%s, '':'', 2) AS k, 1::pg_catalog.int8 AS n FROM %s WHERE %s OPERATOR(pg_catalog.~~) ''v2:%%''',
                                            pinned[2], pinned[1], pinned[2]);
    END LOOP;
    RETURN QUERY EXECUTE format(
        'WITH used AS (SELECT NULL::text AS k, 0::pg_catalog.int8 AS n WHERE false%s),
              agg AS (SELECT k, sum(n) AS n FROM used GROUP BY k)
         SELECT t.key_id, t.tenant_id, t.state,
                CASE WHEN $1 OR EXISTS (SELECT 1 FROM agg x WHERE x.k IS NULL) THEN NULL
                     ELSE coalesce(u.n, 0) END::bigint
         FROM pgseal.tenant_keys t
         LEFT JOIN agg u ON u.k = t.key_id
         WHERE t.purpose = ''dek''
         ORDER BY t.tenant_id, t.created_at', parts) USING uncounted;
    PERFORM pgseal._citus_owner_done();
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

-- A registration is removed (retention_remove, vault_unregister_column,
-- subject_unregister, or a DELETE of its row) only by a role that could make it:
-- one allowed to DELETE from (retention, subjects) or UPDATE (sealing) its table,
-- or a member of its owner's role. A row whose table is gone goes (a DROP's event
-- trigger removes those, as the extension owner).
CREATE FUNCTION pgseal._registration_check_delete() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    owner pg_catalog.oid;
BEGIN
    SELECT c.relowner INTO owner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) OLD.rel;
    IF owner IS NOT NULL AND NOT pg_catalog.pg_has_role(owner, 'USAGE')
       AND NOT pg_catalog.has_table_privilege(OLD.rel, TG_ARGV[0]) THEN
        RAISE EXCEPTION '%', pg_catalog.format('permission denied: removing a registration of %s needs %s on it', OLD.rel, TG_ARGV[0])
            USING ERRCODE = '42501';
    END IF;
    -- Nor while an offboarding that read the table is under way: its deletes and
    -- its count of rows left go by the registrations (a superuser's removal, such
    -- as a DROP COLUMN's through the event trigger, goes).
    IF owner IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                        WHERE r.rolname OPERATOR(pg_catalog.=) CURRENT_USER AND r.rolsuper)
       AND EXISTS (SELECT 1 FROM pgseal.tenant_offboardings o
                                      WHERE o.step OPERATOR(pg_catalog.<>) 'done'
                                        AND OLD.rel OPERATOR(pg_catalog.=) ANY (o.export_tables)) THEN
        RAISE EXCEPTION '%', pg_catalog.format('a registration of %s cannot be removed while an offboarding that exported the table is under way', OLD.rel)
            USING ERRCODE = '55000';
    END IF;
    RETURN OLD;
END
$$;
CREATE TRIGGER retention_rules_check_delete BEFORE DELETE ON pgseal.retention_rules
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check_delete('DELETE');
CREATE TRIGGER sealed_columns_check_delete BEFORE DELETE ON pgseal.sealed_columns
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check_delete('UPDATE');
ALTER TABLE pgseal.retention_rules ENABLE ALWAYS TRIGGER retention_rules_check_delete;
ALTER TABLE pgseal.sealed_columns ENABLE ALWAYS TRIGGER sealed_columns_check_delete;

-- Removes rel's retention rule for tenant (NULL: its default rule); returns whether
-- there was one. Recorded as 'retention.removed'. Runs as the caller (the trigger
-- above checks the table).
CREATE FUNCTION pgseal.retention_remove(rel regclass, tenant text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'rel must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF tenant = '' THEN
        RAISE EXCEPTION 'tenant must not be empty; NULL names the default rule' USING ERRCODE = '22023';
    END IF;
    PERFORM pgseal._check_tenant_arg(tenant);
    DELETE FROM pgseal.retention_rules r
     WHERE r.rel OPERATOR(pg_catalog.=) rel AND r.tenant_id IS NOT DISTINCT FROM tenant;
    RETURN FOUND;
END
$$;

-- Removes the registration of rel's sealed column col (rotation no longer reseals
-- it); returns whether there was one. Runs as the caller (the trigger above).
CREATE FUNCTION pgseal.vault_unregister_column(rel regclass, col name) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF rel IS NULL OR col IS NULL THEN
        RAISE EXCEPTION 'rel and col must not be NULL' USING ERRCODE = '22004';
    END IF;
    DELETE FROM pgseal.sealed_columns s WHERE s.rel OPERATOR(pg_catalog.=) rel AND s.col OPERATOR(pg_catalog.=) col;
    RETURN FOUND;
END
$$;

-- Retention rules and legal holds are evidence: 'retention.set' / 'retention.removed'
-- (in the rule's tenant's chain; a default rule's in the tenant context's, else the
-- system chain '_pgseal') and 'retention.held' / 'retention.released' (the tenant's
-- chain), whichever way the row is written (extension/src/ledger/evidence.rs). A C
-- trigger function, executable by no role.
CREATE FUNCTION pgseal._retention_record() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'retention_record_trigger';
-- A rule's rows are recorded by three triggers: every INSERT but a restore's
-- (pgseal.restore, superuser-only: the dump carries the entries that recorded the
-- rules and holds it restores, and a new entry would collide with the restored
-- chains; holds likewise); every UPDATE except
-- the one that only renames time_column along with its column (same rel, tenant,
-- keep, column number and updated_at: _registrations_follow_renames; the rule
-- itself did not change); and every DELETE (retention_rules_record_delete, created
-- in finalize.sql because its condition reads vault_status()).
CREATE TRIGGER retention_rules_record AFTER INSERT ON pgseal.retention_rules
    FOR EACH ROW WHEN (pg_catalog.current_setting('pgseal.restore', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION pgseal._retention_record();
CREATE TRIGGER retention_rules_record_update AFTER UPDATE ON pgseal.retention_rules
    FOR EACH ROW
    WHEN (OLD.time_column IS NOT DISTINCT FROM NEW.time_column
          OR (OLD.rel, OLD.tenant_id, OLD.keep, OLD.time_attnum, OLD.updated_at)
             IS DISTINCT FROM (NEW.rel, NEW.tenant_id, NEW.keep, NEW.time_attnum, NEW.updated_at))
    EXECUTE FUNCTION pgseal._retention_record();
CREATE TRIGGER retention_holds_record AFTER INSERT ON pgseal.retention_holds
    FOR EACH ROW WHEN (pg_catalog.current_setting('pgseal.restore', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION pgseal._retention_record();
CREATE TRIGGER retention_holds_record_change AFTER UPDATE OR DELETE ON pgseal.retention_holds
    FOR EACH ROW EXECUTE FUNCTION pgseal._retention_record();
ALTER TABLE pgseal.retention_rules ENABLE ALWAYS TRIGGER retention_rules_record;
ALTER TABLE pgseal.retention_rules ENABLE ALWAYS TRIGGER retention_rules_record_update;
ALTER TABLE pgseal.retention_holds ENABLE ALWAYS TRIGGER retention_holds_record;
ALTER TABLE pgseal.retention_holds ENABLE ALWAYS TRIGGER retention_holds_record_change;

-- Column registrations are evidence too: they say what pgseald reseals and what
-- subject_export, subject_erase and offboarding reach, for every tenant
-- ('vault.column_registered' / 'vault.column_unregistered' here; 'subject.column_…'
-- and 'subject.anonymised_column_…' in sql/subjects.sql; extension/src/ledger/evidence.rs),
-- in the system chain '_pgseal' (a chain the caller's tenant setting chose could be
-- one no auditor reads), a removal by a DROP of a role that is not a pgseal_admin or
-- superuser in '_pgseal_open' (no such role may hold the system chain's lock). Every INSERT but a restore's; every
-- UPDATE that changes the registration (not a rename of its column, which
-- _registrations_follow_renames follows); every DELETE (the DELETE triggers are in
-- finalize.sql: their condition reads vault_status()). A C trigger function,
-- executable by no role.
CREATE FUNCTION pgseal._registration_record() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'registration_record_trigger';
CREATE TRIGGER sealed_columns_record AFTER INSERT ON pgseal.sealed_columns
    FOR EACH ROW WHEN (pg_catalog.current_setting('pgseal.restore', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION pgseal._registration_record();
CREATE TRIGGER sealed_columns_record_update AFTER UPDATE ON pgseal.sealed_columns
    FOR EACH ROW WHEN ((OLD.rel, OLD.attnum, OLD.context) IS DISTINCT FROM (NEW.rel, NEW.attnum, NEW.context))
    EXECUTE FUNCTION pgseal._registration_record();
ALTER TABLE pgseal.sealed_columns ENABLE ALWAYS TRIGGER sealed_columns_record;
ALTER TABLE pgseal.sealed_columns ENABLE ALWAYS TRIGGER sealed_columns_record_update;

REVOKE ALL ON pgseal.retention_rules, pgseal.retention_holds, pgseal.sealed_columns, pgseal.job_runs FROM PUBLIC;
-- retention_set and vault_register_column run as the caller (the trigger above
-- checks what they write).
GRANT SELECT, INSERT, UPDATE, DELETE ON pgseal.retention_rules, pgseal.sealed_columns TO pgseal_admin;
GRANT SELECT ON pgseal.retention_policies, pgseal.key_usage, pgseal.sealed_columns, pgseal.retention_holds TO pgseal_admin;
GRANT SELECT, INSERT, UPDATE ON pgseal.job_runs TO pgseal_admin;
-- pg_dump copies a registration only while its table exists and its stored name is
-- its column's (pg_dump runs "COPY (SELECT ... FROM ONLY <table> <condition>)" with
-- an empty search_path): a rule dropped while event triggers were off, or a name a
-- rename could not sync, would fail the restore's COPY or resolve to another column.
SELECT pg_catalog.pg_extension_config_dump('pgseal.retention_rules',
    'WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) retention_rules.rel::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.=) retention_rules.time_attnum AND a.attname OPERATOR(pg_catalog.=) retention_rules.time_column AND NOT a.attisdropped)');
SELECT pg_catalog.pg_extension_config_dump('pgseal.retention_holds', '');
SELECT pg_catalog.pg_extension_config_dump('pgseal.sealed_columns',
    'WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) sealed_columns.rel::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.=) sealed_columns.attnum AND a.attname OPERATOR(pg_catalog.=) sealed_columns.col AND NOT a.attisdropped)');

-- Registrations follow the schema (issue 17). These event triggers fire for every
-- role's DDL and run as the extension's owner (only the owner deletes registrations,
-- and a rename must reach registrations the renaming role cannot write), so they
-- resolve nothing by a name anyone chose: they match the OIDs and column numbers
-- PostgreSQL reports against the registrations and run no other role's code
-- (pinned search_path, schema-qualified operators).
--
-- _registrations_follow_drops (sql_drop): a DROP of a registered table (DROP TABLE,
-- DROP SCHEMA/OWNED ... CASCADE, DROP of a partitioned parent) or of a registered
-- column (ALTER TABLE ... DROP COLUMN, a CASCADE from a type) deletes its retention
-- rules and column registrations, each named in a NOTICE, and takes a
-- dropped table out of the tables an offboarding's export read. A deletion
-- is recorded like any other ('retention.removed', retention_rules_record_delete;
-- 'vault.column_unregistered' and 'subject.…_unregistered', the registries'
-- *_record_delete; the entry names the table by OID, its name being gone): a
-- tenant's rule in that tenant's chain, a default rule and a column registration in
-- the system chain '_pgseal', or '_pgseal_open' when the dropping role is not a
-- pgseal_admin or superuser (for a rule, the C trigger sees in the catalog that the
-- table or column is gone; the dropping session's tenant setting chooses nothing). Without
-- the master key no entry can be written: the row is deleted all the same (a
-- dropped table cannot be sealed, swept or erased) and a WARNING, which goes to the
-- server log, names it instead. Any other error fails the
-- DROP: no handler keeps a registration of a dropped table, which pgseald would skip
-- but which a later restore could not load. The errors left are the transaction's
-- own (a lock or statement timeout on the chain, a serialization failure), after
-- which the DROP can simply be retried.
CREATE FUNCTION pgseal._registrations_follow_drops() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    r        record;
    loaded   pg_catalog.bool;
    registry pg_catalog.text;
    dropped  pg_catalog.oid[];
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
                WHERE d.object_type OPERATOR(pg_catalog.=) 'extension'
                  AND d.object_identity OPERATOR(pg_catalog.=) 'pgseal') THEN
        RETURN;
    END IF;
    -- A dropped table leaves the tables a running offboarding's export read: its OID
    -- could name another table later (after a restore, or when OIDs wrap around).
    SELECT pg_catalog.array_agg(d.objid) INTO dropped FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.objsubid OPERATOR(pg_catalog.=) 0 AND NOT d.is_temporary;
    IF dropped IS NOT NULL THEN
        UPDATE pgseal.tenant_offboardings o
           SET export_tables = ARRAY(SELECT t FROM pg_catalog.unnest(o.export_tables) t
                                      WHERE NOT t::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (dropped))
         WHERE o.step OPERATOR(pg_catalog.<>) 'done'
           AND o.export_tables::pg_catalog.oid[] OPERATOR(pg_catalog.&&) dropped;
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND (EXISTS (SELECT 1 FROM pgseal.retention_rules x
                         WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid)
                OR EXISTS (SELECT 1 FROM pgseal.sealed_columns x
                            WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid)
                OR EXISTS (SELECT 1 FROM pgseal.subject_columns x
                            WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid)
                OR EXISTS (SELECT 1 FROM pgseal.subject_anonymised_columns x
                            WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) d.objid))) THEN
        RETURN;
    END IF;
    loaded := pgseal._master_key_loaded();
    FOR r IN
        DELETE FROM pgseal.retention_rules x
         USING pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
           AND d.objid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
           AND (d.objsubid OPERATOR(pg_catalog.=) 0 OR d.objsubid OPERATOR(pg_catalog.=) x.time_attnum)
        RETURNING x.rel::pg_catalog.oid AS relid, d.object_identity AS what, x.tenant_id AS tenant
    LOOP
        IF loaded THEN
            RAISE NOTICE 'pgseal: removed the retention rule (%) of % (OID %): it was dropped',
                coalesce('tenant ' OPERATOR(pg_catalog.||) pg_catalog.quote_literal(r.tenant), 'default rule'), r.what, r.relid;
        ELSE
            RAISE WARNING 'pgseal: removed the retention rule (%) of % (OID %): it was dropped; not recorded in the ledger, the master key is not loaded',
                coalesce('tenant ' OPERATOR(pg_catalog.||) pg_catalog.quote_literal(r.tenant), 'default rule'), r.what, r.relid;
        END IF;
    END LOOP;
    -- The column registries have one shape (rel, col, attnum).
    FOREACH registry IN ARRAY ARRAY['sealed_columns', 'subject_columns', 'subject_anonymised_columns'] LOOP
        FOR r IN EXECUTE pg_catalog.format($q$
            DELETE FROM pgseal.%I x
             USING pg_catalog.pg_event_trigger_dropped_objects() d
             WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
               AND d.objid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
               AND (d.objsubid OPERATOR(pg_catalog.=) 0 OR d.objsubid OPERATOR(pg_catalog.=) x.attnum)
            RETURNING x.rel::pg_catalog.oid AS relid, d.object_identity AS what, x.col AS col $q$, registry)
        LOOP
            IF loaded THEN
                RAISE NOTICE 'pgseal: removed the % column registration of % (OID %, column %): it was dropped',
                    pg_catalog.split_part(registry, '_', 1), r.what, r.relid, pg_catalog.quote_ident(r.col);
            ELSE
                RAISE WARNING 'pgseal: removed the % column registration of % (OID %, column %): it was dropped; not recorded in the ledger, the master key is not loaded',
                    pg_catalog.split_part(registry, '_', 1), r.what, r.relid, pg_catalog.quote_ident(r.col);
            END IF;
        END LOOP;
    END LOOP;
END
$$;

-- _registrations_follow_renames (ddl_command_end): the stored name of a registered
-- column follows a RENAME COLUMN (the number already does), so that pg_dump carries
-- the current name and a restore resolves it to the same column. It fires for every
-- tag a column rename takes (the tag names the relation kind the command was
-- written for, not the table's: ALTER VIEW / MATERIALIZED VIEW / FOREIGN TABLE ...
-- RENAME COLUMN rename a plain table's column too; ALTER TYPE ... RENAME ATTRIBUTE),
-- and syncs only the registrations of the relations the command altered
-- (pg_event_trigger_ddl_commands), of their inheritors (a rename recurses to
-- them) and of the tables typed by an altered composite type. It never waits on a registration row: one locked by another transaction
-- is skipped (SKIP LOCKED) with a WARNING and synced by the next DDL on its table;
-- until then pg_dump leaves it out (its name is not its column's). Not recorded:
-- the rule is unchanged. Event triggers do not fire while event_triggers is off
-- (PostgreSQL 17+, superuser) or in single-user mode; a rename made then leaves the
-- name stale, and the dump leaves that registration out likewise.
CREATE FUNCTION pgseal._registrations_follow_renames() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    r        record;
    rels     pg_catalog.oid[];
    want     pg_catalog.int8;
    done     pg_catalog.int8;
    registry pg_catalog.text;
BEGIN
    -- A registered table is touched when the command altered it, an ancestor (a
    -- rename recurses to inheritors and partitions) or its row type (ALTER TYPE ...
    -- RENAME ATTRIBUTE ... CASCADE renames a typed table's column). Walked up from
    -- the few registered tables, not down from the command's.
    WITH RECURSIVE cmd(objid) AS (
        SELECT d.objid FROM pg_catalog.pg_event_trigger_ddl_commands() d
         WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
    ), up(reg, relid) AS (
        SELECT x.rel::pg_catalog.oid, x.rel::pg_catalog.oid FROM pgseal.retention_rules x
        UNION
        SELECT x.rel::pg_catalog.oid, x.rel::pg_catalog.oid FROM pgseal.sealed_columns x
        UNION
        SELECT x.rel::pg_catalog.oid, x.rel::pg_catalog.oid FROM pgseal.subject_columns x
        UNION
        SELECT x.rel::pg_catalog.oid, x.rel::pg_catalog.oid FROM pgseal.subject_anonymised_columns x
        UNION
        SELECT u.reg, i.inhparent FROM up u
          JOIN pg_catalog.pg_inherits i ON i.inhrelid OPERATOR(pg_catalog.=) u.relid
    )
    SELECT pg_catalog.array_agg(DISTINCT u.reg) INTO rels FROM up u
     WHERE EXISTS (SELECT 1 FROM cmd WHERE cmd.objid OPERATOR(pg_catalog.=) u.relid)
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                     JOIN pg_catalog.pg_type t ON t.oid OPERATOR(pg_catalog.=) c.reloftype
                     JOIN cmd ON cmd.objid OPERATOR(pg_catalog.=) t.typrelid
                    WHERE c.oid OPERATOR(pg_catalog.=) u.relid);
    IF rels IS NULL THEN
        RETURN;
    END IF;
    SELECT pg_catalog.count(*) INTO want
      FROM pgseal.retention_rules x
      JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
           AND a.attnum OPERATOR(pg_catalog.=) x.time_attnum AND NOT a.attisdropped
     WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (rels)
       AND a.attname OPERATOR(pg_catalog.<>) x.time_column;
    done := 0;
    FOR r IN
        SELECT x.ctid AS row_ctid, a.attname AS name
          FROM pgseal.retention_rules x
          JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
               AND a.attnum OPERATOR(pg_catalog.=) x.time_attnum AND NOT a.attisdropped
         WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) ANY (rels)
           AND a.attname OPERATOR(pg_catalog.<>) x.time_column
           FOR UPDATE OF x SKIP LOCKED
    LOOP
        UPDATE pgseal.retention_rules x SET time_column = r.name WHERE x.ctid OPERATOR(pg_catalog.=) r.row_ctid;
        done := done OPERATOR(pg_catalog.+) 1;
    END LOOP;
    IF done OPERATOR(pg_catalog.<) want THEN
        RAISE WARNING 'pgseal: % retention rule(s) of a renamed column keep the old name: another transaction holds them',
            want OPERATOR(pg_catalog.-) done
            USING HINT = 'pgseal follows the column by its number; the name is synced by the next DDL on the table, and pg_dump leaves the rule out until then.';
    END IF;
    -- The column registries have one shape (rel, col, attnum).
    FOREACH registry IN ARRAY ARRAY['sealed_columns', 'subject_columns', 'subject_anonymised_columns'] LOOP
        EXECUTE pg_catalog.format($q$
            SELECT pg_catalog.count(*)
              FROM pgseal.%I x
              JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
                   AND a.attnum OPERATOR(pg_catalog.=) x.attnum AND NOT a.attisdropped
             WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1)
               AND a.attname OPERATOR(pg_catalog.<>) x.col $q$, registry) INTO want USING rels;
        done := 0;
        FOR r IN EXECUTE pg_catalog.format($q$
            SELECT x.ctid AS row_ctid, a.attname AS name
              FROM pgseal.%I x
              JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
                   AND a.attnum OPERATOR(pg_catalog.=) x.attnum AND NOT a.attisdropped
             WHERE x.rel::pg_catalog.oid OPERATOR(pg_catalog.=) ANY ($1)
               AND a.attname OPERATOR(pg_catalog.<>) x.col
               FOR UPDATE OF x SKIP LOCKED $q$, registry) USING rels
        LOOP
            EXECUTE pg_catalog.format('UPDATE pgseal.%I x SET col = $1 WHERE x.ctid OPERATOR(pg_catalog.=) $2', registry)
                USING r.name, r.row_ctid;
            done := done OPERATOR(pg_catalog.+) 1;
        END LOOP;
        IF done OPERATOR(pg_catalog.<) want THEN
            RAISE WARNING 'pgseal: % % column registration(s) of a renamed column keep the old name: another transaction holds them',
                want OPERATOR(pg_catalog.-) done, pg_catalog.split_part(registry, '_', 1)
                USING HINT = 'pgseal follows the column by its number; the name is synced by the next DDL on the table, and pg_dump leaves the registration out until then.';
        END IF;
    END LOOP;
END
$$;

CREATE EVENT TRIGGER pgseal_registrations_drop ON sql_drop EXECUTE FUNCTION pgseal._registrations_follow_drops();
CREATE EVENT TRIGGER pgseal_registrations_rename ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER VIEW', 'ALTER MATERIALIZED VIEW', 'ALTER FOREIGN TABLE', 'ALTER TYPE')
    EXECUTE FUNCTION pgseal._registrations_follow_renames();
ALTER EVENT TRIGGER pgseal_registrations_drop ENABLE ALWAYS;
ALTER EVENT TRIGGER pgseal_registrations_rename ENABLE ALWAYS;

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
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    -- First, on this node: the key table may be in Citus, and the query below is
    -- then sent to another node as the owner.
    PERFORM pgseal._citus_owner_check();
    RETURN QUERY
    SELECT k.tenant_id FROM pgseal.tenant_keys k
    WHERE k.purpose = 'dek' AND k.state = 'active'
      AND (k.created_at < now() - max_age
           OR k.encryptions >= current_setting('pgseal.dek_max_encryptions')::bigint * 9 / 10)
    ORDER BY k.tenant_id;
    PERFORM pgseal._citus_owner_done();
END
$$;
