//! Typed errors of pgseald and their documented exit codes.

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("could not start the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("the database URL is not a valid connection string or postgres:// URL")]
    BadUrl,
    #[error("could not connect to the database: {}", describe(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("query failed: {}", describe(.0))]
    Query(#[source] tokio_postgres::Error),
    #[error("{0}: {1}")]
    File(String, String),
    #[error("{0}")]
    Usage(&'static str),
    #[error("{0}")]
    Config(String),
    #[error("the database connection was lost")]
    ConnectionLost,
    #[error("ledger verification failed for tenant(s) {0:?}")]
    VerifyFailed(Vec<String>),
    #[error("{0}")]
    NoProgress(String),
    #[error("{job} failed for tenant(s) {failed:?} ({done})")]
    TenantsFailed {
        job: &'static str,
        failed: Vec<String>,
        done: String,
    },
    #[error("checkpoint for tenant {0} at seq {1} does not carry a valid signature for the given public key")]
    BadCheckpoint(String, i64),
}

/// A database error as the server reported it: its message and SQLSTATE (never its
/// DETAIL, which may quote row values); other errors as the driver words them.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// pgseald's documented exit codes (README, Layout; `pgseald --help`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// pgseald itself could not run (no async runtime).
    Internal = 1,
    /// Bad usage, configuration or input file.
    Usage = 2,
    /// `status`: the master key is not loaded.
    NoMasterKey = 3,
    /// The database is unreachable, or a query failed.
    Database = 4,
    /// A ledger failed verification.
    VerifyFailed = 5,
    /// A one-shot command stopped by SIGINT after the batch in hand: the status a
    /// shell reports for a process SIGINT ended.
    Interrupted = 130,
    /// A one-shot command stopped by SIGTERM after the batch in hand (as above).
    Terminated = 143,
}

impl From<Exit> for std::process::ExitCode {
    fn from(e: Exit) -> Self {
        std::process::ExitCode::from(e as u8)
    }
}

impl DaemonError {
    /// The exit code this error ends pgseald with.
    pub fn exit(&self) -> Exit {
        match self {
            DaemonError::Runtime(_) => Exit::Internal,
            DaemonError::BadUrl
            | DaemonError::File(..)
            | DaemonError::Usage(_)
            | DaemonError::Config(_) => Exit::Usage,
            DaemonError::BadCheckpoint(..) | DaemonError::VerifyFailed(_) => Exit::VerifyFailed,
            DaemonError::ConnectionLost
            | DaemonError::Connect(_)
            | DaemonError::Query(_)
            | DaemonError::TenantsFailed { .. }
            | DaemonError::NoProgress(_) => Exit::Database,
        }
    }
}
