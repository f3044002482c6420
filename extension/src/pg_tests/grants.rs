//! The README's function tables say who may call each function; this holds every
//! function in schema `pgseal`, enumerated from the catalog, to them. A function
//! added without a README row, or without its grant, fails here.

#[pgrx::pg_schema]
mod tests {
    use std::collections::BTreeMap;

    use pgrx::prelude::*;

    use crate::pg_tests::helpers::run;

    /// Who a README row says may call its functions: the first word of the
    /// "who" column.
    #[derive(Debug, Clone, PartialEq)]
    enum Who {
        Public,
        /// Members of this role (with its privileges inherited).
        Role(String),
        /// Only the extension's owner (a superuser).
        Owner,
    }

    /// Every function a README table row names in its first column, with the
    /// row's "who". A row is `| `f(args) → result`, `g(args)` (note) | who | errors |`.
    fn readme_grants() -> BTreeMap<String, Who> {
        let mut out = BTreeMap::new();
        for line in include_str!("../../../README.md").lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() < 4 || !cells[1].starts_with('`') {
                continue;
            }
            // Names are the backticked spans of the first cell that start with
            // an identifier followed by '('.
            let names: Vec<String> = cells[1]
                .split('`')
                .skip(1)
                .step_by(2)
                .filter_map(|span| {
                    let name = span.split('(').next()?;
                    (span.len() > name.len()
                        && !name.is_empty()
                        && name
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                    .then(|| name.to_owned())
                })
                .collect();
            if names.is_empty() {
                continue;
            }
            let first = cells[2].split([' ', ',', ';', '(']).next().unwrap_or("");
            let who = match first {
                "PUBLIC" => Who::Public,
                "extension" => Who::Owner,
                r if r.starts_with("pgseal_") => Who::Role(r.to_owned()),
                other => panic!(
                    "README row for {names:?}: unknown caller {other:?} in {:?}",
                    cells[2]
                ),
            };
            for n in names {
                if let Some(prev) = out.insert(n.clone(), who.clone()) {
                    assert_eq!(prev, who, "README lists {n} twice with different callers");
                }
            }
        }
        out
    }

    #[pg_test]
    fn every_function_is_granted_to_exactly_whom_the_readme_names() {
        let readme = readme_grants();
        // A role with no pgseal role at all, beside every pgseal role there is.
        run("CREATE ROLE t_grants_nobody NOLOGIN");
        let roles: Vec<String> = Spi::connect(|c| {
            c.select(
                "SELECT rolname::text FROM pg_catalog.pg_roles \
                 WHERE rolname LIKE 'pgseal\\_%' OR rolname = 't_grants_nobody' ORDER BY 1",
                None,
                &[],
            )?
            .map(|r| r.get::<String>(1).map(Option::unwrap_or_default))
            .collect::<Result<Vec<_>, _>>()
        })
        .unwrap();
        assert!(roles.len() >= 5, "pgseal's roles: {roles:?}");
        let functions: Vec<(String, String)> = Spi::connect(|c| {
            c.select(
                "SELECT p.proname::text, p.oid::pg_catalog.regprocedure::text \
                 FROM pg_catalog.pg_proc p \
                 WHERE p.pronamespace = 'pgseal'::pg_catalog.regnamespace ORDER BY 2",
                None,
                &[],
            )?
            .map(|r| Ok((r.get::<String>(1)?.unwrap(), r.get::<String>(2)?.unwrap())))
            .collect::<Result<Vec<_>, pgrx::spi::Error>>()
        })
        .unwrap();
        assert!(
            functions.len() > 40,
            "pgseal's functions: {}",
            functions.len()
        );
        let mut wrong = Vec::new();
        for (name, signature) in &functions {
            let Some(who) = readme.get(name) else {
                wrong.push(format!(
                    "{signature}: no row in the README's function tables"
                ));
                continue;
            };
            for role in &roles {
                let may: bool = Spi::get_one_with_args(
                    "SELECT pg_catalog.has_function_privilege($1, $2::pg_catalog.regprocedure, 'EXECUTE')",
                    &[role.as_str().into(), signature.as_str().into()],
                )
                .unwrap()
                .unwrap();
                let should = match who {
                    Who::Public => true,
                    Who::Owner => false,
                    Who::Role(r) => Spi::get_one_with_args::<bool>(
                        "SELECT pg_catalog.pg_has_role($1, $2, 'USAGE')",
                        &[role.as_str().into(), r.as_str().into()],
                    )
                    .unwrap()
                    .unwrap(),
                };
                if may != should {
                    wrong.push(format!(
                        "{signature}: {role} {} execute it; the README says {who:?}",
                        if may { "can" } else { "cannot" }
                    ));
                }
            }
        }
        // README rows that name no function left in the schema are stale.
        for name in readme.keys() {
            if !functions.iter().any(|(n, _)| n == name) {
                wrong.push(format!(
                    "README names {name}(), which schema pgseal does not have"
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "grants differ from the README:\n{}",
            wrong.join("\n")
        );
    }
}
