//! Tenant offboarding (issue 19): `tenant_offboard` schedules the end of a tenant
//! after a grace period, `tenant_offboard_cancel` undoes it within that period, and
//! pgseald carries out the steps through the internal functions here, each of which
//! checks the tenant's step (compare-and-set), its due time and its legal hold under
//! the tenant's chain lock. The state is `pgseal.tenant_offboardings`
//! (sql/offboarding.sql), written only here, as the extension owner.

use pgrx::prelude::*;
use pgrx::JsonB;
use serde_json::json;

use crate::error::{OrRaise, SealError, SealResult};
use crate::ledger::erase::{self, Which};
use crate::ledger::evidence;
use crate::privilege::as_owner;

/// The steps, in order (`tenant_offboardings.step`).
const STEPS: [&str; 7] = [
    "scheduled",
    "exported",
    "deleted",
    "shredded",
    "erased",
    "receipted",
    "done",
];

/// The checks every function makes: the master key, a tenant argument that is not
/// one of pgseal's own chains, pgseal_admin, a read-write transaction.
fn checked(tenant: Option<&str>, what: &'static str) -> SealResult<String> {
    crate::master::require_loaded()?;
    let tenant = tenant.ok_or(SealError::NullArgument("tenant"))?;
    crate::limits::tenant_arg(tenant)?;
    if crate::ledger::names::is_pgseal_chain(tenant) {
        return Err(SealError::Forbidden(
            "pgseal's own chains cannot be offboarded",
        ));
    }
    crate::ledger::access::require_admin(what)?;
    crate::pg::xact::require_read_write(what)?;
    Ok(tenant.to_owned())
}

/// `pgseal.tenant_offboard(tenant, grace)`: schedules the tenant's offboarding for
/// `now() + grace` and records `tenant.offboard_scheduled`; returns the due time.
/// Refused (55000) when one is already scheduled or running.
#[pg_extern(volatile, parallel_unsafe)]
fn tenant_offboard(
    tenant: Option<&str>,
    grace: Option<pgrx::datum::Interval>,
) -> pgrx::datum::TimestampWithTimeZone {
    (|| {
        let tenant = checked(tenant, "tenant_offboard")?;
        let grace = grace.ok_or(SealError::NullArgument("grace"))?;
        erase::lock_chain(&tenant)?;
        let (due, due_text) = as_owner(|| -> SealResult<_> {
            if Spi::get_one_with_args::<bool>(
                "SELECT $1::pg_catalog.interval OPERATOR(pg_catalog.<) '0'::pg_catalog.interval",
                &[grace.into()],
            )? != Some(false)
            {
                return Err(SealError::InvalidArgument("grace must not be negative"));
            }
            let row = Spi::get_two_with_args::<pgrx::datum::TimestampWithTimeZone, String>(
                "INSERT INTO pgseal.tenant_offboardings (tenant_id, due_at) \
                 VALUES ($1, pg_catalog.now() OPERATOR(pg_catalog.+) $2::pg_catalog.interval) \
                 ON CONFLICT (tenant_id) DO NOTHING \
                 RETURNING due_at, pg_catalog.to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                &[tenant.as_str().into(), grace.into()],
            );
            match row {
                Ok((Some(due), Some(text))) => Ok((due, text)),
                Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => Err(SealError::Refused(
                    "an offboarding of the tenant is already scheduled or running",
                )),
                Err(e) => Err(e.into()),
            }
        })?;
        let grace_text = as_owner(|| {
            Spi::get_one_with_args::<String>(
                "SELECT $1::pg_catalog.interval::pg_catalog.text",
                &[grace.into()],
            )
        })?;
        evidence::record(
            &tenant,
            "tenant.offboard_scheduled",
            json!({ "due_at": due_text, "grace": grace_text }),
        )?;
        Ok(due)
    })()
    .or_raise()
}

