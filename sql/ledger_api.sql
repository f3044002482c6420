-- pgseal ledger: the public SQL API over the extension's internal functions, the
-- append-only guards, and row-level security. Included after ledger_schema.sql and
-- the functions it names; privileges are granted in finalize.sql.

-- Written in Rust (extension/src/pg/ledger_append_fn.rs); declared here because it
-- returns its row in materialize mode, which pgrx's function declarations do not.
-- `subjects` names the data subjects the entry concerns (pseudonymous ids: they
-- are hashed into the entry and never erased); subject_erase() erases the payloads
-- of the entries that name a subject.
CREATE FUNCTION pgseal.ledger_append(event text, payload jsonb DEFAULT '{}', actor text DEFAULT NULL, subjects text[] DEFAULT NULL)
RETURNS TABLE (seq bigint, hash text)
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'ledger_append_srf';

COMMENT ON FUNCTION pgseal.ledger_append(text, jsonb, text, text[]) IS
    'Appends an entry to the current tenant''s ledger, naming the data subjects it concerns; returns its seq and hash (hex).';

-- One JSON object per entry with every field needed to verify it offline
-- (docs/FORMAT.md, "Export lines"). Runs as the caller: row-level security limits
-- pgseal_ledger to its own tenant, and _ledger_tenant() refuses others.
CREATE FUNCTION pgseal.ledger_export(tenant text DEFAULT NULL, from_seq bigint DEFAULT NULL, to_seq bigint DEFAULT NULL)
RETURNS SETOF jsonb
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    -- Checked before any row is read, so a refused tenant is an error, not an empty result.
    t text := pgseal._ledger_tenant(tenant);
BEGIN
    RETURN QUERY
    -- Every line has `fmt`; the format 2 fields appear when stored (not NULL), so
    -- a format 1 row has none and an unerased format 2 row has no commitment.
    SELECT pg_catalog.jsonb_build_object(
               'fmt', l.fmt,
               'tenant_id', l.tenant_id,
               'seq', l.seq,
               'recorded_at', pg_catalog.to_char(l.recorded_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'recorded_at_us', (EXTRACT(epoch FROM l.recorded_at) * 1000000)::bigint,
               'actor', l.actor,
               'event', l.event,
               'payload', l.payload,
               'prev_hash', pg_catalog.encode(l.prev_hash, 'hex'),
               'hash', pg_catalog.encode(l.hash, 'hex'),
               'mac', pg_catalog.encode(l.mac, 'hex'))
           OPERATOR(pg_catalog.||) pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
               'db_role', l.db_role,
               'subjects', pg_catalog.to_jsonb(l.subjects),
               'salt', pg_catalog.encode(l.salt, 'hex'),
               'commitment', pg_catalog.encode(l.commitment, 'hex')))
    FROM pgseal.ledger AS l
    WHERE l.tenant_id = t
      AND l.seq BETWEEN coalesce(from_seq, 1) AND coalesce(to_seq, 9223372036854775807)
    ORDER BY l.seq;
END
$$;

-- Append-only: UPDATE, DELETE and TRUNCATE fail with 42501, except the deletes
-- ledger_prune() makes (TRUNCATE of the heads and the checkpoints too). ENABLE
-- ALWAYS keeps the guard on under session_replication_role = replica.
CREATE FUNCTION pgseal._ledger_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' AND pgseal._ledger_pruning() THEN
        RETURN OLD;
    END IF;
    -- An erasure (subject_erase, extension/src/ledger/erase.rs) replaces a format 2
    -- entry's payload and salt by their commitment and changes nothing else.
    IF TG_OP = 'UPDATE' AND pgseal._ledger_erasing() THEN
        IF OLD.fmt = 2 AND OLD.salt IS NOT NULL AND OLD.commitment IS NULL
           AND NEW.payload IS NULL AND NEW.salt IS NULL AND pg_catalog.length(NEW.commitment) = 32
           AND (NEW.tenant_id, NEW.seq, NEW.recorded_at, NEW.actor, NEW.event, NEW.prev_hash,
                NEW.hash, NEW.mac, NEW.fmt, NEW.db_role, NEW.subjects)
               IS NOT DISTINCT FROM
               (OLD.tenant_id, OLD.seq, OLD.recorded_at, OLD.actor, OLD.event, OLD.prev_hash,
                OLD.hash, OLD.mac, OLD.fmt, OLD.db_role, OLD.subjects) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'pgseal.ledger is append-only: % is not allowed', TG_OP
        USING ERRCODE = '42501', HINT = 'Entries are removed only by pgseal.ledger_prune(), and payloads erased only by pgseal.subject_erase().';
