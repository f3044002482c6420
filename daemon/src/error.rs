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
}

impl DaemonError {
    /// Exit codes: 0 ok; 2 bad usage or configuration; 3 master key not loaded
    /// (status); 4 database unreachable or a query failed.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Runtime(_) => 1,
            DaemonError::BadUrl => 2,
            DaemonError::Connect(_) | DaemonError::Query(_) => 4,
        }
    }
}