/// `pgseal.tenant_offboard_cancel(tenant)`: cancels a scheduled offboarding while
/// its grace period runs and records `tenant.offboard_cancelled`. Refused (55000)
/// when none is scheduled, or once it is due (pgseald may have begun).
#[pg_extern(volatile, parallel_unsafe)]
fn tenant_offboard_cancel(tenant: Option<&str>) {
    (|| {
        let tenant = checked(tenant, "tenant_offboard_cancel")?;
        erase::lock_chain(&tenant)?;
        let state = as_owner(|| {
            Spi::get_two_with_args::<String, bool>(
                "SELECT step, due_at OPERATOR(pg_catalog.<=) pg_catalog.now() \
                   FROM pgseal.tenant_offboardings WHERE tenant_id = $1 FOR UPDATE",
                &[tenant.as_str().into()],
            )
        });
        match state {
            Ok((Some(step), Some(false))) if step == "scheduled" => {}
            Ok((Some(_), Some(_))) => {
                return Err(SealError::Refused(
                    "the offboarding's grace period is over: it can no longer be cancelled",
                ))
            }
            Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => {
                return Err(SealError::Refused("no offboarding of the tenant is scheduled"))
            }
            Err(e) => return Err(e.into()),
        }
        let due = as_owner(|| {
            Spi::get_one_with_args::<String>(
                "DELETE FROM pgseal.tenant_offboardings WHERE tenant_id = $1 \
                 RETURNING pg_catalog.to_char(due_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
                &[tenant.as_str().into()],
            )
        })?;
        evidence::record(&tenant, "tenant.offboard_cancelled", json!({ "due_at": due }))?;
        Ok(())
    })()
    .or_raise()
}

/// Fails (55000) unless `tenant`'s offboarding is due, not done, not held, and at
/// `step`. Takes the tenant's chain lock first (a hold is recorded in the chain).
fn require_step(tenant: &str, step: &str) -> SealResult<()> {
    erase::lock_chain(tenant)?;
    if crate::ledger::admin::on_hold(tenant)? {
        return Err(SealError::Refused(
            "the tenant is under a retention hold: it is not offboarded",
        ));
    }
    let at = as_owner(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT step = $2 AND due_at OPERATOR(pg_catalog.<=) pg_catalog.now() \
               FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[tenant.into(), step.into()],
        )
    });
    match at {
        Ok(Some(true)) => Ok(()),
        Ok(_) | Err(pgrx::spi::Error::InvalidPosition) => Err(SealError::Refused(
            "the tenant's offboarding is not due at that step",
        )),
        Err(e) => Err(e.into()),
    }
}

/// `pgseal._offboard_due()`: the tenants whose offboarding is due and not done,
/// and not under a hold, earliest first.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_due() -> SetOfIterator<'static, String> {
    let tenants = (|| {
        crate::master::require_loaded()?;
        crate::ledger::access::require_admin("_offboard_due")?;
        as_owner(|| {
            Spi::connect(|c| {
                let rows = c.select(
                    "SELECT o.tenant_id FROM pgseal.tenant_offboardings o \
                      WHERE o.step OPERATOR(pg_catalog.<>) 'done' AND o.due_at OPERATOR(pg_catalog.<=) pg_catalog.now() \
                        AND NOT EXISTS (SELECT 1 FROM pgseal.retention_holds h WHERE h.tenant_id OPERATOR(pg_catalog.=) o.tenant_id) \
                      ORDER BY o.due_at, o.tenant_id",
                    None,
                    &[],
                )?;
                rows.map(|r| {
                    r.get::<String>(1)?
                        .ok_or(SealError::Internal("an offboarding's tenant"))
                })
                .collect::<SealResult<Vec<_>>>()
            })
        })
    })()
    .or_raise();
    SetOfIterator::new(tenants)
}

/// `pgseal._offboard_advance(tenant, from_step, to_step, export_file)`: records that
/// the step after `from_step` is done (pgseald calls it in the transaction that did
/// the step's work). `export_file` is kept with 'exported'.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_advance(
    tenant: Option<&str>,
    from_step: Option<&str>,
    to_step: Option<&str>,
    export_file: default!(Option<&str>, "NULL"),
) {
    (|| {
        let tenant = checked(tenant, "_offboard_advance")?;
        let from = from_step.ok_or(SealError::NullArgument("from_step"))?;
        let to = to_step.ok_or(SealError::NullArgument("to_step"))?;
        let next = STEPS
            .iter()
            .position(|s| *s == from)
            .and_then(|i| STEPS.get(i + 1));
        // 'receipted' is reached only through _offboard_finish, which checks the
        // work is done.
        if next != Some(&to) || to == "receipted" {
            return Err(SealError::InvalidArgument(
                "to_step must be the step after from_step",
            ));
        }
        if to == "exported" && export_file.is_none() {
            return Err(SealError::NullArgument("export_file"));
        }
        require_step(&tenant, from)?;
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE pgseal.tenant_offboardings SET step = $2, step_at = pg_catalog.now(), \
                        export_file = COALESCE($3, export_file) WHERE tenant_id = $1",
                &[tenant.as_str().into(), to.into(), export_file.into()],
            )
        })?;
        Ok(())
    })()
    .or_raise()
}

