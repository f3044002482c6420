-- pgseal subjects (issue 19): where a data subject's personal data lives, so that
-- pgseal.subject_export() can return it and pgseal.subject_erase() can delete it,
-- with the payloads of the ledger entries that name the subject
-- (extension/src/subjects.rs). Included after jobs.sql, whose registration check
-- and event triggers this registry shares.

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
