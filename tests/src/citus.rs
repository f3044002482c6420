//! A Citus cluster for the scale-out tier (tests/citus_cluster.rs): a coordinator and
//! two workers on loopback, each a `Cluster` with Citus and pgseal preloaded and the
//! same master key command. `scripts/citus.sh build` installs Citus first; `make test`
//! runs it and sets `PGSEAL_CITUS=1` when Citus is there to test.

use std::process::Command;

use crate::{pg_bindir, Cluster, KEY_V1};

/// Whether the Citus tier runs: `PGSEAL_CITUS=1`, which `make test` sets on
/// PostgreSQL 16 and later once `scripts/citus.sh build` installed Citus. Without it a
/// test prints why it is skipped and returns; with it Citus must really be installed.
pub fn enabled(test: &str) -> bool {
    if std::env::var("PGSEAL_CITUS").as_deref() != Ok("1") {
        eprintln!(
            "{test}: skipped, the Citus tier is off (PGSEAL_CITUS is not 1: PostgreSQL 15, \
             or no vendored Citus source for scripts/citus.sh)"
        );
        return false;
    }
    let out = Command::new(pg_bindir().join("pg_config"))
        .arg("--sharedir")
        .output()
        .expect("run pg_config --sharedir");
    let share = String::from_utf8(out.stdout).unwrap();
    let control = std::path::Path::new(share.trim()).join("extension/citus.control");
    assert!(
        control.exists(),
        "PGSEAL_CITUS=1 but {} is missing: run scripts/citus.sh build",
        control.display()
    );
    true
}

/// The coordinator and its workers; all stop when dropped.
pub struct CitusCluster {
    pub coordinator: Cluster,
    pub workers: Vec<Cluster>,
}

/// Every node's extra configuration: Citus first (it must come first), pgseal, and
/// prepared transactions for Citus's two-phase commits across nodes.
const CONF: [&str; 2] = [
    "shared_preload_libraries = 'citus,pgseal'",
    "max_prepared_transactions = 100",
];

impl CitusCluster {
    /// Starts a coordinator and two workers (`<name>-c`, `<name>-w1`, `<name>-w2`),
    /// creates Citus on each, and adds the workers to the coordinator's metadata.
    pub fn start(name: &str) -> CitusCluster {
        let node = |suffix: &str| {
            Cluster::with(&format!("{name}-{suffix}"))
                .keys(&[KEY_V1])
                .conf(&CONF)
                .start()
        };
        let cc = CitusCluster {
            coordinator: node("c"),
            workers: vec![node("w1"), node("w2")],
        };
        for n in cc.nodes() {
            n.connect().batch_execute("CREATE EXTENSION citus").unwrap();
        }
        let mut c = cc.coordinator.connect();
        c.execute(
            "SELECT citus_set_coordinator_host('127.0.0.1', $1)",
            &[&i32::from(cc.coordinator.port)],
        )
        .unwrap();
        for w in &cc.workers {
            c.execute(
                "SELECT citus_add_node('127.0.0.1', $1)",
                &[&i32::from(w.port)],
            )
            .unwrap();
        }
        cc
    }

    /// The coordinator, then the workers.
    pub fn nodes(&self) -> impl Iterator<Item = &Cluster> {
        std::iter::once(&self.coordinator).chain(self.workers.iter())
    }

    /// The node listening on `port`.
    pub fn node_at(&self, port: u16) -> &Cluster {
        self.nodes()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster listens on {port}"))
    }
}
