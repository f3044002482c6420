//! The one-shot commands: `status`, `rotate kek|tenant`, `retention run` and
//! `ledger verify`. Each prints its outcome on stdout and returns its exit code;
//! rotations and retention runs (not dry runs) are recorded in `pgseal.job_runs`
//! like the scheduler's jobs. Those that work in batches stop between batches on
//! SIGINT or SIGTERM and then exit with that signal's code.

use std::path::PathBuf;

use crate::cli::{LedgerCommand, OffboardCommand, OneShot, RetentionCommand, RotateCommand};
use crate::db::connect;
use crate::error::{DaemonError, Exit};
use crate::job::record::recorded;
use crate::job::{offboarding, retention, rotation, Job};
use crate::ledger;
use crate::shutdown::Shutdown;

impl OneShot {
    /// Whether the command works through the database in batches, so that a signal
    /// should stop it between two batches (the others end at once, as by default).
    pub fn stops_between_batches(&self) -> bool {
        match self {
            OneShot::Status { .. } => false,
            OneShot::Rotate { .. } | OneShot::Retention { .. } | OneShot::Offboard { .. } => true,
            OneShot::Ledger {
                command: LedgerCommand::Verify { file, .. },
            } => file.is_none(),
        }
    }
}

pub async fn run(command: OneShot, shutdown: &Shutdown) -> Result<Exit, DaemonError> {
    match command {
        OneShot::Status { database_url } => status(&database_url).await,
        OneShot::Rotate {
            command,
            database_url,
        } => rotate(command, database_url, shutdown).await,
        OneShot::Retention {
            command:
                RetentionCommand::Run {
                    dry_run,
                    tenant,
                    batch,
                    lock_timeout_ms,
                    pause_ms,
                },
            database_url,
        } => {
            let opts = retention::Options {
                dry_run,
                tenant,
                batch: batch.batch(),
                lock_timeout_ms,
                pause: std::time::Duration::from_millis(pause_ms),
            };
            retention_run(&opts, database_url, shutdown).await
        }
        OneShot::Offboard {
            command:
                OffboardCommand::Run {
                    export_dir,
                    tenant,
                    batch,
                },
            database_url,
        } => {
            let opts = offboarding::Options {
                export_dir,
                tenant,
                batch: batch.batch(),
            };
            offboard_run(&opts, database_url, shutdown).await
        }
        OneShot::Ledger {
            command:
                LedgerCommand::Verify {
                    tenant,
                    file,
                    checkpoints,
                    public_key,
                    database_url,
                },
        } => {
            let source = match file {
                Some(file) => Source::File {
                    file,
                    checkpoints,
                    public_key,
                },
                None => Source::Database(database_url.ok_or(DaemonError::Usage(
                    "give --file, or --database-url / PGSEALD_DATABASE_URL",
                ))?),
            };
            ledger_verify(source, tenant.as_deref(), shutdown).await
        }
    }
}

/// The URL of a command that needs the database.
fn url(database_url: Option<String>) -> Result<String, DaemonError> {
    database_url.ok_or(DaemonError::Usage(
        "give --database-url or PGSEALD_DATABASE_URL",
    ))
}

/// Exit::Ok, or when a signal stopped the command, that signal's code.
fn done(shutdown: &Shutdown) -> Exit {
    match shutdown.signal() {
        None => Exit::Ok,
        Some(signal) => {
            tracing::warn!(
                "stopped by a signal: what is printed above was done; run the command again for the rest"
            );
            signal.exit()
        }
    }
}

