-- pgseal 0.1.0 -> 0.2.0. Run by `ALTER EXTENSION pgseal UPDATE` after the 0.2.0 files
-- are installed and the server has been restarted with them (shared_preload_libraries
-- loads pgseal.so at postmaster start; README, "Upgrading").
--
-- What it migrates, block by block (each block says which 0.2.0 change it carries):
--   0. who runs it (the owner of the extension's objects), and (0b) whether any
--      object of another role depends on what the script drops: if so it stops,
--      with 2BP01 naming those objects, before changing anything.
--   1. ledger format 2: five new columns of pgseal.ledger, payload nullable. Existing
--      rows are not rewritten: they read fmt = 1 (the column default, stored as the
--      column's missing value, so no row is updated and no guard trigger fires) and
--      NULL in the other new columns, which is exactly a format 1 row
--      (docs/FORMAT.md); they keep verifying, and new appends are format 2.
--   2. the checkpoint log pgseal.ledger_checkpoints (empty: 0.1.0 kept no
--      checkpoints; the v1 checkpoints users kept verify offline with the public key
--      0.1.0 gave them).
--  2b. EXECUTE grants other roles had on ledger_append and ledger_verify, which
--      this script drops and creates again: each named in a WARNING with the GRANT
--      that restores it.
--   3. the new C functions of 0.2.0.
--   4. the ledger API: guards (row write guards are new), the C audit triggers, the
--      export with the format 2 fields, pinned search_paths; _ledger_audit_append goes.
--   5. tenancy: limits, organisation invariants (org_locks and three triggers on
--      org_members), argument checks, protection evidence.
--   6. isolation_report and its helpers; (6b) the key table on every Citus node.
--   7. jobs: retention_set and vault_register_column run as the caller (no longer
--      SECURITY DEFINER) behind a registration check trigger; evidence triggers on
--      the retention tables; _tenants_of through the C _tenants_scan. Before that,
--      registrations 0.1.0 accepted that name no plain or partitioned table outside
--      pgseal (or a dropped column) are deleted, each named in a WARNING, and the
--      rest are listed in one WARNING for review. Then registrations get their
--      columns' numbers, the event triggers that make them follow renames and
--      drops (issue 17), and pg_dump conditions that dump only the registrations
--      whose table and column name still hold.
--  7b. data subjects (issue 19): the registry pgseal.subject_columns and
--      subject_register (ledger_append's subjects, the erasure guard and
--      ledger_verify's erased count are in blocks 3 and 4); 7c. tenant offboarding:
--      pgseal.tenant_offboardings (its C functions in block 3) and
--      _ledger_held_from, what a retention hold keeps of the ledger.
--   8. privileges exactly as sql/finalize.sql grants them, the checkpoint purpose of
--      tenant_keys, and the ledger id (pgseal.ledger_identity, one new random id).
--   9. tables audited with ledger_audit under 0.1.0 get the TRUNCATE trigger that
--      0.2.0's ledger_audit adds (plain and partitioned tables only; anything else
--      with a pgseal_audit trigger is named in a WARNING and skipped).
--  10. the index kek_rewrap reads, on (kek_version, key_id) (was kek_version alone).
--  11. data keys of tenant ids that name pgseal's own chains, named in a WARNING.
--  12. the outbox of a Citus worker's prepared seal counts (sql/citus.sql).
-- Function definitions are copied verbatim from the 0.2.0 install script (generated
-- from sql/*.sql and extension/src), as CREATE OR REPLACE, so a function keeps its
-- OID, and the triggers and views that use it keep working; C functions whose
-- definition did not change between the two releases are not repeated (their
-- symbols are the same in the 0.2.0 library). tests/tests/upgrade_cluster.rs checks
-- that the result equals a fresh 0.2.0 install (tests/sql/catalog_dump.sql).
-- Released upgrade scripts are never edited: a later change gets its own script.

\echo Use "ALTER EXTENSION pgseal UPDATE TO '0.2.0'" to load this file. \quit

-- The DDL guard (pgseal._ledger_ddl_guard) lets these statements through: it returns
-- early while pgseal._creating_extension() is true, which it is during ALTER
-- EXTENSION ... UPDATE as during CREATE EXTENSION.

------------------------------------------------------------------------------------
-- 0. Who runs it. PostgreSQL runs an update script as the calling role, so every
-- object it creates is owned by that role. In a fresh install the role that ran
-- CREATE EXTENSION owns them all, and the library acts as the owner of
-- pgseal.tenant_keys for its own tables (extension/src/privilege.rs). A different
-- superuser would leave the new tables and functions with another owner; refuse.
------------------------------------------------------------------------------------
DO $owner$
DECLARE
    owner pg_catalog.name := (SELECT r.rolname FROM pg_catalog.pg_class c
                               JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) c.relowner
                              WHERE c.oid OPERATOR(pg_catalog.=) 'pgseal.tenant_keys'::pg_catalog.regclass);
BEGIN
    IF owner OPERATOR(pg_catalog.<>) current_user THEN
        RAISE EXCEPTION 'ALTER EXTENSION pgseal UPDATE must run as %, the owner of the extension''s objects', owner
            USING ERRCODE = '42501',
                  HINT = pg_catalog.format('SET ROLE %I; ALTER EXTENSION pgseal UPDATE; RESET ROLE;', owner);
    END IF;
END
$owner$;

------------------------------------------------------------------------------------
-- 0b. What the script drops. It drops objects other roles can make depend on:
-- 0.1.0's pgseal._ledger_audit_append, pgseal.ledger_append(text, jsonb, text)
-- (block 4) and pgseal.ledger_verify(text, bigint, bigint) (block 3; any role that can connect can hold a view calling them, a temporary one
-- included), and one CHECK constraint of
-- pgseal.tenant_keys (block 8). The drops do not CASCADE (that would drop other
-- roles' objects); a dependent object would make the update fail with a generic
-- error instead. So they are looked up first, and the update stops before changing
-- anything, naming each dependent object with its schema and its owner. A view's
-- _RETURN rule is named as the view. (Only views, rules, defaults, constraints,
-- policies and BEGIN ATOMIC functions record such a dependency; a PL/pgSQL body
-- does not, and calls the function it names only when it runs.)
------------------------------------------------------------------------------------
DO $dependents$
DECLARE
    found pg_catalog.text;
    temps pg_catalog.text;
BEGIN
    WITH dropped(classid, objid) AS (
        SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid, p.oid
          FROM pg_catalog.pg_proc p
         WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('pgseal._ledger_audit_append(text, text, text)')
        UNION ALL
        SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid, p.oid
          FROM pg_catalog.pg_proc p
         WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('pgseal.ledger_append(text, jsonb, text)')
        UNION ALL
        SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass::pg_catalog.oid, p.oid
          FROM pg_catalog.pg_proc p
         WHERE p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure('pgseal.ledger_verify(text, bigint, bigint)')
        UNION ALL
        SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass::pg_catalog.oid, co.oid
          FROM pg_catalog.pg_constraint co
         WHERE co.conrelid OPERATOR(pg_catalog.=) 'pgseal.tenant_keys'::pg_catalog.regclass
           AND co.conname OPERATOR(pg_catalog.=) 'tenant_keys_purpose_check'
    ),
    dep AS (
        SELECT DISTINCT x.classid AS refclassid, x.objid AS refobjid,
               CASE WHEN rw.rulename OPERATOR(pg_catalog.=) '_RETURN'
                    THEN 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid ELSE d.classid END AS classid,
               CASE WHEN rw.rulename OPERATOR(pg_catalog.=) '_RETURN' THEN rw.ev_class ELSE d.objid END AS objid,
               CASE WHEN rw.rulename OPERATOR(pg_catalog.=) '_RETURN' THEN 0 ELSE d.objsubid END AS objsubid
          FROM dropped x
          JOIN pg_catalog.pg_depend d
            ON d.refclassid OPERATOR(pg_catalog.=) x.classid AND d.refobjid OPERATOR(pg_catalog.=) x.objid
          LEFT JOIN pg_catalog.pg_rewrite rw
            ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
           AND rw.oid OPERATOR(pg_catalog.=) d.objid
         WHERE d.deptype IN ('n', 'a')
    ),
    named AS (
        SELECT pg_catalog.format('%s %s%s depends on %s %s', i.type, i.identity,
                   coalesce(' (owner ' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(
                       CASE dep.classid
                           WHEN 'pg_catalog.pg_class'::pg_catalog.regclass THEN
                               (SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) dep.objid)
                           WHEN 'pg_catalog.pg_proc'::pg_catalog.regclass THEN
                               (SELECT p.proowner FROM pg_catalog.pg_proc p WHERE p.oid OPERATOR(pg_catalog.=) dep.objid)
                       END)) OPERATOR(pg_catalog.||) ')', ''),
                   r.type, r.identity) AS obj,
               i.schema
          FROM dep,
               pg_catalog.pg_identify_object(dep.classid, dep.objid, dep.objsubid) AS i,
               pg_catalog.pg_identify_object(dep.refclassid, dep.refobjid, 0) AS r
    )
    SELECT pg_catalog.string_agg(obj, '; ' ORDER BY obj),
           pg_catalog.string_agg(DISTINCT schema, ', ') FILTER (WHERE schema OPERATOR(pg_catalog.~) '^pg_temp_[0-9]+$')
      INTO found, temps
      FROM named;
    IF found IS NOT NULL THEN
        RAISE EXCEPTION 'ALTER EXTENSION pgseal UPDATE must drop objects of 0.1.0 that other objects depend on: %', found
            USING ERRCODE = '2BP01',
                  DETAIL = 'Nothing was changed: the extension is still at version 0.1.0. The update does not drop other roles'' objects.',
                  HINT = 'Drop the objects listed'
                         OPERATOR(pg_catalog.||) CASE WHEN temps IS NULL THEN '' ELSE pg_catalog.format(
                             '; those in %s are temporary and go when the session that made them ends: end that session (a session of the owner named above, in pg_stat_activity; pg_terminate_backend(pid) ends it)', temps) END
                         OPERATOR(pg_catalog.||) '. Then run ALTER EXTENSION pgseal UPDATE again.';
    END IF;
END
$dependents$;

------------------------------------------------------------------------------------
-- 1. Ledger format 2 (sql/ledger_schema.sql). The new columns come last, in the
-- order a fresh install has them (attnums 10-14), so the C code's tuple layout is the
-- same in both. ADD COLUMN with a constant default does not rewrite the table.
------------------------------------------------------------------------------------
ALTER TABLE pgseal.ledger
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN fmt        smallint NOT NULL DEFAULT 1,
    ADD COLUMN db_role    text,
    ADD COLUMN subjects   text[],
    ADD COLUMN salt       bytea,
    ADD COLUMN commitment bytea;

------------------------------------------------------------------------------------
-- 2. The checkpoint log (sql/ledger_schema.sql, issue 14).
------------------------------------------------------------------------------------
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

-- 0.2.0 revokes on ledger, ledger_heads and ledger_checkpoints in one statement; the
-- first two were revoked by 0.1.0 already.
REVOKE ALL ON pgseal.ledger_checkpoints FROM PUBLIC;

SELECT pg_catalog.pg_extension_config_dump('pgseal.ledger_checkpoints', '');

------------------------------------------------------------------------------------
-- 2b. EXECUTE grants that roles other than pgseal's were given on the two functions
-- this script drops and creates again with another signature (ledger_append) or
-- result (ledger_verify) go with them. A grant made inside an extension script
-- would become one of the extension's initial privileges (pg_init_privs), which
-- pg_dump leaves out, so the script does not make them again: a WARNING names each
-- one with the GRANT that restores it after the update.
------------------------------------------------------------------------------------
DO $grants$
DECLARE
    g record;
BEGIN
    FOR g IN
        SELECT pg_catalog.format('GRANT EXECUTE ON FUNCTION %s TO %I%s',
                   f.newsig, r.rolname, CASE WHEN a.is_grantable THEN ' WITH GRANT OPTION' ELSE '' END) AS stmt,
               f.oldsig, r.rolname
          FROM (VALUES ('pgseal.ledger_append(text, jsonb, text)', 'pgseal.ledger_append(text, jsonb, text, text[])'),
                       ('pgseal.ledger_verify(text, bigint, bigint)', 'pgseal.ledger_verify(text, bigint, bigint)')) AS f(oldsig, newsig)
          JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) pg_catalog.to_regprocedure(f.oldsig)
          CROSS JOIN LATERAL pg_catalog.aclexplode(p.proacl) AS a
          JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.grantee
         WHERE a.privilege_type OPERATOR(pg_catalog.=) 'EXECUTE'
           AND a.grantee OPERATOR(pg_catalog.<>) p.proowner
           AND r.rolname NOT IN ('pgseal_ledger', 'pgseal_admin', 'pgseal_seal', 'pgseal_decrypt')
    LOOP
        RAISE WARNING 'pgseal: the EXECUTE grant on % to % goes with the function, which the update replaces', g.oldsig, g.rolname
            USING HINT = pg_catalog.format('After the update: %s;', g.stmt);
    END LOOP;
END
$grants$;

------------------------------------------------------------------------------------
-- 3. C functions new in 0.2.0 (leader lock, protection evidence, tenant scan, audit
-- queue status, ledger id, the Citus workers' forwarded audit entries, data subjects'
-- export and erasure), and ledger_verify with its erased count. Created closed;
-- block 8 grants them.
------------------------------------------------------------------------------------
CREATE OR REPLACE FUNCTION pgseal."_leader_try_lock"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_leader_try_lock_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_protection_changed"(
	"rel" oid /* pg_sys :: Oid */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_protection_changed_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_tenants_scan"(
	"rel" oid /* pg_sys :: Oid */
) RETURNS SETOF TEXT /* String */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_tenants_scan_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_shard_tenants"(
	"rel" TEXT, /* &str */
	"shards" bigint[], /* alloc::vec::Vec<i64> */
	"lock_timeout" TEXT /* &str */
) RETURNS TEXT[] /* alloc::vec::Vec<alloc::string::String> */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_shard_tenants_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_citus_key_counts"(
	"rel" oid, /* pgrx::pg_sys::Oid */
	"attnum" smallint /* i16 */
) RETURNS TABLE (
	"k" TEXT,  /* alloc::string::String */
	"n" bigint  /* i64 */
)
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_citus_key_counts_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_shard_key_counts"(
	"rel" TEXT, /* &str */
	"column" TEXT, /* &str */
	"shards" bigint[], /* alloc::vec::Vec<i64> */
	"lock_timeout" TEXT /* &str */
) RETURNS TEXT /* alloc::string::String */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_shard_key_counts_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_pinned_name"(
	"rel" oid, /* pg_sys :: Oid */
	"attnum" smallint /* i16 */
) RETURNS TEXT[] /* alloc::vec::Vec<alloc::string::String> */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_pinned_name_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_planning_runs_owner_code"(
	"rel" oid /* pg_sys :: Oid */
) RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_planning_runs_owner_code_wrapper';

