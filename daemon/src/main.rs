//! pgseald: the companion daemon of the pgseal extension.
//!
//! The crypto stays in the extension, where the master key lives; the daemon calls
//! its SQL functions: `status`, `ledger verify`, `rotate`, `retention`, and `run`,
//! the scheduler that runs them on cron schedules as the one leader.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod config;
mod error;
mod jobs;
mod ledger;
mod metrics;
mod progress;
mod retention;
mod rotate;
mod scheduler;
mod tls;

/// Set by SIGTERM/SIGINT during `pgseald run`: batch loops end after the batch in hand.
pub static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Failed ledger verifications since start (logged as errors; see `scheduler`).
pub static FAILED_VERIFICATIONS: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
use error::{DaemonError, Exit};

#[derive(Parser, Debug)]
#[command(
    name = "pgseald",
    version,
    about = "Key rotation, retention and ledger verification for pgseal"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The scheduler: runs the configured jobs on their cron schedules, as leader.
    Run {
        /// The configuration file (see docs/pgseald.toml.example).
        #[arg(long, default_value = "pgseald.toml")]
        config: std::path::PathBuf,
        /// Overrides database_url and PGSEALD_DATABASE_URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    /// Print pgseal.vault_status(): whether the master key is loaded, and its versions.
    Status {
        /// libpq connection string or postgres:// URL.
        #[arg(long, env = "PGSEALD_DATABASE_URL")]
        database_url: String,
    },
    /// Key rotation.
    Rotate {
        #[command(subcommand)]
        command: RotateCommand,
        /// libpq connection string or postgres:// URL.
        #[arg(long, env = "PGSEALD_DATABASE_URL", global = true)]
        database_url: Option<String>,
    },
    /// Per-tenant retention.
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
        /// libpq connection string or postgres:// URL.
        #[arg(long, env = "PGSEALD_DATABASE_URL", global = true)]
        database_url: Option<String>,
    },
    /// Tenant ledgers.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand, Debug)]
enum RotateCommand {
    /// Rewrap every tenant key under the active master key version (kek_rewrap until 0).
    Kek {
        #[arg(long, default_value_t = 1000)]
        batch: i32,
    },
    /// New data key for a tenant, then reseal its registered columns under it.
    Tenant {
        tenant: String,
        #[arg(long, default_value_t = 1000)]
        batch: i64,
    },
}

#[derive(Subcommand, Debug)]
enum RetentionCommand {
    /// Delete, per tenant and table, the rows older than the tenant's window.
    Run {
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Rows per delete transaction.
        #[arg(long, default_value_t = 5000)]
        batch: i64,
        /// lock_timeout of each delete transaction, in milliseconds.
        #[arg(long, default_value_t = 200)]
        lock_timeout_ms: u64,
        /// Pause between batches, in milliseconds.
        #[arg(long, default_value_t = 10)]
        pause_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
enum LedgerCommand {
    /// Verify ledgers: in the database (hashes, MACs, links, seq), or offline in a
    /// `pgseal.ledger_export()` file (hashes, links, seq, and signed checkpoints).
    /// Exits 5 when any chain fails.
    Verify {
        /// Only this tenant (default: every tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Verify this JSON-lines export offline instead of the database.
        #[arg(long, conflicts_with = "database_url")]
        file: Option<std::path::PathBuf>,
        /// JSON-lines file of checkpoints from `pgseal.ledger_checkpoint()` (with --file).
        #[arg(long, requires = "file")]
        checkpoints: Option<std::path::PathBuf>,
        /// Hex public key from `pgseal.ledger_public_key()` that signed the checkpoints.
        #[arg(long, requires = "checkpoints")]
        public_key: Option<String>,
        /// libpq connection string or postgres:// URL (without --file).
        #[arg(long, env = "PGSEALD_DATABASE_URL")]
        database_url: Option<String>,
    },
}

fn init_tracing(format: &str) {
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi);
    if format == "json" {
        fmt.json().init();
    } else {
        fmt.init();
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // `run` reads its configuration first: the log format is part of it.
    let mut config = None;
    if let Command::Run {
        config: path,
        database_url,
    } = &mut cli.command
    {
        let loaded = config::Config::load(path).and_then(|mut c| {
            if let Some(url) = database_url.take() {
                url.parse::<tokio_postgres::Config>()
                    .map_err(|_| DaemonError::BadUrl)?;
                c.database_url = Some(url);
            }
            Ok(c)
        });
        match loaded {
            Ok(c) => config = Some(c),
            Err(e) => {
                eprintln!("pgseald: {e}");
                return ExitCode::from(e.exit());
            }
        }
    }
    init_tracing(
        config
            .as_ref()
            .map(|c| c.log_format.as_str())
            .unwrap_or("text"),
    );
    match try_main(cli, config) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit())
        }
    }
}

