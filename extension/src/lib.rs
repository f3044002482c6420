//! pgseal: the pgrx binding. One module per capability; the crypto lives in
//! `pgseal-core`, the SQL API sources in the top-level `sql/` directory.
#![forbid(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

mod audit_worker;
mod cache;
mod context;
mod enc_counts;
mod error;
mod gucs;
mod jobs;
mod keystore;
mod ledger;
mod limits;
mod locks;
mod master;
mod offboard;
mod orgs;
mod pg;
mod privilege;
mod subjects;
mod txn;
mod vault;

pgrx::pg_module_magic!();

extension_sql_file!(
    "../../sql/vault_schema.sql",
    name = "vault_schema",
    bootstrap
);
extension_sql_file!(
    "../../sql/ledger_schema.sql",
    name = "ledger_schema",
    requires = ["vault_schema"]
);
extension_sql_file!(
    "../../sql/ledger_api.sql",
    name = "ledger_api",
    requires = [
        "ledger_schema",
        ledger::admin::_ledger_pruning,
        ledger::erase::_ledger_erasing,
        ledger::admin::_creating_extension,
        ledger::admin::_ledger_tenant,
        context::current_tenant
    ]
);
extension_sql_file!(
    "../../sql/tenancy.sql",
    name = "tenancy",
    requires = [
        "ledger_api",
        context::current_tenant,
        context::current_user_id,
        context::_context_setting,
        orgs::_citus_worker,
        orgs::_replica_orgs
    ]
);
extension_sql_file!(
    "../../sql/isolation_report.sql",
    name = "isolation_report",
    requires = ["tenancy"]
);
extension_sql_file!(
    "../../sql/citus.sql",
    name = "citus",
    requires = ["isolation_report"]
);
extension_sql_file!(
    "../../sql/jobs.sql",
    name = "jobs",
    requires = [
        "citus",
        jobs::_tenants_scan,
        jobs::_planning_runs_owner_code,
        jobs::_citus_key_counts
    ]
);
extension_sql_file!(
    "../../sql/subjects.sql",
    name = "subjects",
    requires = ["jobs"]
);
extension_sql_file!(
    "../../sql/offboarding.sql",
    name = "offboarding",
    requires = ["subjects"]
);
extension_sql_file!("../../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain bool global set by the postmaster while it loads
    // shared_preload_libraries; reading it is always valid.
    if !unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        error::SealError::NotPreloaded.raise();
    }
    gucs::init();
    use cache::EPOCH;
    pgrx::pg_shmem_init!(EPOCH);
    use enc_counts::COUNTS;
    pgrx::pg_shmem_init!(COUNTS);
    use audit_worker::queue::QUEUE;
    pgrx::pg_shmem_init!(QUEUE);
    use ledger::shared_heads::SHARED_HEADS;
    pgrx::pg_shmem_init!(SHARED_HEADS = false);
    ledger::shared_heads::register_drop_hook();
    pg::rls_guard::register();
    pg::citus_clock::register();
    audit_worker::register();
    // Transaction-end work; end callbacks run in this order, pre-commit work in
    // the order of `txn::Phase`.
    txn::register(&[
        ledger::TXN,
        privilege::TXN,
        cache::TXN,
        context::TXN,
        pg::citus::TXN,
        offboard::TXN,
    ]);
    master::load_at_startup();
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

/// Settings for the `#[pg_test]` cluster.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries='pgseal'",
            // Every #[pg_test] runs in one transaction that is rolled back; the audit
            // writer commits on its own, so `on` is tested out of process
            // (tests/tests/decrypt_audit_cluster.rs).
            "pgseal.audit_decrypt='commit'",
            // Two development-only master key versions; version 2 is active.
            "pgseal.master_key_command='echo 1:000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f; echo 2:202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f'",
        ]
    }
}