/// `status`: prints `pgseal.vault_status()`; exit 3 when no master key is loaded.
async fn status(url: &str) -> Result<Exit, DaemonError> {
    let client = connect(url).await?;
    let row = client
        .query_one(
            "SELECT loaded, active_version, versions FROM pgseal.vault_status()",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?;
    let loaded: bool = row.get(0);
    let active: Option<i32> = row.get(1);
    let versions: Vec<i32> = row.get(2);
    let versions: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
    println!("master key loaded: {}", if loaded { "yes" } else { "no" });
    println!(
        "active version:    {}",
        active.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
    );
    println!(
        "loaded versions:   {}",
        if versions.is_empty() {
            "-".into()
        } else {
            versions.join(", ")
        }
    );
    Ok(if loaded { Exit::Ok } else { Exit::NoMasterKey })
}

/// `rotate kek` and `rotate tenant`.
async fn rotate(
    command: RotateCommand,
    database_url: Option<String>,
    shutdown: &Shutdown,
) -> Result<Exit, DaemonError> {
    let mut client = connect(&url(database_url)?).await?;
    let stop = shutdown.token();
    match command {
        RotateCommand::Kek { batch } => {
            let n = recorded(
                &mut client,
                rotation::KEK_RUN,
                |r| match r {
                    Ok(n) => serde_json::json!({ "rewrapped": n }),
                    Err(e) => serde_json::json!({ "error": e.to_string() }),
                },
                async |c| rotation::kek(c, batch.batch(), stop).await,
            )
            .await??;
            println!("rewrapped {n} tenant keys");
        }
        RotateCommand::Tenant { tenant, batch } => {
            let (key, n) = recorded(
                &mut client,
                rotation::TENANT_RUN,
                |r| match r {
                    Ok((key, n)) => {
                        serde_json::json!({ "tenant": tenant, "key_id": key, "resealed": n })
                    }
                    Err(e) => serde_json::json!({ "tenant": tenant, "error": e.to_string() }),
                },
                async |c| rotation::tenant(c, &tenant, &mut batch.batch(), stop).await,
            )
            .await??;
            println!("tenant {tenant}: new key {key}, {n} values resealed");
        }
    }
    Ok(done(shutdown))
}

/// `retention run`: one line per tenant × table.
async fn retention_run(
    opts: &retention::Options,
    database_url: Option<String>,
    shutdown: &Shutdown,
) -> Result<Exit, DaemonError> {
    let mut client = connect(&url(database_url)?).await?;
    let stop = shutdown.token();
    let outcomes = if opts.dry_run {
        retention::run(&mut client, opts, stop).await?
    } else {
        recorded(
            &mut client,
            Job::Retention.name(),
            |r: Result<&Vec<retention::Outcome>, &DaemonError>| match r {
                Ok(o) => serde_json::json!({
                    "deleted": o.iter().map(|x| x.rows).sum::<u64>(),
                    "longest_batch_ms": retention::longest_batch_ms(o),
                }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            },
            async |c| retention::run(c, opts, stop).await,
        )
        .await??
    };
    let verb = if opts.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for o in outcomes {
        if o.on_hold {
            println!(
                "{} tenant {}: on legal hold, nothing deleted",
                o.rel, o.tenant
            );
        } else {
            println!(
                "{} tenant {}: {verb} {} rows older than {} (longest batch {:.1} ms)",
                o.rel,
                o.tenant,
                o.rows,
                o.cutoff,
                o.longest_batch.as_secs_f64() * 1000.0
            );
        }
    }
    Ok(done(shutdown))
}

/// `offboard run`: one line per due tenant, with the step it reached.
async fn offboard_run(
    opts: &offboarding::Options,
    database_url: Option<String>,
    shutdown: &Shutdown,
) -> Result<Exit, DaemonError> {
    let mut client = connect(&url(database_url)?).await?;
    let stop = shutdown.token();
    let outcomes = recorded(
        &mut client,
        Job::Offboarding.name(),
        |r: Result<&Vec<offboarding::Outcome>, &DaemonError>| match r {
            Ok(o) => serde_json::json!({
                "tenants": o.iter().map(|x| serde_json::json!({
                    "tenant": x.tenant, "step": x.step, "rows_deleted": x.rows_deleted,
                    "entries_erased": x.entries_erased, "stopped": x.stopped,
                })).collect::<Vec<_>>(),
            }),
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        },
        async |c| offboarding::run(c, opts, stop).await,
    )
    .await??;
    for o in outcomes {
        let why = o
            .stopped
            .map(|s| format!(" (stopped: {s})"))
            .unwrap_or_default();
        println!(
            "tenant {}: {}; {} rows deleted, {} ledger entries erased in this run; export {}{why}",
            o.tenant,
            o.step,
            o.rows_deleted,
            o.entries_erased,
            o.export_file.as_deref().unwrap_or("-"),
        );
    }
    Ok(done(shutdown))
}

/// What `ledger verify` reads.
enum Source {
    Database(String),
    File {
        file: PathBuf,
        checkpoints: Option<PathBuf>,
        public_key: Option<String>,
    },
}

/// `ledger verify`: one line per tenant; exit 5 when any chain fails.
async fn ledger_verify(
    source: Source,
    tenant: Option<&str>,
    shutdown: &Shutdown,
) -> Result<Exit, DaemonError> {
    let outcomes = match source {
        Source::File {
            file,
            checkpoints,
            public_key,
        } => ledger::verify_file(&file, checkpoints.as_deref(), public_key.as_deref(), tenant)?,
        Source::Database(url) => {
            let client = connect(&url).await?;
            ledger::verify_db(&client, tenant, shutdown.token()).await?
        }
    };
    let mut failed = false;
    for o in &outcomes {
        println!("{o}");
        if !o.ok {
            tracing::error!("ledger verification failed: {o}");
            failed = true;
        }
    }
    Ok(if failed {
        Exit::VerifyFailed
    } else {
        done(shutdown)
    })
}
