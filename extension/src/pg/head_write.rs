//! Writing a tenant's pending entries, and moving its heads row when it is due,
//! without SPI.
//!
//! A transaction that appends one entry writes it at the end of the statement
//! that appended it (why not SPI: the 16-client ledger rows in docs/BENCHMARKS.md);
//! a bulk append writes each batch of its entries here too, with no array built
//! and unnested.
//! The entry goes through `ExecSimpleRelationInsert` and the
//! row through `ExecSimpleRelationUpdate`, the calls logical replication applies
//! rows with. They keep every index of both tables current (an index a DBA adds
//! included), check NOT NULL, and make the update HOT when the page has room.
//! The heads row moves only when it is `ledger::heads::HEAD_STRIDE` entries
//! behind the last entry written (the head is read from the last entry), and
//! only then is its table opened. It is updated at the place `head_read` found
//! it, or the last write here moved it to: every writer of that row holds the tenant's chain lock (`locks.rs`), and
//! this transaction holds it. If the row were not there (a write outside the
//! lock), `heap_update` raises an error and nothing is written.
//!
//! Only when nothing else would run on an SPI write: both tables plain, with no
//! rules, no forced row security and no trigger on the insert or the update but
//! pgseal's write guard (`guard.rs`, whose check this path makes itself: it is
//! pgseal's own append, and it carries the anchor over unchanged), and with
//! exactly their own columns; the transaction read-write. Otherwise the caller
//! writes through SPI.
//!
//! The executor calls it uses have the same signatures and contracts in
//! PostgreSQL 15 and 18, the versions pgseal builds and tests against; the one
//! structure whose layout differs (the tuple descriptor) is read through
//! `pg::compat`.

pub(crate) use imp::write;

