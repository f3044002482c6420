-- pgseal tenancy: the pooler-safe context setter, RLS policy helpers, organisation
-- roles, and the isolation linter. Policies call pgseal.current_tenant() and
-- pgseal.current_user_id() inside a sub-select, so the planner evaluates each once per
-- query (an InitPlan) and can use an index on the tenant column; in a database with
-- Citus they call them directly, for Citus refuses sub-selects in the policies of
-- distributed tables (docs/SCALING.md).

-- Whether this database has Citus (docs/SCALING.md).
CREATE FUNCTION pgseal._citus_present() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$ SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') $$;

-- A policy's value of the function call `call`, cast to `typ`: in a sub-select (an
-- InitPlan, evaluated once a query), or, where Citus is installed, the call itself. A
-- table may be distributed after it is protected, so the form follows the database,
-- not the table.
CREATE FUNCTION pgseal._policy_value(call text, typ text) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT CASE WHEN pgseal._citus_present() THEN format('%s::%s', call, typ)
                ELSE format('(SELECT %s)::%s', call, typ) END
$$;

-- Sets Citus's citus.enable_ddl_propagation for the rest of the transaction and
-- returns its value before, when Citus's setting exists (NULL and nothing set
-- otherwise, or when `value` is NULL). The protect functions turn it on for their
-- call, so a session that turned it off cannot leave the shards without the
-- policies that the coordinator's table shows.
CREATE FUNCTION pgseal._citus_ddl_propagation(value text) RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    prev text := current_setting('citus.enable_ddl_propagation', true);
BEGIN
    IF prev IS NOT NULL AND value IS NOT NULL THEN
        PERFORM set_config('citus.enable_ddl_propagation', value, true);
    END IF;
    RETURN prev;
END
$$;

-- Sets the tenant (and user) for the current transaction only. A real SET LOCAL,
-- because set_config(..., true) is not propagated by Citus (docs/SECURITY.md).
CREATE FUNCTION pgseal.set_tenant(tenant text, user_id text DEFAULT NULL) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF tenant IS NULL OR tenant = '' THEN
        RAISE EXCEPTION 'tenant must not be NULL or empty' USING ERRCODE = '22023';
    END IF;
    -- The limits of extension/src/limits.rs (README, "Limits").
    IF octet_length(tenant) > 256 THEN
        RAISE EXCEPTION 'tenant id is longer than 256 bytes' USING ERRCODE = '54000';
    END IF;
    IF octet_length(user_id) > 1024 THEN
        RAISE EXCEPTION 'user id is longer than 1024 bytes' USING ERRCODE = '54000';
    END IF;
    -- pgseal's own chains are no tenant a session acts for (context.rs refuses them too).
    IF left(tenant, 7) = '_pgseal' THEN
        RAISE EXCEPTION 'the tenant names one of pgseal''s own chains (_pgseal…), which no session acts for' USING ERRCODE = '42501';
    END IF;
    -- Under Citus the two SET LOCALs below reach the workers only when
    -- citus.propagate_set_commands is 'local'; without them the workers' policies
    -- fail closed. Set so for the rest of the transaction, like any SET LOCAL.
    IF current_setting('citus.propagate_set_commands', true) IS DISTINCT FROM NULL THEN
        SET LOCAL citus.propagate_set_commands = 'local';
    END IF;
    EXECUTE format('SET LOCAL %s = %L', pgseal._context_setting('tenant'), tenant);
    -- A NULL user clears any user left from earlier in the transaction.
    EXECUTE format('SET LOCAL %s = %L', pgseal._context_setting('user'), coalesce(user_id, ''));
END
$$;

-- Organisation membership. The role order is owner > admin > member > viewer.
CREATE TYPE pgseal.org_role AS ENUM ('owner', 'admin', 'member', 'viewer');

CREATE TABLE pgseal.org_members (
    tenant_id text NOT NULL CHECK (tenant_id <> ''),
    org_id    text NOT NULL CHECK (org_id <> ''),
    user_id   text NOT NULL CHECK (user_id <> ''),
    role      pgseal.org_role NOT NULL,
    PRIMARY KEY (tenant_id, org_id, user_id)
);
CREATE INDEX org_members_by_user ON pgseal.org_members (tenant_id, user_id);

