-- pgseal.isolation_report(): every way a tenant-scoped table can escape row level
-- security, one row per finding. A table is tenant-scoped when it has a column named
-- in pgseal.tenant_column_names (default {tenant_id}). Objects that belong to an
-- extension, and the system schemas, are not checked. A clean database returns no rows.

CREATE FUNCTION pgseal._tenant_column_names() RETURNS name[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT coalesce(nullif(current_setting('pgseal.tenant_column_names', true), ''), '{tenant_id}')::name[]
$$;

-- The tables Citus distributes ('h', with the column they are distributed by) or
-- replicates to every node ('n': reference tables and local tables in Citus's
-- metadata); no rows without Citus. Its catalog is read by name at run time, as it
-- exists only where Citus is installed.
CREATE FUNCTION pgseal._citus_tables() RETURNS TABLE (rel oid, method "char", dist_column name)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    IF pgseal._citus_present() THEN
        RETURN QUERY EXECUTE
            'SELECT logicalrelid::pg_catalog.oid, partmethod, '
            'pg_catalog.column_to_column_name(logicalrelid, partkey)::pg_catalog.name '
            'FROM pg_catalog.pg_dist_partition';
    END IF;
END
$$;

-- A relation's row level security as one text: on, forced, and every policy (name,
-- command, permissive, roles, USING, WITH CHECK), each part quoted. The same on
-- every node for the same protection: it prints expressions under a fixed
-- search_path, so names print the same way everywhere.
CREATE FUNCTION pgseal._rls_signature(rel regclass) RETURNS text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT format('%L %L %s', c.relrowsecurity, c.relforcerowsecurity,
                  coalesce((SELECT string_agg(format('(%L %L %L %L %L %L)', p.polname, p.polcmd, p.polpermissive,
                                                     (SELECT array_agg(CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r)::text END ORDER BY 1)
                                                      FROM unnest(p.polroles) r),
                                                     pg_get_expr(p.polqual, p.polrelid), pg_get_expr(p.polwithcheck, p.polrelid)),
                                              ' ' ORDER BY p.polname)
                            FROM pg_policy p WHERE p.polrelid = c.oid), ''))
    FROM pg_class c WHERE c.oid = rel
$$;

-- Citus: how the shards of the Citus tables among `rels` differ from the table on
-- this node in row level security (_rls_signature), read on every placement; one row
-- per differing placement, or per table whose placements could not be read. No rows
-- without Citus.
CREATE FUNCTION pgseal._citus_shard_problems(rels oid[]) RETURNS TABLE (rel oid, problem text)
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
DECLARE
    r oid;
BEGIN
    IF NOT pgseal._citus_present() THEN
        RETURN;
    END IF;
    FOR r IN SELECT d.rel FROM pgseal._citus_tables() d WHERE d.rel = ANY (rels) LOOP
        BEGIN
            -- run_command_on_placements puts each shard's name for %L, quoted.
            RETURN QUERY EXECUTE
                'SELECT $1, CASE WHEN success '
                'THEN format(''shard %s on %s:%s differs from the table in its row level security or policies'', '
                '            shardid, nodename, nodeport) '
                'ELSE format(''shard %s on %s:%s could not be read: %s'', shardid, nodename, nodeport, result) END '
                'FROM pg_catalog.run_command_on_placements($1::pg_catalog.regclass, '
                '     ''SELECT pgseal._rls_signature(%L::pg_catalog.regclass)'') '
                'WHERE NOT success OR result IS DISTINCT FROM pgseal._rls_signature($1::pg_catalog.regclass)'
                USING r;
        EXCEPTION WHEN OTHERS THEN
            rel := r;
            problem := 'its shards could not be read: ' || SQLERRM;
            RETURN NEXT;
        END;
    END LOOP;
END
$$;

-- Whether a policy clause's text compares the tenant column `col` with the tenant
-- (current_tenant() or current_setting()).
CREATE FUNCTION pgseal._names_tenant(clause text, col name) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT clause ~ ('(^|[^a-z0-9_."])' || quote_ident(col) || '([^a-z0-9_"]|$)')
       AND clause ~ '(current_tenant|current_setting)\('
$$;