END
$$;

CREATE TRIGGER pgseal_ledger_guard BEFORE UPDATE OR DELETE ON pgseal.ledger
    FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_guard();
CREATE TRIGGER pgseal_ledger_truncate_guard BEFORE TRUNCATE ON pgseal.ledger
    FOR EACH STATEMENT EXECUTE FUNCTION pgseal._ledger_guard();
CREATE TRIGGER pgseal_heads_truncate_guard BEFORE TRUNCATE ON pgseal.ledger_heads
    FOR EACH STATEMENT EXECUTE FUNCTION pgseal._ledger_guard();
CREATE TRIGGER pgseal_checkpoints_truncate_guard BEFORE TRUNCATE ON pgseal.ledger_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION pgseal._ledger_guard();
ALTER TABLE pgseal.ledger ENABLE ALWAYS TRIGGER pgseal_ledger_guard;
ALTER TABLE pgseal.ledger ENABLE ALWAYS TRIGGER pgseal_ledger_truncate_guard;
ALTER TABLE pgseal.ledger_heads ENABLE ALWAYS TRIGGER pgseal_heads_truncate_guard;
ALTER TABLE pgseal.ledger_checkpoints ENABLE ALWAYS TRIGGER pgseal_checkpoints_truncate_guard;

-- Row writes other than pgseal's own, refused with 42501 for everyone, superusers
-- included (extension/src/ledger/guard.rs): INSERT into the ledger outside
-- pgseal's append path; any write of a heads row outside the ledger functions,
-- and a change of its anchor outside ledger_prune(); any write of a checkpoint
-- outside ledger_checkpoint(). A C function: it runs for every appended row, and
-- the direct single-entry write performs its check itself instead of firing it.
CREATE FUNCTION pgseal._ledger_write_guard() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'ledger_write_guard';

CREATE TRIGGER pgseal_ledger_write_guard BEFORE INSERT ON pgseal.ledger
    FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_write_guard('ledger');
CREATE TRIGGER pgseal_heads_write_guard BEFORE INSERT OR UPDATE OR DELETE ON pgseal.ledger_heads
    FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_write_guard('heads');
CREATE TRIGGER pgseal_checkpoints_write_guard BEFORE INSERT OR UPDATE OR DELETE ON pgseal.ledger_checkpoints
    FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_write_guard('checkpoints');
ALTER TABLE pgseal.ledger ENABLE ALWAYS TRIGGER pgseal_ledger_write_guard;
ALTER TABLE pgseal.ledger_heads ENABLE ALWAYS TRIGGER pgseal_heads_write_guard;
ALTER TABLE pgseal.ledger_checkpoints ENABLE ALWAYS TRIGGER pgseal_checkpoints_write_guard;

-- Tenants read their own entries; pgseal_admin reads every tenant's.
ALTER TABLE pgseal.ledger ENABLE ROW LEVEL SECURITY;
CREATE POLICY ledger_own_tenant ON pgseal.ledger FOR SELECT TO pgseal_ledger
    USING (tenant_id = (SELECT pgseal.current_tenant()));
CREATE POLICY ledger_admin ON pgseal.ledger FOR SELECT TO pgseal_admin
    USING (true);

-- Row-change audit (extension/src/ledger/audit_trigger.rs). Not SECURITY DEFINER:
-- it builds the row images as the role that changed the row, and only the
-- finished entry is appended as the owner. The trigger arguments are the primary
-- key columns and the tenant column ('' when the table has none).
CREATE FUNCTION pgseal._audit_row() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'audit_row_trigger';