-- On Citus, the coordinator's org_members copied to every node: citus_distribute()
-- makes it a reference table, and a trigger on org_members (below) keeps it equal
-- to the coordinator's table in the same transaction. On a worker, _my_orgs reads
-- this node's placement of it (extension/src/orgs.rs), never the worker's own
-- org_members. No role but the owner reads or writes it.
CREATE TABLE pgseal._org_members_copy (
    tenant_id text NOT NULL,
    org_id    text NOT NULL,
    user_id   text NOT NULL,
    role      pgseal.org_role NOT NULL,
    PRIMARY KEY (tenant_id, org_id, user_id)
);
REVOKE ALL ON pgseal._org_members_copy FROM PUBLIC;

-- The organisations in which the current user holds at least `min_role`, in the
-- current tenant. SECURITY DEFINER so that policies on org_members itself can use it
-- without recursing into those policies. Like every SECURITY DEFINER function of
-- pgseal, its search_path ends in pg_temp (otherwise PostgreSQL searches the
-- caller's temporary schema first for types and tables) and it names what it uses
-- with its schema.
CREATE FUNCTION pgseal._my_orgs(min_role pgseal.org_role) RETURNS pg_catalog.text[]
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
-- On a Citus worker it reads the coordinator's membership from this node's copy
-- (_replica_orgs); elsewhere _replica_orgs is NULL and it reads org_members.
AS $$
    SELECT coalesce(pgseal._replica_orgs(min_role::pg_catalog.text),
        (SELECT coalesce(pg_catalog.array_agg(m.org_id), '{}'::pg_catalog.text[])
         FROM pgseal.org_members m
         WHERE m.tenant_id OPERATOR(pg_catalog.=) pgseal.current_tenant()
           AND m.user_id OPERATOR(pg_catalog.=) pgseal.current_user_id()
           AND m.role OPERATOR(pg_catalog.<=) min_role))
$$;

-- Whether an organisation has any member yet (its first owner may add themselves).
CREATE FUNCTION pgseal._org_exists(org pg_catalog.text) RETURNS pg_catalog.bool
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pgseal.org_members m
                   WHERE m.tenant_id OPERATOR(pg_catalog.=) pgseal.current_tenant()
                     AND m.org_id OPERATOR(pg_catalog.=) org)
$$;

ALTER TABLE pgseal.org_members ENABLE ROW LEVEL SECURITY;
ALTER TABLE pgseal.org_members FORCE ROW LEVEL SECURITY;
CREATE POLICY org_members_tenant ON pgseal.org_members AS RESTRICTIVE FOR ALL
    USING (tenant_id = (SELECT pgseal.current_tenant()))
    WITH CHECK (tenant_id = (SELECT pgseal.current_tenant()));
CREATE POLICY org_members_read ON pgseal.org_members FOR SELECT
    USING (true);
-- Only an org's owners and admins change its membership; an org's first member is
-- its creator, as owner. The trigger below narrows both: who may create an
-- organisation, and who may grant or take the owner role.
CREATE POLICY org_members_insert ON pgseal.org_members FOR INSERT
    WITH CHECK (org_id = ANY ((SELECT pgseal._my_orgs('admin'))::text[])
                OR (role = 'owner' AND user_id = (SELECT pgseal.current_user_id()) AND NOT pgseal._org_exists(org_id)));
CREATE POLICY org_members_update ON pgseal.org_members FOR UPDATE
    USING (org_id = ANY ((SELECT pgseal._my_orgs('admin'))::text[]))
    WITH CHECK (org_id = ANY ((SELECT pgseal._my_orgs('admin'))::text[]));
CREATE POLICY org_members_delete ON pgseal.org_members FOR DELETE
    USING (org_id = ANY ((SELECT pgseal._my_orgs('admin'))::text[]));
GRANT SELECT, INSERT, UPDATE, DELETE ON pgseal.org_members TO PUBLIC;

