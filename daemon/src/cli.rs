//! pgseald's command line (clap). `run` is the scheduler; every other command is a
//! one-shot [`OneShot`], run by `commands.rs`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "pgseald",
    version,
    about = "Key rotation, retention and ledger verification for pgseal"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The scheduler: runs the configured jobs on their cron schedules, as leader.
    Run {
        /// The configuration file (see docs/pgseald.toml.example).
        #[arg(long, default_value = "pgseald.toml")]
        config: PathBuf,
        /// Overrides database_url and PGSEALD_DATABASE_URL.
        #[arg(long)]
        database_url: Option<String>,
    },
    #[command(flatten)]
    OneShot(OneShot),
}

#[derive(Subcommand, Debug)]
pub enum OneShot {
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
    /// Tenant offboarding (pgseal.tenant_offboard).
    Offboard {
        #[command(subcommand)]
        command: OffboardCommand,
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
pub enum RotateCommand {
    /// Rewrap every tenant key under the active master key version (kek_rewrap until 0).
    Kek {
        #[command(flatten)]
        batch: BatchArgs,
    },
    /// New data key for a tenant, then reseal its registered columns under it.
    Tenant {
        tenant: String,
        #[command(flatten)]
        batch: BatchArgs,
    },
}

/// How many rows each batch transaction takes.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct BatchArgs {
    /// Rows per transaction, fixed. Without it the size adapts: each batch is sized
    /// to take about --batch-ms.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=i32::MAX as i64))]
    pub batch: Option<i64>,
    /// Without --batch: the time each batch transaction aims at, in milliseconds.
    #[arg(long, default_value_t = crate::job::batch::DEFAULT_TARGET_MS,
          value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "batch")]
    pub batch_ms: u64,
}

impl BatchArgs {
    pub fn batch(self) -> crate::job::batch::Batch {
        crate::job::batch::Batch::new(self.batch, self.batch_ms)
    }
}

#[derive(Subcommand, Debug)]
pub enum RetentionCommand {
    /// Delete, per tenant and table, the rows older than the tenant's window.
    Run {
        /// Print what would be deleted; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        batch: BatchArgs,
        /// lock_timeout of each delete transaction, in milliseconds.
        #[arg(long, default_value_t = 200)]
        lock_timeout_ms: u64,
        /// Pause between batches, in milliseconds.
        #[arg(long, default_value_t = 10)]
        pause_ms: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum OffboardCommand {
    /// Carry out every offboarding whose grace period is over, each from the step
    /// it reached: export, delete, shred, erase, receipt, checkpoint.
    Run {
        /// The directory for the export files and final checkpoints.
        #[arg(long)]
        export_dir: PathBuf,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        batch: BatchArgs,
    },
}

#[derive(Subcommand, Debug)]
pub enum LedgerCommand {
    /// Verify ledgers: in the database (hashes, MACs, links, seq), or offline in a
    /// `pgseal.ledger_export()` file (hashes, links, seq, and signed checkpoints).
    /// Exits 5 when any chain fails.
    Verify {
        /// Only this tenant (default: every tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// Verify this JSON-lines export offline instead of the database.
        #[arg(long, conflicts_with = "database_url")]
        file: Option<PathBuf>,
        /// JSON-lines file of checkpoints from `pgseal.ledger_checkpoint()` (with --file).
        #[arg(long, requires = "file")]
        checkpoints: Option<PathBuf>,
        /// Hex public key from `pgseal.ledger_public_key()` that signed the checkpoints.
        #[arg(long, requires = "checkpoints")]
        public_key: Option<String>,
        /// libpq connection string or postgres:// URL (without --file).
        #[arg(long, env = "PGSEALD_DATABASE_URL")]
        database_url: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