CREATE OR REPLACE FUNCTION pgseal."audit_queue_status"() RETURNS TABLE (
	"launcher_running" bool,  /* bool */
	"writers" INT,  /* i32 */
	"slots" INT,  /* i32 */
	"slots_in_use" INT  /* i32 */
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'audit_queue_status_wrapper';

CREATE OR REPLACE FUNCTION pgseal."ledger_id"() RETURNS TEXT /* String */
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ledger_id_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_citus_owner_check"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_citus_owner_check_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_citus_owner_done"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_citus_owner_done_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_keys_changed"() RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_keys_changed_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_audit_append_forwarded"(
	"tenant" TEXT, /* &str */
	"event" TEXT, /* &str */
	"payload" TEXT, /* &str */
	"actor" TEXT, /* &str */
	"db_role" TEXT, /* &str */
	"system_ok" bool /* bool */
) RETURNS TEXT /* alloc::string::String */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_audit_append_forwarded_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_seal_counts_forwarded"(
	"key_ids" TEXT[], /* Vec < String > */
	"seals" bigint[] /* Vec < i64 > */
) RETURNS void
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_seal_counts_forwarded_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_ledger_erasing"() RETURNS bool /* bool */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_ledger_erasing_wrapper';

CREATE OR REPLACE FUNCTION pgseal."subject_erase"(
	"tenant" TEXT, /* Option < & str > */
	"subject" TEXT /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'subject_erase_wrapper';

CREATE OR REPLACE FUNCTION pgseal."subject_export"(
	"tenant" TEXT, /* Option < & str > */
	"subject" TEXT /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'subject_export_wrapper';

CREATE OR REPLACE FUNCTION pgseal."tenant_offboard"(
	"tenant" TEXT, /* Option < & str > */
	"grace" interval /* Option < pgrx :: datum :: Interval > */
) RETURNS timestamp with time zone /* pgrx :: datum :: TimestampWithTimeZone */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'tenant_offboard_wrapper';

CREATE OR REPLACE FUNCTION pgseal."tenant_offboard_cancel"(
	"tenant" TEXT /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'tenant_offboard_cancel_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_due"() RETURNS SETOF TEXT /* String */
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_due_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_export"(
	"tenant" TEXT /* Option < & str > */
) RETURNS SETOF TEXT /* alloc::string::String */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_export_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_delete"(
	"tenant" TEXT, /* Option < & str > */
	"batch" INT /* Option < i32 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_delete_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_visible"(
	"rel" oid /* pgrx::pg_sys::Oid */
) RETURNS bool /* bool */
STABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_visible_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_visible_in"(
	"table" TEXT /* &str */
) RETURNS bool /* bool */
STABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_visible_in_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_row_key"(
	"rel" oid, /* pgrx::pg_sys::Oid */
	"place" tid, /* pgrx::pg_sys::ItemPointerData */
	"xmin" xid /* pgrx::pg_sys::TransactionId */
) RETURNS bytea /* alloc::vec::Vec<u8> */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_row_key_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_node_row_key"(
	"rel" oid, /* pgrx::pg_sys::Oid */
	"place" tid, /* pgrx::pg_sys::ItemPointerData */
	"xmin" xid /* pgrx::pg_sys::TransactionId */
) RETURNS bytea /* alloc::vec::Vec<u8> */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_node_row_key_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_advance"(
	"tenant" TEXT, /* Option < & str > */
	"from_step" TEXT, /* Option < & str > */
	"to_step" TEXT, /* Option < & str > */
	"export_file" TEXT DEFAULT NULL, /* Option < & str > */
	"export_sha256" TEXT DEFAULT NULL /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_advance_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_erase"(
	"tenant" TEXT, /* Option < & str > */
	"batch" INT /* Option < i32 > */
) RETURNS bigint /* i64 */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_erase_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_offboard_finish"(
	"tenant" TEXT /* Option < & str > */
) RETURNS jsonb /* JsonB */
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_offboard_finish_wrapper';