-- One row per organisation whose owners a transaction has changed. Every change that
-- grants or takes the owner role first updates its organisation's row here, so such
-- changes to one organisation run one at a time: a second one waits for the first
-- to end and then (under READ COMMITTED) checks against what the first committed,
-- or (under REPEATABLE READ and SERIALIZABLE) fails with 40001. A row lock on a
-- table that only pgseal writes (through _org_lock, for the caller's own tenant):
-- unlike an advisory lock, no role can take it for another tenant's organisations.
CREATE TABLE pgseal.org_locks (
    tenant_id text NOT NULL,
    org_id    text NOT NULL,
    changes   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, org_id)
);
REVOKE ALL ON pgseal.org_locks FROM PUBLIC;

-- Locks (creating it if need be) the row of `org` in the current tenant until the
-- transaction ends. The caller names only the organisation: the tenant is its own.
CREATE FUNCTION pgseal._org_lock(org pg_catalog.text) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF org IS NULL THEN
        RAISE EXCEPTION 'organisation id must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF pg_catalog.octet_length(org) OPERATOR(pg_catalog.>) 256 THEN
        RAISE EXCEPTION 'organisation id is longer than 256 bytes' USING ERRCODE = '54000';
    END IF;
    INSERT INTO pgseal.org_locks AS l (tenant_id, org_id) VALUES (pgseal.current_tenant(), org)
    ON CONFLICT (tenant_id, org_id) DO UPDATE SET changes = l.changes OPERATOR(pg_catalog.+) 1;
END
$$;

-- The organisation invariants, for every row change of org_members:
--   * only an owner of the organisation grants or takes the owner role (an admin
--     cannot insert an owner row, promote anyone, nor demote or delete an owner);
--   * only a user who already owns an organisation of the tenant creates a new
--     organisation (inserts its first member, as its owner);
--   * a member of pgseal_admin (superusers too) may do both.
-- SECURITY INVOKER, so current_user is the role that changed the row, and it reads
-- org_members through its row level security: the caller's tenant, all of it.
-- Changes to an organisation's owners are serialized by its org_locks row, taken
-- before anything is checked; each later query of this VOLATILE function takes a
-- fresh snapshot, so two sessions racing to create one organisation cannot both
-- become its owner.
CREATE FUNCTION pgseal._org_members_guard() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    adds    boolean := false;  -- the row change makes someone an owner
    removes boolean := false;  -- the row change takes the owner role from someone
    moved   boolean;
    context pg_catalog.text := nullif(pg_catalog.current_setting(pgseal._context_setting('tenant'), true), '');
    me      pg_catalog.text;
BEGIN
    -- On Citus the coordinator's membership is the one that counts (its copy is
    -- what the workers read): a worker's own table is changed by no one.
    IF pgseal._citus_worker() THEN
        RAISE EXCEPTION 'organisation membership is changed on the Citus coordinator, not on a worker'
            USING ERRCODE = '0A000';
    END IF;
    IF TG_OP = 'INSERT' THEN
        adds := NEW.role = 'owner';
    ELSIF TG_OP = 'DELETE' THEN
        removes := OLD.role = 'owner';
    ELSE
        moved := (NEW.tenant_id, NEW.org_id, NEW.user_id) IS DISTINCT FROM (OLD.tenant_id, OLD.org_id, OLD.user_id);
        removes := OLD.role = 'owner' AND (moved OR NEW.role <> 'owner');
        adds := NEW.role = 'owner' AND (moved OR OLD.role <> 'owner');
    END IF;
    IF NOT (adds OR removes) THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;

    -- Serialize every change to the owners of the organisations involved. A caller
    -- without a tenant context (a superuser seeding rows) takes no lock.
    IF removes AND OLD.tenant_id = context THEN
        PERFORM pgseal._org_lock(OLD.org_id);
    END IF;
    IF adds AND NEW.tenant_id = context AND NOT (removes AND OLD.org_id = NEW.org_id) THEN
        PERFORM pgseal._org_lock(NEW.org_id);
    END IF;

    IF pg_catalog.pg_has_role(current_user, 'pgseal_admin', 'MEMBER') THEN
        IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
        RETURN NEW;
    END IF;

    me := pgseal.current_user_id();
    IF removes AND NOT EXISTS (
        SELECT 1 FROM pgseal.org_members m
        WHERE m.tenant_id = OLD.tenant_id AND m.org_id = OLD.org_id AND m.user_id = me AND m.role = 'owner')
    THEN
        RAISE EXCEPTION 'only an owner of organisation % can demote or remove its owners', OLD.org_id
            USING ERRCODE = '42501';
    END IF;
    IF adds THEN
        IF EXISTS (SELECT 1 FROM pgseal.org_members m WHERE m.tenant_id = NEW.tenant_id AND m.org_id = NEW.org_id) THEN
            IF NOT EXISTS (
                SELECT 1 FROM pgseal.org_members m
                WHERE m.tenant_id = NEW.tenant_id AND m.org_id = NEW.org_id AND m.user_id = me AND m.role = 'owner')
            THEN
                RAISE EXCEPTION 'only an owner of organisation % can grant the owner role', NEW.org_id
                    USING ERRCODE = '42501';
            END IF;
        ELSIF NOT EXISTS (
            SELECT 1 FROM pgseal.org_members m
            WHERE m.tenant_id = NEW.tenant_id AND m.user_id = me AND m.role = 'owner')
        THEN
            RAISE EXCEPTION 'only an owner of an organisation of this tenant, or a member of pgseal_admin, can create organisation %', NEW.org_id
                USING ERRCODE = '42501',
                      HINT = 'An owner of an existing organisation creates it, or pgseal_admin adds its first owner.';
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER org_members_guard BEFORE INSERT OR UPDATE OR DELETE ON pgseal.org_members
    FOR EACH ROW EXECUTE FUNCTION pgseal._org_members_guard();

