//! The database connection every command and the scheduler use.

use tokio_postgres::Client;

use crate::error::DaemonError;
use crate::tls;

/// Connects with the TLS the connection string asks for (`tls.rs`: libpq's sslmode
/// and sslrootcert), and drives the connection on a task of its own.
pub async fn connect(url: &str) -> Result<Client, DaemonError> {
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
