//! What lets an offboarding see all of a tenant's rows in a table `org_protect`
//! protects. Its policies show a row to the organisations' members and to the
//! user who owns it, and they bind the table's owner too (FORCE), by whose rights
//! the offboarding's statements run; `org_protect` adds two more, for SELECT and
//! DELETE, whose condition is `pgseal._offboard_visible('<the table>')`: true only
//! while one of those statements runs on that table (`as_offboarding_owner`), as
//! its owner. Its restrictive policy still limits every row to the tenant. No other
//! table's rows, no other role and no other statement of the transaction see more.
//!
//! On Citus the statements run on the workers, in backends of their own, which
//! have no such flag: there each of `org_protect`'s policies tests the tenant
//! itself (Citus makes every policy permissive on the shards), and the coordinator
//! sends, for each statement, a grant (`pgseal.offboard_grant`,
//! `pgseal_core::grant`): a MAC of the database, the table, its owner and the
//! tenant, which only a node holding the master key can make, valid for an hour.
//! There the policies' condition is `pgseal._offboard_visible_in('<the table>')`,
//! true on any node where the grant matches its own database, the table, the
//! current role and tenant, and has not expired; the grant is cleared when the
//! statement returns.

use std::cell::RefCell;

use std::cell::Cell;

use pgrx::prelude::*;

use crate::error::{OrRaise, SealError, SealResult};
use crate::privilege::as_table_owner_pinned;