-- An organisation that has members has an owner: the last owner cannot be demoted or
-- removed while anyone else is still a member (to hand over, make the new owner an
-- owner first). Checked when the statement ends, against its final rows, so that
-- deleting every member in one statement dissolves the organisation. It holds for
-- everyone, pgseal_admin included.
CREATE FUNCTION pgseal._org_members_keep_owner() RETURNS trigger
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgseal.org_members m WHERE m.tenant_id = OLD.tenant_id AND m.org_id = OLD.org_id)
       AND NOT EXISTS (SELECT 1 FROM pgseal.org_members m
                       WHERE m.tenant_id = OLD.tenant_id AND m.org_id = OLD.org_id AND m.role = 'owner')
    THEN
        RAISE EXCEPTION 'organisation % must keep an owner: its last owner cannot be demoted or removed while it has other members', OLD.org_id
            USING ERRCODE = '23514', HINT = 'Make another member an owner first.';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER org_members_keep_owner AFTER UPDATE OR DELETE ON pgseal.org_members
    FOR EACH ROW WHEN (OLD.role = 'owner') EXECUTE FUNCTION pgseal._org_members_keep_owner();

-- Every membership change is evidence: 'org.member_added', 'org.member_removed' and
-- 'org.role_changed' in the row's tenant's chain (extension/src/ledger/evidence.rs).
-- A C trigger function, executable by no role, so it cannot be called or attached
-- to another table; it fires after the checks above, for everyone (ENABLE ALWAYS).
CREATE FUNCTION pgseal._org_members_record() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'org_members_record_trigger';
CREATE TRIGGER org_members_record AFTER INSERT OR UPDATE OR DELETE ON pgseal.org_members
    FOR EACH ROW EXECUTE FUNCTION pgseal._org_members_record();
ALTER TABLE pgseal.org_members ENABLE ALWAYS TRIGGER org_members_record;