-- Its search_path leaves pgseal out so that every object outside pg_catalog, pgseal's
-- own included, is named with its schema (regclass and regprocedure print a schema
-- only for what the search_path does not find).
CREATE FUNCTION pgseal.isolation_report()
RETURNS TABLE (severity text, object text, problem text, fix text)
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
WITH user_rel AS (
    SELECT c.oid, c.relname, c.relkind, c.relrowsecurity, c.relforcerowsecurity, c.relowner, c.relacl,
           c.reloptions, c.relispartition, c.oid::regclass::text AS obj
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
      AND n.nspname NOT LIKE 'pg_temp%' AND n.nspname NOT LIKE 'pg_toast_temp%'
      AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')
),
tenant_tab AS (
    SELECT r.*, a.attname AS tcol
    FROM user_rel r
    JOIN LATERAL (
        SELECT a.attname FROM pg_attribute a
        WHERE a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ANY (pgseal._tenant_column_names())
        ORDER BY a.attnum LIMIT 1
    ) a ON true
    WHERE r.relkind IN ('r', 'p')
),
pol AS (
    SELECT t.oid, t.obj, t.tcol, p.polname, p.polpermissive, p.polcmd,
           coalesce(pg_get_expr(p.polqual, p.polrelid), '') AS qual,
           coalesce(pg_get_expr(p.polwithcheck, p.polrelid), '') AS chk
    FROM tenant_tab t JOIN pg_policy p ON p.polrelid = t.oid
),
-- A policy restricts to the tenant when each clause that applies compares the tenant
-- column with the tenant: USING for what it reads (SELECT, UPDATE, DELETE, ALL), and
-- WITH CHECK for what it writes (INSERT, UPDATE, ALL; without one, UPDATE and ALL
-- check USING).
tenant_pred AS (
    SELECT pol.*,
           (polcmd = 'a' OR pgseal._names_tenant(qual, tcol))
           AND (polcmd NOT IN ('a', 'w', '*') OR (chk = '' AND polcmd <> 'a') OR pgseal._names_tenant(chk, tcol)) AS has_tenant
    FROM pol
),
restricted AS (
    SELECT DISTINCT oid FROM tenant_pred WHERE NOT polpermissive AND has_tenant
)
-- RLS off, not forced, or no policy.
SELECT 'error', t.obj, 'row level security is off on a tenant table',
       format('SELECT pgseal.tenant_protect(%L, %L);', t.obj, t.tcol)
FROM tenant_tab t WHERE NOT t.relrowsecurity
UNION ALL
SELECT 'error', t.obj, 'row level security is not forced, so the table owner bypasses it',
       format('ALTER TABLE %s FORCE ROW LEVEL SECURITY;', t.obj)
FROM tenant_tab t WHERE t.relrowsecurity AND NOT t.relforcerowsecurity
UNION ALL
SELECT 'error', t.obj, 'row level security is on but the table has no policy, so it shows no rows to anyone',
       format('SELECT pgseal.tenant_protect(%L, %L);', t.obj, t.tcol)
FROM tenant_tab t WHERE t.relrowsecurity AND NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = t.oid)
UNION ALL
-- A permissive policy that does not restrict to the tenant, with no restrictive one that does.
SELECT 'error', p.obj,
       CASE WHEN p.qual IN ('', 'true') AND p.chk IN ('', 'true')
            THEN format('policy %s allows every row (USING (true))', p.polname)
            ELSE format('policy %s has no tenant predicate', p.polname) END,
       format('DROP POLICY %I ON %s; SELECT pgseal.tenant_protect(%L, %L);', p.polname, p.obj, p.obj, p.tcol)
FROM tenant_pred p
WHERE p.polpermissive AND NOT p.has_tenant AND p.oid NOT IN (SELECT oid FROM restricted)
UNION ALL
-- current_tenant()/current_setting() called directly in the predicate runs per row;
-- on a Citus table that is the only form a policy may take.
SELECT 'warning', p.obj, format('policy %s evaluates the tenant once per row', p.polname),
       format('DROP POLICY %I ON %s; SELECT pgseal.tenant_protect(%L, %L);', p.polname, p.obj, p.obj, p.tcol)
FROM tenant_pred p
WHERE p.oid NOT IN (SELECT d.rel FROM pgseal._citus_tables() d)
  AND (p.qual || ' ' || p.chk) ~ '(current_tenant|current_setting)\('
  AND regexp_replace(p.qual || ' ' || p.chk, '\(\s*SELECT\s+[^()]*\([^()]*\)[^()]*\)', '', 'g')
      ~ '(current_tenant|current_setting)\('
