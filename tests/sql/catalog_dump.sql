-- Everything the pgseal extension consists of, as sorted text lines (one column,
-- `line`): each object in schema pgseal and each member of the extension
-- (pg_depend deptype 'e'), with every property that a fresh CREATE EXTENSION and an
-- ALTER EXTENSION UPDATE must agree on. Lines name objects, never OIDs, so two
-- databases (a fresh install and an upgraded one) can be compared line by line
-- (tests/tests/upgrade_cluster.rs). ACLs are compared as sorted grants, NULL (the
-- default) expanded with acldefault(), so the order of GRANTs does not matter; source
-- text (function bodies, view definitions) is one line per source line.
WITH ext AS (
    SELECT e.oid, e.extname, e.extversion, e.extrelocatable, e.extnamespace, e.extowner,
           e.extconfig, e.extcondition
    FROM pg_catalog.pg_extension e WHERE e.extname = 'pgseal'
),
nsp AS (
    SELECT n.oid, n.nspname, n.nspowner, n.nspacl
    FROM pg_catalog.pg_namespace n WHERE n.nspname = 'pgseal'
),
member AS (
    SELECT d.classid, d.objid, d.objsubid
    FROM pg_catalog.pg_depend d, ext
    WHERE d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass
      AND d.refobjid = ext.oid AND d.deptype = 'e'
),
fn AS (
    SELECT p.*, p.oid::pg_catalog.regprocedure::text AS sig
    FROM pg_catalog.pg_proc p
    WHERE p.pronamespace IN (SELECT oid FROM nsp)
       OR p.oid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_proc'::pg_catalog.regclass)
),
rel AS (
    SELECT c.*, pg_catalog.format('%I.%I', n.nspname, c.relname) AS rname
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relnamespace IN (SELECT oid FROM nsp)
       OR c.oid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_class'::pg_catalog.regclass)
),
typ AS (
    SELECT t.*, t.oid::pg_catalog.regtype::text AS tname
    FROM pg_catalog.pg_type t
    WHERE t.typnamespace IN (SELECT oid FROM nsp)
       OR t.oid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_type'::pg_catalog.regclass)
),
con AS (
    SELECT co.*, coalesce(r.rname, ty.tname) AS owner_name
    FROM pg_catalog.pg_constraint co
    LEFT JOIN rel r ON r.oid = co.conrelid
    LEFT JOIN typ ty ON ty.oid = co.contypid
    WHERE r.oid IS NOT NULL OR ty.oid IS NOT NULL
),
trg AS (
    SELECT tg.* FROM pg_catalog.pg_trigger tg
    WHERE tg.tgrelid IN (SELECT oid FROM rel) AND NOT tg.tgisinternal
),
pol AS (
    SELECT po.*, r.rname FROM pg_catalog.pg_policy po JOIN rel r ON r.oid = po.polrelid
),
evt AS (
    SELECT et.* FROM pg_catalog.pg_event_trigger et
    WHERE et.oid IN (SELECT objid FROM member WHERE classid = 'pg_catalog.pg_event_trigger'::pg_catalog.regclass)
       OR et.evtfoid IN (SELECT oid FROM fn)
),
rul AS (
    SELECT ru.*, r.rname FROM pg_catalog.pg_rewrite ru JOIN rel r ON r.oid = ru.ev_class
),
-- Every object whose comment counts.
obj(classid, objid) AS (
    SELECT 'pg_catalog.pg_extension'::pg_catalog.regclass::oid, oid FROM ext
    UNION ALL SELECT 'pg_catalog.pg_namespace'::pg_catalog.regclass::oid, oid FROM nsp
    UNION ALL SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass::oid, oid FROM fn
    UNION ALL SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::oid, oid FROM rel
    UNION ALL SELECT 'pg_catalog.pg_type'::pg_catalog.regclass::oid, oid FROM typ
    UNION ALL SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass::oid, oid FROM con
    UNION ALL SELECT 'pg_catalog.pg_trigger'::pg_catalog.regclass::oid, oid FROM trg
    UNION ALL SELECT 'pg_catalog.pg_policy'::pg_catalog.regclass::oid, oid FROM pol
    UNION ALL SELECT 'pg_catalog.pg_event_trigger'::pg_catalog.regclass::oid, oid FROM evt
    UNION ALL SELECT classid, objid FROM member
),
acl(kind, name, grantee, privilege, grantable, grantor) AS (
    SELECT k, name,
           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END,
           a.privilege_type, a.is_grantable, pg_catalog.pg_get_userbyid(a.grantor)::text
    FROM (
        SELECT 'function' AS k, sig AS name, coalesce(proacl, pg_catalog.acldefault('f', proowner)) AS acl FROM fn
        UNION ALL
        SELECT 'relation', rname,
               coalesce(relacl, pg_catalog.acldefault((CASE WHEN relkind = 'S' THEN 's' ELSE 'r' END)::"char", relowner))
        FROM rel WHERE relkind NOT IN ('i', 'I', 'c', 't')
        UNION ALL
        SELECT 'type', tname, coalesce(typacl, pg_catalog.acldefault('T', typowner)) FROM typ
        UNION ALL
        SELECT 'schema', nspname::text, coalesce(nspacl, pg_catalog.acldefault('n', nspowner)) FROM nsp
    ) s, pg_catalog.aclexplode(s.acl) a
),
lines(line) AS (
    -- The extension and its configuration tables (pg_dump's extconfig).
    SELECT pg_catalog.format('extension %s version=%s relocatable=%s schema=%s owner=%s',
               extname, extversion, extrelocatable, extnamespace::pg_catalog.regnamespace,
               pg_catalog.pg_get_userbyid(extowner))
    FROM ext
    UNION ALL
    SELECT pg_catalog.format('extension config %s condition=%L', c.cfg::pg_catalog.regclass, c.cond)
    FROM ext, unnest(ext.extconfig, ext.extcondition) AS c(cfg, cond)  -- (a multi-argument unnest cannot be schema-qualified)
    UNION ALL
    SELECT pg_catalog.format('extension member %s', pg_catalog.pg_describe_object(classid, objid, objsubid))
    FROM member
    UNION ALL
    SELECT pg_catalog.format('schema %s owner=%s', nspname, pg_catalog.pg_get_userbyid(nspowner)) FROM nsp
    UNION ALL
    SELECT pg_catalog.format('%s %s acl %s %s grantable=%s grantor=%s', kind, name, grantee, privilege, grantable, grantor)
    FROM acl
    UNION ALL
    -- Functions.
    SELECT pg_catalog.format(
               'function %s kind=%s args=(%s) returns=%s lang=%s secdef=%s volatile=%s strict=%s parallel=%s leakproof=%s cost=%s rows=%s retset=%s support=%s owner=%s config=%s bin=%s',
               f.sig, f.prokind, pg_catalog.pg_get_function_arguments(f.oid),
               pg_catalog.pg_get_function_result(f.oid), l.lanname, f.prosecdef, f.provolatile,
               f.proisstrict, f.proparallel, f.proleakproof, f.procost, f.prorows, f.proretset,
               f.prosupport, pg_catalog.pg_get_userbyid(f.proowner), f.proconfig, f.probin)
    FROM fn f JOIN pg_catalog.pg_language l ON l.oid = f.prolang
    UNION ALL
    SELECT pg_catalog.format('function %s src %s: %s', f.sig, pg_catalog.lpad(s.n::text, 4, '0'), s.t)
    FROM fn f, pg_catalog.regexp_split_to_table(f.prosrc, E'\n') WITH ORDINALITY AS s(t, n)
    UNION ALL
    -- Relations, their columns, views' definitions, sequences.
    SELECT pg_catalog.format(
               'relation %s kind=%s persistence=%s owner=%s rowsecurity=%s forcerowsecurity=%s options=%s replident=%s partition=%s am=%s',
               r.rname, r.relkind, r.relpersistence, pg_catalog.pg_get_userbyid(r.relowner),
               r.relrowsecurity, r.relforcerowsecurity, r.reloptions, r.relreplident,
               r.relispartition, (SELECT amname FROM pg_catalog.pg_am WHERE oid = r.relam))
    FROM rel r
    UNION ALL
    SELECT pg_catalog.format(
               'relation %s column %s %s type=%s notnull=%s default=%s identity=%s generated=%s collation=%s dropped=%s storage=%s acl=%s options=%s',
               r.rname, pg_catalog.lpad(a.attnum::text, 3, '0'),
               CASE WHEN a.attisdropped THEN '(dropped)' ELSE pg_catalog.quote_ident(a.attname) END,
               CASE WHEN a.attisdropped THEN '' ELSE pg_catalog.format_type(a.atttypid, a.atttypmod) END,
               a.attnotnull, pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated,
               CASE WHEN a.attcollation = 0 THEN NULL ELSE a.attcollation::pg_catalog.regcollation::text END,
               a.attisdropped, a.attstorage, a.attacl,
               -- This machine's PostgreSQL 15 build stores a per-table 'pg_attver=<n>' in
               -- every column's attoptions (n differs between tables): not a property of pgseal.
               (SELECT pg_catalog.array_agg(o ORDER BY o) FROM pg_catalog.unnest(a.attoptions) AS o
                 WHERE o NOT LIKE 'pg\_attver=%'))
    FROM rel r
    JOIN pg_catalog.pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0
    LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    UNION ALL
    SELECT pg_catalog.format('relation %s view %s: %s', r.rname, pg_catalog.lpad(s.n::text, 4, '0'), s.t)
    FROM rel r, pg_catalog.regexp_split_to_table(pg_catalog.pg_get_viewdef(r.oid, true), E'\n') WITH ORDINALITY AS s(t, n)
    WHERE r.relkind IN ('v', 'm')
    UNION ALL
    SELECT pg_catalog.format('relation %s sequence type=%s start=%s increment=%s max=%s min=%s cache=%s cycle=%s owned_by=%s',
               r.rname, sq.seqtypid::pg_catalog.regtype, sq.seqstart, sq.seqincrement, sq.seqmax, sq.seqmin,
               sq.seqcache, sq.seqcycle,
               (SELECT pg_catalog.format('%s.%s', dp.refobjid::pg_catalog.regclass, at.attname)
                FROM pg_catalog.pg_depend dp
                JOIN pg_catalog.pg_attribute at ON at.attrelid = dp.refobjid AND at.attnum = dp.refobjsubid
                WHERE dp.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND dp.objid = r.oid
                  AND dp.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND dp.deptype IN ('a', 'i')))
    FROM rel r JOIN pg_catalog.pg_sequence sq ON sq.seqrelid = r.oid
    UNION ALL
    -- Indexes (also those behind constraints), constraints, triggers, policies, rules.
    SELECT pg_catalog.format('index %s on %s: %s valid=%s clustered=%s replident=%s',
               r.rname, i.indrelid::pg_catalog.regclass, pg_catalog.pg_get_indexdef(i.indexrelid),
               i.indisvalid, i.indisclustered, i.indisreplident)
    FROM rel r JOIN pg_catalog.pg_index i ON i.indexrelid = r.oid
    UNION ALL
    SELECT pg_catalog.format('constraint %s on %s type=%s deferrable=%s deferred=%s validated=%s index=%s: %s',
               c.conname, c.owner_name, c.contype, c.condeferrable, c.condeferred, c.convalidated,
               CASE WHEN c.conindid = 0 THEN NULL ELSE c.conindid::pg_catalog.regclass::text END,
               pg_catalog.pg_get_constraintdef(c.oid))
    FROM con c
    UNION ALL
    SELECT pg_catalog.format('trigger %s enabled=%s: %s', t.tgname, t.tgenabled, pg_catalog.pg_get_triggerdef(t.oid))
    FROM trg t
    UNION ALL
    SELECT pg_catalog.format('policy %s on %s permissive=%s cmd=%s roles=%s using=%s check=%s',
               p.polname, p.rname, p.polpermissive, p.polcmd,
               (SELECT pg_catalog.array_agg(CASE WHEN x = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(x)::text END ORDER BY 1)
                FROM pg_catalog.unnest(p.polroles) AS x),
               pg_catalog.pg_get_expr(p.polqual, p.polrelid), pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid))
    FROM pol p
    UNION ALL
    SELECT pg_catalog.format('rule %s on %s enabled=%s: %s', ru.rulename, ru.rname, ru.ev_enabled, pg_catalog.pg_get_ruledef(ru.oid))
    FROM rul ru WHERE ru.rulename <> '_RETURN'
    UNION ALL
    SELECT pg_catalog.format('statistics %s: %s', s.stxname, pg_catalog.pg_get_statisticsobjdef(s.oid))
    FROM pg_catalog.pg_statistic_ext s WHERE s.stxnamespace IN (SELECT oid FROM nsp)
    UNION ALL
    -- Types: enums (labels in order), domains, composite and array types by name.
    SELECT pg_catalog.format('type %s type=%s owner=%s relation=%s element=%s base=%s notnull=%s default=%s collation=%s',
               t.tname, t.typtype, pg_catalog.pg_get_userbyid(t.typowner),
               CASE WHEN t.typrelid = 0 THEN NULL ELSE t.typrelid::pg_catalog.regclass::text END,
               CASE WHEN t.typelem = 0 THEN NULL ELSE t.typelem::pg_catalog.regtype::text END,
               CASE WHEN t.typbasetype = 0 THEN NULL ELSE t.typbasetype::pg_catalog.regtype::text END,
               t.typnotnull, t.typdefault,
               CASE WHEN t.typcollation = 0 THEN NULL ELSE t.typcollation::pg_catalog.regcollation::text END)
    FROM typ t
    UNION ALL
    SELECT pg_catalog.format('type %s enum labels %s', t.tname,
               (SELECT pg_catalog.string_agg(pg_catalog.quote_literal(e.enumlabel), ', ' ORDER BY e.enumsortorder)
                FROM pg_catalog.pg_enum e WHERE e.enumtypid = t.oid))
    FROM typ t WHERE t.typtype = 'e'
    UNION ALL
    -- Event triggers (members of the extension, or calling its functions).
    SELECT pg_catalog.format('event trigger %s on %s enabled=%s tags=%s owner=%s: %s',
               e.evtname, e.evtevent, e.evtenabled, e.evttags, pg_catalog.pg_get_userbyid(e.evtowner),
               e.evtfoid::pg_catalog.regprocedure)
    FROM evt e
    UNION ALL
    -- The initial privileges PostgreSQL recorded for the extension's objects
    -- (pg_init_privs, from its scripts' GRANTs and REVOKEs): pg_dump compares the
    -- current privileges with these to decide which GRANTs and REVOKEs to dump.
    SELECT pg_catalog.format('init privileges %s type=%s %s %s grantable=%s grantor=%s',
               pg_catalog.pg_describe_object(ip.classoid, ip.objoid, ip.objsubid), ip.privtype,
               CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.pg_get_userbyid(a.grantee)::text END,
               a.privilege_type, a.is_grantable, pg_catalog.pg_get_userbyid(a.grantor))
    FROM pg_catalog.pg_init_privs ip, pg_catalog.aclexplode(ip.initprivs) a
    WHERE (ip.classoid, ip.objoid) IN (SELECT classid, objid FROM obj)
    UNION ALL
    -- Comments on any of the above (columns included).
    SELECT pg_catalog.format('comment on %s: %s',
               pg_catalog.pg_describe_object(d.classoid, d.objoid, d.objsubid), d.description)
    FROM pg_catalog.pg_description d
    WHERE (d.classoid, d.objoid) IN (SELECT classid, objid FROM obj)
)
SELECT line FROM lines ORDER BY line COLLATE "C";