-- Keeps pgseal._org_members_copy equal to org_members on a Citus coordinator once
-- citus_distribute() made the copy a reference table (nothing to do elsewhere), in
-- the transaction of the change, so the workers' placements change with it or not
-- at all. It writes through Citus as the owner, with pgseal's parse settings sent to
-- the workers (_citus_owner_check). For every change (ENABLE ALWAYS), TRUNCATE too.
CREATE FUNCTION pgseal._org_members_copy_sync() RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    -- Only org_members' own trigger (no role may execute this function, so no one
    -- else can attach it; this holds even if a grant came back).
    IF TG_RELID OPERATOR(pg_catalog.<>) 'pgseal.org_members'::pg_catalog.regclass THEN
        RAISE EXCEPTION 'pgseal._org_members_copy_sync() is a trigger of pgseal.org_members only'
            USING ERRCODE = '42501';
    END IF;
    IF NOT pgseal._citus_present() OR pgseal._citus_worker()
       OR NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                      WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal._org_members_copy'::pg_catalog.regclass) THEN
        RETURN NULL;
    END IF;
    PERFORM pgseal._citus_owner_check();
    IF TG_OP = 'TRUNCATE' THEN
        DELETE FROM pgseal._org_members_copy;
        PERFORM pgseal._citus_owner_done();
        RETURN NULL;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        DELETE FROM pgseal._org_members_copy c
         WHERE c.tenant_id OPERATOR(pg_catalog.=) OLD.tenant_id
           AND c.org_id OPERATOR(pg_catalog.=) OLD.org_id
           AND c.user_id OPERATOR(pg_catalog.=) OLD.user_id;
    END IF;
    -- An upsert: a row the copy should not have held is put right, not a failure.
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO pgseal._org_members_copy AS c (tenant_id, org_id, user_id, role)
        VALUES (NEW.tenant_id, NEW.org_id, NEW.user_id, NEW.role)
        ON CONFLICT (tenant_id, org_id, user_id) DO UPDATE SET role = EXCLUDED.role;
    END IF;
    -- The workers parse the caller's later statements as it had them do.
    PERFORM pgseal._citus_owner_done();
    RETURN NULL;
END
$$;
CREATE TRIGGER org_members_copy AFTER INSERT OR UPDATE OR DELETE ON pgseal.org_members
    FOR EACH ROW EXECUTE FUNCTION pgseal._org_members_copy_sync();
CREATE TRIGGER org_members_copy_truncate AFTER TRUNCATE ON pgseal.org_members
    FOR EACH STATEMENT EXECUTE FUNCTION pgseal._org_members_copy_sync();
ALTER TABLE pgseal.org_members ENABLE ALWAYS TRIGGER org_members_copy;
ALTER TABLE pgseal.org_members ENABLE ALWAYS TRIGGER org_members_copy_truncate;

-- Checks a table argument: 22004 NULL, 42P01 no such relation (an OID that names
-- nothing), 42809 not a plain or partitioned table.
CREATE FUNCTION pgseal._check_table(rel regclass) RETURNS void
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE k "char";
BEGIN
    IF rel IS NULL THEN
        RAISE EXCEPTION 'rel must not be NULL' USING ERRCODE = '22004';
    END IF;
    SELECT c.relkind INTO k FROM pg_class c WHERE c.oid OPERATOR(pg_catalog.=) rel;
    IF k IS NULL THEN
        RAISE EXCEPTION 'relation with OID % does not exist', rel::oid USING ERRCODE = '42P01';
    END IF;
    IF k NOT IN ('r', 'p') THEN
        RAISE EXCEPTION '% is not a table', rel USING ERRCODE = '42809';
    END IF;
END
$$;

-- Checks a tenant argument against the tenant id limit (extension/src/limits.rs).
CREATE FUNCTION pgseal._check_tenant_arg(tenant text) RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF octet_length(tenant) > 256 THEN
        RAISE EXCEPTION 'tenant id is longer than 256 bytes' USING ERRCODE = '54000';
    END IF;
END
$$;

-- The type of a column, as SQL text; 22004 for a NULL name, 42703 when the table
-- has no such column.
CREATE FUNCTION pgseal._column_type(rel regclass, col name) RETURNS text
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE t text;
BEGIN
    IF col IS NULL THEN
        RAISE EXCEPTION 'column name must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM pgseal._check_table(rel);
    -- The type without its modifier: a cast to varchar(8) would cut a longer tenant
    -- id down to one that matches another tenant's rows.
    SELECT format_type(a.atttypid, NULL) INTO t FROM pg_attribute a
     WHERE a.attrelid = rel AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF t IS NULL THEN
        RAISE EXCEPTION 'column % of % does not exist', col, rel USING ERRCODE = '42703';
    END IF;
    RETURN t;
END
$$;

-- The table and, for a partitioned table, every partition below it.
CREATE FUNCTION pgseal._with_partitions(rel regclass) RETURNS SETOF regclass
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    WITH RECURSIVE t(oid) AS (
        SELECT rel::oid
        UNION ALL
        SELECT i.inhrelid FROM pg_inherits i JOIN t ON i.inhparent = t.oid
    )
    SELECT oid::regclass FROM t
