//! The tenancy isolation matrix (roles × commands × context states), run by the
//! single-node tier (tests/tenancy_cluster.rs) and the Citus tier
//! (tests/citus_cluster.rs) against the same expectations.

use crate::sqlstate;

/// The commands of the matrix: `cell` runs each in a transaction of its own.
pub const OPS: [&str; 6] = [
    "SELECT",
    "INSERT",
    "INSERT other",
    "UPDATE",
    "DELETE",
    "COPY",
];

/// The result of one cell: the SQLSTATE, rows seen or affected, and how many of
/// them belonged to another tenant than the context's.
#[derive(Debug, PartialEq)]
pub struct Cell {
    pub state: String,
    pub rows: usize,
    pub cross: usize,
}

pub fn cell(
    c: &mut postgres::Client,
    context: Option<(&str, &str)>,
    op: &str,
    table: &str,
) -> Cell {
    let mut tx = c.transaction().unwrap();
    if let Some((tenant, user)) = context {
        tx.batch_execute(&format!("SELECT pgseal.set_tenant('{tenant}', '{user}')"))
            .unwrap();
    }
    let own = context.map(|(t, _)| t.to_owned()).unwrap_or_default();
    let sql = match op {
        "SELECT" => format!("SELECT tenant_id FROM {table}"),
        "INSERT" => match table {
            "docs" => format!("INSERT INTO docs VALUES (100, '{own}', 'someone', 'org1', 'new') RETURNING tenant_id"),
            _ => format!("INSERT INTO {table} VALUES (100, '{own}', 'new') RETURNING tenant_id"),
        },
        "INSERT other" => match table {
            "docs" => "INSERT INTO docs VALUES (101, 'B', 'someone', 'org1', 'new') RETURNING tenant_id".into(),
            _ => format!("INSERT INTO {table} VALUES (101, 'B', 'new') RETURNING tenant_id"),
        },
        "UPDATE" => format!("UPDATE {table} SET body = body || '!' RETURNING tenant_id"),
        "DELETE" => format!("DELETE FROM {table} RETURNING tenant_id"),
        "COPY" => String::new(), // below, through the COPY protocol
        _ => unreachable!("unknown operation {op}"),
    };
    let result = match op {
        "COPY" => {
            use std::io::Read;
            let mut out = String::new();
            match tx.copy_out(&format!("COPY (SELECT tenant_id FROM {table}) TO STDOUT")) {
                // The server's error arrives while reading, wrapped in an io::Error.
                Ok(mut r) => match r.read_to_string(&mut out) {
                    Ok(_) => Ok(out.lines().map(str::to_owned).collect::<Vec<_>>()),
                    Err(e) => Err(*e
                        .into_inner()
                        .and_then(|inner| inner.downcast::<postgres::Error>().ok())
                        .expect("a COPY read fails with the server's error")),
                },
                Err(e) => Err(e),
            }
        }
        _ => tx
            .query(&sql, &[])
            .map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect()),
    };
    let _ = tx.rollback();
    match result {
        Ok(tenants) => Cell {
            state: "00000".into(),
            rows: tenants.len(),
            cross: tenants.iter().filter(|t| **t != own).count(),
        },
        Err(e) => Cell {
            state: sqlstate::<()>(Err(e)),
            rows: 0,
            cross: 0,
        },
    }
}

pub fn ok(rows: usize) -> Cell {
    Cell {
        state: "00000".into(),
        rows,
        cross: 0,
    }
}

pub fn denied() -> Cell {
    Cell {
        state: "42501".into(),
        rows: 0,
        cross: 0,
    }
}

/// The matrix of a table shaped like `notes` (id, tenant_id, body) under
/// `tenant_protect`, whose rows are two of tenant A and one of tenant B, seen by `app`
/// (a role with SELECT, INSERT, UPDATE and DELETE on it).
pub fn notes(app: &mut postgres::Client, table: &str) {
    let ops = OPS;
    for (who, ctx, expect) in [
        (
            "own tenant",
            Some(("A", "u")),
            [ok(2), ok(1), denied(), ok(2), ok(2), ok(2)],
        ),
        (
            "other tenant",
            Some(("B", "u")),
            [ok(1), ok(1), ok(1), ok(1), ok(1), ok(1)],
        ),
        (
            "no context",
            None,
            [denied(), denied(), denied(), denied(), denied(), denied()],
        ),
    ] {
        for (op, want) in ops.iter().zip(expect) {
            let got = cell(app, ctx, op, table);
            assert_eq!(got, want, "{table}, {who}, {op}");
        }
    }
}
