//! pgseald: the companion daemon of the pgseal extension.
//!
//! The crypto stays in the extension, where the master key lives; the daemon calls
//! its SQL functions. It offers `status` and `ledger verify`; rotation, retention
//! and the scheduler follow (see the issues).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_postgres::NoTls;

mod error;
mod ledger;
use error::DaemonError;

/// Exit code of a failed ledger verification.
const VERIFY_FAILED: u8 = 5;

#[derive(Parser, Debug)]
#[command(name = "pgseald", version, about = "Key rotation, retention and ledger verification for pgseal")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print pgseal.vault_status(): whether the master key is loaded, and its versions.
    Status {
        /// libpq connection string or postgres:// URL.
        #[arg(long, env = "PGSEALD_DATABASE_URL")]
        database_url: String,
    },
    /// Tenant ledgers.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).init();
    match try_main(cli) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn try_main(cli: Cli) -> Result<ExitCode, DaemonError> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(DaemonError::Runtime)?;
    rt.block_on(async {
        match cli.command {
            Command::Status { database_url } => status(&database_url).await,
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
                Ok(if failed { ExitCode::from(VERIFY_FAILED) } else { ExitCode::SUCCESS })
            }
        }
    })
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, DaemonError> {
    let config: tokio_postgres::Config = url.parse().map_err(|_| DaemonError::BadUrl)?;
    let (client, connection) = config.connect(NoTls).await.map_err(DaemonError::Connect)?;
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
        .query_one("SELECT loaded, active_version, versions FROM pgseal.vault_status()", &[])
        .await
        .map_err(DaemonError::Query)?;
    let loaded: bool = row.get(0);
    let active: Option<i32> = row.get(1);
    let versions: Vec<i32> = row.get(2);
    let versions: Vec<String> = versions.iter().map(|v| v.to_string()).collect();
    println!("master key loaded: {}", if loaded { "yes" } else { "no" });
    println!("active version:    {}", active.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    println!("loaded versions:   {}", if versions.is_empty() { "-".into() } else { versions.join(", ") });
    Ok(if loaded { ExitCode::SUCCESS } else { ExitCode::from(3) })
}