-- TRUNCATE fires no row trigger: ledger_audit adds this statement trigger, which
-- records 'audit.truncated' (the table's name) in the chain of the tenant context,
-- else pgseal's open chain '_pgseal_open'. It reads nothing from the table.
CREATE FUNCTION pgseal._audit_truncate() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'audit_truncate_trigger';

-- pgseald's receipts ('retention.deleted'): appended to the current tenant's chain
-- through this narrow entry point, since ledger_append refuses pgseal's reserved
-- event names. It accepts only pgseald's job events; granted to pgseal_admin.
CREATE FUNCTION pgseal._job_receipt(event text, payload jsonb) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'job_receipt_fn';

CREATE FUNCTION pgseal.ledger_audit(rel regclass, events text[] DEFAULT '{INSERT,UPDATE,DELETE}')
RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    ev   text[];
    bad  text;
    pk   text[];
    tcol text;
    part regclass;
    on_workers boolean;
BEGIN
    -- 22004 NULL, 42P01 no such relation, 42809 not a table (sql/tenancy.sql).
    PERFORM pgseal._check_table(rel);
    IF rel IN ('pgseal.ledger'::regclass, 'pgseal.ledger_heads'::regclass, 'pgseal.ledger_checkpoints'::regclass) THEN
        RAISE EXCEPTION 'the ledger cannot audit itself' USING ERRCODE = '22023';
    END IF;
    -- On Citus the ledger is kept on the coordinator (docs/SCALING.md): the trigger
    -- on a table whose rows Citus keeps on the workers (distributed by any method,
    -- single-shard or schema-sharded, or a reference table: all but a Citus local
    -- table) would fire there, where every append is refused, and fail every write.
    IF pgseal._citus_present() THEN
        EXECUTE $q$
            SELECT pg_catalog.count(*) OPERATOR(pg_catalog.>) 0 FROM pg_catalog.pg_dist_partition p
            WHERE p.logicalrelid OPERATOR(pg_catalog.=) $1
              AND (p.partmethod OPERATOR(pg_catalog.<>) 'n' OR p.repmodel OPERATOR(pg_catalog.=) 't'
                   OR p.colocationid OPERATOR(pg_catalog.<>) 0) $q$
            INTO on_workers USING rel;
        IF on_workers THEN
            RAISE EXCEPTION '% is a Citus table whose rows are kept on the workers, and pgseal''s ledger is on the coordinator', rel
                USING ERRCODE = '0A000',
                      HINT = 'Record its changes with pgseal.ledger_append() in the transactions that make them (docs/SCALING.md).';
        END IF;
    END IF;
    SELECT pg_catalog.array_agg(DISTINCT pg_catalog.upper(e)) INTO ev FROM pg_catalog.unnest(events) AS e;
    IF ev IS NULL THEN
        RAISE EXCEPTION 'events must name at least one of INSERT, UPDATE, DELETE' USING ERRCODE = '22023';
    END IF;
    SELECT e INTO bad FROM pg_catalog.unnest(ev) AS e WHERE e IS NULL OR e NOT IN ('INSERT', 'UPDATE', 'DELETE') LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'unknown event %; expected INSERT, UPDATE or DELETE', coalesce(bad, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord) INTO pk
      FROM pg_catalog.pg_index i
      CROSS JOIN LATERAL pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
     WHERE i.indrelid = rel AND i.indisprimary;
    SELECT a.attname::text INTO tcol FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attname = 'tenant_id' AND a.attnum > 0 AND NOT a.attisdropped;
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgseal_audit ON %s', rel);
    EXECUTE pg_catalog.format(
        'CREATE TRIGGER pgseal_audit AFTER %s ON %s FOR EACH ROW EXECUTE FUNCTION pgseal._audit_row(%L, %L)',
        pg_catalog.array_to_string(ev, ' OR '), rel, coalesce(pk, '{}')::text, coalesce(tcol, ''));
    -- Statement triggers are not cloned to partitions as row triggers are: the
    -- TRUNCATE trigger goes on the table and on each of its partitions (a partition
    -- attached later needs ledger_audit again).
    FOR part IN SELECT * FROM pgseal._with_partitions(rel) LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgseal_audit_truncate ON %s', part);
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER pgseal_audit_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgseal._audit_truncate()',
            part);
    END LOOP;