-- ledger_verify reports the erased entries it checked (a new result column, which
-- CREATE OR REPLACE cannot add: 0b checked that nothing depends on it).
DROP FUNCTION pgseal.ledger_verify(text, bigint, bigint);
CREATE FUNCTION pgseal."ledger_verify"(
	"tenant" TEXT DEFAULT NULL, /* Option < & str > */
	"from_seq" bigint DEFAULT NULL, /* Option < i64 > */
	"to_seq" bigint DEFAULT NULL /* Option < i64 > */
) RETURNS TABLE (
	"ok" bool,  /* bool */
	"checked" bigint,  /* i64 */
	"first_bad_seq" bigint,  /* Option < i64 > */
	"problem" TEXT,  /* Option < String > */
	"erased" bigint  /* i64 */
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'ledger_verify_wrapper';

------------------------------------------------------------------------------------
-- 4. The ledger API (sql/ledger_api.sql).
------------------------------------------------------------------------------------
-- One JSON object per entry with every field needed to verify it offline
-- (docs/FORMAT.md, "Export lines"). Runs as the caller: row-level security limits
-- pgseal_ledger to its own tenant, and _ledger_tenant() refuses others.
CREATE OR REPLACE FUNCTION pgseal.ledger_export(tenant text DEFAULT NULL, from_seq bigint DEFAULT NULL, to_seq bigint DEFAULT NULL)
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
CREATE OR REPLACE FUNCTION pgseal._ledger_guard() RETURNS trigger
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

CREATE TRIGGER pgseal_checkpoints_truncate_guard BEFORE TRUNCATE ON pgseal.ledger_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION pgseal._ledger_guard();
ALTER TABLE pgseal.ledger_checkpoints ENABLE ALWAYS TRIGGER pgseal_checkpoints_truncate_guard;

-- Row writes other than pgseal's own, refused with 42501 for everyone, superusers
-- included (extension/src/ledger/guard.rs): INSERT into the ledger outside
-- pgseal's append path; any write of a heads row outside the ledger functions,
-- and a change of its anchor outside ledger_prune(); any write of a checkpoint
-- outside ledger_checkpoint(). A C function: it runs for every appended row, and
-- the direct single-entry write performs its check itself instead of firing it.
CREATE OR REPLACE FUNCTION pgseal._ledger_write_guard() RETURNS trigger
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

-- 0.1.0's _audit_row was PL/pgSQL, SECURITY DEFINER; 0.2.0's is C and runs as the
-- invoker. CREATE OR REPLACE keeps the function's OID, so the pgseal_audit triggers
-- of tables audited under 0.1.0 now run the C trigger (same arguments: primary key
-- columns, tenant column).
-- Row-change audit (extension/src/ledger/audit_trigger.rs). Not SECURITY DEFINER:
-- it builds the row images as the role that changed the row, and only the
-- finished entry is appended as the owner. The trigger arguments are the primary
-- key columns and the tenant column ('' when the table has none).
CREATE OR REPLACE FUNCTION pgseal._audit_row() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'audit_row_trigger';

-- TRUNCATE fires no row trigger: ledger_audit adds this statement trigger, which
-- records 'audit.truncated' (the table's name) in the chain of the tenant context,
-- else pgseal's open chain '_pgseal_open'. It reads nothing from the table.
CREATE OR REPLACE FUNCTION pgseal._audit_truncate() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'audit_truncate_trigger';

-- pgseald's receipts ('retention.deleted'): appended to the current tenant's chain
-- through this narrow entry point, since ledger_append refuses pgseal's reserved
-- event names. It accepts only pgseald's job events; granted to pgseal_admin.
CREATE OR REPLACE FUNCTION pgseal._job_receipt(event text, payload jsonb) RETURNS bigint
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'job_receipt_fn';

CREATE OR REPLACE FUNCTION pgseal.ledger_audit(rel regclass, events text[] DEFAULT '{INSERT,UPDATE,DELETE}')
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

CREATE OR REPLACE FUNCTION pgseal.ledger_unaudit(rel regclass) RETURNS void
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
CREATE OR REPLACE FUNCTION pgseal._ledger_ddl_guard() RETURNS event_trigger
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

-- 0.1.0's row audit appended through this function; 0.2.0's C trigger appends
-- directly, and the 0.2.0 library has no such symbol.
DROP FUNCTION pgseal._ledger_audit_append(text, text, text);

-- ledger_append takes the entry's data subjects (issue 19): a fourth argument with a
-- default, which cannot sit beside the three-argument function (every call with three
-- arguments would be ambiguous), so that one goes (0b checked that nothing depends on
-- it) and the new one is created with 0.2.0's grant (block 8).
DROP FUNCTION pgseal.ledger_append(text, jsonb, text);
CREATE FUNCTION pgseal.ledger_append(event text, payload jsonb DEFAULT '{}', actor text DEFAULT NULL, subjects text[] DEFAULT NULL)
RETURNS TABLE (seq bigint, hash text)
VOLATILE PARALLEL UNSAFE
LANGUAGE c AS 'MODULE_PATHNAME', 'ledger_append_srf';

COMMENT ON FUNCTION pgseal.ledger_append(text, jsonb, text, text[]) IS
    'Appends an entry to the current tenant''s ledger, naming the data subjects it concerns; returns its seq and hash (hex).';

------------------------------------------------------------------------------------
-- 5. Tenancy (sql/tenancy.sql).
------------------------------------------------------------------------------------
-- pgseal tenancy: the pooler-safe context setter, RLS policy helpers, organisation
-- roles, and the isolation linter. Policies call pgseal.current_tenant() and
-- pgseal.current_user_id() inside a sub-select, so the planner evaluates each once per
-- query (an InitPlan) and can use an index on the tenant column; in a database with
-- Citus they call them directly, for Citus refuses sub-selects in the policies of
-- distributed tables (docs/SCALING.md).

-- Whether this database has Citus (docs/SCALING.md).
CREATE OR REPLACE FUNCTION pgseal._citus_present() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$ SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') $$;

-- A policy's value of the function call `call`, cast to `typ`: in a sub-select (an
-- InitPlan, evaluated once a query), or, where Citus is installed, the call itself. A
-- table may be distributed after it is protected, so the form follows the database,
-- not the table.
CREATE OR REPLACE FUNCTION pgseal._policy_value(call text, typ text) RETURNS text
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
CREATE OR REPLACE FUNCTION pgseal._citus_ddl_propagation(value text) RETURNS text
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
CREATE OR REPLACE FUNCTION pgseal.set_tenant(tenant text, user_id text DEFAULT NULL) RETURNS void
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

CREATE OR REPLACE FUNCTION pgseal."_citus_worker"() RETURNS bool /* bool */
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_citus_worker_wrapper';

CREATE OR REPLACE FUNCTION pgseal."_replica_orgs"(
	"min_role" TEXT /* &str */
) RETURNS TEXT[] /* core::option::Option<alloc::vec::Vec<alloc::string::String>> */
STRICT STABLE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_replica_orgs_wrapper';

-- The organisations in which the current user holds at least `min_role`, in the
-- current tenant. SECURITY DEFINER so that policies on org_members itself can use it
-- without recursing into those policies. Like every SECURITY DEFINER function of
-- pgseal, its search_path ends in pg_temp (otherwise PostgreSQL searches the
-- caller's temporary schema first for types and tables) and it names what it uses
-- with its schema.
CREATE OR REPLACE FUNCTION pgseal._my_orgs(min_role pgseal.org_role) RETURNS pg_catalog.text[]
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
CREATE OR REPLACE FUNCTION pgseal._org_exists(org pg_catalog.text) RETURNS pg_catalog.bool
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT EXISTS (SELECT 1 FROM pgseal.org_members m
                   WHERE m.tenant_id OPERATOR(pg_catalog.=) pgseal.current_tenant()
                     AND m.org_id OPERATOR(pg_catalog.=) org)
$$;

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
CREATE OR REPLACE FUNCTION pgseal._org_lock(org pg_catalog.text) RETURNS void
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

-- The organisation invariants apply to changes from now on; memberships written
-- under 0.1.0 are not re-checked (an organisation left without an owner keeps its
-- members; only a pgseal_admin member can then add an owner).
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
CREATE OR REPLACE FUNCTION pgseal._org_members_guard() RETURNS trigger
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
CREATE OR REPLACE FUNCTION pgseal._org_members_keep_owner() RETURNS trigger
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
CREATE OR REPLACE FUNCTION pgseal._org_members_record() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'org_members_record_trigger';
CREATE TRIGGER org_members_record AFTER INSERT OR UPDATE OR DELETE ON pgseal.org_members
    FOR EACH ROW EXECUTE FUNCTION pgseal._org_members_record();
ALTER TABLE pgseal.org_members ENABLE ALWAYS TRIGGER org_members_record;

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
CREATE OR REPLACE FUNCTION pgseal._check_table(rel regclass) RETURNS void
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
CREATE OR REPLACE FUNCTION pgseal._check_tenant_arg(tenant text) RETURNS void
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
CREATE OR REPLACE FUNCTION pgseal._column_type(rel regclass, col name) RETURNS text
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
CREATE OR REPLACE FUNCTION pgseal._with_partitions(rel regclass) RETURNS SETOF regclass
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
CREATE OR REPLACE FUNCTION pgseal._has_leading_index(rel regclass, col name) RETURNS boolean
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
CREATE OR REPLACE FUNCTION pgseal._rls_reset(t regclass, tenant_column name) RETURNS void
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
CREATE OR REPLACE FUNCTION pgseal.tenant_protect(rel regclass, tenant_column name DEFAULT 'tenant_id') RETURNS void
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

CREATE OR REPLACE FUNCTION pgseal.tenant_unprotect(rel regclass) RETURNS void
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

CREATE OR REPLACE FUNCTION pgseal.org_protect(rel regclass, owner_column name, org_column name, tenant_column name DEFAULT 'tenant_id')
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

------------------------------------------------------------------------------------
-- 6. The isolation report (sql/isolation_report.sql).
------------------------------------------------------------------------------------
-- pgseal.isolation_report(): every way a tenant-scoped table can escape row level
-- security, one row per finding. A table is tenant-scoped when it has a column named
-- in pgseal.tenant_column_names (default {tenant_id}). Objects that belong to an
-- extension, and the system schemas, are not checked. A clean database returns no rows.

CREATE OR REPLACE FUNCTION pgseal._tenant_column_names() RETURNS name[]
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
    SELECT coalesce(nullif(current_setting('pgseal.tenant_column_names', true), ''), '{tenant_id}')::name[]
$$;

-- The tables Citus distributes ('h', with the column they are distributed by) or
-- replicates to every node ('n': reference tables and local tables in Citus's
-- metadata); no rows without Citus. Its catalog is read by name at run time, as it
-- exists only where Citus is installed.
CREATE OR REPLACE FUNCTION pgseal._citus_tables() RETURNS TABLE (rel oid, method "char", dist_column name)
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
CREATE OR REPLACE FUNCTION pgseal._rls_signature(rel regclass) RETURNS text
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
CREATE OR REPLACE FUNCTION pgseal._citus_shard_problems(rels oid[]) RETURNS TABLE (rel oid, problem text)
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
CREATE OR REPLACE FUNCTION pgseal._names_tenant(clause text, col name) RETURNS boolean
LANGUAGE sql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT clause ~ ('(^|[^a-z0-9_."])' || quote_ident(col) || '([^a-z0-9_"]|$)')
       AND clause ~ '(current_tenant|current_setting)\('
$$;

-- Its search_path leaves pgseal out so that every object outside pg_catalog, pgseal's
-- own included, is named with its schema (regclass and regprocedure print a schema
-- only for what the search_path does not find).
CREATE OR REPLACE FUNCTION pgseal.isolation_report()
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

------------------------------------------------------------------------------------
-- 6b. Keys on every Citus node (sql/citus.sql, issue 18): pgseal.citus_distribute()
-- makes pgseal.tenant_keys a reference table; keys are read from this node's copy.
------------------------------------------------------------------------------------
-- Where this node reads pgseal.tenant_keys from: its local placement when Citus
-- replicates the table (`replicated`), the table itself otherwise (no Citus, not
-- distributed yet, or no placement here). The placement is found in Citus's metadata,
-- which only a superuser writes, and is a table of pgseal's schema, where only
-- pgseal's owner creates tables.
CREATE OR REPLACE FUNCTION pgseal._keys_relation(OUT rel text, OUT replicated boolean)
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    shard text;
BEGIN
    rel := 'pgseal.tenant_keys';
    replicated := false;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'citus') THEN
        RETURN;
    END IF;
    -- Read by name at run time: Citus's catalog exists only where it is installed.
    -- The placement is named by its shard id; Citus hides it from pg_class queries.
    EXECUTE $q$
        SELECT pg_catalog.format('%I.%I', 'pgseal', 'tenant_keys_' || s.shardid)
        FROM pg_catalog.pg_dist_shard s
        JOIN pg_catalog.pg_dist_placement p ON p.shardid OPERATOR(pg_catalog.=) s.shardid
        WHERE s.logicalrelid OPERATOR(pg_catalog.=) 'pgseal.tenant_keys'::pg_catalog.regclass
          AND p.groupid OPERATOR(pg_catalog.=) (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g)
        LIMIT 1 $q$ INTO shard;
    IF pg_catalog.to_regclass(shard) IS NOT NULL THEN
        rel := shard;
        replicated := true;
    ELSIF EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                  WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal.tenant_keys'::pg_catalog.regclass) THEN
        -- Replicated, but not to this node: read through Citus (top-level queries only).
        replicated := true;
    END IF;
END
$$;

-- Makes pgseal.tenant_keys and pgseal._org_members_copy reference tables (run once,
-- on the coordinator, after CREATE EXTENSION pgseal and adding the workers; run
-- again, it does what is left). Keys and organisation members made on the
-- coordinator so far are copied to every node; keys or members that exist only in a
-- worker's own table would be hidden by the distribution, so it refuses while any
-- worker has one (or, for members, does not know it is a worker). It also
-- hands pgseal._two_phase to Citus, which pgseal's ledger needs on a Citus
-- coordinator, and makes pgseal._ledger_forwarded and pgseal._two_phase_shards,
-- through which a worker's ledger_append reaches the coordinator. Returns what it
-- did.
CREATE OR REPLACE FUNCTION pgseal.citus_distribute() RETURNS text
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    stray text;
    done  text[] := '{}';
    -- The extension's owner: pgseal writes the tables made here as that role, which
    -- may not be the superuser running this.
    ext_owner name := (SELECT r.rolname FROM pg_catalog.pg_extension e
                       JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) e.extowner
                       WHERE e.extname OPERATOR(pg_catalog.=) 'pgseal');