thread_local! {
    /// The table an offboarding statement runs on now, and its owner.
    static VISIBLE: Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { Cell::new(None) };
    /// That table's qualified name (`_offboard_visible_in`).
    static VISIBLE_NAME: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Puts the previous values back when dropped, also while unwinding from an error.
struct Restore(Option<(pg_sys::Oid, pg_sys::Oid)>, Option<String>);

impl Drop for Restore {
    fn drop(&mut self) {
        VISIBLE.with(|v| v.set(self.0));
        VISIBLE_NAME.with(|v| *v.borrow_mut() = self.1.take());
    }
}

/// Runs `f` as table `rel`'s owner `owner` (`as_table_owner_pinned`), with
/// `_offboard_visible(rel)` (and `_offboard_visible_in` of its name) true for the
/// owner meanwhile; for a table Citus manages, with a grant for it sent to the
/// workers too (and, with Citus, acting for the application user
/// `OFFBOARDING_USER`).
pub(super) fn as_offboarding_owner<R, E>(
    rel: pg_sys::Oid,
    owner: pg_sys::Oid,
    f: impl FnOnce() -> Result<R, E>,
) -> SealResult<R>
where
    SealError: From<E>,
{
    let name = crate::ledger::evidence::qualified_name(rel);
    refuse_name_named_elsewhere(rel, &name)?;
    let _restore = Restore(
        VISIBLE.with(|v| v.replace(Some((rel, owner)))),
        VISIBLE_NAME.with(|v| v.replace(Some(name))),
    );
    // The grant names the tenant of the caller's context, which the workers have.
    let citus = crate::pg::citus::present();
    let grant = if citus && crate::pg::citus::manages(rel)? {
        Some(mint(rel, owner)?)
    } else {
        None
    };
    // The caller's user and grant (an enclosing statement's), which the workers
    // have too, sent back when the statement returns.
    let user_setting = crate::gucs::user_setting_name();
    let caller_user = crate::context::read_setting(&user_setting).unwrap_or_default();
    let caller_grant = crate::context::read_setting(GRANT_SETTING).unwrap_or_default();
    as_table_owner_pinned::<R, SealError>(owner, || {
        // No parallel worker, which has no flag, reads the table meanwhile (in
        // `as_table_owner`'s setting level, discarded on return).
        crate::privilege::save_setting(c"max_parallel_workers_per_gather", c"0");
        // Where Citus is, a user that is no one's (its rows are the tenant's
        // anyway, which the offboarding's condition shows): `org_protect`'s Citus
        // form calls `current_user_id()` for each row, which fails without one,
        // before it reaches that condition (PostgreSQL tests the permissive
        // policies in reverse order of their names), and Citus evaluates it on
        // this node for a table of the workers.
        if citus {
            crate::privilege::save_setting(&user_setting, OFFBOARDING_USER);
        }
        let Some(grant) = &grant else {
            return f().map_err(SealError::from);
        };
        // The grant and that user, on this node and the workers.
        let grant = std::ffi::CString::new(grant.as_str()).unwrap_or_default();
        crate::privilege::save_setting(GRANT_SETTING, &grant);
        crate::pg::citus::send_own_setting(GRANT_SETTING)?;
        crate::pg::citus::send_own_setting(&user_setting)?;
        // An error returns at once, without sending the caller's values back: the
        // grant and user stay set on the workers until the (sub)transaction ends,
        // which an error here must therefore end. Every caller raises it (none
        // handles it and goes on in the same subtransaction); one that did would
        // leave the grant in force for its later statements.
        let r = f()?;
        // The workers get the caller's user and grant back, with propagation on
        // whatever a table owner's code in the statement set (an error instead
        // ends the transaction, or the subtransaction whose SETs it undoes).
        let caller_user = std::ffi::CString::new(caller_user.as_str()).unwrap_or_default();
        let caller_grant = std::ffi::CString::new(caller_grant.as_str()).unwrap_or_default();
        crate::privilege::set_setting(
            c"citus.propagate_set_commands",
            c"local",
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );
        crate::privilege::set_setting(
            GRANT_SETTING,
            &caller_grant,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );
        crate::privilege::set_setting(
            &user_setting,
            &caller_user,
            pg_sys::GucAction::GUC_ACTION_LOCAL,
        );
        crate::pg::citus::send_own_setting(GRANT_SETTING)?;
        crate::pg::citus::send_own_setting(&user_setting)?;
        Ok(r)
    })
}

/// Refuses (55000, naming that table) when an offboarding policy (`org_protect`'s
/// names) of another table, not a temporary one, names table `rel`'s qualified
/// name `name` in `_offboard_visible_in`: that condition names
/// its table by text (`org_protect`'s Citus form), so it goes stale when its table
/// is renamed or moved to another schema, and a table made since under the old
/// name would then hold a grant (or, in this backend, the flag) that shows the
/// renamed table's rows too: to its owner, whose code runs in the statements here,
/// or to whoever reads the grant sent to the workers. (Matched with or without
/// its schema, which `pg_get_expr` prints only when the caller's `search_path`
/// does not find the function.)
fn refuse_name_named_elsewhere(rel: pg_sys::Oid, name: &str) -> SealResult<()> {
    // `pg_get_expr` writes a text constant as `simple_quote_literal` does: quotes
    // doubled, no `E` prefix, backslashes doubled only where
    // `standard_conforming_strings` is off (both forms are looked for).
    let other = Spi::get_one_with_args::<String>(
        "WITH n(lit) AS (SELECT pg_catalog.replace($2::pg_catalog.text, '''', '''''') \
                         UNION ALL \
                         SELECT pg_catalog.replace(pg_catalog.replace($2::pg_catalog.text, '''', ''''''), pg_catalog.chr(92), pg_catalog.repeat(pg_catalog.chr(92), 2))) \
         SELECT pg_catalog.min(p.polrelid::pg_catalog.regclass::pg_catalog.text) \
           FROM pg_catalog.pg_policy p JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.polrelid, n \
          WHERE p.polrelid OPERATOR(pg_catalog.<>) $1 \
            AND p.polname OPERATOR(pg_catalog.=) ANY (ARRAY['pgseal_offboard_select', 'pgseal_offboard_delete']::pg_catalog.name[]) \
            AND c.relpersistence OPERATOR(pg_catalog.<>) 't' \
            AND pg_catalog.strpos(pg_catalog.pg_get_expr(p.polqual, p.polrelid), \
                                  '_offboard_visible_in(''' OPERATOR(pg_catalog.||) n.lit OPERATOR(pg_catalog.||) '''::text)') \
                OPERATOR(pg_catalog.>) 0",
        &[rel.into(), name.into()],
    )?;
    match other {
        Some(other) => Err(SealError::Refused(NAMED_ELSEWHERE).on_table(&other)),
        None => Ok(()),
    }
}

const NAMED_ELSEWHERE: &str = "a policy of this table names an offboarded table's name in its offboarding condition (it was renamed, or moved to another schema, after org_protect protected it, and another table now has its old name): the offboarding's grant for that table would show this one's rows too (run pgseal.org_protect on this table again)";

/// The application user an offboarding's statements act for where Citus is (on the
/// workers too, for a Citus table): no one's (`as_offboarding_owner`).
const OFFBOARDING_USER: &std::ffi::CStr = c"_pgseal_offboarding";

/// The setting that carries a grant to the workers.
const GRANT_SETTING: &std::ffi::CStr = c"pgseal.offboard_grant";

/// How long a grant counts: an offboarding's statement on a Citus table deletes the
/// tenant's rows of that table in one statement, which a large tenant can make long;
/// the grant is cleared when it returns.
const GRANT_SECONDS: i64 = 3600;

/// This node's database name and role `role`'s name, for a grant.
fn scope_names(role: pg_sys::Oid) -> Option<(String, String)> {
    // SAFETY: get_database_name and GetUserNameFromId (noerr) return palloc'd
    // copies, or NULL for an object that is gone.
    let (database, role) = unsafe {
        let d = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        let r = pg_sys::GetUserNameFromId(role, true);
        if d.is_null() || r.is_null() {
            return None;
        }
        (
            std::ffi::CStr::from_ptr(d).to_string_lossy().into_owned(),
            std::ffi::CStr::from_ptr(r).to_string_lossy().into_owned(),
        )
    };
    Some((database, role))
}

/// The clock in whole Unix seconds; None for a clock set before 1970.
fn unix_now() -> Option<i64> {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_secs()).ok())
}