#[cfg(any(test, feature = "pg_test"))]
thread_local! {
    static WRITTEN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many entries this backend has written here (for the tests).
#[cfg(any(test, feature = "pg_test"))]
pub fn written() -> u64 {
    WRITTEN.with(|w| w.get())
}

mod imp {
    use pgrx::{pg_sys, IntoDatum, PgMemoryContexts};

    use crate::error::{SealError, SealResult};
    use crate::ledger::heads::HEAD_STRIDE;
    use crate::ledger::pending::Pending;
    use crate::pg::head_read::{relids, HeadRow, HEADS_COLUMNS};

    /// `pgseal.ledger`'s columns: tenant_id, seq, recorded_at, actor, event,
    /// payload, prev_hash, hash, mac, fmt, db_role, subjects, salt, commitment.
    const LEDGER_COLUMNS: [pg_sys::Oid; 14] = [
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::BYTEAOID,
        pg_sys::BYTEAOID,
        pg_sys::BYTEAOID,
        pg_sys::INT2OID,
        pg_sys::TEXTOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::BYTEAOID,
        pg_sys::BYTEAOID,
    ];

    /// What `write` opened, closed on every path out of it. After an ERROR
    /// the transaction's abort releases all of it instead.
    struct Opened {
        ledger: pg_sys::Relation,
        heads: pg_sys::Relation,
        estate: *mut pg_sys::EState,
        /// Result relations whose indexes are open.
        indexed: Vec<*mut pg_sys::ResultRelInfo>,
        slots: Vec<*mut pg_sys::TupleTableSlot>,
        /// An active snapshot was pushed (for index expressions, as logical
        /// replication's apply does): there was none.
        pushed_snapshot: bool,
    }

    impl Drop for Opened {
        fn drop(&mut self) {
            if std::thread::panicking() {
                return;
            }
            // SAFETY: every pointer was opened by `write` and not closed since;
            // slots and result relations live in the executor state, freed last
            // but for the tables, whose locks are kept until the transaction ends
            // as an SPI write keeps them.
            unsafe {
                for slot in self.slots.drain(..) {
                    pg_sys::ExecDropSingleTupleTableSlot(slot);
                }
                for rri in self.indexed.drain(..) {
                    pg_sys::ExecCloseIndices(rri);
                }
                if !self.estate.is_null() {
                    pg_sys::FreeExecutorState(self.estate);
                }
                if self.pushed_snapshot {
                    pg_sys::PopActiveSnapshot();
                }
                for rel in [self.heads, self.ledger] {
                    if !rel.is_null() {
                        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                    }
                }
            }
        }
    }

    /// Whether every trigger of `trigdesc` that an insert (or an update) fires is
    /// pgseal's write guard, as a BEFORE ROW trigger (`guard.rs`).
    ///
    /// # Safety
    /// `trigdesc` is an open relation's trigger descriptor.
    unsafe fn only_the_guard_fires(trigdesc: &pg_sys::TriggerDesc, insert: bool) -> bool {
        let op = if insert {
            pg_sys::TRIGGER_TYPE_INSERT
        } else {
            pg_sys::TRIGGER_TYPE_UPDATE
        };
        let guard = pg_sys::TRIGGER_TYPE_ROW | pg_sys::TRIGGER_TYPE_BEFORE;
        if trigdesc.numtriggers <= 0 || trigdesc.triggers.is_null() {
            return true;
        }
        // SAFETY: the descriptor holds `numtriggers` triggers (caller's contract).
        let triggers =
            unsafe { std::slice::from_raw_parts(trigdesc.triggers, trigdesc.numtriggers as usize) };
        triggers.iter().all(|t| {
            let tgtype = t.tgtype as u16 as u32;
            tgtype & op == 0
                || (tgtype & (guard | pg_sys::TRIGGER_TYPE_INSTEAD) == guard
                    && t.tgoldtable.is_null()
                    && t.tgnewtable.is_null()
                    && crate::ledger::guard::is_guard_fn(t.tgfoid))
        })
    }

    /// Whether `rel` is a plain table with exactly `columns`, no rules, no forced
    /// row security, and no trigger that an insert (or an update) would fire but
    /// pgseal's write guard, whose check the caller makes itself.
    ///
    /// # Safety
    /// `rel` is an open relation.
    unsafe fn plain(rel: pg_sys::Relation, columns: &[pg_sys::Oid], insert: bool) -> bool {
        // SAFETY: the caller's relation is open, so its descriptors are valid.
        unsafe {
            let class = &*(*rel).rd_rel;
            let desc = (*rel).rd_att;
            let attrs = crate::pg::compat::tupdesc_attrs(desc);
            let fires = match (*rel).trigdesc.as_ref() {
                None => false,
                Some(t) => !only_the_guard_fires(t, insert),
            };
            class.relkind as u8 == pg_sys::RELKIND_RELATION
                && !class.relispartition
                && !class.relhasrules
                && !class.relforcerowsecurity
                && !fires
                && attrs.len() == columns.len()
                && attrs
                    .iter()
                    .zip(columns)
                    .all(|(a, t)| !a.attisdropped && a.atttypid == *t)
        }
    }

    /// A virtual slot of `rel`'s shape holding `values` (`None` is NULL).
    ///
    /// # Safety
    /// `rel` is open and `values` has one datum of the right type per column.
    unsafe fn slot_with(
        o: &mut Opened,
        rel: pg_sys::Relation,
        values: &[Option<pg_sys::Datum>],
    ) -> *mut pg_sys::TupleTableSlot {
        // SAFETY: a fresh virtual slot of `rel`'s descriptor, filled as `refill` says.
        unsafe {
            let slot = pg_sys::MakeSingleTupleTableSlot(
                (*rel).rd_att,
                std::ptr::addr_of!(pg_sys::TTSOpsVirtual),
            );
            o.slots.push(slot);
            refill(slot, values)
        }
    }

    /// `slot`, emptied and holding `values` (`None` is NULL).
    ///
    /// # Safety
    /// `slot` is a virtual slot whose descriptor has one column of the right type
    /// per value.
    unsafe fn refill(
        slot: *mut pg_sys::TupleTableSlot,
        values: &[Option<pg_sys::Datum>],
    ) -> *mut pg_sys::TupleTableSlot {
        // SAFETY: per the contract, the slot has room for one datum per value.
        unsafe {
            pg_sys::ExecClearTuple(slot);
            for (i, v) in values.iter().enumerate() {
                *(*slot).tts_values.add(i) = v.unwrap_or(pg_sys::Datum::from(0usize));
                *(*slot).tts_isnull.add(i) = v.is_none();
            }
            pg_sys::ExecStoreVirtualTuple(slot)
        }
    }

    /// The ledger row of `e` (format 2, with no stored commitment: see
    /// `ledger::writer`), its datums palloc'd in the current memory context.
    fn entry_values(e: &Pending, tenant: pg_sys::Datum) -> SealResult<[Option<pg_sys::Datum>; 14]> {
        Ok([
            Some(tenant),
            Some(datum(e.seq)),
            Some(datum(e.recorded_at)),
            Some(datum(e.actor.as_str())),
            Some(datum(e.event.as_str())),
            Some(e.payload_datum()?),
            Some(datum(&e.prev[..])),
            Some(datum(&e.hash[..])),
            Some(datum(&e.mac[..])),
            Some(datum(pgseal_core::ledger::FMT_V2)),
            Some(datum(e.db_role.as_str())),
            Some(subjects_datum(&e.subjects)),
            Some(datum(&e.salt[..])),
            None,
        ])
    }

    fn datum<T: IntoDatum>(v: T) -> pg_sys::Datum {
        v.into_datum().expect("a value that is not NULL")
    }

    /// `subjects` as a `text[]` datum; the usual empty list without pgrx's array
    /// builder.
    fn subjects_datum(subjects: &[String]) -> pg_sys::Datum {
        if subjects.is_empty() {
            // SAFETY: builds a palloc'd zero-dimensional array of text in the
            // current memory context; no preconditions.
            pg_sys::Datum::from(unsafe { pg_sys::construct_empty_array(pg_sys::TEXTOID) })
        } else {
            datum(subjects.iter().map(String::as_str).collect::<Vec<_>>())
        }
    }

    /// Writes `entries` (one tenant's, in seq order) and moves the heads row at
    /// `row`, when given, to the last when the row is `HEAD_STRIDE` or more
    /// entries behind it, and notes in `row` where the row is now and what it
    /// holds. Without `row` the heads row is not touched. Returns false,
    /// having written nothing, when this path does not apply; the caller then
    /// writes through SPI. Runs as the extension's owner.
    pub(crate) fn write(entries: &[Pending], row: Option<&mut HeadRow>) -> SealResult<bool> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(true);
        };
        if crate::pg::xact::read_only() || entries.iter().any(|e| e.tenant != first.tenant) {
            return Ok(false);
        }
        let (ledger_id, heads_id) = relids()?;
        let mut o = Opened {
            ledger: std::ptr::null_mut(),
            heads: std::ptr::null_mut(),
            estate: std::ptr::null_mut(),
            indexed: Vec::with_capacity(2),
            slots: Vec::with_capacity(3),
            pushed_snapshot: false,
        };
        // SAFETY: called inside a transaction, as the owner of both tables.
        // table_open raises on a bad OID; `o` closes what is opened. The result
        // relations and every datum are allocated in the executor state's memory,
        // which outlives their use and is freed with it. The slots are filled
        // with one datum per column of their table, of the types `plain` checked;
        // the entry slot is refilled per entry after the insert has copied the
        // previous one into the table, and the per-tuple memory index maintenance
        // used is reset (nothing of it outlives the insert).
        // ExecSimpleRelationInsert/Update expect what is set up here: a result
        // relation per table with its indexes open, an output command id, and (for
        // the update) a search slot whose tid is the row to replace; the EPQ state
        // is only used by BEFORE UPDATE row triggers, which `plain` rules out.
        // When no snapshot is active (a write at pre-commit), one is pushed for
        // whatever an index expression may run, and `o` pops it.
        unsafe {
            // A new command, as SPI would start: this transaction's last write of
            // the heads row becomes visible to the update.
            pg_sys::CommandCounterIncrement();
            // The heads row moves only when it is HEAD_STRIDE entries behind
            // (and never back: entries of an outer subtransaction level may be
            // written after an inner level wrote later ones); only then is the
            // heads table opened.
            let move_head = row
                .as_ref()
                .is_some_and(|r| last.seq >= r.seq.saturating_add(HEAD_STRIDE));
            o.ledger = pg_sys::table_open(ledger_id, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            if move_head {
                o.heads =
                    pg_sys::table_open(heads_id, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
            }
            let (ledger, heads) = (o.ledger, o.heads);
            if !plain(ledger, &LEDGER_COLUMNS, true)
                || (move_head && !plain(heads, &HEADS_COLUMNS, false))
            {
                return Ok(false);
            }
            if !pg_sys::ActiveSnapshotSet() {
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
                o.pushed_snapshot = true;
            }
            o.estate = pg_sys::CreateExecutorState();
            (*o.estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
            let estate = o.estate;
            let moved = PgMemoryContexts::For((*estate).es_query_cxt).switch_to(|_| {
                let mut rri = [std::ptr::null_mut(); 2];
                let opened = if move_head { 2 } else { 1 };
                for (slot, rel) in rri.iter_mut().zip([ledger, heads]).take(opened) {
                    *slot = pg_sys::palloc(std::mem::size_of::<pg_sys::ResultRelInfo>())
                        .cast::<pg_sys::ResultRelInfo>();
                    pg_sys::InitResultRelInfo(*slot, rel, 0, std::ptr::null_mut(), 0);
                    // The only triggers this write would fire are pgseal's write
                    // guard (`plain`), and this is the check it would make: the
                    // entry is pgseal's own append, and the heads row keeps its
                    // anchor (carried over from `row` below). Firing it would make
                    // the update lock the row first, a WAL record per append.
                    (**slot).ri_TrigDesc = std::ptr::null_mut();
                    pg_sys::ExecOpenIndices(*slot, false);
                    o.indexed.push(*slot);
                }
                // The tenant goes into every row; the last entry's seq and hash
                // into the heads row.
                let tenant = datum(first.tenant.as_str());
                // Every row built before the first insert: an error returns with
                // nothing written.
                let rows = entries
                    .iter()
                    .map(|e| entry_values(e, tenant))
                    .collect::<SealResult<Vec<_>>>()?;
                let entry = slot_with(&mut o, ledger, &rows[0]);
                pg_sys::ExecSimpleRelationInsert(rri[0], estate, entry);
                for values in &rows[1..] {
                    // What the previous insert's index maintenance allocated.
                    if let Some(cx) = (*estate).es_per_tuple_exprcontext.as_mut() {
                        pg_sys::MemoryContextReset(cx.ecxt_per_tuple_memory);
                    }
                    refill(entry, values);
                    pg_sys::ExecSimpleRelationInsert(rri[0], estate, entry);
                }
                let Some(row) = row.as_deref().filter(|_| move_head) else {
                    return Ok(None);
                };
                let (seq, hash) = (datum(last.seq), datum(&last.hash[..]));
                let search = pg_sys::MakeSingleTupleTableSlot(
                    (*heads).rd_att,
                    std::ptr::addr_of!(pg_sys::TTSOpsVirtual),
                );
                o.slots.push(search);
                (*search).tts_tid = row.tid;
                let head = slot_with(
                    &mut o,
                    heads,
                    &[
                        Some(tenant),
                        Some(seq),
                        Some(hash),
                        Some(datum(row.anchor_seq)),
                        Some(datum(row.anchor_hash.as_slice())),
                    ],
                );
                pg_sys::ExecSimpleRelationUpdate(
                    rri[1],
                    estate,
                    std::ptr::null_mut(),
                    search,
                    head,
                );
                Ok::<_, SealError>(Some((*head).tts_tid))
            })?;
            if let (Some(row), Some(moved)) = (row, moved) {
                row.tid = moved;
                row.seq = last.seq;
            }
            // As after an SPI write: later commands see the entries and the row.
            pg_sys::CommandCounterIncrement();
            #[cfg(any(test, feature = "pg_test"))]
            super::WRITTEN.with(|w| w.set(w.get() + entries.len() as u64));
            Ok(true)
        }
    }
}
