//! Tenant offboarding (issue 19): `pgseald offboard run` and the scheduled
//! `[offboarding]` job end every tenant whose `pgseal.tenant_offboard()` grace
//! period is over, one step at a time (sql/offboarding.sql, extension/src/offboard.rs):
//!
//! 1. **export**: `_offboard_export` (the tenant's rows of every offboarded table,
//!    sealed values as stored, and its ledger export) to
//!    `<export_dir>/<tenant>.offboard.jsonl`, written to a new file (mode 0600) under
//!    a random name, synced and renamed into place;
//! 2. **delete**: `_offboard_delete` in batch transactions until none is left
//!    (back to step 1 when the tenant's rows differ from what the export held
//!    and nothing was deleted yet; stopped, 55000, once rows were);
//! 3. **shred**: `tenant_shred`, in the transaction that records the step;
//! 4. **erase**: its ledger payloads, in batches (`_offboard_erase`);
//! 5. **receipt**: `_offboard_finish`, which appends `tenant.offboarded` once no row,
//!    key or payload is left, or sends the tenant back to step 2 when the
//!    application wrote more meanwhile;
//! 6. **checkpoint**: `ledger_checkpoint` of the final chain, in the transaction
//!    that marks the offboarding done; its JSON goes next to the export.
//!
//! pgseald runs no SQL of its own on the tenant's tables: the extension reads and
//! deletes the rows (as each table's owner, restricted), so no table owner's code
//! runs with pgseald's rights. Every step's work commits with the step, or is
//! idempotent up to it, so a run killed at any point, pgseald or the server,
//! resumes from the recorded step. The database refuses every step of a tenant
//! under a legal hold; such a tenant is skipped and logged, and an error with one
//! tenant is reported without stopping the others.
//!
//! In debug builds, `PGSEALD_FAILPOINT=offboard.<point>` (tests only) pauses the run
//! just after the work named there committed, and says so on stderr, for a test to
//! kill pgseald or the server there.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::batch::Batch;
use crate::config::OffboardingJob;
use crate::error::DaemonError;

#[derive(Debug, Clone)]
pub struct Options {
    pub export_dir: PathBuf,
    /// Only this tenant (it must be due).
    pub tenant: Option<String>,
    pub batch: Batch,
}

/// What one tenant's run did.
#[derive(Debug)]
pub struct Outcome {
    pub tenant: String,
    /// The step the tenant is at after the run ('done' when finished).
    pub step: String,
    pub export_file: Option<String>,
    pub rows_deleted: u64,
    pub entries_erased: u64,
    /// Why it stopped before 'done' (a hold, a signal), if it did.
    pub stopped: Option<String>,
}

/// The scheduled job: every due tenant.
pub async fn scheduled(
    client: &mut Client,
    j: &OffboardingJob,
    stop: &CancellationToken,
) -> Result<serde_json::Value, DaemonError> {
    let opts = Options {
        export_dir: j.export_dir.clone(),
        tenant: None,
        batch: Batch::new(j.batch, j.batch_ms),
    };
    let out = run(client, &opts, stop).await?;
    Ok(serde_json::json!({
        "tenants": out.iter().map(|o| serde_json::json!({
            "tenant": o.tenant, "step": o.step, "rows_deleted": o.rows_deleted,
            "entries_erased": o.entries_erased, "stopped": o.stopped,
        })).collect::<Vec<_>>(),
    }))
}