$$;

-- Whether some index of rel has col as its first column.
CREATE FUNCTION pgseal._has_leading_index(rel regclass, col name) RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = rel AND a.attname = col)
$$;

-- For each table that tenant_protect or org_protect covers: drop pgseal's earlier
-- policies, ENABLE and FORCE row level security, and warn when no index leads with
-- the tenant column.
CREATE FUNCTION pgseal._rls_reset(t regclass, tenant_column name) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    p name;
BEGIN
    PERFORM pgseal._check_table(t);
    FOR p IN SELECT polname FROM pg_policy WHERE polrelid = t AND polname LIKE 'pgseal\_%' LOOP
        EXECUTE format('DROP POLICY %I ON %s', p, t);
    END LOOP;
    EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', t);
    EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', t);
    IF (SELECT relkind FROM pg_class WHERE oid = t) = 'r' AND NOT pgseal._has_leading_index(t, tenant_column) THEN
        RAISE WARNING 'pgseal: % has no index whose first column is %', t, tenant_column
            USING HINT = format('CREATE INDEX ON %s (%I);', t, tenant_column);
    END IF;
END
$$;

-- The protect functions' search_path leaves pgseal out: Citus sends a new policy to
-- the other nodes as the text PostgreSQL prints for it, which names pgseal's
-- functions with their schema only where the search_path does not find them.
CREATE FUNCTION pgseal.tenant_protect(rel regclass, tenant_column name DEFAULT 'tenant_id') RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t    regclass;
    pred text;
    ddl  text;
BEGIN
    PERFORM pgseal._check_table(rel);
    pred := format('%I = %s', tenant_column, pgseal._policy_value('pgseal.current_tenant()', pgseal._column_type(rel, tenant_column)));
    ddl := pgseal._citus_ddl_propagation('on');
    FOR t IN SELECT * FROM pgseal._with_partitions(rel) LOOP
        PERFORM pgseal._rls_reset(t, tenant_column);
        EXECUTE format('CREATE POLICY pgseal_tenant ON %s AS PERMISSIVE FOR ALL USING (%s) WITH CHECK (%s)', t, pred, pred);
    END LOOP;
    PERFORM pgseal._citus_ddl_propagation(ddl);
    PERFORM pgseal._protection_changed(rel::pg_catalog.oid);
END
$$;

CREATE FUNCTION pgseal.tenant_unprotect(rel regclass) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    t   regclass;
    p   name;
    ddl text;
BEGIN
    PERFORM pgseal._check_table(rel);
    ddl := pgseal._citus_ddl_propagation('on');
    FOR t IN SELECT * FROM pgseal._with_partitions(rel) LOOP
        FOR p IN SELECT polname FROM pg_policy WHERE polrelid = t AND polname LIKE 'pgseal\_%' LOOP
            EXECUTE format('DROP POLICY %I ON %s', p, t);
        END LOOP;
        EXECUTE format('ALTER TABLE %s NO FORCE ROW LEVEL SECURITY', t);
        EXECUTE format('ALTER TABLE %s DISABLE ROW LEVEL SECURITY', t);
    END LOOP;
    PERFORM pgseal._citus_ddl_propagation(ddl);
    PERFORM pgseal._protection_changed(rel::pg_catalog.oid);
END
$$;

CREATE FUNCTION pgseal.org_protect(rel regclass, owner_column name, org_column name, tenant_column name DEFAULT 'tenant_id')
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t       regclass;
    tenant  text;
    owner   text;
    org_typ text;
    viewer  text;
    member  text;
    admin   text;
    citus   boolean := pgseal._citus_present();
    mine    text;
    ddl     text;
    qname   text;
