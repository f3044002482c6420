//! Writing pending entries.
//!
//! An append adds its entry to the pending list, and each tenant's entries are
//! written together. That write runs when the statement that appended ends (the
//! executor-end work this module registers with `txn`, through the ledger's
//! `TXN`), when the list grows past its bound, before the ledger functions read
//! the chain, and at pre-commit. So the next statement of the transaction sees
//! every entry appended before it. Entries are written without SPI, with the
//! executor's one-row insert per entry (`pg::head_write`), which also moves the
//! tenant's heads row when it is `HEAD_STRIDE` entries behind; where that path
//! does not apply, one SQL statement per tenant inserts them and moves the row.

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;

use super::guard::Scope;
use super::heads::{self, Row};
use super::pending::{self, Pending};
use crate::error::{SealError, SealResult};
use crate::pg::plans;
use crate::privilege::as_owner;

/// Inserts one tenant's pending entries and moves its heads row to the last, in
/// one statement (a data-modifying WITH always runs). With one entry, and with
/// several (as arrays, unnested in lockstep in the select list, which streams the
/// rows where `ROWS FROM` would first copy them into a tuplestore). Every entry of
/// a transaction has the same `recorded_at`, the transaction's start. Entries are
/// format 2 (`fmt` 2), with no stored commitment (it is recomputed from the salt
/// and payload when verifying). In a batch each entry's subjects are passed as the
/// text of a `text[]` literal (an array of arrays must be rectangular).
const WRITE_ONE: &str = "WITH e AS (\
       INSERT INTO pgseal.ledger (tenant_id, seq, recorded_at, actor, event, payload, prev_hash, hash, mac, fmt, db_role, subjects, salt) \
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 2, $10, $11, $12)) \
     UPDATE pgseal.ledger_heads SET seq = $2, hash = $8 WHERE tenant_id = $1 AND seq <= $2";
const WRITE_MANY: &str = "WITH e AS (\
       INSERT INTO pgseal.ledger (tenant_id, seq, recorded_at, actor, event, payload, prev_hash, hash, mac, fmt, db_role, subjects, salt) \
       SELECT $1, pg_catalog.unnest($2::pg_catalog.int8[]), $3, pg_catalog.unnest($4::pg_catalog.text[]), \
              pg_catalog.unnest($5::pg_catalog.text[]), pg_catalog.unnest($6::pg_catalog.jsonb[]), \
              pg_catalog.unnest($7::pg_catalog.bytea[]), pg_catalog.unnest($8::pg_catalog.bytea[]), pg_catalog.unnest($9::pg_catalog.bytea[]), \
              2, pg_catalog.unnest($12::pg_catalog.text[]), pg_catalog.unnest($13::pg_catalog.text[])::pg_catalog.text[], \
              pg_catalog.unnest($14::pg_catalog.bytea[])) \
     UPDATE pgseal.ledger_heads SET seq = $10, hash = $11 WHERE tenant_id = $1 AND seq <= $10";