/// One run over the due tenants (or `opts.tenant`), each taken as far as it goes.
pub async fn run(
    client: &mut Client,
    opts: &Options,
    stop: &CancellationToken,
) -> Result<Vec<Outcome>, DaemonError> {
    let due: Vec<String> = client
        .query("SELECT t FROM pgseal._offboard_due() t", &[])
        .await
        .map_err(DaemonError::Query)?
        .iter()
        .map(|r| r.get(0))
        .filter(|t: &String| opts.tenant.as_ref().is_none_or(|only| only == t))
        .collect();
    let mut out = Vec::new();
    // Rows deleted and payloads erased cost differently: each step sizes its own
    // batches (a size learned on one would start the other far off its target).
    let mut batches = (opts.batch, opts.batch);
    for tenant in due {
        if stop.is_cancelled() {
            break;
        }
        match offboard(client, &tenant, opts, &mut batches, stop).await {
            Ok(o) => out.push(o),
            Err(e) if client.is_closed() => return Err(e),
            Err(e) => {
                tracing::error!(tenant = %tenant, "offboarding failed: {e}");
                let (step, export_file) = step_of(client, &tenant).await.unwrap_or_default();
                out.push(Outcome {
                    tenant,
                    step,
                    export_file,
                    rows_deleted: 0,
                    entries_erased: 0,
                    stopped: Some(e.to_string()),
                });
            }
        }
    }
    Ok(out)
}

/// The tenant's recorded step.
async fn step_of(client: &Client, tenant: &str) -> Result<(String, Option<String>), DaemonError> {
    let r = client
        .query_one(
            "SELECT step, export_file FROM pgseal.tenant_offboardings WHERE tenant_id = $1",
            &[&tenant],
        )
        .await
        .map_err(DaemonError::Query)?;
    Ok((r.get(0), r.get(1)))
}

async fn offboard(
    client: &mut Client,
    tenant: &str,
    opts: &Options,
    batches: &mut (Batch, Batch),
    stop: &CancellationToken,
) -> Result<Outcome, DaemonError> {
    let mut o = Outcome {
        tenant: tenant.to_owned(),
        step: String::new(),
        export_file: None,
        rows_deleted: 0,
        entries_erased: 0,
        stopped: None,
    };
    let mut redos = 0;
    let mut exports_again = 0;
    loop {
        let (step, file) = step_of(client, tenant).await?;
        o.step = step.clone();
        o.export_file = file;
        if step == "done" {
            return Ok(o);
        }
        if stop.is_cancelled() {
            o.stopped = Some("stopped by a signal".into());
            return Ok(o);
        }
        let began = Instant::now();
        let r = match step.as_str() {
            "scheduled" => export(client, tenant, &opts.export_dir).await,
            "exported" => match delete_rows(client, tenant, &mut batches.0, stop, &mut o).await {
                Ok(Deleted::ExportAgain) if exports_again < 3 => {
                    exports_again += 1;
                    tracing::warn!(tenant = %tenant, "offboarding: the tenant's rows differ from what the export held; exporting again");
                    continue;
                }
                Ok(Deleted::ExportAgain) => {
                    o.stopped = Some(
                        "tables holding the tenant's rows keep appearing after its export: run again once they have stopped"
                            .into(),
                    );
                    return Ok(o);
                }
                Ok(Deleted::Done) => Ok(()),
                Err(e) => Err(e),
            },
            "deleted" => shred(client, tenant).await,
            "shredded" => erase(client, tenant, &mut batches.1, stop, &mut o).await,
            "erased" => match receipt(client, tenant).await {
                Ok(true) => Ok(()),
                Ok(false) if redos < 3 => {
                    redos += 1;
                    tracing::warn!(tenant = %tenant, "offboarding: rows, keys or payloads were written after their step; deleting again");
                    continue;
                }
                Ok(false) => {
                    o.stopped = Some(
                        "the tenant's application keeps writing: run again once it has stopped"
                            .into(),
                    );
                    return Ok(o);
                }
                Err(e) => Err(e),
            },
            "receipted" => checkpoint(client, tenant, &opts.export_dir).await,
            other => Err(DaemonError::Config(format!(
                "tenant {tenant}: unknown offboarding step {other:?}"
            ))),
        };
        match r {
            Ok(()) => {
                tracing::info!(
                    tenant = %tenant,
                    step = %next_step(&step),
                    seconds = began.elapsed().as_secs_f64(),
                    delete_batch = batches.0.size(),
                    erase_batch = batches.1.size(),
                    "offboarding: step done"
                );
                failpoint(&format!("offboard.{}", next_step(&step))).await
            }
            // A hold set meanwhile: the database refused the step.
            Err(e @ DaemonError::Query(_)) if matches!(&e, DaemonError::Query(q) if q.code().map(|c| c.code()) == Some("55000")) =>
            {
                // The server's message says why (the table, the hold).
                tracing::warn!(tenant = %tenant, step = %step, "offboarding stopped: {e}");
                o.stopped = Some(e.to_string());
                return Ok(o);
            }
            Err(e) => return Err(e),
        }
    }
}

