//! The names only pgseal uses: its own chains and its reserved event prefixes.

/// The chain of changes made outside any tenant context by roles pgseal trusts with
/// them: column registrations, default retention rules, `kek_rewrap`, and the
/// removals that follow a DROP of what they name. Nothing an application role can
/// do on its own appends here, so none can hold this chain's lock.
pub const SYSTEM_TENANT: &str = "_pgseal";
/// The chain of pgseal's entries that any role can cause outside a tenant context:
/// table protection and TRUNCATE of an audited table with no tenant set, and
/// audited rows whose tenant column names no chain a caller may use. A role that
/// keeps its transaction open after such a change holds this chain's lock, never
/// `SYSTEM_TENANT`'s.
pub const OPEN_CHAIN: &str = "_pgseal_open";
/// The chain only the audit writer appends to: its fallback when a tenant's chain is
/// held by another transaction (no other session holds this one, apart from an
/// administrator's `ledger_prune` of it).
pub const AUDIT_CHAIN: &str = "_pgseal_audit";

/// Whether `tenant` names one of pgseal's own chains (`_pgseal…`), which no caller
/// appends to.
pub fn is_pgseal_chain(tenant: &str) -> bool {
    pgseal_core::ledger::is_pgseal_chain(tenant)
}

/// Event names under these prefixes are written only by pgseal (compared without
/// regard to ASCII case and leading white space).
pub const RESERVED_PREFIXES: [&str; 11] = [
    "vault.",
    "ledger.",
    "key.",
    "policy.",
    "org.",
    "retention.",
    "pgseal.",
    "subject.",
    "tenant.",
    "audit.",
    "row.",
];

/// Whether `event` is one of pgseal's own event names.
pub fn is_reserved(event: &str) -> bool {
    let e = event.trim_start().as_bytes();
    RESERVED_PREFIXES
        .iter()
        .any(|p| e.len() >= p.len() && e[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
}
