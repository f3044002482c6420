//! Typed errors of pgseald and their documented exit codes.

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("could not start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("the database URL is not a valid connection string or postgres:// URL")]
    BadUrl,
    #[error("could not connect to the database: {0}")]
    Connect(tokio_postgres::Error),
    #[error("query failed: {0}")]
    Query(tokio_postgres::Error),
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
    #[error("checkpoint for tenant {0} at seq {1} does not carry a valid signature for the given public key")]
    BadCheckpoint(String, i64),
}

impl DaemonError {
    /// Exit codes: 0 ok; 2 bad usage, configuration or input file; 3 master key
    /// not loaded (status); 4 database unreachable or a query failed; 5 a ledger
    /// failed verification (also returned directly by `ledger verify`).
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Runtime(_) => 1,
            DaemonError::BadUrl
            | DaemonError::File(..)
            | DaemonError::Usage(_)
            | DaemonError::Config(_) => 2,
            DaemonError::BadCheckpoint(..) | DaemonError::VerifyFailed(_) => 5,
            DaemonError::ConnectionLost => 4,
            DaemonError::Connect(_) | DaemonError::Query(_) => 4,
        }
    }
}