BEGIN
    IF NOT pgseal._citus_present() THEN
        RAISE EXCEPTION 'Citus is not installed in this database'
            USING ERRCODE = '55000';
    END IF;
    -- An empty table for Citus, made here on the coordinator only (Citus makes its
    -- copies on the workers, which would clash with a table of the extension
    -- there). pgseal's first ledger write of a transaction on a Citus coordinator
    -- deletes from it (nothing is ever in it): Citus then commits the transaction's writes on the
    -- workers with two-phase commit, so they and the ledger entries written here
    -- commit together or not at all (pgseal::pg::citus::commit_remote_writes_in_two_phases).
    IF pg_catalog.to_regclass('pgseal._two_phase') IS NULL THEN
        CREATE TABLE pgseal._two_phase ();
        REVOKE ALL ON pgseal._two_phase FROM PUBLIC;
        ALTER EXTENSION pgseal ADD TABLE pgseal._two_phase;
    END IF;
    EXECUTE pg_catalog.format('ALTER TABLE pgseal._two_phase OWNER TO %I', ext_owner);
    IF NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                   WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal._two_phase'::pg_catalog.regclass) THEN
        EXECUTE 'SELECT pg_catalog.citus_add_local_table_to_metadata(''pgseal._two_phase'')';
    END IF;
    -- Where a worker's ledger_append goes (pgseal._ledger_forwarded_append() above):
    -- a Citus local table of the coordinator, made here for the same reason.
    IF pg_catalog.to_regclass('pgseal._ledger_forwarded') IS NULL THEN
        -- The tenant's column is not named as a tenant table's would be: the
        -- isolation report reads no table of pgseal's as an application's, and
        -- Citus's shell of it is not a member of the extension.
        CREATE TABLE pgseal._ledger_forwarded (
            chain     text NOT NULL,
            event     text NOT NULL,
            payload   jsonb,
            actor     text NOT NULL,
            db_role   text NOT NULL,
            subjects  text[],
            seq       bigint,
            hash      text
        );
        REVOKE ALL ON pgseal._ledger_forwarded FROM PUBLIC;
        CREATE TRIGGER ledger_forwarded_append BEFORE INSERT ON pgseal._ledger_forwarded
            FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_forwarded_append();
        CREATE TRIGGER ledger_forwarded_done AFTER INSERT ON pgseal._ledger_forwarded
            FOR EACH ROW EXECUTE FUNCTION pgseal._ledger_forwarded_done();
        ALTER TABLE pgseal._ledger_forwarded ENABLE ALWAYS TRIGGER ledger_forwarded_append;
        ALTER TABLE pgseal._ledger_forwarded ENABLE ALWAYS TRIGGER ledger_forwarded_done;
        ALTER EXTENSION pgseal ADD TABLE pgseal._ledger_forwarded;
    END IF;
    EXECUTE pg_catalog.format('ALTER TABLE pgseal._ledger_forwarded OWNER TO %I', ext_owner);
    IF NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                   WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal._ledger_forwarded'::pg_catalog.regclass) THEN
        EXECUTE 'SELECT pg_catalog.citus_add_local_table_to_metadata(''pgseal._ledger_forwarded'')';
    END IF;
    -- pgseal._two_phase_shards (above), distributed over the workers. Citus
    -- distributes a table of the extension by finding it on every node.
    IF NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                   WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal._two_phase_shards'::pg_catalog.regclass) THEN
        EXECUTE 'SELECT pg_catalog.create_distributed_table(''pgseal._two_phase_shards'', ''k'', colocate_with => ''none'')';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                   WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal.tenant_keys'::pg_catalog.regclass) THEN
        EXECUTE $q$
            SELECT pg_catalog.string_agg(pg_catalog.format('%s:%s', r.nodename, r.nodeport), ', ')
            FROM pg_catalog.run_command_on_workers('SELECT pg_catalog.count(*) FROM pgseal.tenant_keys') r
            WHERE NOT r.success OR r.result OPERATOR(pg_catalog.<>) '0' $q$ INTO stray;
        IF stray IS NOT NULL THEN
            RAISE EXCEPTION 'workers % have keys of their own in pgseal.tenant_keys (or could not be read)', stray
                USING ERRCODE = '55000',
                      HINT = 'Keys made on a worker before pgseal.citus_distribute() would be hidden by it; decrypt and seal those values again through the coordinator.';
        END IF;
        EXECUTE 'SELECT pg_catalog.create_reference_table(''pgseal.tenant_keys'')';
        EXECUTE 'SELECT pg_catalog.truncate_local_data_after_distributing_table(''pgseal.tenant_keys'')';
        -- Keys cached so far were read from this node's own table: empty every cache.
        PERFORM pgseal._keys_changed();
        done := pg_catalog.array_append(done, 'pgseal.tenant_keys');
    END IF;
    -- The organisation membership the workers read (sql/tenancy.sql): this node's
    -- org_members as it is now, then kept equal by org_members' trigger.
    IF NOT EXISTS (SELECT 1 FROM pgseal._citus_tables() d
                   WHERE d.rel OPERATOR(pg_catalog.=) 'pgseal._org_members_copy'::pg_catalog.regclass) THEN
        -- Every worker must know it is one (a node that Citus's metadata never
        -- reached reads as a coordinator, its own org_members), and hold no
        -- membership of its own, which would stop counting here without a word.
        EXECUTE $q$
            SELECT pg_catalog.string_agg(pg_catalog.format('%s:%s', r.nodename, r.nodeport), ', ')
            FROM pg_catalog.run_command_on_workers(
                'SELECT (SELECT g.groupid FROM pg_catalog.pg_dist_local_group g) OPERATOR(pg_catalog.<>) 0
                        AND NOT EXISTS (SELECT 1 FROM pgseal.org_members)') r
            WHERE NOT r.success OR r.result OPERATOR(pg_catalog.<>) 't' $q$ INTO stray;
        IF stray IS NOT NULL THEN
            RAISE EXCEPTION 'workers % do not know they are workers, or hold organisation members of their own in pgseal.org_members (or could not be read)', stray
                USING ERRCODE = '55000',
                      HINT = 'Sync Citus''s metadata to every worker (citus_activate_node); add the members through the coordinator, and TRUNCATE pgseal.org_members on those workers as a superuser.';
        END IF;
        -- No change of org_members may commit between the copy and the distribution.
        LOCK TABLE pgseal.org_members IN EXCLUSIVE MODE;
        DELETE FROM pgseal._org_members_copy;
        INSERT INTO pgseal._org_members_copy (tenant_id, org_id, user_id, role)
            SELECT m.tenant_id, m.org_id, m.user_id, m.role FROM pgseal.org_members m;
        EXECUTE 'SELECT pg_catalog.create_reference_table(''pgseal._org_members_copy'')';
        EXECUTE 'SELECT pg_catalog.truncate_local_data_after_distributing_table(''pgseal._org_members_copy'')';
        done := pg_catalog.array_append(done, 'pgseal._org_members_copy');
    END IF;
    RETURN CASE pg_catalog.cardinality(done)
        WHEN 0 THEN 'pgseal.tenant_keys and pgseal._org_members_copy are already reference tables'
        WHEN 1 THEN done[1] || ' is now a reference table'
        ELSE pg_catalog.array_to_string(done, ' and ') || ' are now reference tables' END;
END
$$;

------------------------------------------------------------------------------------
-- 7. Jobs (sql/jobs.sql). Rules and registrations written under 0.1.0 that name a
-- plain or partitioned table outside pgseal stay (listed for review); the
-- registration check and the evidence triggers apply to writes from now on.
------------------------------------------------------------------------------------
-- Registrations written under 0.1.0. Its retention_set and vault_register_column
-- were SECURITY DEFINER and accepted any relation with the right columns: a view,
-- a table of pgseal (tenant_keys), a system catalog, a table the registering role
-- could not DELETE from or UPDATE; and a registration stays when its table or
-- column is dropped later. pgseald acts on every row as its own role, so such a row
-- would make it delete or update what the registrant could not, run a view's
-- functions as pgseald, or (_tenants_of refusing a view or a pgseal table) stop the
-- whole retention run. Rows that the registration check below would refuse for
-- their relation (no plain or partitioned table, or one of pgseal), rows naming a
-- system catalog (which that check lets a superuser register, but no application
-- table is one), and rows whose column is gone, are deleted here, each named in a
-- WARNING; what remains is listed in one WARNING for review, because who
-- registered it, and whether that role could DELETE or UPDATE, is not recorded.
-- This runs before the evidence triggers exist (they are created below), so the
-- deletions append no 'retention.removed' entries: 0.1.0 recorded no 'retention.set'
-- for these rows either, the WARNINGs (and the server log) are their record, and
-- the update does not depend on appending to chains of tenants a registrant chose.
DO $registrations$
DECLARE
    r       record;
    n_rules bigint;
    n_cols  bigint;
    listed  pg_catalog.text;
BEGIN
    FOR r IN
        WITH bad AS (
            SELECT x.ctid AS row_ctid, x.rel::pg_catalog.oid AS relid, x.time_column AS col, x.tenant_id AS tenant,
                   CASE
                       WHEN c.oid IS NULL THEN 'no such relation (dropped)'
                       WHEN c.relkind NOT IN ('r', 'p') THEN
                           CASE c.relkind WHEN 'v' THEN 'a view' WHEN 'm' THEN 'a materialized view'
                                          WHEN 'f' THEN 'a foreign table'
                                          ELSE pg_catalog.format('relkind %s', c.relkind) END
                           OPERATOR(pg_catalog.||) ', not a plain or partitioned table'
                       WHEN n.nspname OPERATOR(pg_catalog.=) 'pgseal' THEN 'a table of pgseal'
                       WHEN n.nspname IN ('pg_catalog', 'information_schema') OR n.nspname OPERATOR(pg_catalog.~~) 'pg\_toast%' THEN 'a system catalog'
                       WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                         WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
                                           AND a.attname OPERATOR(pg_catalog.=) x.time_column
                                           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped)
                           THEN 'its time column does not exist'
                   END AS why,
                   CASE WHEN c.oid IS NOT NULL THEN pg_catalog.format('%I.%I', n.nspname, c.relname) END AS relname
              FROM pgseal.retention_rules x
              LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
              LEFT JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
        ),
        gone AS (
            DELETE FROM pgseal.retention_rules x USING bad
             WHERE x.ctid OPERATOR(pg_catalog.=) bad.row_ctid AND bad.why IS NOT NULL
            RETURNING bad.relid, bad.relname, bad.col, bad.tenant, bad.why
        )
        SELECT * FROM gone ORDER BY relid, tenant NULLS FIRST
    LOOP
        RAISE WARNING 'pgseal: removed the retention rule of relation % (%), time column %, %, written under 0.1.0: %',
            r.relid, coalesce(r.relname, 'dropped'), pg_catalog.quote_ident(r.col),
            coalesce('tenant ' OPERATOR(pg_catalog.||) pg_catalog.quote_literal(r.tenant), 'default rule (all tenants)'), r.why
            USING HINT = 'pgseal 0.2.0 registers only plain or partitioned tables outside pgseal that the registering role may DELETE from (retention_set, as that role).';
    END LOOP;

    FOR r IN
        WITH bad AS (
            SELECT x.ctid AS row_ctid, x.rel::pg_catalog.oid AS relid, x.col AS col,
                   CASE
                       WHEN c.oid IS NULL THEN 'no such relation (dropped)'
                       WHEN c.relkind NOT IN ('r', 'p') THEN
                           CASE c.relkind WHEN 'v' THEN 'a view' WHEN 'm' THEN 'a materialized view'
                                          WHEN 'f' THEN 'a foreign table'
                                          ELSE pg_catalog.format('relkind %s', c.relkind) END
                           OPERATOR(pg_catalog.||) ', not a plain or partitioned table'
                       WHEN n.nspname OPERATOR(pg_catalog.=) 'pgseal' THEN 'a table of pgseal'
                       WHEN n.nspname IN ('pg_catalog', 'information_schema') OR n.nspname OPERATOR(pg_catalog.~~) 'pg\_toast%' THEN 'a system catalog'
                       WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                                         WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid
                                           AND a.attname OPERATOR(pg_catalog.=) x.col
                                           AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped)
                           THEN 'the column does not exist'
                   END AS why,
                   CASE WHEN c.oid IS NOT NULL THEN pg_catalog.format('%I.%I', n.nspname, c.relname) END AS relname
              FROM pgseal.sealed_columns x
              LEFT JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
              LEFT JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
        ),
        gone AS (
            DELETE FROM pgseal.sealed_columns x USING bad
             WHERE x.ctid OPERATOR(pg_catalog.=) bad.row_ctid AND bad.why IS NOT NULL
            RETURNING bad.relid, bad.relname, bad.col, bad.why
        )
        SELECT * FROM gone ORDER BY relid, col
    LOOP
        RAISE WARNING 'pgseal: removed the sealed column registration of relation % (%), column %, written under 0.1.0: %',
            r.relid, coalesce(r.relname, 'dropped'), pg_catalog.quote_ident(r.col), r.why
            USING HINT = 'pgseal 0.2.0 registers only plain or partitioned tables outside pgseal that the registering role may UPDATE (vault_register_column, as that role).';
    END LOOP;

    SELECT pg_catalog.count(*) INTO n_rules FROM pgseal.retention_rules;
    SELECT pg_catalog.count(*) INTO n_cols FROM pgseal.sealed_columns;
    IF n_rules OPERATOR(pg_catalog.+) n_cols OPERATOR(pg_catalog.>) 0 THEN
        SELECT pg_catalog.string_agg(l, '; ' ORDER BY l) INTO listed FROM (
            SELECT pg_catalog.format('retention %I.%I (time column %I, %s)', n.nspname, c.relname, x.time_column,
                       coalesce('tenant ' OPERATOR(pg_catalog.||) pg_catalog.quote_literal(x.tenant_id), 'default rule')) AS l
              FROM pgseal.retention_rules x
              JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
              JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
            UNION ALL
            SELECT pg_catalog.format('sealed column %I.%I.%I', n.nspname, c.relname, x.col)
              FROM pgseal.sealed_columns x
              JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid
              JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
        ) s;
        RAISE WARNING 'pgseal: % retention rule(s) and % sealed column registration(s) were written under 0.1.0, which did not check that the registering role may DELETE from (retention) or UPDATE (sealing) the table; pgseald acts on them as its own role. Review them: %',
            n_rules, n_cols, listed
            USING HINT = pg_catalog.format(
                'List them with: SELECT rel, tenant_id, time_column, keep FROM pgseal.retention_rules WHERE updated_at <= %L; SELECT rel, col FROM pgseal.sealed_columns; '
                'delete each one that no role allowed to DELETE from (retention) or UPDATE (sealing) its table asked for, and have such a role register the others again (retention_set, vault_register_column), which checks them.',
                pg_catalog.now());
    END IF;
