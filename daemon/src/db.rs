//! The database connection every command and the scheduler use.

use tokio_postgres::Client;

/// What `connect` sets for the session.
const SESSION_SETTINGS: &str =
    "SET search_path = pg_catalog, pg_temp; SET extra_float_digits = 3; \
     SET default_transaction_isolation = 'read committed'";

/// How the session prints times and intervals (`connect`; a job sets them again).
pub const STYLES: &str = "SET DateStyle = 'ISO, YMD'; SET IntervalStyle = postgres";

use crate::error::DaemonError;
use crate::tls;

/// Connects with the TLS the connection string asks for (`tls.rs`: libpq's sslmode
/// and sslrootcert), and drives the connection on a task of its own.
///
/// The session's search_path is `pg_catalog, pg_temp` before any statement runs.
/// pgseald puts names it read from the catalogs into its statements (registered
/// tables as `regclass::text`, key types by `format_type`); those print a name
/// unqualified when the search_path makes it visible, and a schema another role
/// creates later (a `"$user"` schema named after pgseald's role, say) could then
/// take it over between the read and the statement, with a view or a domain whose
/// functions would run as pgseald. With no schema but the catalog on the path,
/// every such name is printed with its schema, and means that table and no other.
/// (A job's transaction on a tenant's rows adds the schemas of its columns'
/// types for itself: `job::tenant_tx`.) extra_float_digits = 3 makes a float's text form exact, so a
/// key read back from it is the key written. `DateStyle` ISO and `IntervalStyle`
/// postgres do the same for times and intervals (retention's cutoffs and its
/// batches' time bounds): another style prints a zone as an abbreviation, which
/// reads back through `timezone_abbreviations` as another zone where they differ
/// (Asia/Shanghai's CST as US Central's), or not at all.
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
    client
        .batch_execute(&format!("{SESSION_SETTINGS}; {STYLES}"))
        .await
        .map_err(DaemonError::Query)?;
    Ok(client)
}
