//! Organisation membership on a Citus cluster (docs/SCALING.md).
//!
//! `pgseal.org_members` is a table of each node. Where Citus runs, the coordinator's
//! is the one that counts: its triggers check every change (who may create an
//! organisation, grant or take the owner role) and record it in the ledger, which is
//! on the coordinator. `citus_distribute()` makes `pgseal._org_members_copy` a
//! reference table, and a trigger on the coordinator's `org_members` keeps it equal
//! to it in the same transaction, so every node holds a copy. On a worker,
//! `org_protect`'s policies (through `pgseal._my_orgs`) read that copy's placement
//! here, never the worker's own `org_members`, which no one may change there.

use pgrx::prelude::*;

use crate::error::{OrRaise, SealResult};
use crate::pg::{citus, plans};

/// The copy's name in pgseal's schema; its placements are `<name>_<shard id>`.
const COPY: &str = "_org_members_copy";

/// Whether this node is a Citus worker (Citus installed, this node's group not the
/// coordinator's).
#[pg_extern(stable, parallel_unsafe)]
fn _citus_worker() -> bool {
    citus::is_worker().or_raise()
}

/// On a Citus worker: the organisations in which the current user holds at least
/// `min_role` (an `org_role` label) in the current tenant, read from this node's
/// placement of the copy; none when there is no tenant or user context, or no
/// placement here (fails closed). NULL on any other node: the caller reads
/// `pgseal.org_members`. Called by `_my_orgs`, as the owner.
#[pg_extern(stable, parallel_unsafe)]
fn _replica_orgs(min_role: &str) -> Option<Vec<String>> {
    replica_orgs(min_role).or_raise()
}

fn replica_orgs(min_role: &str) -> SealResult<Option<Vec<String>>> {
    if !citus::is_worker()? {
        return Ok(None);
    }
    let (Ok(tenant), Ok(user)) = (crate::context::tenant(), crate::context::user_id()) else {
        return Ok(Some(Vec::new()));
    };
    let Some(placement) = citus::local_placement(COPY)? else {
        return Ok(Some(Vec::new()));
    };
    let Some(sql) = query_on(&placement) else {
        return Ok(Some(Vec::new()));
    };
    // Evaluated per row of a shard: no owner switch here. It runs inside `_my_orgs`
    // (SECURITY DEFINER, its search_path pinned), the only role that may execute it
    // is the owner, and its statement names everything with its schema.
    let orgs = plans::select_first(
        sql,
        &[plans::TEXT, plans::TEXT, plans::TEXT],
        &[tenant.into(), user.into(), min_role.into()],
        |r| Ok(r.get::<Vec<String>>(1)?),
    )?
    .flatten()
    .unwrap_or_default();
    Ok(Some(orgs))
}

thread_local! {
    /// The statement for each placement seen, kept for the backend's life so that its
    /// plan is kept too (`plans`); a placement keeps its name for the table's life.
    static QUERIES: std::cell::RefCell<std::collections::HashMap<String, &'static str>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// The membership statement on `placement`; None past a few placements in one
/// backend (then nothing is read: fails closed).
fn query_on(placement: &str) -> Option<&'static str> {
    QUERIES.with(|m| {
        let mut m = m.borrow_mut();
        if let Some(q) = m.get(placement) {
            return Some(*q);
        }
        if m.len() >= 4 {
            return None;
        }
        let q: &'static str = Box::leak(
            format!(
                "SELECT COALESCE(pg_catalog.array_agg(m.org_id), '{{}}'::pg_catalog.text[]) \
                   FROM {placement} m \
                  WHERE m.tenant_id OPERATOR(pg_catalog.=) $1 \
                    AND m.user_id OPERATOR(pg_catalog.=) $2 \
                    AND m.role OPERATOR(pg_catalog.<=) $3::pgseal.org_role"
            )
            .into_boxed_str(),
        );
        m.insert(placement.to_owned(), q);
        Some(q)
    })
}
