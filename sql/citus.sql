-- pgseal on Citus (docs/SCALING.md): the tenant keys and the organisation membership
-- on every node.
--
-- pgseal.citus_distribute() makes pgseal.tenant_keys a Citus reference table, so
-- every node holds every tenant's wrapped keys, and vault_decrypt in a query that
-- Citus pushes to a worker finds the key there. Inside such a query a function may
-- not run a distributed query, so pgseal reads the key table's placement on its own
-- node (pgseal._keys_relation()), a plain table, directly.

-- Seal counts of this node's transactions prepared for another node's two-phase
-- commit (extension/src/cache.rs): written in the prepared transaction, so they
-- appear exactly when it commits, whichever session commits it, and never if it is
-- rolled back; this node's audit writer moves them to pgseal.tenant_keys on the
-- coordinator (extension/src/audit_worker/writer.rs). A plain table of each node,
-- never distributed; only pgseal writes it, as its owner.
CREATE TABLE pgseal._seal_counts_outbox (
    key_id text   NOT NULL,
    seals  bigint NOT NULL CHECK (seals > 0)
);
REVOKE ALL ON pgseal._seal_counts_outbox FROM PUBLIC;

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

-- Where this node reads pgseal.tenant_keys from: its local placement when Citus
-- replicates the table (`replicated`), the table itself otherwise (no Citus, not
-- distributed yet, or no placement here). The placement is found in Citus's metadata,
-- which only a superuser writes, and is a table of pgseal's schema, where only
-- pgseal's owner creates tables.
CREATE FUNCTION pgseal._keys_relation(OUT rel text, OUT replicated boolean)
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
CREATE FUNCTION pgseal.citus_distribute() RETURNS text
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
