-- pgseal privileges. Included last (extension_sql_file!(…, finalize)).
-- Every function starts closed; each role gets exactly what docs/SECURITY.md lists.

-- First, what sql/jobs.sql could not create, for want of vault_status() (issue 17:
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

-- Policies call current_tenant() as the querying user; vault_status() shows no secret.
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

-- The ledger. pgseal_admin can do everything pgseal_ledger can, for any tenant.
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