fn next_step(step: &str) -> &'static str {
    match step {
        "scheduled" => "exported",
        "exported" => "deleted",
        "deleted" => "shredded",
        "shredded" => "erased",
        "erased" => "receipted",
        _ => "done",
    }
}

/// Pauses here when the test failpoint names `point` (module docs).
async fn failpoint(point: &str) {
    if cfg!(debug_assertions) && std::env::var("PGSEALD_FAILPOINT").is_ok_and(|v| v == point) {
        eprintln!("failpoint {point} reached");
        std::future::pending::<()>().await;
    }
}

/// The tenant's export file: its id with every byte but ASCII letters, digits,
/// '-' and '_' written as %XX, so no id names another path; an id whose name would
/// pass 200 bytes is named `%sha256-<hex>` instead (file names end at 255).
fn export_path(dir: &Path, tenant: &str, suffix: &str) -> PathBuf {
    use sha2::Digest;
    let mut name = String::new();
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            name.push(b as char);
        } else {
            name.push_str(&format!("%{b:02X}"));
        }
    }
    if name.len() > 200 {
        // '%s' is no escape the loop above writes: no id's own name is this one.
        name = format!(
            "%sha256-{}",
            hex::encode(sha2::Sha256::digest(tenant.as_bytes()))
        );
    }
    dir.join(format!("{name}{suffix}"))
}

/// A file written line by line under a temporary name and renamed into place when
/// finished, with the SHA-256 of its bytes: a new file (never one that exists, nor
/// a symbolic link planted there), that only pgseald's user can read, under a name no
/// one can guess; synced, and its directory synced after the rename. Dropped
/// unfinished, it removes what it wrote.
struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
    hash: sha2::Sha256,
}

impl AtomicFile {
    fn create(path: &Path) -> Result<AtomicFile, DaemonError> {
        let tmp = path.with_file_name(format!(
            ".{}.{:016x}.partial",
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            rand_core::RngCore::next_u64(&mut rand_core::OsRng)
        ));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
        Ok(AtomicFile {
            path: path.to_owned(),
            tmp,
            out: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
            hash: sha2::Digest::new(),
        })
    }

    fn io(&self, e: std::io::Error) -> DaemonError {
        DaemonError::File(self.path.display().to_string(), e.to_string())
    }

    fn write_line(&mut self, line: &str) -> Result<(), DaemonError> {
        use sha2::Digest;
        let out = self.out.as_mut().expect("an unfinished file");
        let written = out
            .write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"));
        written.map_err(|e| self.io(e))?;
        self.hash.update(line.as_bytes());
        self.hash.update(b"\n");
        Ok(())
    }

    /// Syncs the file, renames it into place and syncs its directory; returns the
    /// SHA-256 of its bytes, hex.
    fn finish(mut self) -> Result<String, DaemonError> {
        use sha2::Digest;
        let out = self.out.take().expect("an unfinished file");
        let f = out.into_inner().map_err(|e| self.io(e.into_error()))?;
        f.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.io(e))?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| self.io(e))?;
        }
        Ok(hex::encode(std::mem::take(&mut self.hash).finalize()))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `lines` written to `path` as an `AtomicFile`; returns the SHA-256 of its bytes.
