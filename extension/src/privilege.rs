//! Acting as the extension's owner for access to pgseal's own tables.
//!
//! The key table is readable by no application role. Functions that need it run
//! their SPI queries as the extension owner, as SECURITY DEFINER would, but only
//! around the queries themselves, so the fast paths pay nothing.
//!
//! Owner-run SQL is hijack-proof in two ways (docs/SECURITY.md, "Privilege
//! boundary"):
//! - while `as_owner` runs, `search_path` is `pg_catalog, pg_temp`, set in a GUC
//!   nest level of its own and restored on return and on error: a caller's
//!   `pg_temp` domain or a caller's schema with operators is never searched before
//!   `pg_catalog` (with `pg_temp` unlisted PostgreSQL would search it first for
//!   types);
//! - every query run this way also names its objects, types and functions with
//!   their schema.

use pgrx::pg_sys;

struct RestoreUser {
    user: pg_sys::Oid,
    sec_context: i32,
}

impl Drop for RestoreUser {
    fn drop(&mut self) {
        // SAFETY: restores exactly the values GetUserIdAndSecContext returned. Runs on
        // normal return and on unwinding; an ERROR that escapes to the transaction
        // or subtransaction abort also restores them in core PostgreSQL.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.sec_context) };
    }
}

thread_local! {
    /// The owner for this transaction (the ledger's append path switches identity
    /// on every call).
    static OWNER: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// The owner of the extension's objects: the role that ran CREATE EXTENSION owns
/// every table its script created. Read as the owner of `pgseal.tenant_keys`,
/// through the system caches (the pg_extension row has no cache and cost a
/// catalog scan per transaction). If the table is missing, the current user:
/// never a more privileged role than the caller's.
pub(crate) fn extension_owner() -> pg_sys::Oid {
    if let Some(o) = OWNER.with(|c| c.get()) {
        return o;
    }
    // SAFETY: syscache lookups. get_namespace_oid with missing_ok returns
    // InvalidOid instead of raising, and get_relname_relid returns InvalidOid for
    // a missing name. SearchSysCache1 returns a pinned tuple or NULL; a pg_class
    // tuple's fixed part is FormData_pg_class, read before ReleaseSysCache.
    let owner = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"pgseal".as_ptr(), true);
        let rel = pg_sys::get_relname_relid(c"tenant_keys".as_ptr(), nsp);
        let tup = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(rel),
        );
        if tup.is_null() {
            pg_sys::GetUserId()
        } else {
            let owner = (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tup)).relowner;
            pg_sys::ReleaseSysCache(tup);
            owner
        }
    };
    OWNER.with(|c| c.set(Some(owner)));
    owner
}

/// Forgets the cached owner at every transaction end.
fn forget_owner(_: crate::txn::End) {
    OWNER.with(|c| c.set(None));
}

/// The owner cache lasts one transaction.
pub const TXN: crate::txn::Participant = crate::txn::Participant {
    end: Some(forget_owner),
    ..crate::txn::Participant::NONE
};

/// The `search_path` under which pgseal parses SQL it runs with more privilege than
/// its caller: the system catalog first, the session's temporary schema last.
const PINNED_SEARCH_PATH: &std::ffi::CStr = c"pg_catalog, pg_temp";

/// Ends the GUC nest level that `with_pinned_search_path` opened.
struct RestoreGucs {
    nest_level: i32,
}

impl Drop for RestoreGucs {
    fn drop(&mut self) {
        // SAFETY: pops exactly the nest level NewGUCNestLevel returned, restoring every
        // setting changed inside it (as fmgr_security_definer does). While unwinding
        // from an ERROR the values are rolled back (isCommit = false); the transaction
        // or subtransaction abort would also pop the level.
        unsafe { pg_sys::AtEOXact_GUC(!std::thread::panicking(), self.nest_level) };
    }
}