END
$registrations$;

-- Registrations name their column by number (issue 17): time_attnum and attnum,
-- filled here from the names 0.1.0 stored (every row left names an existing column),
-- and sealed_columns' key becomes (rel, attnum), as in sql/jobs.sql. The tables
-- have no triggers yet.
ALTER TABLE pgseal.retention_rules ADD COLUMN time_attnum int2;
UPDATE pgseal.retention_rules x SET time_attnum = a.attnum
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid AND a.attname OPERATOR(pg_catalog.=) x.time_column
   AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
ALTER TABLE pgseal.retention_rules ALTER COLUMN time_attnum SET NOT NULL;
ALTER TABLE pgseal.sealed_columns ADD COLUMN attnum int2;
UPDATE pgseal.sealed_columns x SET attnum = a.attnum
  FROM pg_catalog.pg_attribute a
 WHERE a.attrelid OPERATOR(pg_catalog.=) x.rel::pg_catalog.oid AND a.attname OPERATOR(pg_catalog.=) x.col
   AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped;
ALTER TABLE pgseal.sealed_columns ALTER COLUMN attnum SET NOT NULL,
    DROP CONSTRAINT sealed_columns_pkey, ADD PRIMARY KEY (rel, attnum);

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
CREATE OR REPLACE FUNCTION pgseal._registration_check() RETURNS trigger
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

CREATE OR REPLACE FUNCTION pgseal.retention_set(rel regclass, keep interval, time_column name DEFAULT 'created_at', tenant text DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION pgseal.retention_hold(tenant text, "on" boolean) RETURNS void
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

-- time_column is the column's name now (NULL if it is gone), read by its number.
CREATE OR REPLACE VIEW pgseal.retention_policies AS
    SELECT r.rel, r.tenant_id, r.keep,
           (SELECT a.attname FROM pg_catalog.pg_attribute a
             WHERE a.attrelid OPERATOR(pg_catalog.=) r.rel::pg_catalog.oid
               AND a.attnum OPERATOR(pg_catalog.=) r.time_attnum AND NOT a.attisdropped) AS time_column,
           (r.tenant_id IS NOT NULL AND EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id = r.tenant_id)) AS on_hold,
           r.updated_at
    FROM pgseal.retention_rules r;

CREATE OR REPLACE FUNCTION pgseal.vault_register_column(rel regclass, col name, context text DEFAULT NULL) RETURNS void
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
CREATE OR REPLACE FUNCTION pgseal._key_usage() RETURNS TABLE (key_id text, tenant_id text, state text, rows bigint)
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

CREATE OR REPLACE FUNCTION pgseal._job_runs_trim() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
BEGIN
    DELETE FROM pgseal.job_runs WHERE id <= NEW.id - 1000;
    RETURN NULL;
END
$$;

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
CREATE OR REPLACE FUNCTION pgseal._retention_record() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'retention_record_trigger';
-- A rule's rows are recorded by three triggers: every INSERT but a restore's
-- (pgseal.restore, superuser-only: the dump carries the entries that recorded the
-- rules and holds it restores, and a new entry would collide with the restored
-- chains; holds likewise); every UPDATE except
-- the one that only renames time_column along with its column (same rel, tenant,
-- keep, column number and updated_at: _registrations_follow_renames; the rule
-- itself did not change); and every DELETE (retention_rules_record_delete, created
-- in block 8, as finalize.sql creates it).
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
-- superuser in '_pgseal_open'. Every INSERT but a restore's; every
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