fn write_atomically(path: &Path, lines: &[String]) -> Result<String, DaemonError> {
    let mut f = AtomicFile::create(path)?;
    for l in lines {
        f.write_line(l)?;
    }
    f.finish()
}

/// How long a statement on the application's tables waits for a lock. Whoever can
/// hold a lock on a registered table, or on its schema's catalog row (an open
/// GRANT or ALTER SCHEMA), could otherwise stall the offboarding of every tenant
/// behind it; past this the tenant's step fails for this run (with the error in
/// `job_runs` and the log) and is taken up again by the next.
const LOCK_TIMEOUT: &str = "10s";

/// Runs `sql` in a transaction under `tenant`'s context (the extension reads,
/// deletes and counts the tenant's rows under it), with `LOCK_TIMEOUT`; returns
/// its rows.
async fn in_tenant(
    client: &mut Client,
    tenant: &str,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, DaemonError> {
    let tx = begin_in_tenant(client, tenant).await?;
    let rows = tx.query(sql, params).await.map_err(DaemonError::Query)?;
    tx.commit().await.map_err(DaemonError::Query)?;
    Ok(rows)
}

/// A transaction under `tenant`'s context, with `LOCK_TIMEOUT` (`tenant_tx`: READ
/// COMMITTED, which the extension's step functions require; the extension, not
/// pgseald, builds the statements on the tables).
async fn begin_in_tenant<'c>(
    client: &'c mut Client,
    tenant: &str,
) -> Result<tokio_postgres::Transaction<'c>, DaemonError> {
    super::tenant_tx::begin(client, tenant, super::tenant_tx::CATALOG_ONLY, LOCK_TIMEOUT).await
}

/// Lines of the export fetched at a time (`export`).
const EXPORT_FETCH: i64 = 10_000;

