//! pgseald: the companion daemon of the pgseal extension.
//!
//! The crypto stays in the extension, where the master key lives; the daemon calls
//! its SQL functions. This first version offers `status`; rotation, retention and
//! ledger verification follow (see the issues).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_postgres::NoTls;

mod error;
use error::DaemonError;

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
        }
    })
}

async fn status(url: &str) -> Result<ExitCode, DaemonError> {
    let config: tokio_postgres::Config = url.parse().map_err(|_| DaemonError::BadUrl)?;
    let (client, connection) = config.connect(NoTls).await.map_err(DaemonError::Connect)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!("connection error: {e}");
        }
    });
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