UNION ALL
SELECT 'warning', t.obj, format('no index has %s as its first column, so every tenant query scans the table', t.tcol),
       format('CREATE INDEX ON %s (%I);', t.obj, t.tcol)
FROM tenant_tab t WHERE t.relkind = 'r' AND NOT pgseal._has_leading_index(t.oid, t.tcol)
UNION ALL
-- Citus: a tenant table distributed by another column spreads each tenant over every
-- node (every tenant query fans out, and the rows do not share a node with the
-- tenant's keys and ledger).
SELECT 'warning', t.obj, format('distributed by %s, not by its tenant column %s', d.dist_column, t.tcol),
       format('SELECT alter_distributed_table(%L, distribution_column := %L);', t.obj, t.tcol)
FROM tenant_tab t JOIN pgseal._citus_tables() d ON d.rel = t.oid
WHERE d.method = 'h' AND d.dist_column IS DISTINCT FROM t.tcol
UNION ALL
-- Citus: a restrictive policy reaches the shards as a permissive one (Citus does not
-- copy the kind), where it then allows what it meant to forbid.
SELECT 'error', p.obj,
       format('policy %s is restrictive, and Citus creates it as permissive on the shards', p.polname),
       format('DROP POLICY %I ON %s; -- and put its condition into each permissive policy', p.polname, p.obj)
FROM pol p JOIN pgseal._citus_tables() d ON d.rel = p.oid
WHERE NOT p.polpermissive
UNION ALL
-- Citus: shards without the row level security the table shows (a protect function
-- run with DDL propagation off, a shard changed on its node).
SELECT 'error', t.obj, s.problem,
       format('-- run pgseal.tenant_protect or pgseal.org_protect on %s again', t.obj)
FROM tenant_tab t JOIN pgseal._citus_shard_problems(ARRAY(SELECT oid FROM tenant_tab)) s ON s.rel = t.oid
UNION ALL
-- Citus: a SET LOCAL of the tenant setting outside pgseal.set_tenant() reaches the
-- workers only when citus.propagate_set_commands is 'local' (set_tenant sets it for
-- its transaction); otherwise the workers' policies fail closed.
SELECT 'warning', 'citus.propagate_set_commands',
       'is not ''local'': a SET LOCAL of the tenant setting outside pgseal.set_tenant() does not reach the workers, and their queries fail',
       'ALTER SYSTEM SET citus.propagate_set_commands = ''local''; SELECT pg_reload_conf();'
WHERE pgseal._citus_present()
  AND (SELECT s.reset_val FROM pg_settings s WHERE s.name = 'citus.propagate_set_commands') IS DISTINCT FROM 'local'
UNION ALL
-- Citus: without pgseal.citus_distribute() the keys are on the node that made them,
-- and vault_decrypt in a query Citus sends to another node fails there.
SELECT 'warning', 'pgseal.tenant_keys',
       'is not a Citus reference table: sealed values of Citus tables decrypt only on the node that made their key',
       'SELECT pgseal.citus_distribute();'
WHERE EXISTS (SELECT 1 FROM pgseal._citus_tables() d JOIN tenant_tab t ON t.oid = d.rel)
  AND NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d WHERE d.rel = 'pgseal.tenant_keys'::regclass)
UNION ALL
-- A partition or inheritance child queried directly is protected only by its own policies.
SELECT 'error', c.oid::regclass::text, format('child of %s lacks its parent''s row level security', par.obj),
       format('SELECT pgseal.tenant_protect(%L, %L);', c.oid::regclass::text, par.tcol)
FROM tenant_tab par
JOIN pg_inherits i ON i.inhparent = par.oid
JOIN pg_class c ON c.oid = i.inhrelid
WHERE par.relrowsecurity
  AND (NOT c.relrowsecurity OR NOT c.relforcerowsecurity OR NOT EXISTS (SELECT 1 FROM pg_policy p WHERE p.polrelid = c.oid))
UNION ALL
-- Views run as their owner unless security_invoker is set, so RLS sees the owner.
SELECT 'error', v.obj, format('view reads tenant table %s without security_invoker', t.obj),
       format('ALTER VIEW %s SET (security_invoker = true);', v.obj)