-- retention_set and vault_register_column run as the caller (the trigger above
-- checks what they write).
GRANT SELECT, INSERT, UPDATE, DELETE ON pgseal.retention_rules, pgseal.sealed_columns TO pgseal_admin;
GRANT SELECT ON pgseal.retention_policies, pgseal.key_usage, pgseal.sealed_columns, pgseal.retention_holds TO pgseal_admin;
-- pg_dump copies a registration only while its table exists and its stored name is
-- its column's (pg_dump runs "COPY (SELECT ... FROM ONLY <table> <condition>)" with
-- an empty search_path): a rule dropped while event triggers were off, or a name a
-- rename could not sync, would fail the restore's COPY or resolve to another column.
SELECT pg_catalog.pg_extension_config_dump('pgseal.retention_rules',
    'WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) retention_rules.rel::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.=) retention_rules.time_attnum AND a.attname OPERATOR(pg_catalog.=) retention_rules.time_column AND NOT a.attisdropped)');
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
-- the system chain '_pgseal' (for a rule, the C trigger sees in the catalog that the
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

-- 7b. Data subjects (sql/subjects.sql, issue 19).
-- A registration names its table by OID and its column by number, with the
-- column's current name beside it, exactly as sealed_columns does (sql/jobs.sql):
-- _registration_check resolves the name as the writing role, which must be allowed
-- to DELETE from the table (erasure deletes its rows); renames and drops follow
-- (_registrations_follow_renames, _registrations_follow_drops).
CREATE TABLE pgseal.subject_columns (
    rel    regclass NOT NULL,
    col    name     NOT NULL,
    attnum int2     NOT NULL,
    PRIMARY KEY (rel, attnum)
);

-- Columns that subject_erase clears instead of deleting the row (a table that must
-- keep its rows, such as invoices kept for ten years, declares it with
-- subject_anonymise). Same shape and upkeep as subject_columns; the registration
-- check asks for UPDATE on the table.
CREATE TABLE pgseal.subject_anonymised_columns (
    rel    regclass NOT NULL,
    col    name     NOT NULL,
    attnum int2     NOT NULL,
    PRIMARY KEY (rel, attnum)
);

COMMENT ON TABLE pgseal.subject_anonymised_columns IS
    'Columns that pgseal.subject_erase() sets to their default instead of deleting the row (pgseal.subject_anonymise()).';

COMMENT ON TABLE pgseal.subject_columns IS
    'Columns that hold a data subject''s id (pgseal.subject_register()); read by the row audit and by subject_export()/subject_erase().';

CREATE TRIGGER subject_columns_check BEFORE INSERT OR UPDATE ON pgseal.subject_columns
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check('DELETE');
ALTER TABLE pgseal.subject_columns ENABLE ALWAYS TRIGGER subject_columns_check;
CREATE TRIGGER subject_columns_check_delete BEFORE DELETE ON pgseal.subject_columns
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check_delete('DELETE');
ALTER TABLE pgseal.subject_columns ENABLE ALWAYS TRIGGER subject_columns_check_delete;
-- Recorded in the ledger (sql/jobs.sql, _registration_record; the DELETE trigger is
-- in finalize.sql).
CREATE TRIGGER subject_columns_record AFTER INSERT ON pgseal.subject_columns
    FOR EACH ROW WHEN (pg_catalog.current_setting('pgseal.restore', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION pgseal._registration_record();
CREATE TRIGGER subject_columns_record_update AFTER UPDATE ON pgseal.subject_columns
    FOR EACH ROW WHEN ((OLD.rel, OLD.attnum) IS DISTINCT FROM (NEW.rel, NEW.attnum))
    EXECUTE FUNCTION pgseal._registration_record();
ALTER TABLE pgseal.subject_columns ENABLE ALWAYS TRIGGER subject_columns_record;
ALTER TABLE pgseal.subject_columns ENABLE ALWAYS TRIGGER subject_columns_record_update;

-- Removes the registration of rel's subject column subject_column (export and
-- erasure no longer read it); returns whether there was one. Runs as the caller
-- (the trigger above checks the table).
CREATE FUNCTION pgseal.subject_unregister(rel regclass, subject_column name) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF rel IS NULL OR subject_column IS NULL THEN
        RAISE EXCEPTION 'rel and subject_column must not be NULL' USING ERRCODE = '22004';
    END IF;
    DELETE FROM pgseal.subject_columns x
     WHERE x.rel OPERATOR(pg_catalog.=) rel AND x.col OPERATOR(pg_catalog.=) subject_column;
    RETURN FOUND;
END
$$;

-- Declares that rel's subject_column holds the id of the data subject a row is
-- about. Several columns of a table may be registered; the table needs a text
-- tenant_id column, which limits export and erasure to the tenant. The id's text form is what
-- ledger entries name in `subjects`, so the column is text, varchar, uuid, integer
-- or bigint. Runs as the caller (the trigger above checks the table).
CREATE FUNCTION pgseal.subject_register(rel regclass, subject_column name) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_variable
BEGIN
    IF rel IS NULL OR subject_column IS NULL THEN
        RAISE EXCEPTION 'rel and subject_column must not be NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM pgseal._check_table(rel);
    IF (SELECT c.relpersistence FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) rel) = 't' THEN
        RAISE EXCEPTION 'a temporary table cannot be registered' USING ERRCODE = '42809';
    END IF;
    -- Export and erasure limit every statement to the tenant by this column.
    -- _column_type raises 42703 for a missing column.
    IF pgseal._column_type(rel, 'tenant_id') NOT IN ('text', 'character varying') THEN
        RAISE EXCEPTION 'column tenant_id of % is not text or varchar', rel USING ERRCODE = '42804';
    END IF;
    IF pgseal._column_type(rel, subject_column)
       NOT IN ('text', 'character varying', 'uuid', 'integer', 'bigint') THEN
        RAISE EXCEPTION 'column % of % is not text, varchar, uuid, integer or bigint', subject_column, rel
            USING ERRCODE = '42804';
    END IF;
    INSERT INTO pgseal.subject_columns AS x (rel, col) VALUES (rel, subject_column)
    ON CONFLICT ON CONSTRAINT subject_columns_pkey DO NOTHING;
END
$$;

REVOKE ALL ON pgseal.subject_columns FROM PUBLIC;
-- The row audit reads the registrations as the role that changed the row
-- (extension/src/ledger/audit_trigger.rs): table and column names, no data.
GRANT SELECT ON pgseal.subject_columns TO PUBLIC;
GRANT INSERT, DELETE ON pgseal.subject_columns TO pgseal_admin;
SELECT pg_catalog.pg_extension_config_dump('pgseal.subject_columns',
    'WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) subject_columns.rel::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.=) subject_columns.attnum AND a.attname OPERATOR(pg_catalog.=) subject_columns.col AND NOT a.attisdropped)');

CREATE TRIGGER subject_anonymised_columns_check BEFORE INSERT OR UPDATE ON pgseal.subject_anonymised_columns
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check('UPDATE');
ALTER TABLE pgseal.subject_anonymised_columns ENABLE ALWAYS TRIGGER subject_anonymised_columns_check;
CREATE TRIGGER subject_anonymised_columns_check_delete BEFORE DELETE ON pgseal.subject_anonymised_columns
    FOR EACH ROW EXECUTE FUNCTION pgseal._registration_check_delete('UPDATE');
ALTER TABLE pgseal.subject_anonymised_columns ENABLE ALWAYS TRIGGER subject_anonymised_columns_check_delete;
-- Recorded in the ledger (sql/jobs.sql, _registration_record; the DELETE trigger is
-- in finalize.sql).
CREATE TRIGGER subject_anonymised_columns_record AFTER INSERT ON pgseal.subject_anonymised_columns
    FOR EACH ROW WHEN (pg_catalog.current_setting('pgseal.restore', true) IS DISTINCT FROM 'on')
    EXECUTE FUNCTION pgseal._registration_record();
CREATE TRIGGER subject_anonymised_columns_record_update AFTER UPDATE ON pgseal.subject_anonymised_columns
    FOR EACH ROW WHEN ((OLD.rel, OLD.attnum) IS DISTINCT FROM (NEW.rel, NEW.attnum))
    EXECUTE FUNCTION pgseal._registration_record();
ALTER TABLE pgseal.subject_anonymised_columns ENABLE ALWAYS TRIGGER subject_anonymised_columns_record;
ALTER TABLE pgseal.subject_anonymised_columns ENABLE ALWAYS TRIGGER subject_anonymised_columns_record_update;

-- Declares that subject_erase anonymises rel's rows of a subject instead of
-- deleting them: it sets `columns`, and the registered subject column the row
-- matched, to their defaults (NULL where a column has none). Replaces the table's
-- earlier declaration; an empty array removes it (erasure deletes again). A column
-- that is NOT NULL without a default could not be cleared (23502). Runs as the
-- caller (the trigger above checks the table).
CREATE FUNCTION pgseal.subject_anonymise(rel regclass, columns name[]) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    c pg_catalog.name;
BEGIN
    IF rel IS NULL OR columns IS NULL THEN
        RAISE EXCEPTION 'rel and columns must not be NULL' USING ERRCODE = '22004';
    END IF;
    IF pg_catalog.array_ndims(columns) OPERATOR(pg_catalog.>) 1 THEN
        RAISE EXCEPTION 'columns must be a one-dimensional array' USING ERRCODE = '22023';
    END IF;
    IF pg_catalog.array_position(columns, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'columns must not contain NULL' USING ERRCODE = '22004';
    END IF;
    PERFORM pgseal._check_table(rel);
    IF (SELECT c.relpersistence FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) rel) = 't' THEN
        RAISE EXCEPTION 'a temporary table cannot be registered' USING ERRCODE = '42809';
    END IF;
    -- Only what the new declaration leaves out goes (each removal and addition is
    -- recorded in the ledger; a column declared again is no change).
    DELETE FROM pgseal.subject_anonymised_columns x
     WHERE x.rel OPERATOR(pg_catalog.=) rel AND NOT x.col OPERATOR(pg_catalog.=) ANY (columns);
    FOREACH c IN ARRAY columns LOOP
        IF c OPERATOR(pg_catalog.=) 'tenant_id' THEN
            RAISE EXCEPTION 'tenant_id limits erasure to the tenant: it cannot be cleared' USING ERRCODE = '22023';
        END IF;
        -- The registration check: the table, UPDATE on it, the column (42703).
        INSERT INTO pgseal.subject_anonymised_columns AS x (rel, col) VALUES (rel, c)
        ON CONFLICT ON CONSTRAINT subject_anonymised_columns_pkey DO NOTHING;
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a
                    WHERE a.attrelid OPERATOR(pg_catalog.=) rel AND a.attname OPERATOR(pg_catalog.=) c
                      AND a.attnotnull AND NOT a.atthasdef) THEN
            RAISE EXCEPTION 'column % of % is NOT NULL and has no default: it cannot be cleared', c, rel
                USING ERRCODE = '23502';
        END IF;
    END LOOP;