/// `pgseal._offboard_deleted(tenant, tbl, n)`: adds `n` rows deleted from `tbl` to
/// the offboarding's counts, in the transaction that deleted them.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_deleted(tenant: Option<&str>, tbl: Option<&str>, n: Option<i64>) {
    (|| {
        let tenant = checked(tenant, "_offboard_deleted")?;
        let tbl = tbl.ok_or(SealError::NullArgument("tbl"))?;
        let n = n.ok_or(SealError::NullArgument("n"))?;
        require_step(&tenant, "exported")?;
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE pgseal.tenant_offboardings \
                    SET deleted = deleted OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_object($2::pg_catalog.text, \
                        COALESCE((deleted OPERATOR(pg_catalog.->>) $2::pg_catalog.text)::pg_catalog.int8, 0) OPERATOR(pg_catalog.+) $3) \
                  WHERE tenant_id = $1",
                &[tenant.as_str().into(), tbl.into(), n.into()],
            )
        })?;
        Ok(())
    })()
    .or_raise()
}

/// `pgseal._offboard_erase(tenant, batch)`: erases the payloads of up to `batch`
/// more of the tenant's entries (at step 'shredded'); returns how many (0: none
/// left).
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_erase(tenant: Option<&str>, batch: Option<i32>) -> i64 {
    (|| {
        let tenant = checked(tenant, "_offboard_erase")?;
        let batch = batch.filter(|b| *b > 0).ok_or(SealError::InvalidArgument(
            "batch must be a positive number",
        ))?;
        require_step(&tenant, "shredded")?;
        Ok(erase::erase(
            &tenant,
            Which::All {
                limit: batch.into(),
            },
        )?
        .len() as i64)
    })()
    .or_raise()
}

/// `pgseal._offboard_finish(tenant)`: at step 'erased', checks that the work is
/// done (no data key left, no payload left to erase), appends the
/// `tenant.offboarded` receipt and moves to 'receipted'; returns the receipt.
#[pg_extern(volatile, parallel_unsafe)]
fn _offboard_finish(tenant: Option<&str>) -> JsonB {
    (|| {
        let tenant = checked(tenant, "_offboard_finish")?;
        require_step(&tenant, "erased")?;
        let (keys, left) = as_owner(|| {
            Spi::get_two_with_args::<i64, i64>(
                "SELECT (SELECT pg_catalog.count(*) FROM pgseal.tenant_keys k \
                          WHERE k.tenant_id = $1 AND k.purpose = 'dek' AND k.wrapped IS NOT NULL), \
                        (SELECT pg_catalog.count(*) FROM pgseal.ledger l \
                          WHERE l.tenant_id = $1 AND l.fmt = 2 AND l.salt IS NOT NULL \
                            AND NOT pg_catalog.starts_with(l.event, 'subject.') \
                            AND NOT pg_catalog.starts_with(l.event, 'tenant.'))",
                &[tenant.as_str().into()],
            )
        })?;
        if keys != Some(0) || left != Some(0) {
            return Err(SealError::Refused(
                "the tenant still has data keys or ledger payloads: the offboarding's steps are not done",
            ));
        }
        let (file, deleted, erased, kept) = as_owner(|| {
            Spi::connect(|c| {
                let row = c
                    .select(
                        "SELECT o.export_file, o.deleted, \
                                (SELECT pg_catalog.count(*) FROM pgseal.ledger l WHERE l.tenant_id = $1 AND l.commitment IS NOT NULL), \
                                (SELECT pg_catalog.count(*) FROM pgseal.ledger l WHERE l.tenant_id = $1 AND l.fmt = 1) \
                           FROM pgseal.tenant_offboardings o WHERE o.tenant_id = $1",
                        Some(1),
                        &[tenant.as_str().into()],
                    )?
                    .first();
                Ok::<_, pgrx::spi::Error>((
                    row.get::<String>(1)?,
                    row.get::<JsonB>(2)?.map(|j| j.0),
                    row.get::<i64>(3)?,
                    row.get::<i64>(4)?,
                ))
            })
        })?;
        let receipt = json!({
            "export_file": file,
            "deleted": deleted,
            "ledger_entries_erased": erased,
            "format_1_entries_kept": kept,
        });
        evidence::record(&tenant, "tenant.offboarded", receipt.clone())?;
        as_owner(|| {
            Spi::run_with_args(
                "UPDATE pgseal.tenant_offboardings SET step = 'receipted', step_at = pg_catalog.now() WHERE tenant_id = $1",
                &[tenant.as_str().into()],
            )
        })?;
        Ok(JsonB(receipt))
    })()
    .or_raise()
}