/// Step 1: the export file, then 'exported'. The lines come through a cursor, a
/// fetch at a time, and go to the file as they come: pgseald holds one fetch, not
/// the tenant's whole export.
async fn export(client: &mut Client, tenant: &str, dir: &Path) -> Result<(), DaemonError> {
    let path = export_path(dir, tenant, ".offboard.jsonl");
    let mut file = AtomicFile::create(&path)?;
    let mut lines = 0u64;
    {
        let tx = begin_in_tenant(client, tenant).await?;
        // The transaction waits while pgseald writes and syncs the file: a short
        // idle or transaction timeout set for pgseald's role must not end it
        // meanwhile (the step would fail on every run), but a hung file system must
        // not keep its locks for ever either: an hour idle at most, and no limit on
        // the whole (PostgreSQL 17's transaction_timeout cannot be lengthened while
        // it runs, only turned off; a large tenant's export may take long).
        tx.execute(
            "SELECT pg_catalog.set_config(s.name, CASE s.name WHEN 'transaction_timeout' THEN '0' ELSE '1h' END, true) \
               FROM pg_catalog.pg_settings s \
              WHERE s.name IN ('idle_in_transaction_session_timeout', 'transaction_timeout')",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?;
        tx.execute(
            "DECLARE pgseald_export NO SCROLL CURSOR FOR SELECT l FROM pgseal._offboard_export($1) l",
            &[&tenant],
        )
        .await
        .map_err(DaemonError::Query)?;
        let fetch = format!("FETCH FORWARD {EXPORT_FETCH} FROM pgseald_export");
        loop {
            let rows = tx.query(&fetch, &[]).await.map_err(DaemonError::Query)?;
            for r in &rows {
                file.write_line(r.get(0))?;
            }
            lines += rows.len() as u64;
            if (rows.len() as i64) < EXPORT_FETCH {
                break;
            }
        }
        // The step is recorded in the export's own transaction, which holds the
        // tenant's chain lock from the export's first fetch: a second export (another
        // pgseald, or `offboard run` beside the scheduled job) waits for it and then
        // finds the step taken, so the tables the export recorded, the file in place
        // and the hash recorded are one export's.
        let sha256 = file.finish()?;
        failpoint("offboard.export_written").await;
        let name = path.to_string_lossy().into_owned();
        tx.execute(
            "SELECT pgseal._offboard_advance($1, 'scheduled', 'exported', $2, $3)",
            &[&tenant, &name, &sha256],
        )
        .await
        .map_err(DaemonError::Query)?;
        tx.commit().await.map_err(DaemonError::Query)?;
        tracing::info!(tenant = %tenant, file = %name, lines, "offboarding: exported");
    }
    Ok(())
}

/// How the delete step ended.
enum Deleted {
    /// Every row deleted and the step recorded (or stopped by a signal).
    Done,
    /// The tenant's rows differ from what the export held and nothing was deleted
    /// yet: the database sent the offboarding back to exporting.
    ExportAgain,
}

/// Step 2: the tenant's rows, in batch transactions; then 'deleted' (which the
/// database refuses while a row is left).
async fn delete_rows(
    client: &mut Client,
    tenant: &str,
    batch: &mut Batch,
    stop: &CancellationToken,
    o: &mut Outcome,
) -> Result<Deleted, DaemonError> {
    loop {
        if stop.is_cancelled() {
            return Ok(Deleted::Done);
        }
        let size = i32::try_from(batch.size()).unwrap_or(i32::MAX);
        let began = Instant::now();
        let n: i64 = in_tenant(
            client,
            tenant,
            "SELECT pgseal._offboard_delete($1, $2)",
            &[&tenant, &size],
        )
        .await?[0]
            .get(0);
        batch.observe(n as u64, began.elapsed());
        o.rows_deleted += n as u64;
        if n == 0 {
            if step_of(client, tenant).await?.0 == "scheduled" {
                return Ok(Deleted::ExportAgain);
            }
            break;
        }
        failpoint("offboard.delete_batch").await;
    }
    in_tenant(
        client,
        tenant,
        "SELECT pgseal._offboard_advance($1, 'exported', 'deleted')",
        &[&tenant],
    )
    .await?;
    Ok(Deleted::Done)
}

/// Step 3: the data keys, with 'shredded', in one transaction.
async fn shred(client: &mut Client, tenant: &str) -> Result<(), DaemonError> {
    let tx = client.transaction().await.map_err(DaemonError::Query)?;
    tx.execute("SELECT pgseal.tenant_shred($1)", &[&tenant])
        .await
        .map_err(DaemonError::Query)?;
    tx.execute(
        "SELECT pgseal._offboard_advance($1, 'deleted', 'shredded')",
        &[&tenant],
    )
    .await
    .map_err(DaemonError::Query)?;
    tx.commit().await.map_err(DaemonError::Query)
}

/// Step 4: the ledger payloads, in batches; then 'erased'.
async fn erase(
    client: &mut Client,
    tenant: &str,
    batch: &mut Batch,
    stop: &CancellationToken,
    o: &mut Outcome,
) -> Result<(), DaemonError> {
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let size = i32::try_from(batch.size()).unwrap_or(i32::MAX);
        let began = Instant::now();
        let n: i64 = client
            .query_one("SELECT pgseal._offboard_erase($1, $2)", &[&tenant, &size])
            .await
            .map_err(DaemonError::Query)?
            .get(0);
        batch.observe(n as u64, began.elapsed());
        o.entries_erased += n as u64;
        if n == 0 {
            break;
        }
        failpoint("offboard.erase_batch").await;
    }
    client
        .execute(
            "SELECT pgseal._offboard_advance($1, 'shredded', 'erased')",
            &[&tenant],
        )
        .await
        .map_err(DaemonError::Query)?;
    Ok(())
}