/// Runs `f` with `search_path` set to `pg_catalog, pg_temp`, in a GUC nest level
/// that is popped when `f` returns or unwinds. Used for every SQL statement pgseal
/// parses as the owner, and for the audit trigger's own query as the invoker.
pub fn with_pinned_search_path<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: NewGUCNestLevel only increments the nesting counter; the guard pops
    // the level.
    let _restore = unsafe {
        RestoreGucs {
            nest_level: pg_sys::NewGUCNestLevel(),
        }
    };
    save_setting(c"search_path", PINNED_SEARCH_PATH);
    f()
}

/// Sets `name` to `value` for this session, saving the old value in the innermost
/// GUC nest level (`with_pinned_search_path`'s, or a function's SET clause), which
/// restores it when it pops. Raises on a value the setting refuses.
pub fn save_setting(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    set_setting(name, value, pg_sys::GucAction::GUC_ACTION_SAVE);
}

/// Sets `name` (a setting any role may set) to `value` as a `SET` (for the session,
/// `GUC_ACTION_SET`), a `SET LOCAL` (`GUC_ACTION_LOCAL`) or saved in the innermost
/// nest level (`GUC_ACTION_SAVE`). Raises on a value the setting refuses.
pub fn set_setting(name: &std::ffi::CStr, value: &std::ffi::CStr, action: pg_sys::GucAction::Type) {
    // SAFETY: set_config_option with both strings NUL-terminated; a SAVE records the
    // old value in the current nest level; elevel ERROR makes a failure raise
    // instead of returning quietly.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            action,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

/// Whether a built-in setting's current value is `value` (as `SHOW` prints it).
pub fn setting_is(name: &std::ffi::CStr, value: &[u8]) -> bool {
    // SAFETY: GetConfigOption returns the current value of a built-in setting as a
    // string valid until the setting changes; it is compared at once.
    unsafe {
        let v = pg_sys::GetConfigOption(name.as_ptr(), false, false);
        !v.is_null() && std::ffi::CStr::from_ptr(v).to_bytes() == value
    }
}

/// Runs `f` with the current user switched to the extension owner and
/// `search_path` pinned (`with_pinned_search_path`).
pub fn as_owner<R>(f: impl FnOnce() -> R) -> R {
    let owner = extension_owner();
    let mut user = pg_sys::Oid::INVALID;
    let mut sec_context = 0;
    // SAFETY: both out-pointers are valid locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context) };
    let _restore = RestoreUser { user, sec_context };
    // SAFETY: SECURITY_LOCAL_USERID_CHANGE is the flag SECURITY DEFINER functions
    // use; the guard above restores the previous identity.
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            owner,
            sec_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        )
    };
    with_pinned_search_path(f)
}

/// Ends a GUC nest level discarding every setting changed in it, as PostgreSQL ends
/// a security-restricted operation (`AtEOXact_GUC(false, …)`): a `SET` or
/// `set_config(…, false)` made by a table owner's code does not reach the caller.
struct DiscardGucs {
    nest_level: i32,
}

impl Drop for DiscardGucs {
    fn drop(&mut self) {
        // SAFETY: pops exactly the nest level NewGUCNestLevel returned, restoring
        // every setting changed inside it, committed or not.
        unsafe { pg_sys::AtEOXact_GUC(false, self.nest_level) };
    }
}