fn try_main(cli: Cli, config: Option<config::Config>) -> Result<ExitCode, DaemonError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    rt.block_on(async {
        match cli.command {
            Command::Run { .. } => {
                let cfg = config.expect("loaded in main");
                if let Some(addr) = cfg.metrics_addr.clone() {
                    tokio::spawn(async move {
                        if let Err(e) = metrics::serve(addr).await {
                            tracing::error!("metrics endpoint failed: {e}");
                        }
                    });
                }
                tokio::spawn(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let mut term = match signal(SignalKind::terminate()) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!("cannot watch SIGTERM: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping after the current batch");
                    STOP.store(true, std::sync::atomic::Ordering::SeqCst);
                });
                scheduler::run(cfg).await?;
                tracing::info!("stopped");
                Ok(ExitCode::SUCCESS)
            }
            Command::Status { database_url } => status(&database_url).await,
            Command::Rotate { command, database_url } => {
                let url = database_url.ok_or(DaemonError::Usage("give --database-url or PGSEALD_DATABASE_URL"))?;
                let mut client = connect(&url).await?;
                match command {
                    RotateCommand::Kek { batch } => {
                        let run = jobs::start(&client, "rotate.kek").await?;
                        let r = rotate::kek(&client, batch).await;
                        let detail = serde_json::json!({ "rewrapped": r.as_ref().ok() });
                        jobs::finish(&client, run, r.is_ok(), detail).await;
                        println!("rewrapped {} tenant keys", r?);
                    }
                    RotateCommand::Tenant { tenant, batch } => {
                        let run = jobs::start(&client, "rotate.tenant").await?;
                        let r = rotate::tenant(&mut client, &tenant, batch).await;
                        let detail = match &r {
                            Ok((key, n)) => serde_json::json!({ "tenant": tenant, "key_id": key, "resealed": n }),
                            Err(e) => serde_json::json!({ "tenant": tenant, "error": e.to_string() }),
                        };
                        jobs::finish(&client, run, r.is_ok(), detail).await;
                        let (key, n) = r?;
                        println!("tenant {tenant}: new key {key}, {n} values resealed");
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Retention { command: RetentionCommand::Run { dry_run, tenant, batch, lock_timeout_ms, pause_ms }, database_url } => {
                if batch <= 0 {
                    return Err(DaemonError::Usage("--batch must be positive"));
                }
                let url = database_url.ok_or(DaemonError::Usage("give --database-url or PGSEALD_DATABASE_URL"))?;
                let mut client = connect(&url).await?;
                let opts = retention::Options { dry_run, tenant, batch, lock_timeout_ms, pause: std::time::Duration::from_millis(pause_ms) };
                let run = if dry_run { None } else { Some(jobs::start(&client, "retention").await?) };
                let r = retention::run(&mut client, &opts).await;
                if let Some(run) = run {
                    let deleted: u64 = r.as_ref().map(|o| o.iter().map(|x| x.rows).sum()).unwrap_or(0);
                    let longest = r.as_ref().map(|o| retention::longest_batch_ms(o)).unwrap_or(0.0);
                    let detail = serde_json::json!({ "deleted": deleted, "longest_batch_ms": longest });
                    jobs::finish(&client, run, r.is_ok(), detail).await;
                }
                for o in r? {
                    let verb = if dry_run { "would delete" } else { "deleted" };
                    if o.on_hold {
                        println!("{} tenant {}: on legal hold, nothing deleted", o.rel, o.tenant);
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
                Ok(ExitCode::SUCCESS)
            }
            Command::Ledger { command: LedgerCommand::Verify { tenant, file, checkpoints, public_key, database_url } } => {
                let outcomes = match file {
                    Some(f) => ledger::verify_file(&f, checkpoints.as_deref(), public_key.as_deref(), tenant.as_deref())?,
                    None => {
                        let url = database_url.ok_or(DaemonError::Usage("give --file, or --database-url / PGSEALD_DATABASE_URL"))?;
                        let client = connect(&url).await?;
                        ledger::verify_db(&client, tenant.as_deref()).await?
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
                Ok(if failed { Exit::VerifyFailed.into() } else { Exit::Ok.into() })
            }
        }
    })
}

/// Connects with the TLS the connection string asks for (`tls.rs`: libpq's sslmode
/// and sslrootcert).
async fn connect(url: &str) -> Result<tokio_postgres::Client, DaemonError> {
    let target = tls::parse(url)?;
    let connector = tls::connector(&target)?;
    let (client, connection) = target
        .config
        .connect(connector)
        .await
        .map_err(DaemonError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!("connection error: {e}");
        }
    });
    Ok(client)
}

async fn status(url: &str) -> Result<ExitCode, DaemonError> {
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
    Ok(if loaded { Exit::Ok } else { Exit::NoMasterKey }.into())
}