BEGIN
    PERFORM pgseal._check_table(rel);
    tenant  := format('%I = %s', tenant_column, pgseal._policy_value('pgseal.current_tenant()', pgseal._column_type(rel, tenant_column)));
    owner   := format('%I = %s', owner_column, pgseal._policy_value('pgseal.current_user_id()', pgseal._column_type(rel, owner_column)));
    org_typ := pgseal._column_type(rel, org_column);
    IF citus THEN
        viewer := format('%I = ANY (pgseal._my_orgs(''viewer'')::%s[])', org_column, org_typ);
        member := format('%I = ANY (pgseal._my_orgs(''member'')::%s[])', org_column, org_typ);
        admin  := format('%I = ANY (pgseal._my_orgs(''admin'')::%s[])', org_column, org_typ);
    ELSE
        viewer := format('%I = ANY (ARRAY(SELECT o::%s FROM unnest(pgseal._my_orgs(''viewer'')) o))', org_column, org_typ);
        member := format('%I = ANY (ARRAY(SELECT o::%s FROM unnest(pgseal._my_orgs(''member'')) o))', org_column, org_typ);
        admin  := format('%I = ANY (ARRAY(SELECT o::%s FROM unnest(pgseal._my_orgs(''admin'')) o))', org_column, org_typ);
    END IF;
    -- Nothing ever crosses tenants, whatever the permissive policies allow: a
    -- restrictive policy on the tenant. Citus creates every policy on the shards as
    -- permissive (a restrictive one would there allow the whole tenant), so under
    -- Citus the tenant is part of each permissive policy instead.
    IF citus THEN
        mine   := format('(%s) AND (%s)', tenant, owner);
        viewer := format('(%s) AND (%s)', tenant, viewer);
        member := format('(%s) AND (%s)', tenant, member);
        admin  := format('(%s) AND (%s)', tenant, admin);
    ELSE
        mine := owner;
    END IF;
    ddl := pgseal._citus_ddl_propagation('on');
    FOR t IN SELECT * FROM pgseal._with_partitions(rel) LOOP
        PERFORM pgseal._rls_reset(t, tenant_column);
        IF NOT citus THEN
            EXECUTE format('CREATE POLICY pgseal_tenant_only ON %s AS RESTRICTIVE FOR ALL USING (%s) WITH CHECK (%s)', t, tenant, tenant);
            -- A tenant's offboarding reads and deletes all its rows as the table's
            -- owner, whatever organisation or user they belong to: these show them
            -- to the owner only inside those statements, for this table only
            -- (pgseal._offboard_visible, extension/src/offboard/visible.rs), and
            -- the restrictive policy above still limits them to the tenant.
            EXECUTE format('CREATE POLICY pgseal_offboard_select ON %s FOR SELECT USING (pgseal._offboard_visible(%L::pg_catalog.regclass))', t, t);
            EXECUTE format('CREATE POLICY pgseal_offboard_delete ON %s FOR DELETE USING (pgseal._offboard_visible(%L::pg_catalog.regclass))', t, t);
        ELSE
            SELECT format('%I.%I', n.nspname, c.relname) INTO qname
              FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
             WHERE c.oid OPERATOR(pg_catalog.=) t::pg_catalog.oid;
            -- On Citus, with the tenant (no restrictive policy there), and on
            -- every node the coordinator's grant for the table, named by its
            -- qualified name (a regclass argument cannot be resolved on a worker
            -- in the transaction that distributed the table).
            EXECUTE format('CREATE POLICY pgseal_offboard_select ON %s FOR SELECT USING ((%s) AND pgseal._offboard_visible_in(%L))', t, tenant, qname);
            EXECUTE format('CREATE POLICY pgseal_offboard_delete ON %s FOR DELETE USING ((%s) AND pgseal._offboard_visible_in(%L))', t, tenant, qname);
        END IF;
        EXECUTE format('CREATE POLICY pgseal_owner ON %s FOR ALL USING (%s) WITH CHECK (%s)', t, mine, mine);
        EXECUTE format('CREATE POLICY pgseal_org_select ON %s FOR SELECT USING (%s)', t, viewer);
        EXECUTE format('CREATE POLICY pgseal_org_insert ON %s FOR INSERT WITH CHECK (%s)', t, member);
        EXECUTE format('CREATE POLICY pgseal_org_update ON %s FOR UPDATE USING (%s) WITH CHECK (%s)', t, member, member);
        EXECUTE format('CREATE POLICY pgseal_org_delete ON %s FOR DELETE USING (%s)', t, admin);
    END LOOP;
    PERFORM pgseal._citus_ddl_propagation(ddl);
    PERFORM pgseal._protection_changed(rel::pg_catalog.oid);
END
$$;