thread_local! {
    /// Set while `as_table_owner` runs a table owner's statement.
    static IN_TABLE_OWNER_SCOPE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct LeaveTableOwnerScope(bool);

impl Drop for LeaveTableOwnerScope {
    fn drop(&mut self) {
        IN_TABLE_OWNER_SCOPE.with(|s| s.set(self.0));
    }
}

/// Fails (42501) while a table owner's code runs inside `as_table_owner`: the
/// session's role (an entry's `db_role`, a decrypt's role) is then the caller's,
/// not the role whose code it is, so pgseal's public entry points that record a
/// role refuse to run there.
pub fn require_no_table_owner_code(what: &'static str) -> crate::error::SealResult<()> {
    if IN_TABLE_OWNER_SCOPE.with(|s| s.get()) {
        return Err(crate::error::SealError::Forbidden(what));
    }
    Ok(())
}

/// Runs `f` as `role`, the owner of an application table, in a security-restricted
/// operation, with `search_path` pinned: how PostgreSQL itself runs a table owner's
/// code for another role (VACUUM, ANALYZE, REFRESH MATERIALIZED VIEW). The owner's
/// triggers, rules, policies and casts then run with the owner's rights, never the
/// caller's, cannot change the session's role or leave temporary objects behind,
/// and every setting they change is discarded on return. pgseal's entry points that
/// record the session's role refuse to run meanwhile
/// (`require_no_table_owner_code`). Used by `subjects` for its statements on
/// registered tables; the caller's own privilege on the table is checked before.
pub fn as_table_owner<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::Oid::INVALID;
    let mut sec_context = 0;
    // SAFETY: both out-pointers are valid locals.
    unsafe { pg_sys::GetUserIdAndSecContext(&mut user, &mut sec_context) };
    let _restore = RestoreUser { user, sec_context };
    // SAFETY: NewGUCNestLevel only increments the nesting counter; the guard pops
    // the level (declared after `_restore`, so it is dropped first).
    let _discard = unsafe {
        DiscardGucs {
            nest_level: pg_sys::NewGUCNestLevel(),
        }
    };
    save_setting(c"search_path", PINNED_SEARCH_PATH);
    let _scope = LeaveTableOwnerScope(IN_TABLE_OWNER_SCOPE.with(|s| s.replace(true)));
    // SAFETY: the flags are those ExecRefreshMatView and vacuum use; the guard
    // above restores the previous identity and context.
    unsafe {
        pg_sys::SetUserIdAndSecContext(
            role,
            sec_context
                | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        )
    };
    f()
}

/// `as_table_owner` for statements on an application table where Citus runs: Citus
/// sends statements on its tables (the table itself, or one the owner's triggers,
/// cascades or policies reach from a table of this node) to the other nodes as that owner, over
/// connections on which it first replays the caller's `SET LOCAL`s and then calls
/// `assign_distributed_transaction_id` unqualified; so they run with the remote
/// parsing pinned (`citus::with_remote_parsing_pinned`, the caller's parsing read
/// here, before the switch), as pgseal's own owner statements through Citus do. A
/// caller's `search_path` naming a function of its own by that name then runs
/// nothing as the table's owner. Without Citus, `as_table_owner`.
pub fn as_table_owner_pinned<R, E>(
    role: pg_sys::Oid,
    f: impl FnOnce() -> Result<R, E>,
) -> crate::error::SealResult<R>
where
    crate::error::SealError: From<E>,
{
    let caller = crate::pg::citus::caller_parsing()?;
    as_table_owner(role, || {
        crate::pg::citus::with_remote_parsing_pinned(caller.as_ref(), || Ok(f()?))
    })
}

/// Locks, in `lockmode`, every relation that `tree` (a query of `rel`'s
/// relatives, `$1` being `rel`, already locked) returns, until the set is the
/// same twice: each read takes a fresh snapshot (read-write SPI, under READ
/// COMMITTED), so a relative attached while pgseal waited for a lock is seen and
/// locked too. A child is attached under a lock on its parent, so the set settles.
fn lock_tree(tree: &str, rel: pg_sys::Oid, lockmode: u32) -> crate::error::SealResult<()> {
    let mut locked = vec![rel];
    loop {
        let now = as_owner(|| {
            pgrx::Spi::connect_mut(|c| {
                c.update(tree, None, &[rel.into()])?
                    .map(|r| r.get::<pg_sys::Oid>(1))
                    .collect::<Result<Vec<_>, _>>()
            })
        })?;
        let mut grew = false;
        for oid in now.into_iter().flatten() {
            if !locked.contains(&oid) {
                // SAFETY: LockRelationOid takes a heavyweight lock on an OID that
                // need not exist (it raises nothing for a missing one), held to
                // transaction end.
                unsafe { pg_sys::LockRelationOid(oid, lockmode as pg_sys::LOCKMODE) };
                locked.push(oid);
                grew = true;
            }
        }
        if !grew {
            return Ok(());
        }
    }
}

