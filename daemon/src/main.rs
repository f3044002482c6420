//! pgseald: the companion daemon of the pgseal extension.
//!
//! The crypto stays in the extension, where the master key lives; the daemon calls
//! its SQL functions: `status`, `ledger verify`, `rotate`, `retention`, and `run`,
//! the scheduler that runs them on cron schedules as the one leader.
//!
//! `main` goes in stages: parse the command line, load `run`'s configuration,
//! start tracing (its format is part of that configuration), build the runtime,
//! then dispatch to the scheduler or a one-shot command.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod config;
mod db;
mod error;
mod job;
mod ledger;
mod metrics;
mod progress;
mod scheduler;
mod shutdown;
mod tls;

use cli::{Cli, Command, OneShot};
use config::Config;
use error::{DaemonError, Exit};
use shutdown::Shutdown;

/// A command with what it needs loaded before tracing and the runtime start.
enum Task {
    /// `run`, with its configuration.
    Run(Box<Config>),
    OneShot(OneShot),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let task = match load(cli.command) {
        Ok(t) => t,
        // Before tracing starts: its format is part of what failed to load.
        Err(e) => {
            eprintln!("pgseald: {e}");
            return e.exit().into();
        }
    };
    init_tracing(match &task {
        Task::Run(cfg) => cfg.log_format.as_str(),
        Task::OneShot(_) => "text",
    });
    match runtime().and_then(|rt| rt.block_on(dispatch(task))) {
        Ok(exit) => exit.into(),
        Err(e) => {
            tracing::error!("{e}");
            e.exit().into()
        }
    }
}

/// `run` reads its configuration file and environment, then `--database-url`.
fn load(command: Command) -> Result<Task, DaemonError> {
    match command {
        Command::Run {
            config,
            database_url,
        } => {
            let mut cfg = Config::load(&config)?;
            if let Some(url) = database_url {
                url.parse::<tokio_postgres::Config>()
                    .map_err(|_| DaemonError::BadUrl)?;
                cfg.database_url = Some(url);
            }
            Ok(Task::Run(Box::new(cfg)))
        }
        Command::OneShot(c) => Ok(Task::OneShot(c)),
    }
}

/// Log lines go to stderr, as text or JSON lines.
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

fn runtime() -> Result<tokio::runtime::Runtime, DaemonError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)
}

/// Runs the task; SIGINT and SIGTERM stop `run` and the batch commands through the
/// cancellation token handed to every job (`shutdown.rs`).
async fn dispatch(task: Task) -> Result<Exit, DaemonError> {
    let shutdown = Shutdown::new();
    match task {
        Task::Run(cfg) => {
            shutdown.watch_signals();
            if let Some(addr) = cfg.metrics_addr.clone() {
                tokio::spawn(async move {
                    if let Err(e) = metrics::serve(addr).await {
                        tracing::error!("metrics endpoint failed: {e}");
                    }
                });
            }
            scheduler::run(*cfg, shutdown.token()).await?;
            tracing::info!("stopped");
            Ok(Exit::Ok)
        }
        Task::OneShot(command) => {
            if command.stops_between_batches() {
                shutdown.watch_signals();
            }
            commands::run(command, &shutdown).await
        }
    }
}