/// `subjects` as the text of a `text[]` literal, every element quoted.
pub(crate) fn text_array_literal(subjects: &[String]) -> String {
    let mut out = String::from("{");
    for (i, s) in subjects.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in s.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// Writes the pending entries, one tenant at a time: without SPI where
/// `write_directly` can (the heads row moved only when due), else one statement
/// per tenant that also moves its heads row to the last. Needs a snapshot (SPI
/// plans it).
///
/// Only the entries of the current subtransaction are written (those of
/// finished inner ones were handed to it): an entry written inside a deeper
/// subtransaction would vanish if that one rolled back, although the statement
/// that appended it did not fail. Entries of outer levels wait for their level.
pub fn flush() -> SealResult<()> {
    // SAFETY: reads the current subtransaction's id; no preconditions.
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let pending = pending::take_from(current);
    if pending.is_empty() {
        return Ok(());
    }
    // Group by tenant, in order of first appearance; a tenant's entries stay in order.
    let mut groups: Vec<Vec<Pending>> = Vec::new();
    for e in pending {
        match groups.iter_mut().find(|g| g[0].tenant == e.tenant) {
            Some(g) => g.push(e),
            None => groups.push(vec![e]),
        }
    }
    as_owner(|| {
        super::guard::with_scope(Scope::Append, || {
            groups.into_iter().try_for_each(write_group)
        })
    })
}

/// Writes one tenant's entries without SPI (`pg::head_write`) when that path
/// applies and enough is known of the heads row: where it is, or (a published
/// head) the seq it holds, when it is not yet due to move. A row due to move whose
/// place is not known is located first. False when nothing was written.
fn write_directly(entries: &[Pending]) -> SealResult<bool> {
    use crate::pg::head_write::write;
    let tenant = &entries[0].tenant;
    let last = entries.last().map_or(0, |e| e.seq);
    let row = match heads::take_row(tenant) {
        Row::Behind(seq) if last < seq.saturating_add(heads::HEAD_STRIDE) => {
            let written = write(entries, None)?;
            heads::put_row(tenant, Row::Behind(seq));
            return Ok(written);
        }
        Row::Behind(_) => match crate::pg::head_read::read(tenant, false)? {
            Some((_, Some(row))) => row,
            _ => return Ok(false),
        },
        Row::Known(row) => row,
        Row::Unknown => return Ok(false),
    };
    let mut row = row;
    if write(entries, Some(&mut row))? {
        heads::put_row(tenant, Row::Known(row));
        return Ok(true);
    }
    Ok(false)
}

fn write_group(mut entries: Vec<Pending>) -> SealResult<()> {
    use plans::{
        BYTEA, BYTEA_ARRAY, INT8, INT8_ARRAY, JSONB, JSONB_ARRAY, TEXT, TEXT_ARRAY, TIMESTAMPTZ,
    };
    if write_directly(&entries)? {
        return Ok(());
    }
    if entries.len() == 1 {
        let e = entries.pop().expect("one entry");
        let payload = e.payload_datum()?;
        // SAFETY: a jsonb datum, palloc'd in the current memory context, which
        // outlives the statement below.
        let payload = unsafe { DatumWithOid::new(payload, pg_sys::JSONBOID) };
        let args: [DatumWithOid; 12] = [
            e.tenant.into(),
            e.seq.into(),
            e.recorded_at.into(),
            e.actor.into(),
            e.event.into(),
            payload,
            e.prev.to_vec().into(),
            e.hash.to_vec().into(),
            e.mac.to_vec().into(),
            e.db_role.into(),
            e.subjects.into(),
            e.salt.to_vec().into(),
        ];
        return plans::run(
            WRITE_ONE,
            &[
                TEXT,
                INT8,
                TIMESTAMPTZ,
                TEXT,
                TEXT,
                JSONB,
                BYTEA,
                BYTEA,
                BYTEA,
                TEXT,
                TEXT_ARRAY,
                BYTEA,
            ],
            &args,
        );
    }
    let n = entries.len();
    let tenant = entries[0].tenant.clone();
    let (last_seq, last_hash) = entries
        .last()
        .map(|e| (e.seq, e.hash.to_vec()))
        .expect("entries");
    let recorded_at = entries[0].recorded_at;
    if entries.iter().any(|e| e.recorded_at != recorded_at) {
        return Err(SealError::Internal(
            "pending entries of one transaction differ in time",
        ));
    }
    let prevs = plans::bytea32_array(entries.iter().map(|e| &e.prev));
    let hashes = plans::bytea32_array(entries.iter().map(|e| &e.hash));
    let macs = plans::bytea32_array(entries.iter().map(|e| &e.mac));
    let salts = plans::bytea32_array(entries.iter().map(|e| &e.salt));
    let mut seqs = Vec::with_capacity(n);
    let mut actors = Vec::with_capacity(n);
    let mut events = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut roles = Vec::with_capacity(n);
    let mut subjects = Vec::with_capacity(n);
    for e in entries {
        payloads.push(e.payload_datum()?);
        seqs.push(e.seq);
        actors.push(e.actor);
        events.push(e.event);
        roles.push(e.db_role);
        subjects.push(text_array_literal(&e.subjects));
    }
    let args: [DatumWithOid; 14] = [
        tenant.into(),
        seqs.into(),
        recorded_at.into(),
        actors.into(),
        events.into(),
        crate::pg::jsonb::array(payloads),
        prevs,
        hashes,
        macs,
        last_seq.into(),
        last_hash.into(),
        roles.into(),
        subjects.into(),
        salts,
    ];
    plans::run(
        WRITE_MANY,
        &[
            TEXT,
            INT8_ARRAY,
            TIMESTAMPTZ,
            TEXT_ARRAY,
            TEXT_ARRAY,
            JSONB_ARRAY,
            BYTEA_ARRAY,
            BYTEA_ARRAY,
            BYTEA_ARRAY,
            INT8,
            BYTEA,
            TEXT_ARRAY,
            TEXT_ARRAY,
            BYTEA_ARRAY,
        ],
        &args,
    )
}
