//! `pgseald rotate kek` and `pgseald rotate tenant <id>`.
//!
//! The crypto stays in the extension: `kek_rewrap` rewraps tenant keys in batches,
//! `tenant_key_rotate` makes a new data key, and `vault_rewrap` reseals each value
//! under it. Every batch is its own transaction under the tenant's context, and each
//! row is updated only if it still holds the value read, so a concurrent update wins
//! and a rerun after a crash picks up whatever is left.

use tokio_postgres::Client;

use crate::error::DaemonError;
use crate::progress::Progress;

/// Runs `kek_rewrap(batch)` until it returns 0; returns the keys rewrapped.
pub async fn kek(client: &Client, batch: i32) -> Result<i64, DaemonError> {
    let remaining: i64 = client
        .query_one(
            "SELECT count(*) FROM pgseal.tenant_keys WHERE state <> 'destroyed' \
             AND kek_version <> (SELECT active_version FROM pgseal.vault_status())",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(0);
    let bar = Progress::new("rewrapping tenant keys", remaining as u64);
    let mut total = 0i64;
    loop {
        let n: i32 = client
            .query_one("SELECT pgseal.kek_rewrap($1)", &[&batch])
            .await
            .map_err(DaemonError::Query)?
            .get(0);
        if n == 0 {
            break;
        }
        total += n as i64;
        bar.inc(n as u64);
    }
    bar.finish();
    Ok(total)
}

/// One registered sealed column.
struct SealedColumn {
    rel: String,
    col: String,
    context: Option<String>,
    /// Quoted primary key columns.
    pk: Vec<String>,
}

async fn sealed_columns(client: &Client) -> Result<Vec<SealedColumn>, DaemonError> {
    let rows = client
        .query(
            "SELECT s.rel::text, quote_ident(s.col), s.context, \
                    (SELECT array_agg(quote_ident(a.attname) ORDER BY k.ord) \
                       FROM pg_index i \
                       CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                       JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                      WHERE i.indrelid = s.rel AND i.indisprimary) \
             FROM pgseal.sealed_columns s ORDER BY 1, 2",
            &[],
        )
        .await
        .map_err(DaemonError::Query)?;
    Ok(rows
        .iter()
        .map(|r| SealedColumn {
            rel: r.get(0),
            col: r.get(1),
            context: r.get(2),
            pk: r.get::<_, Option<Vec<String>>>(3).unwrap_or_default(),
        })
        .collect())
}

/// Rotates the tenant's data key, then reseals every registered column's values
/// under older keys. Returns (new key id, values resealed).
pub async fn tenant(client: &mut Client, tenant: &str, batch: i64) -> Result<(String, u64), DaemonError> {
    let key_id: String = client
        .query_one("SELECT pgseal.tenant_key_rotate($1)", &[&tenant])
        .await
        .map_err(DaemonError::Query)?
        .get(0);
    let resealed = reseal(client, tenant, &key_id, batch).await?;
    Ok((key_id, resealed))
}

/// Reseals the tenant's registered values that are not under `active`, in
/// batches of `batch` rows, each batch one transaction.
pub async fn reseal(client: &mut Client, tenant: &str, active: &str, batch: i64) -> Result<u64, DaemonError> {
    let mut total = 0u64;
    for c in sealed_columns(client).await? {
        if c.pk.is_empty() {
            return Err(DaemonError::Config(format!("{} has no primary key; it cannot be resealed", c.rel)));
        }
        let pk = c.pk.join(", ");
        let join: Vec<String> = c.pk.iter().map(|k| format!("t.{k} = s.{k}")).collect();
        // Compare-and-set: the UPDATE matches only rows that still hold the value
        // read; under READ COMMITTED a concurrent update makes the row fail that test.
        let sql = format!(
            "UPDATE {rel} AS t SET {col} = pgseal.vault_rewrap(t.{col}, $3) \
             FROM (SELECT {pk}, {col} AS old FROM {rel} \
                   WHERE tenant_id::text = $1 AND {col} LIKE 'v2:%' AND split_part({col}, ':', 2) <> $2 \
                   LIMIT $4) AS s \
             WHERE {join} AND t.{col} = s.old",
            rel = c.rel,
            col = c.col,
            join = join.join(" AND ")
        );
        let bar = Progress::new(&format!("resealing {}.{}", c.rel, c.col), 0);
        loop {
            let tx = client.transaction().await.map_err(DaemonError::Query)?;
            tx.execute("SELECT pgseal.set_tenant($1)", &[&tenant]).await.map_err(DaemonError::Query)?;
            let n = tx.execute(&sql, &[&tenant, &active, &c.context, &batch]).await.map_err(DaemonError::Query)?;
            tx.commit().await.map_err(DaemonError::Query)?;
            if n == 0 {
                break;
            }
            total += n;
            bar.inc(n);
            if crate::STOP.load(std::sync::atomic::Ordering::SeqCst) {
                break;
            }
        }
        bar.finish();
    }
    Ok(total)
}