END
$$;

REVOKE ALL ON pgseal.subject_anonymised_columns FROM PUBLIC;
GRANT SELECT, INSERT, DELETE ON pgseal.subject_anonymised_columns TO pgseal_admin;
SELECT pg_catalog.pg_extension_config_dump('pgseal.subject_anonymised_columns',
    'WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid OPERATOR(pg_catalog.=) subject_anonymised_columns.rel::pg_catalog.oid AND a.attnum OPERATOR(pg_catalog.=) subject_anonymised_columns.attnum AND a.attname OPERATOR(pg_catalog.=) subject_anonymised_columns.col AND NOT a.attisdropped)');

-- 7c. Tenant offboarding (sql/offboarding.sql, issue 19).
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

-- The distinct tenants of a table (a loose index scan over its tenant_id), for the
-- retention run's default rules. The scan runs as the owner, so that discovering
-- tenants needs no tenant context or BYPASSRLS; _tenants_scan first checks, as the
-- caller, that rel is a plain or partitioned table outside pgseal that the caller
-- owns or may DELETE from (extension/src/jobs.rs).
CREATE OR REPLACE FUNCTION pgseal._tenants_of(rel regclass) RETURNS SETOF text
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$ SELECT * FROM pgseal._tenants_scan(rel::pg_catalog.oid) $$;

-- Tenants whose active data key is due for rotation: older than max_age, or past
-- 90% of pgseal.dek_max_encryptions. For pgseald's rotation job.
CREATE OR REPLACE FUNCTION pgseal._rotation_due(max_age interval) RETURNS SETOF text
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

------------------------------------------------------------------------------------
-- 8. Privileges and identity (sql/finalize.sql). As in a fresh install, every
-- function is first closed to PUBLIC (the functions created above were created with
-- PostgreSQL's default EXECUTE for PUBLIC), then each role gets what finalize.sql
-- grants. Grants 0.1.0 made are repeated; repeating a grant changes nothing. No grant
-- of 0.1.0 is withdrawn by 0.2.0. (As in a fresh install, the REVOKE also withdraws
-- an EXECUTE that a DBA granted to PUBLIC on a pgseal function; grants to named
-- roles stay.)
------------------------------------------------------------------------------------
-- As finalize.sql begins: what sql/jobs.sql could not create, for want of vault_status() (issue 17:
-- registrations follow the schema). A retention rule's DELETE is recorded
-- ('retention.removed'), fail closed, except the deletion of a rule whose table or
-- time column is gone (has_column_privilege is NULL for a missing table or column)
-- while the master key is not loaded: a DROP must not fail for want of the key, and
-- _registrations_follow_drops names such a rule in a WARNING instead. The same for
-- the column registries' removals.
-- _master_key_loaded is vault_status()'s flag as a scalar (a trigger's WHEN takes no
-- set-returning function); executable by pgseal_admin, who may DELETE a rule
-- (retention_remove), and shows no more than vault_status(), which PUBLIC may call.
CREATE FUNCTION pgseal._master_key_loaded() RETURNS boolean
LANGUAGE sql STABLE
SET search_path = pg_catalog, pgseal, pg_temp
AS $$ SELECT s.loaded FROM pgseal.vault_status() s $$;
CREATE TRIGGER retention_rules_record_delete AFTER DELETE ON pgseal.retention_rules
    FOR EACH ROW
    WHEN (pgseal._master_key_loaded()
          OR pg_catalog.has_column_privilege(OLD.rel::pg_catalog.oid, OLD.time_attnum, 'SELECT') IS NOT NULL)
    EXECUTE FUNCTION pgseal._retention_record();
ALTER TABLE pgseal.retention_rules ENABLE ALWAYS TRIGGER retention_rules_record_delete;
-- The column registries' removals likewise (_registration_record, sql/jobs.sql).
DO $$
DECLARE
    t pg_catalog.text;
BEGIN
    FOREACH t IN ARRAY ARRAY['sealed_columns', 'subject_columns', 'subject_anonymised_columns'] LOOP
        EXECUTE pg_catalog.format($t$
            CREATE TRIGGER %1$I AFTER DELETE ON pgseal.%2$I
                FOR EACH ROW
                WHEN (pgseal._master_key_loaded()
                      OR pg_catalog.has_column_privilege(OLD.rel::pg_catalog.oid, OLD.attnum, 'SELECT') IS NOT NULL)
                EXECUTE FUNCTION pgseal._registration_record();
            ALTER TABLE pgseal.%2$I ENABLE ALWAYS TRIGGER %1$I $t$, t || '_record_delete', t);
    END LOOP;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA pgseal FROM PUBLIC;

GRANT EXECUTE ON FUNCTION pgseal.current_tenant() TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgseal.vault_status() TO PUBLIC;

GRANT EXECUTE ON FUNCTION
    pgseal.vault_seal(text, text),
    pgseal.vault_redact(text, integer, text)
TO pgseal_seal;

GRANT EXECUTE ON FUNCTION
    pgseal.vault_decrypt(text, text),
    pgseal.vault_rewrap(text, text)
TO pgseal_decrypt;

GRANT EXECUTE ON FUNCTION
    pgseal.tenant_key_rotate(text),
    pgseal.kek_rewrap(integer),
    pgseal.tenant_shred(text),
    pgseal.key_cache_entries(),
    pgseal.audit_queue_status()
TO pgseal_admin;

GRANT pgseal_ledger TO pgseal_admin;
GRANT SELECT ON pgseal.ledger TO pgseal_ledger, pgseal_admin;

GRANT EXECUTE ON FUNCTION
    pgseal.ledger_append(text, jsonb, text, text[]),
    pgseal.ledger_verify(text, bigint, bigint),
    pgseal.ledger_export(text, bigint, bigint),
    pgseal._ledger_tenant(text),
    pgseal.ledger_public_key()
TO pgseal_ledger;

GRANT EXECUTE ON FUNCTION
    pgseal.ledger_checkpoint(text),
    pgseal.ledger_prune(text, bigint),
    pgseal._ledger_held_from(text),
    pgseal.ledger_audit(regclass, text[]),
    pgseal.ledger_unaudit(regclass),
    pgseal._audit_row()
TO pgseal_admin;

-- Tenancy. Policies call these as the querying user, so PUBLIC executes them; the
-- protect functions run as the caller, so only a table's owner can protect it.
GRANT EXECUTE ON FUNCTION
    pgseal.current_user_id(),
    pgseal.set_tenant(text, text),
    pgseal._context_setting(text),
    pgseal._my_orgs(pgseal.org_role),
    pgseal._org_exists(text),
    pgseal._column_type(regclass, name),
    pgseal._with_partitions(regclass),
    pgseal._has_leading_index(regclass, name),
    pgseal._rls_reset(regclass, name),
    pgseal._check_table(regclass),
    pgseal._check_tenant_arg(text),
    pgseal._tenant_column_names(),
    pgseal._citus_present(),
    pgseal._citus_worker(),
    pgseal._policy_value(text, text),
    pgseal._citus_tables(),
    pgseal._citus_shard_problems(oid[]),
    pgseal._rls_signature(regclass),
    pgseal._names_tenant(text, name),
    pgseal._citus_ddl_propagation(text),
    pgseal.tenant_protect(regclass, name),
    pgseal.tenant_unprotect(regclass),
    pgseal.org_protect(regclass, name, name, name),
    pgseal.isolation_report()
TO PUBLIC;

-- Data subjects (issue 19, extension/src/subjects.rs). Export runs as the caller
-- and reads the ledger as pgseal_ledger does; erasure is for pgseal_admin, and
-- registering a column runs as the caller (the registration check above).
GRANT EXECUTE ON FUNCTION pgseal.subject_export(text, text) TO pgseal_ledger;
GRANT EXECUTE ON FUNCTION
    pgseal.subject_erase(text, text),
    pgseal.subject_register(regclass, name),
    pgseal.subject_unregister(regclass, name),
    pgseal.subject_anonymise(regclass, name[])
TO pgseal_admin;

-- Tenant offboarding (issue 19, extension/src/offboard.rs): scheduled and cancelled
-- by pgseal_admin, carried out by pgseald (a member of pgseal_admin) through the
-- internal step functions.
GRANT EXECUTE ON FUNCTION
    pgseal.tenant_offboard(text, interval),
    pgseal.tenant_offboard_cancel(text),
    pgseal._offboard_due(),
    pgseal._offboard_export(text),
    pgseal._offboard_delete(text, integer),
    pgseal._offboard_advance(text, text, text, text, text),
    pgseal._offboard_erase(text, integer),
    pgseal._offboard_finish(text)
TO pgseal_admin;

-- Jobs that pgseald runs, as a member of pgseal_admin.
GRANT EXECUTE ON FUNCTION
    pgseal.retention_set(regclass, interval, name, text),
    pgseal.retention_hold(text, boolean),
    pgseal.vault_register_column(regclass, name, text),
    pgseal.vault_unregister_column(regclass, name),
    pgseal.retention_remove(regclass, text),
    pgseal._key_usage(),
    pgseal._tenants_of(regclass),
    pgseal._tenants_scan(oid),
    pgseal._rotation_due(interval)
TO pgseal_admin;

-- pgseald's leader election (extension/src/locks.rs).
GRANT EXECUTE ON FUNCTION pgseal._leader_try_lock() TO pgseal_admin;