END
$$;

CREATE FUNCTION pgseal.ledger_unaudit(rel regclass) RETURNS void
LANGUAGE plpgsql
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    part regclass;
BEGIN
    PERFORM pgseal._check_table(rel);
    EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgseal_audit ON %s', rel);
    FOR part IN SELECT * FROM pgseal._with_partitions(rel) LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS pgseal_audit_truncate ON %s', part);
    END LOOP;
END
$$;

-- No ALTER or DROP of the ledger tables, their triggers, policies or columns, by
-- anyone, outside the extension's own scripts. DROP EXTENSION pgseal (superuser
-- only) is the one exception; docs/SECURITY.md says what that means.
CREATE FUNCTION pgseal._ledger_ddl_guard() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    ledger oid := pg_catalog.to_regclass('pgseal.ledger');
    heads  oid := pg_catalog.to_regclass('pgseal.ledger_heads');
    cps    oid := pg_catalog.to_regclass('pgseal.ledger_checkpoints');
    hit    boolean := false;
BEGIN
    IF pgseal._creating_extension() THEN
        RETURN;
    END IF;
    IF TG_EVENT = 'sql_drop' THEN
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_dropped_objects() d
                   WHERE d.object_type = 'extension' AND d.object_identity = 'pgseal') THEN
            RETURN;
        END IF;
        SELECT true INTO hit FROM pg_catalog.pg_event_trigger_dropped_objects() d
         WHERE d.object_identity IN ('pgseal.ledger', 'pgseal.ledger_heads', 'pgseal.ledger_checkpoints')
            OR d.object_identity LIKE 'pgseal.ledger.%' OR d.object_identity LIKE 'pgseal.ledger_heads.%'
            OR d.object_identity LIKE 'pgseal.ledger_checkpoints.%'
            OR d.object_identity LIKE '% on pgseal.ledger' OR d.object_identity LIKE '% on pgseal.ledger_heads'
            OR d.object_identity LIKE '% on pgseal.ledger_checkpoints'
         LIMIT 1;
    ELSE
        SELECT true INTO hit FROM pg_catalog.pg_event_trigger_ddl_commands() c
         WHERE (c.classid = 'pg_catalog.pg_class'::regclass AND c.objid IN (ledger, heads, cps))
            OR (c.classid = 'pg_catalog.pg_trigger'::regclass
                AND (SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE t.oid = c.objid) IN (ledger, heads, cps))
            OR (c.classid = 'pg_catalog.pg_policy'::regclass
                AND (SELECT p.polrelid FROM pg_catalog.pg_policy p WHERE p.oid = c.objid) IN (ledger, heads, cps))
            OR (c.classid = 'pg_catalog.pg_rewrite'::regclass
                AND (SELECT r.ev_class FROM pg_catalog.pg_rewrite r WHERE r.oid = c.objid) IN (ledger, heads, cps))
         LIMIT 1;
    END IF;
    IF hit THEN
        RAISE EXCEPTION 'pgseal.ledger cannot be altered or dropped'
            USING ERRCODE = '42501', HINT = 'The ledger is append-only; see docs/SECURITY.md.';
    END IF;
END
$$;

CREATE EVENT TRIGGER pgseal_ledger_ddl_guard ON ddl_command_end EXECUTE FUNCTION pgseal._ledger_ddl_guard();
CREATE EVENT TRIGGER pgseal_ledger_drop_guard ON sql_drop EXECUTE FUNCTION pgseal._ledger_ddl_guard();
ALTER EVENT TRIGGER pgseal_ledger_ddl_guard ENABLE ALWAYS;
ALTER EVENT TRIGGER pgseal_ledger_drop_guard ENABLE ALWAYS;