/// Step 5: the 'tenant.offboarded' receipt; false when the database sent the
/// tenant back to deleting instead.
async fn receipt(client: &mut Client, tenant: &str) -> Result<bool, DaemonError> {
    let r: String = in_tenant(
        client,
        tenant,
        "SELECT pgseal._offboard_finish($1)::text",
        &[&tenant],
    )
    .await?[0]
        .get(0);
    let r: serde_json::Value =
        serde_json::from_str(&r).map_err(|e| DaemonError::Config(format!("receipt: {e}")))?;
    Ok(r.get("redo").is_none())
}

/// Step 6: a checkpoint of the final chain, with 'done'; its JSON next to the export.
async fn checkpoint(client: &mut Client, tenant: &str, dir: &Path) -> Result<(), DaemonError> {
    let tx = client.transaction().await.map_err(DaemonError::Query)?;
    let cp: String = tx
        .query_one("SELECT pgseal.ledger_checkpoint($1)::text", &[&tenant])
        .await
        .map_err(DaemonError::Query)?
        .get(0);
    tx.execute(
        "SELECT pgseal._offboard_advance($1, 'receipted', 'done')",
        &[&tenant],
    )
    .await
    .map_err(DaemonError::Query)?;
    tx.commit().await.map_err(DaemonError::Query)?;
    // After the commit: a crash before the file is written leaves the checkpoint in
    // pgseal.ledger_checkpoints, where ledger_checkpoint keeps every one.
    write_atomically(
        &export_path(dir, tenant, ".checkpoint.json"),
        &[cp.to_string()],
    )?;
    tracing::info!(tenant = %tenant, "offboarding: done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn an_export_file_name_never_leaves_its_directory() {
        let dir = Path::new("/exports");
        assert_eq!(
            export_path(dir, "acme-1_x", ".offboard.jsonl"),
            Path::new("/exports/acme-1_x.offboard.jsonl")
        );
        for t in ["../etc/passwd", "..", "a/b", "/abs", "a\0b", "ü"] {
            let p = export_path(dir, t, ".offboard.jsonl");
            assert_eq!(p.parent(), Some(dir), "{t:?} → {p:?}");
            assert!(!p.file_name().unwrap().to_string_lossy().contains('/'));
        }
        assert_eq!(
            export_path(dir, "../x", ""),
            Path::new("/exports/%2E%2E%2Fx")
        );
        // A long id is hashed, and no short id's own name is its hash's.
        let long = "t".repeat(256);
        let hashed = export_path(dir, &long, "");
        let name = hashed.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("%sha256-") && name.len() < 100, "{name}");
        let spoof = name.trim_start_matches('%');
        assert_ne!(export_path(dir, spoof, ""), hashed);
    }

    #[test]
    fn a_file_appears_whole_with_its_hash_or_not_at_all() {
        use sha2::Digest;
        let dir = std::env::temp_dir().join(format!("pgseald-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.offboard.jsonl");
        let mut f = AtomicFile::create(&path).unwrap();
        for l in ["{\"a\": 1}", "{\"b\": \"é\"}"] {
            f.write_line(l).unwrap();
        }
        assert!(!path.exists(), "visible before it is finished");
        let sha = f.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, "{\"a\": 1}\n{\"b\": \"é\"}\n".as_bytes());
        assert_eq!(sha, hex::encode(sha2::Sha256::digest(&bytes)));
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Dropped unfinished (a failed fetch): nothing is left, under any name.
        let other = dir.join("u.offboard.jsonl");
        let mut g = AtomicFile::create(&other).unwrap();
        g.write_line("partial").unwrap();
        drop(g);
        let left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("t.offboard.jsonl")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_steps_follow_each_other_to_done() {
        let mut s = "scheduled";
        let mut seen = vec![s];
        while s != "done" {
            s = next_step(s);
            seen.push(s);
        }
        assert_eq!(
            seen,
            [
                "scheduled",
                "exported",
                "deleted",
                "shredded",
                "erased",
                "receipted",
                "done"
            ]
        );
    }
}