/// Whether planning a query on `rel` could run code that a role other than a
/// superuser wrote: PostgreSQL's planner simplifies, as whoever plans the query,
/// the expressions of the table's indexes (and their predicates), extended
/// statistics, partition key and CHECK constraints, on the table and on each
/// partition or inheritance child it scans, and the partition constraint a
/// partition inherits from every ancestor's partition key; an expression that
/// calls a function or operator outside the system catalogs (OID 16384 and up)
/// runs there, and a foreign table's scan runs its wrapper. pgseal scans a table as
/// the extension owner only when this is false, and otherwise as the table's owner
/// (`as_table_owner`).
///
/// First the table, then its descendants and ancestors, are locked in SHARE UPDATE
/// EXCLUSIVE mode until the transaction ends: no statistics object, index,
/// constraint, rule or partition can be added to them between this check and the
/// scan that relies on it. Under REPEATABLE READ or SERIALIZABLE the answer is
/// always true (the check could not see what the planner will).
///
/// Also always true for a table Citus manages: the workers plan its shards' queries,
/// and a shard's own indexes and statistics (made on its worker with Citus's
/// `citus.enable_manual_changes_to_shards`, by the table's owner) are not in this
/// node's catalog.
pub fn planning_runs_owner_code(rel: pg_sys::Oid) -> crate::error::SealResult<bool> {
    if crate::pg::citus::manages(rel)? {
        return Ok(true);
    }
    const TREE: &str = "WITH RECURSIVE down(oid) AS ( \
                 SELECT $1::pg_catalog.oid \
                 UNION \
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down t ON i.inhparent OPERATOR(pg_catalog.=) t.oid \
             ) \
             SELECT oid FROM down \
             UNION \
             SELECT a.relid::pg_catalog.oid FROM pg_catalog.pg_partition_ancestors($1::pg_catalog.oid) a";
    let lock = |oid: pg_sys::Oid| {
        // SAFETY: LockRelationOid takes a heavyweight lock on an OID that need
        // not exist (it raises nothing for a missing one), held to transaction end.
        unsafe {
            pg_sys::LockRelationOid(oid, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE)
        }
    };
    lock(rel);
    // Under REPEATABLE READ or SERIALIZABLE the catalog queries below read the
    // transaction's snapshot, while planning reads the catalog as it is now: a change
    // committed in between would be planned but not seen here.
    if crate::pg::xact::uses_transaction_snapshot() {
        return Ok(true);
    }
    lock_tree(TREE, rel, pg_sys::ShareUpdateExclusiveLock)?;
    Ok(as_owner(|| {
        pgrx::Spi::get_one_with_args::<bool>(
            "WITH RECURSIVE down(oid) AS ( \
                 SELECT $1::pg_catalog.oid \
                 UNION \
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down t ON i.inhparent OPERATOR(pg_catalog.=) t.oid \
             ), tree(oid) AS ( \
                 SELECT oid FROM down \
                 UNION \
                 SELECT a.relid::pg_catalog.oid FROM pg_catalog.pg_partition_ancestors($1::pg_catalog.oid) a \
             ), objs(classid, objid) AS ( \
                 SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, t.oid FROM tree t \
                 UNION ALL \
                 SELECT 'pg_catalog.pg_class'::pg_catalog.regclass::pg_catalog.oid, x.indexrelid \
                   FROM pg_catalog.pg_index x JOIN tree t ON x.indrelid OPERATOR(pg_catalog.=) t.oid \
                 UNION ALL \
                 SELECT 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass::pg_catalog.oid, s.oid \
                   FROM pg_catalog.pg_statistic_ext s JOIN tree t ON s.stxrelid OPERATOR(pg_catalog.=) t.oid \
                 UNION ALL \
                 SELECT 'pg_catalog.pg_constraint'::pg_catalog.regclass::pg_catalog.oid, c.oid \
                   FROM pg_catalog.pg_constraint c JOIN tree t ON c.conrelid OPERATOR(pg_catalog.=) t.oid \
             ) \
             SELECT EXISTS (SELECT 1 FROM tree t JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.oid \
                             WHERE c.relkind NOT IN ('r', 'p')) \
                 OR EXISTS (SELECT 1 FROM objs o JOIN pg_catalog.pg_depend d \
                              ON d.classid OPERATOR(pg_catalog.=) o.classid AND d.objid OPERATOR(pg_catalog.=) o.objid \
                             WHERE d.refclassid IN ('pg_catalog.pg_proc'::pg_catalog.regclass, 'pg_catalog.pg_operator'::pg_catalog.regclass) \
                               AND d.refobjid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid)",
            &[rel.into()],
        )
    })?
    .unwrap_or(true))
}