FROM user_rel v
JOIN pg_rewrite rw ON rw.ev_class = v.oid
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid AND d.refclassid = 'pg_class'::regclass
JOIN tenant_tab t ON t.oid = d.refobjid
WHERE v.relkind = 'v' AND t.oid <> v.oid
  AND NOT coalesce(v.reloptions @> '{security_invoker=true}' OR v.reloptions @> '{security_invoker=on}', false)
GROUP BY v.obj, t.obj
UNION ALL
SELECT 'error', v.obj, format('materialized view copies tenant table %s; row level security does not apply to it', t.obj),
       format('DROP MATERIALIZED VIEW %s;', v.obj)
FROM user_rel v
JOIN pg_rewrite rw ON rw.ev_class = v.oid
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = rw.oid AND d.refclassid = 'pg_class'::regclass
JOIN tenant_tab t ON t.oid = d.refobjid
WHERE v.relkind = 'm' AND t.oid <> v.oid
GROUP BY v.obj, t.obj
UNION ALL
SELECT 'error', quote_ident(r.rolname), 'role bypasses row level security (BYPASSRLS) without being a superuser',
       format('ALTER ROLE %I NOBYPASSRLS;', r.rolname)
FROM pg_roles r WHERE r.rolbypassrls AND NOT r.rolsuper
UNION ALL
-- TRUNCATE ignores row level security.
SELECT 'error', t.obj, format('TRUNCATE is granted to %s, and TRUNCATE ignores row level security',
                              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END),
       format('REVOKE TRUNCATE ON %s FROM %s;', t.obj,
              CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END)
FROM tenant_tab t, aclexplode(t.relacl) a
WHERE a.privilege_type = 'TRUNCATE' AND a.grantee <> t.relowner
UNION ALL
SELECT 'warning', p.oid::regprocedure::text, 'SECURITY DEFINER function without a pinned search_path',
       format('ALTER FUNCTION %s SET search_path = pg_catalog, pg_temp;', p.oid::regprocedure::text)
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass AND d.objid = p.oid AND d.deptype = 'e')
  AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\_path=%')
UNION ALL
-- A SECURITY DEFINER function whose search_path does not end in pg_temp: PostgreSQL
-- then searches the caller's temporary schema first for tables, views and types, so
-- any caller can plant one that the function then uses with its owner's rights.
-- pgseal's own functions (in its schema or members of the extension) are errors;
-- anyone else's are warnings (those of other extensions too, with or without a
-- search_path; a non-extension function without one is reported above).
SELECT CASE WHEN d.own THEN 'error' ELSE 'warning' END, d.obj,
       CASE WHEN d.own THEN 'pgseal''s own SECURITY DEFINER function has a search_path that does not end in pg_temp'
            ELSE 'SECURITY DEFINER function whose search_path does not end in pg_temp, so the caller''s temporary objects come first' END,
       format('ALTER FUNCTION %s SET search_path = %s;', d.obj,
              CASE WHEN coalesce(d.path, '') IN ('', '""') THEN 'pg_catalog, pg_temp' ELSE d.path || ', pg_temp' END)
FROM (
    SELECT p.oid::regprocedure::text AS obj,
           (SELECT substr(c, length('search_path=') + 1) FROM unnest(p.proconfig) c
             WHERE c LIKE 'search\_path=%' LIMIT 1) AS path,
           n.nspname = 'pgseal' OR EXISTS (
               SELECT 1 FROM pg_depend dep JOIN pg_extension e ON e.oid = dep.refobjid
               WHERE dep.classid = 'pg_proc'::regclass AND dep.objid = p.oid AND dep.deptype = 'e'
                 AND dep.refclassid = 'pg_extension'::regclass AND e.extname = 'pgseal') AS own,
           EXISTS (SELECT 1 FROM pg_depend dep
                   WHERE dep.classid = 'pg_proc'::regclass AND dep.objid = p.oid AND dep.deptype = 'e') AS ext
    FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
    WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema')
) d
WHERE (d.path IS NOT NULL OR d.own OR d.ext)
  AND NOT coalesce(lower(regexp_replace(d.path, '\s', '', 'g')) ~ '(^|,)"?pg_temp"?$', false)
$$;