/// How far a grant's expiry may lie beyond an hour from this node's clock (the
/// nodes' clocks differ by that much at most): one further ahead was made by a
/// node whose clock runs ahead, and would count for longer than an hour here.
const CLOCK_SKEW_SECONDS: i64 = 300;

/// A grant for the offboarding's statements on `rel` as its owner `owner`, under
/// the caller's tenant, signed under the active master key version.
fn mint(rel: pg_sys::Oid, owner: pg_sys::Oid) -> SealResult<String> {
    let tenant = crate::context::tenant()?;
    let (database, role) =
        scope_names(owner).ok_or(SealError::Internal("an offboarded table's owner"))?;
    let table = crate::ledger::evidence::qualified_name(rel);
    let scope = pgseal_core::grant::Scope {
        database: &database,
        table: &table,
        role: &role,
        tenant: &tenant,
    };
    crate::master::with_active(|version, key| {
        Ok(pgseal_core::grant::Grant::sign(
            key,
            version,
            unix_now()
                .ok_or(SealError::Refused(NO_CLOCK))?
                .saturating_add(GRANT_SECONDS),
            &scope,
        )
        .to_string())
    })
}

/// A grant checked: its text, the table, role and tenant it was checked for, and
/// whether it granted them.
struct Checked {
    text: Vec<u8>,
    table: String,
    user: pg_sys::Oid,
    tenant: String,
    /// When it grants them, until when.
    until: Option<i64>,
}

thread_local! {
    /// The last grant this backend checked (a policy tests every row): forgotten at
    /// every transaction end.
    static CHECKED: RefCell<Option<Checked>> = const { RefCell::new(None) };
}

/// Whether `pgseal.offboard_grant` holds a grant, made by a node with the master
/// key, of table `table` to role `user` under the current tenant, unexpired.
fn granted(table: &str, user: pg_sys::Oid) -> bool {
    if crate::gucs::with_offboard_grant(|g| g.is_none()) {
        return false;
    }
    let Ok(tenant) = crate::context::tenant_shared() else {
        return false;
    };
    let text = crate::gucs::with_offboard_grant(|g| {
        let g = g?;
        let cached = CHECKED.with(|c| {
            c.borrow().as_ref().and_then(|c| {
                (c.text == g && c.table == table && c.user == user && *c.tenant == *tenant)
                    .then_some(c.until)
            })
        });
        Some(match cached {
            Some(ok) => Err(ok),
            None => Ok(g.to_vec()),
        })
    });
    let until = match text {
        None => return false,
        Some(Err(until)) => until,
        Some(Ok(text)) => {
            let until = check(&text, table, user, &tenant).or_raise();
            CHECKED.with(|c| {
                *c.borrow_mut() = Some(Checked {
                    text,
                    table: table.to_owned(),
                    user,
                    tenant: tenant.to_string(),
                    until,
                })
            });
            until
        }
    };
    match (until, unix_now()) {
        (None, _) => false,
        (Some(_), None) => SealError::Refused(NO_CLOCK).raise(),
        (Some(until), Some(now)) if pgseal_core::grant::expired_at(until, now) => {
            SealError::Refused(GRANT_EXPIRED).raise()
        }
        (Some(until), Some(now))
            if until > now.saturating_add(GRANT_SECONDS + CLOCK_SKEW_SECONDS) =>
        {
            SealError::Refused(GRANT_AHEAD).raise()
        }
        (Some(_), Some(_)) => true,
    }
}