/// A jsonb expression for the image of a row of table `rel`, named `alias` in the
/// statement, equal to `to_jsonb(alias.*)` except that it runs no code but
/// PostgreSQL's own: `to_jsonb` turns a value of a type outside the system
/// catalogs (OID 16384 and up, after domains) with its cast to json, and such a
/// cast may belong to any role that owns the type, while statements on
/// application tables run as the table's owner (`as_table_owner`). A column of a
/// system type (a domain over one included) is turned by `to_jsonb`, which looks
/// up no cast for it; any other column becomes its text form through the type's
/// output function (`format('%s', …)`; output functions are C, written only by
/// superusers), or null.
///
/// The table is locked ACCESS SHARE until the transaction ends and its columns
/// are read from the relation cache after the lock, so they are the columns the
/// statement will see, whatever the transaction's snapshot.
pub fn row_image_sql(rel: pg_sys::Oid, alias: &str) -> crate::error::SealResult<String> {
    // SAFETY: try_relation_open takes the lock and returns null for a relation
    // that no longer exists; a non-null relation is valid until relation_close,
    // which keeps the lock (NoLock) to transaction end.
    let relation =
        unsafe { pg_sys::try_relation_open(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE) };
    if relation.is_null() {
        return Err(crate::error::SealError::Refused(
            "a table was dropped while pgseal read it",
        ));
    }
    let mut columns = Vec::new();
    // SAFETY: rd_att is the open relation's tuple descriptor, read before closing.
    let desc = unsafe { pgrx::PgTupleDesc::from_pg_unchecked((*relation).rd_att) };
    for a in desc.iter().filter(|a| !a.is_dropped()) {
        columns.push((a.name().to_owned(), a.type_oid().value()));
    }
    drop(desc);
    // SAFETY: closes the relation opened above; NoLock keeps its lock.
    unsafe { pg_sys::relation_close(relation, pg_sys::NoLock as pg_sys::LOCKMODE) };
    let mut pairs = Vec::with_capacity(columns.len());
    for (name, typ) in columns {
        // SAFETY: a syscache lookup of the column's type (locked with the table);
        // a missing type raises an ERROR, which pgrx turns into a Rust panic.
        let base = unsafe { pg_sys::getBaseType(typ) };
        let value = format!("{alias}.{}", pgrx::spi::quote_identifier(&name));
        let json = if base.to_u32() < pg_sys::FirstNormalObjectId {
            format!("pg_catalog.to_jsonb({value})")
        } else {
            format!(
                "CASE WHEN pg_catalog.num_nulls({value}) OPERATOR(pg_catalog.=) 0 \
                 THEN pg_catalog.to_jsonb(pg_catalog.format('%s', {value})) END"
            )
        };
        pairs.push(format!(
            "{}::pg_catalog.text, {json}",
            pgrx::spi::quote_literal(&name)
        ));
    }
    if pairs.is_empty() {
        return Ok("'{}'::pg_catalog.jsonb".to_owned());
    }
    // jsonb_build_object takes at most 100 arguments.
    Ok(pairs
        .chunks(50)
        .map(|c| format!("pg_catalog.jsonb_build_object({})", c.join(", ")))
        .collect::<Vec<_>>()
        .join(" OPERATOR(pg_catalog.||) "))
}