-- Tenancy invariants (org_members, cursors)
-- The org_members trigger runs as the role that changed the row and locks the
-- organisation's row in pgseal.org_locks through this narrow SECURITY DEFINER helper
-- (the current tenant's organisations only).
GRANT EXECUTE ON FUNCTION pgseal._org_lock(text) TO PUBLIC;

-- Evidence (issue 14). The protect functions run as the caller and end by recording
-- the table's protection (the caller must own it); ledger_audit, run as the caller,
-- attaches the TRUNCATE trigger; pgseald appends its receipts through _job_receipt.
-- The other recording triggers (_org_members_record, _retention_record) are granted
-- to no role: triggers fire without EXECUTE, and nobody can attach them elsewhere.
GRANT EXECUTE ON FUNCTION pgseal._protection_changed(oid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgseal._audit_truncate() TO pgseal_admin;
GRANT EXECUTE ON FUNCTION pgseal._job_receipt(text, jsonb) TO pgseal_admin;

-- Offboarding (issue 19): the export and the deletes compute each row's key in
-- statements run as the table's owner (extension/src/offboard/exported.rs); a pure
-- function of its arguments.
GRANT EXECUTE ON FUNCTION pgseal._offboard_row_key(oid, tid, xid) TO PUBLIC;
GRANT EXECUTE ON FUNCTION pgseal._offboard_node_row_key(oid, tid, xid) TO PUBLIC;
-- org_protect's offboarding policies call it as whoever reads the table: true only
-- inside an offboarding's statement on that table, as its owner
-- (extension/src/offboard/visible.rs).
GRANT EXECUTE ON FUNCTION pgseal._offboard_visible(oid) TO PUBLIC;
-- Its form on Citus (a table's name, and the coordinator's grant on every node).
GRANT EXECUTE ON FUNCTION pgseal._offboard_visible_in(text) TO PUBLIC;
-- retention_remove's DELETE runs the retention rules' record trigger's condition.
GRANT EXECUTE ON FUNCTION pgseal._master_key_loaded() TO pgseal_admin;

-- Checkpoint log (issue 14): pgseal_admin reads the checkpoints ledger_checkpoint()
-- kept; nobody writes them but ledger_checkpoint() itself (extension/src/ledger/guard.rs).
GRANT SELECT ON pgseal.ledger_checkpoints TO pgseal_admin;

-- 0.1.0 derived its checkpoint signing key from the master key; 0.2.0 makes a random
-- checkpoint key (purpose 'checkpoint') on first use, not here, exactly as after a
-- fresh install. So ledger_public_key() returns a new key after the update, and the
-- checkpoints 0.1.0 signed (v1) verify with the public key 0.1.0 returned.
-- Signing identity (issue 14). The checkpoint key is a random Ed25519 key kept wrapped
-- in pgseal.tenant_keys (tenant '_pgseal', purpose 'checkpoint'), made on first use and
-- rewrapped by kek_rewrap like every other key. It is not made here: pg_dump carries
-- tenant_keys, and a key made by the restore's own CREATE EXTENSION would collide with
-- the restored one. The ledger id names this database's ledger in every checkpoint;
-- it is made here and carried by pg_dump. A restore adds the dumped row next to the
-- one its CREATE EXTENSION made, and the older row is the ledger's id
-- (extension/src/ledger/checkpoints.rs).
ALTER TABLE pgseal.tenant_keys DROP CONSTRAINT tenant_keys_purpose_check;
ALTER TABLE pgseal.tenant_keys ADD CONSTRAINT tenant_keys_purpose_check
    CHECK (purpose IN ('dek', 'ledger', 'checkpoint'));

-- A new random ledger id, as CREATE EXTENSION makes one: every v2 checkpoint of this
-- database will name it.
CREATE TABLE pgseal.ledger_identity (
    ledger_id  text        PRIMARY KEY CHECK (ledger_id ~ '^[0-9a-f]{32}$')
               DEFAULT pg_catalog.replace(pg_catalog.gen_random_uuid()::text, '-', ''),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE pgseal.ledger_identity IS
    'The id every checkpoint of this database names (pgseal.ledger_id()). Written only at CREATE EXTENSION and by a restore.';
INSERT INTO pgseal.ledger_identity DEFAULT VALUES;
REVOKE ALL ON pgseal.ledger_identity FROM PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('pgseal.ledger_identity', '');

GRANT EXECUTE ON FUNCTION pgseal.ledger_id() TO pgseal_ledger;

------------------------------------------------------------------------------------
-- 9. Tables audited under 0.1.0. 0.2.0's ledger_audit also puts a TRUNCATE trigger
-- (pgseal_audit_truncate, 'audit.truncated') on the table and each of its
-- partitions; add it wherever 0.1.0's ledger_audit left its row trigger, so an
-- upgraded database audits what a fresh 0.2.0 one does without a second
-- ledger_audit call. (A partition's cloned row trigger has a parent trigger: only the
-- table ledger_audit was called on is looked at, as ledger_audit does.)
------------------------------------------------------------------------------------
DO $audited$
DECLARE
    part  pg_catalog.regclass;
    kind  pg_catalog."char";
    qname pg_catalog.text;
BEGIN
    FOR part, kind, qname IN
        SELECT DISTINCT p, c.relkind, pg_catalog.format('%I.%I', n.nspname, c.relname)
        FROM pg_catalog.pg_trigger t,
             pgseal._with_partitions(t.tgrelid::pg_catalog.regclass) AS p,
             pg_catalog.pg_class c,
             pg_catalog.pg_namespace n
        WHERE t.tgname OPERATOR(pg_catalog.=) 'pgseal_audit'
          AND t.tgfoid OPERATOR(pg_catalog.=) 'pgseal._audit_row()'::pg_catalog.regprocedure
          AND t.tgparentid OPERATOR(pg_catalog.=) 0
          AND c.oid OPERATOR(pg_catalog.=) p
          AND n.oid OPERATOR(pg_catalog.=) c.relnamespace
    LOOP
        -- Only a plain or partitioned table can have a TRUNCATE trigger (and only
        -- such a table can be audited with ledger_audit). A pgseal_audit trigger that
        -- a member of pgseal_admin attached by hand to anything else (an INSTEAD OF
        -- trigger on a view, a foreign table, a foreign partition of an audited
        -- table) keeps its row trigger and gets no TRUNCATE trigger: skipped, with a
        -- warning, instead of failing the update.
        IF kind NOT IN ('r', 'p') THEN
            RAISE WARNING 'pgseal: % (%) has a pgseal_audit trigger, but only a plain or partitioned table can have the TRUNCATE audit trigger; skipped',
                qname,
                CASE kind WHEN 'v' THEN 'a view' WHEN 'f' THEN 'a foreign table' WHEN 'm' THEN 'a materialized view'
                          ELSE pg_catalog.format('relkind %s', kind) END
                USING HINT = 'Its pgseal_audit row trigger is left as it is; a TRUNCATE of it is not recorded.';
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger t
                       WHERE t.tgrelid OPERATOR(pg_catalog.=) part
                         AND t.tgname OPERATOR(pg_catalog.=) 'pgseal_audit_truncate') THEN
            EXECUTE pg_catalog.format(
                'CREATE TRIGGER pgseal_audit_truncate AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION pgseal._audit_truncate()',
                part);
        END IF;
    END LOOP;
END
$audited$;

------------------------------------------------------------------------------------
-- 10. Linear jobs (issue 17). kek_rewrap reads the keys left under an old master key
-- version by range scans of (kek_version, key_id), below and above the active
-- version, each stopping after a batch; 0.1.0's index on (kek_version) alone gave
-- no order, and the scan in key_id order it used re-read every key already
-- rewrapped on every batch. Same name, the definition sql/vault_schema.sql has.
------------------------------------------------------------------------------------
DROP INDEX pgseal.tenant_keys_kek_version;
CREATE INDEX tenant_keys_kek_version ON pgseal.tenant_keys (kek_version, key_id) WHERE state <> 'destroyed';

------------------------------------------------------------------------------------
-- 11. Tenant ids that name pgseal's own chains. 0.2.0 refuses a tenant context
-- starting with '_pgseal' (set_tenant and every function and policy that reads the
-- context: no session acts for pgseal's chains); 0.1.0 accepted any. Data keys of
-- such a tenant are left as they are, and named here: their values no longer decrypt,
-- and pgseald skips them.
------------------------------------------------------------------------------------
DO $pgseal_named$
DECLARE
    names pg_catalog.text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.quote_literal(k.tenant_id), ', ')
      INTO names
      FROM pgseal.tenant_keys k
     WHERE k.purpose OPERATOR(pg_catalog.=) 'dek'
       AND pg_catalog.left(k.tenant_id, 7) OPERATOR(pg_catalog.=) '_pgseal';
    IF names IS NOT NULL THEN
        RAISE WARNING 'pgseal: data keys of tenants whose ids name pgseal''s own chains: %', names
            USING HINT = 'No session acts for a tenant id starting with _pgseal from 0.2.0 on: its sealed values no longer decrypt. Decrypt them with 0.1.0 and seal them under another tenant id before the update, or accept their loss.';
    END IF;
END
$pgseal_named$;

------------------------------------------------------------------------------------
-- 12. Seal counts of a Citus worker's transactions prepared for another node's
-- two-phase commit wait in this table until they commit (sql/citus.sql). Empty.
------------------------------------------------------------------------------------
CREATE TABLE pgseal._seal_counts_outbox (
    key_id text   NOT NULL,
    seals  bigint NOT NULL CHECK (seals > 0)
);
REVOKE ALL ON pgseal._seal_counts_outbox FROM PUBLIC;

------------------------------------------------------------------------------------
-- 13. ledger_append through a Citus worker (sql/citus.sql): the table that makes its
-- transaction commit in two phases, and the triggers of the table that
-- citus_distribute() makes on the coordinator. On a Citus cluster, run
-- pgseal.citus_distribute() on the coordinator after the update.
------------------------------------------------------------------------------------
-- An empty table that citus_distribute() distributes over the workers: a worker's
-- first forwarded ledger entry of a transaction (below) deletes nothing from a shard
-- of it on that worker, so that Citus commits the transaction in two phases and the
-- entry with it (pgseal::pg::citus::commit_forwarded_entries_in_two_phases). Made
-- on every node, as the extension's tables are; nothing is ever in it.
CREATE TABLE pgseal._two_phase_shards (k integer NOT NULL);
REVOKE ALL ON pgseal._two_phase_shards FROM PUBLIC;

-- ledger_append on a Citus worker (extension/src/ledger/forward.rs): after its
-- checks, the worker's ledger_append inserts the entry's fields into
-- pgseal._ledger_forwarded, a Citus local table that citus_distribute() makes on
-- the coordinator, as pgseal's owner (no role is granted it), and Citus sends the
-- INSERT there in the worker's distributed transaction. These triggers run on the
-- coordinator: the first appends the entry to the tenant's chain under the
-- coordinator's chain lock, on behalf of the worker session's role, and returns its
-- seq and hash to the INSERT's RETURNING; the second deletes the row, so the table
-- holds none past the statement.
CREATE FUNCTION pgseal._ledger_forwarded_append() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'ledger_forwarded_append';

CREATE FUNCTION pgseal._ledger_forwarded_done() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'ledger_forwarded_done';
REVOKE ALL ON FUNCTION pgseal._ledger_forwarded_append(), pgseal._ledger_forwarded_done() FROM PUBLIC;