/// This node's clock reads before 1970: no grant is made or counted.
const NO_CLOCK: &str =
    "this node's clock reads before 1970: an offboarding's grant can be neither made nor checked";

/// A grant that would count here for longer than it was made to.
const GRANT_AHEAD: &str = "an offboarding's grant expires more than an hour ahead of this node's clock (the nodes' clocks differ by more than five minutes): the statement fails rather than take it";

/// An offboarding's grant that a node made for this scope, expired: the statement
/// fails rather than leave the tenant's rows of this node out.
const GRANT_EXPIRED: &str = "an offboarding's grant for this table has expired on this node (it counts an hour, by this node's clock): the statement fails rather than miss the tenant's rows here (run the offboarding again)";

/// Until when the grant `text` grants `table` to role `user` under `tenant` (None:
/// it does not; not a grant, or not made for that scope). A grant whose master key
/// version this node lacks, or made under another key of that version (its check
/// value), or a node with no master key, fails (55000): the tenant's rows of this
/// node would be left out.
fn check(text: &[u8], table: &str, user: pg_sys::Oid, tenant: &str) -> SealResult<Option<i64>> {
    let Some(grant) = std::str::from_utf8(text)
        .ok()
        .and_then(pgseal_core::grant::Grant::parse)
    else {
        return Ok(None);
    };
    let Some((database, role)) = scope_names(user) else {
        return Ok(None);
    };
    let scope = pgseal_core::grant::Scope {
        database: &database,
        table,
        role: &role,
        tenant,
    };
    crate::master::with_ring(|ring| {
        // A version this node lacks and another key of that version fail alike, so
        // that a made-up grant (any role can set one) does not tell which master
        // key versions this node holds.
        let Some(key) = ring.get(grant.version) else {
            return Err(SealError::Refused(GRANT_OTHER_KEY));
        };
        if !grant.made_under(key) {
            return Err(SealError::Refused(GRANT_OTHER_KEY));
        }
        Ok(grant.names(key, &scope).then_some(grant.expires))
    })
}

/// A grant made under another master key of the same version than this node's:
/// the statement fails rather than miss the tenant's rows here.
const GRANT_OTHER_KEY: &str = "an offboarding's grant was made under a master key this node does not hold (the nodes' master key commands differ): the statement fails rather than miss the tenant's rows here";

/// `pgseal._offboard_visible(rel) → boolean`: whether an offboarding statement on
/// table `rel` runs now, as its owner (the condition of `org_protect`'s offboarding
/// policies). False for every other table, role and statement, and in a parallel
/// worker (parallel safe, so that the policies leave queries on the table free to
/// run in parallel: the offboarding's own statements run with none).
#[pg_extern(stable, strict, parallel_safe)]
fn _offboard_visible(rel: pg_sys::Oid) -> bool {
    // SAFETY: reads the backend's current user id; no preconditions.
    let user = unsafe { pg_sys::GetUserId() };
    VISIBLE.with(|v| v.get()) == Some((rel, user))
}

/// `pgseal._offboard_visible_in(table) → boolean`: the condition of `org_protect`'s
/// offboarding policies on Citus, on every node (the coordinator sets the grant for
/// its own backend too): whether `pgseal.offboard_grant` holds a grant of table
/// `table` (its schema-qualified name, as `format('%I.%I')` writes it: a name, which
/// the shards can be sent, where a regclass argument could not be resolved on a
/// worker in the transaction that distributed the table) to the current role under
/// the current tenant (`granted`). False at once when no grant is set, as it is
/// outside an offboarding's statements.
#[pg_extern(stable, strict, parallel_safe)]
fn _offboard_visible_in(table: &str) -> bool {
    // SAFETY: reads the backend's current user id; no preconditions.
    let user = unsafe { pg_sys::GetUserId() };
    // In the backend that runs the statement, its flag, as `_offboard_visible`'s (a
    // table Citus does not manage, which gets no grant).
    let here = VISIBLE
        .with(|v| v.get())
        .is_some_and(|(_, owner)| owner == user)
        && VISIBLE_NAME.with(|v| v.borrow().as_deref() == Some(table));
    here || granted(table, user)
}

/// Forgets the table at every transaction end (it is put back on return anyway).
fn forget(_: crate::txn::End) {
    VISIBLE.with(|v| v.set(None));
    CHECKED.with(|c| *c.borrow_mut() = None);
}

/// The flag lasts no longer than its transaction.
pub const TXN: crate::txn::Participant = crate::txn::Participant {
    end: Some(forget),
    ..crate::txn::Participant::NONE
};