/// The schema-qualified, quoted name of table `rel`, pinned to it until the
/// transaction ends: `rel` is locked in `lockmode` (at least ACCESS SHARE, which
/// every rename, SET SCHEMA and DROP of the table waits for) and the row of its
/// schema in `pg_namespace` FOR SHARE (which ALTER SCHEMA … RENAME and DROP SCHEMA
/// wait for, since they update or delete that row while holding no lock on the
/// tables in it). Without the second lock, whoever owns the schema could rename it
/// and create another one of the old name with a view or function named like the
/// table, between pgseal reading the name and a statement being parsed with it,
/// and the statement, run with more rights than that role's, would run its code.
/// Both names are read from the catalog caches after the locks, whatever the
/// transaction's snapshot.
pub fn pinned_name(rel: pg_sys::Oid, lockmode: u32) -> crate::error::SealResult<String> {
    use crate::error::SealError;
    let gone = || SealError::Refused("a table was dropped while pgseal used it");
    // SAFETY: LockRelationOid takes a heavyweight lock on an OID that need not
    // exist (it raises nothing for a missing one), held to transaction end.
    unsafe {
        pg_sys::LockRelationOid(
            rel,
            lockmode.max(pg_sys::AccessShareLock) as pg_sys::LOCKMODE,
        )
    };
    // SAFETY: a syscache lookup; InvalidOid for a relation that no longer exists.
    let nsp = unsafe { pg_sys::get_rel_namespace(rel) };
    if nsp == pg_sys::InvalidOid {
        return Err(gone());
    }
    let locked = as_owner(|| {
        pgrx::Spi::connect_mut(|c| {
            c.update(
                "SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.oid OPERATOR(pg_catalog.=) $1 FOR SHARE",
                None,
                &[nsp.into()],
            )
            .map(|t| t.len())
        })
    })?;
    if locked != 1 {
        return Err(gone());
    }
    // SAFETY: syscache lookups returning palloc'd copies (or null for a missing
    // object), read before the memory context is reset.
    let (schema, name) = unsafe {
        let schema = pg_sys::get_namespace_name(nsp);
        let name = pg_sys::get_rel_name(rel);
        if schema.is_null() || name.is_null() || pg_sys::get_rel_namespace(rel) != nsp {
            return Err(gone());
        }
        (
            exact_name(std::ffi::CStr::from_ptr(schema))?,
            exact_name(std::ffi::CStr::from_ptr(name))?,
        )
    };
    Ok(format!(
        "{}.{}",
        pgrx::spi::quote_identifier(schema),
        pgrx::spi::quote_identifier(name)
    ))
}

/// A catalog name as a Rust string with the same bytes, for a statement pgseal
/// builds: refused (55000) where the bytes are not UTF-8 (a name with non-ASCII
/// letters in a database of another encoding, such as LATIN1). A lossy conversion
/// would put U+FFFD in the statement, whose bytes the server reads back in its own
/// encoding as another name, one whoever may create objects there could have taken
/// with a view that runs their code as the statement's role.
pub fn exact_name(name: &std::ffi::CStr) -> crate::error::SealResult<String> {
    name.to_str().map(str::to_owned).map_err(|_| {
        crate::error::SealError::Refused(
            "a table, schema or column name is not UTF-8 in this database's encoding: pgseal cannot name it exactly in a statement",
        )
    })
}

