//! `pgseal.ledger_verify`: reads a range of a tenant's chain back and checks
//! every hash, MAC, link and seq with `pgseal-core`'s verifier.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgseal_core::chain::{Failure, Problem, Report, StoredEntry, Verifier};
use pgseal_core::ledger::{Hash, GENESIS};

use crate::error::{OrRaise, SealError, SealResult};
use crate::privilege::as_owner;

/// Rows fetched from the cursor at a time.
const BATCH: i64 = 4096;

struct HeadRow {
    seq: i64,
    hash: Hash,
    anchor_seq: i64,
    anchor_hash: Hash,
}

fn head_row(tenant: &str) -> SealResult<Option<HeadRow>> {
    let row = Spi::connect(|client| -> SealResult<Option<HeadRow>> {
        let t = client.select(
            "SELECT seq, hash, anchor_seq, anchor_hash FROM pgseal.ledger_heads WHERE tenant_id = $1",
            Some(1),
            &[tenant.into()],
        )?;
        let Some(r) = t.into_iter().next() else {
            return Ok(None);
        };
        let h = |i| -> SealResult<Hash> {
            r.get::<Vec<u8>>(i)?
                .and_then(|v| v.try_into().ok())
                .ok_or(SealError::Internal("bad hash in pgseal.ledger_heads"))
        };
        Ok(Some(HeadRow {
            seq: r.get::<i64>(1)?.unwrap_or(0),
            hash: h(2)?,
            anchor_seq: r.get::<i64>(3)?.unwrap_or(0),
            anchor_hash: h(4)?,
        }))
    })?;
    Ok(row)
}

/// The hash of entry `seq`, if it exists.
fn hash_at(tenant: &str, seq: i64) -> SealResult<Option<Hash>> {
    let h = Spi::get_one_with_args::<Vec<u8>>(
        "SELECT hash FROM pgseal.ledger WHERE tenant_id = $1 AND seq = $2",
        &[tenant.into(), seq.into()],
    );
    match h {
        Ok(Some(v)) => Ok(v.try_into().ok()),
        Ok(None) | Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Verifies `tenant`'s entries from `from_seq` to `to_seq` (both inclusive;
/// defaults: the first kept entry and the head). Runs as the extension owner.
pub fn verify_range(
    tenant: &str,
    from_seq: Option<i64>,
    to_seq: Option<i64>,
) -> SealResult<Report> {
    // Entries this transaction appended are verified too: written first, they
    // are in the table and in the heads row.
    super::heads::flush()?;
    as_owner(|| {
        let head = head_row(tenant)?;
        let Some(head) = head else {
            // No head: either no entries, or entries whose head row was removed.
            let any = Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT 1 FROM pgseal.ledger WHERE tenant_id = $1)",
                &[tenant.into()],
            )?
            .unwrap_or(false);
            let failure = any.then_some(Failure {
                seq: 1,
                problem: Problem::Gap,
            });
            return Ok(Report {
                checked: 0,
                failure,
                last: None,
            });
        };
        let first_kept = head.anchor_seq + 1;
        let from = from_seq.unwrap_or(first_kept).max(first_kept);
        let to = to_seq.unwrap_or(head.seq).min(head.seq);
        if from > to {
            return Ok(Report {
                checked: 0,
                failure: None,
                last: None,
            });
        }
        let prev = if from == first_kept {
            if head.anchor_seq == 0 {
                GENESIS
            } else {
                head.anchor_hash
            }
        } else {
            match hash_at(tenant, from - 1)? {
                Some(h) => h,
                None => {
                    return Ok(Report {
                        checked: 0,
                        failure: Some(Failure {
                            seq: from - 1,
                            problem: Problem::Gap,
                        }),
                        last: None,
                    })
                }
            }
        };
        let mac = super::mac_key(tenant, false)?;
        if mac.is_none() {
            return Ok(Report {
                checked: 0,
                failure: Some(Failure {
                    seq: from,
                    problem: Problem::MacMismatch,
                }),
                last: None,
            });
        }
        let mut v = Verifier::new(from, prev, mac);
        // Batches of at most BATCH consecutive seqs: whatever plan the statistics
        // give (a never-analysed table gets a bitmap scan and a sort), a batch
        // sorts no more than BATCH rows. (One open cursor over the range was
        // planned that way too, and its sort spilled to disk.)
        let mut next = from;
        while next <= to {
            let end = next.saturating_add(BATCH).min(to.saturating_add(1));
            let more = Spi::connect(|client| -> SealResult<bool> {
                let batch = client.select(
                    "SELECT seq, recorded_at, actor, event, payload::text, prev_hash, hash, mac FROM pgseal.ledger \
                     WHERE tenant_id = $1 AND seq >= $2 AND seq < $3 ORDER BY seq",
                    None,
                    &[tenant.into(), next.into(), end.into()],
                )?;
                for row in batch {
                    let seq = row.get::<i64>(1)?.unwrap_or(0);
                    let at: TimestampWithTimeZone = row.get(2)?.ok_or(SealError::Internal("NULL recorded_at in pgseal.ledger"))?;
                    // Borrowed from the fetched rows: no copy per field.
                    let actor = row.get::<&str>(3)?.unwrap_or_default();
                    let event = row.get::<&str>(4)?.unwrap_or_default();
                    let payload = row.get::<&str>(5)?.unwrap_or_default();
                    let prev_hash = row.get::<&[u8]>(6)?.unwrap_or_default();
                    let hash = row.get::<&[u8]>(7)?.unwrap_or_default();
                    let mac = row.get::<&[u8]>(8)?.unwrap_or_default();
                    let entry = StoredEntry {
                        tenant,
                        seq,
                        recorded_at_us: at.into_inner() + super::PG_EPOCH_OFFSET_US,
                        actor,
                        event,
                        payload,
                        prev_hash,
                        hash,
                        mac: Some(mac),
                    };
                    if !v.push(&entry) {
                        return Ok(false);
                    }
                }
                Ok(true)
            })?;
            if !more {
                break;
            }
            next = end;
        }
        let expect_head = (to == head.seq).then_some((head.seq, head.hash));
        Ok(v.finish(expect_head))
    })
}

/// Verifies a range of a tenant's chain: hashes, MACs, links and seq continuity.
/// Without `tenant` it verifies the current tenant; members of `pgseal_admin` may
/// verify any tenant. `problem` is NULL when `ok`.
#[pg_extern(volatile, parallel_unsafe)]
fn ledger_verify(
    tenant: default!(Option<&str>, "NULL"),
    from_seq: default!(Option<i64>, "NULL"),
    to_seq: default!(Option<i64>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(checked, i64),
        name!(first_bad_seq, Option<i64>),
        name!(problem, Option<String>),
    ),
> {
    let r = (|| {
        crate::master::require_loaded()?;
        let tenant = super::resolve_tenant(tenant)?;
        if from_seq.is_some_and(|s| s < 1) || to_seq.is_some_and(|s| s < 1) {
            return Err(SealError::InvalidArgument(
                "from_seq and to_seq must be positive",
            ));
        }
        verify_range(&tenant, from_seq, to_seq)
    })()
    .or_raise();
    TableIterator::once((
        r.ok(),
        r.checked,
        r.failure.map(|f| f.seq),
        r.failure.map(|f| f.problem.as_str().to_owned()),
    ))
}