/// Fails (42501) when a statement on table `rel` run as its owner `owner`
/// (`as_table_owner`) could run code that a third role (neither the owner, the
/// extension's owner nor a superuser) wrote, with the owner's rights:
/// - a partition or inheritance child (locked here in `lockmode`, with `rel`)
///   owned by another role (its triggers, indexes, statistics);
/// - an enabled user trigger on any of them whose function, or a function or
///   operator of its WHEN condition, belongs to a third role (whoever holds the
///   TRIGGER privilege can create one; SECURITY DEFINER is no excuse, since its
///   owner can make it SECURITY INVOKER at any time);
/// - where pgseal's row audit is on, a column whose type reaches (through
///   domains, arrays, ranges and composites) a type of a third role, whose cast
///   to json the audit's `to_jsonb` would run;
/// - among `set_columns` (quoted names, set to their defaults by an UPDATE), a
///   column whose type is a domain (or a domain over one) of a third role, whose
///   default and CHECK constraints would run.
///
/// The owner's own code is trusted, as PostgreSQL's VACUUM and ANALYZE trust it.
/// Refused (0A000) under REPEATABLE READ and SERIALIZABLE, whose snapshot would
/// hide a trigger or child added while pgseal waited for its locks.
pub fn require_only_owners_code(
    rel: pg_sys::Oid,
    owner: pg_sys::Oid,
    lockmode: u32,
    set_columns: &[String],
) -> crate::error::SealResult<()> {
    if crate::pg::xact::uses_transaction_snapshot() {
        // The catalog reads below would see the transaction's snapshot, not a
        // trigger or child added while pgseal waited for its locks.
        return Err(crate::error::SealError::NotSupported(
            "statements on registered tables run in READ COMMITTED transactions only",
        ));
    }
    // The statement's own lock mode, and SHARE UPDATE EXCLUSIVE, which ATTACH
    // PARTITION, DETACH PARTITION CONCURRENTLY and ALTER TABLE … INHERIT take on
    // the parent (the statement's ROW EXCLUSIVE or ACCESS SHARE would not stop
    // them): the tree checked is the tree the statement runs on.
    const DOWN: &str = "WITH RECURSIVE down(oid) AS ( \
             SELECT $1::pg_catalog.oid \
             UNION \
             SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down t ON i.inhparent OPERATOR(pg_catalog.=) t.oid \
         ) SELECT oid FROM down";
    for mode in [lockmode, pg_sys::ShareUpdateExclusiveLock] {
        // SAFETY: as in lock_tree.
        unsafe { pg_sys::LockRelationOid(rel, mode as pg_sys::LOCKMODE) };
        lock_tree(DOWN, rel, mode)?;
    }
    let foreign = as_owner(|| {
        pgrx::Spi::get_one_with_args::<bool>(
            "WITH RECURSIVE down(oid) AS ( \
                 SELECT $1::pg_catalog.oid \
                 UNION \
                 SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN down t ON i.inhparent OPERATOR(pg_catalog.=) t.oid \
             ), others(oid) AS ( \
                 SELECT r.oid FROM pg_catalog.pg_roles r \
                  WHERE r.oid OPERATOR(pg_catalog.<>) $2 AND r.oid OPERATOR(pg_catalog.<>) $4 AND NOT r.rolsuper \
             ), trigger_funcs(oid) AS ( \
                 SELECT d.refobjid FROM down t \
                   JOIN pg_catalog.pg_trigger g ON g.tgrelid OPERATOR(pg_catalog.=) t.oid \
                   JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass \
                        AND d.objid OPERATOR(pg_catalog.=) g.oid \
                        AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass \
                  WHERE NOT g.tgisinternal AND g.tgenabled OPERATOR(pg_catalog.<>) 'D' \
                 UNION \
                 SELECT o.oprcode::pg_catalog.oid FROM down t \
                   JOIN pg_catalog.pg_trigger g ON g.tgrelid OPERATOR(pg_catalog.=) t.oid \
                   JOIN pg_catalog.pg_depend d ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_trigger'::pg_catalog.regclass \
                        AND d.objid OPERATOR(pg_catalog.=) g.oid \
                        AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_operator'::pg_catalog.regclass \
                   JOIN pg_catalog.pg_operator o ON o.oid OPERATOR(pg_catalog.=) d.refobjid \
                  WHERE NOT g.tgisinternal AND g.tgenabled OPERATOR(pg_catalog.<>) 'D' \
             ), domains(oid) AS ( \
                 SELECT a.atttypid FROM pg_catalog.pg_attribute a \
                  WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped \
                    AND pg_catalog.quote_ident(a.attname) OPERATOR(pg_catalog.=) ANY ($3) \
                 UNION \
                 SELECT y.typbasetype FROM pg_catalog.pg_type y JOIN domains m ON y.oid OPERATOR(pg_catalog.=) m.oid \
                  WHERE y.typtype OPERATOR(pg_catalog.=) 'd' \
             ), audited AS ( \
                 SELECT 1 FROM down t JOIN pg_catalog.pg_trigger g ON g.tgrelid OPERATOR(pg_catalog.=) t.oid \
                  WHERE g.tgfoid OPERATOR(pg_catalog.=) 'pgseal._audit_row'::pg_catalog.regproc \
                    AND g.tgenabled OPERATOR(pg_catalog.<>) 'D' \
             ), reachable(oid) AS ( \
                 SELECT a.atttypid FROM down t JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) t.oid \
                  WHERE a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped AND EXISTS (SELECT 1 FROM audited) \
                 UNION \
                 SELECT n.next FROM reachable m JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) m.oid \
                 CROSS JOIN LATERAL ( \
                     SELECT y.typbasetype WHERE y.typtype OPERATOR(pg_catalog.=) 'd' \
                     UNION ALL SELECT y.typelem WHERE y.typelem OPERATOR(pg_catalog.<>) 0 \
                     UNION ALL SELECT r.rngsubtype FROM pg_catalog.pg_range r \
                                WHERE r.rngtypid OPERATOR(pg_catalog.=) y.oid OR r.rngmultitypid OPERATOR(pg_catalog.=) y.oid \
                     UNION ALL SELECT ca.atttypid FROM pg_catalog.pg_attribute ca \
                                WHERE ca.attrelid OPERATOR(pg_catalog.=) y.typrelid AND y.typrelid OPERATOR(pg_catalog.<>) 0 \
                                  AND ca.attnum OPERATOR(pg_catalog.>) 0 AND NOT ca.attisdropped \
                 ) AS n(next) \
             ) \
             SELECT EXISTS (SELECT 1 FROM down t JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.oid \
                             WHERE c.relowner OPERATOR(pg_catalog.<>) $2) \
                 OR EXISTS (SELECT 1 FROM reachable m JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) m.oid \
                             WHERE y.oid OPERATOR(pg_catalog.>=) 16384::pg_catalog.oid AND y.typowner IN (SELECT oid FROM others)) \
                 OR EXISTS (SELECT 1 FROM trigger_funcs f JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) f.oid \
                             WHERE p.proowner IN (SELECT oid FROM others)) \
                 OR EXISTS (SELECT 1 FROM domains m JOIN pg_catalog.pg_type y ON y.oid OPERATOR(pg_catalog.=) m.oid \
                             WHERE y.typtype OPERATOR(pg_catalog.=) 'd' AND y.typowner IN (SELECT oid FROM others))",
            &[
                rel.into(),
                owner.into(),
                set_columns.to_vec().into(),
                extension_owner().into(),
            ],
        )
    })?;
    if foreign != Some(false) {
        return Err(crate::error::SealError::Forbidden(
            "a registered table has a partition or child of another owner, a trigger that runs another role's function, or a column to clear whose domain belongs to another role: pgseal would run that code as the table's owner",
        ));
    }
    Ok(())
}
