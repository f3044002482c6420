//! pgseald's jobs: the work that changes or checks the database on a schedule or
//! on demand, each run recorded in `pgseal.job_runs` through [`record::recorded`].
//!
//! [`Job`] names the scheduled jobs, one per section of `pgseald.toml`; its
//! `match`es are the only place the scheduler learns of a job. Every job takes a
//! [`CancellationToken`] and checks it between batches: once cancelled (SIGINT or
//! SIGTERM), it commits the batch in hand and returns what it did so far.

use std::fmt;
use std::str::FromStr;

use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::error::DaemonError;

pub mod batch;
pub mod offboarding;
pub mod record;
pub mod retention;
pub mod rotation;
pub mod tenant_tx;
pub mod verification;

/// A scheduled job. Its name is its section in `pgseald.toml` and its `job` in
/// `pgseal.job_runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Job {
    /// Per-tenant retention deletes, and ledger pruning when configured.
    Retention,
    /// Rotation of tenant keys past their age, and resealing under them.
    Rotation,
    /// Ledger verification, with a signed checkpoint per verified tenant.
    Verification,
    /// The end of the tenants whose offboarding grace period is over.
    Offboarding,
}

impl Job {
    /// Every job, in the order the scheduler lists them.
    pub const ALL: [Job; 4] = [
        Job::Retention,
        Job::Rotation,
        Job::Verification,
        Job::Offboarding,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Job::Retention => "retention",
            Job::Rotation => "rotation",
            Job::Verification => "verification",
            Job::Offboarding => "offboarding",
        }
    }

    /// The job's cron expression, when `cfg` has its section.
    pub fn schedule(self, cfg: &Config) -> Option<&str> {
        match self {
            Job::Retention => cfg.retention.as_ref().map(|j| j.schedule.as_str()),
            Job::Rotation => cfg.rotation.as_ref().map(|j| j.schedule.as_str()),
            Job::Verification => cfg.verification.as_ref().map(|j| j.schedule.as_str()),
            Job::Offboarding => cfg.offboarding.as_ref().map(|j| j.schedule.as_str()),
        }
    }

    /// Every job `cfg` schedules, with its cron expression.
    pub fn scheduled(cfg: &Config) -> Vec<(Job, &str)> {
        Job::ALL
            .into_iter()
            .filter_map(|job| Some((job, job.schedule(cfg)?)))
            .collect()
    }

    /// One scheduled run of the job, with its section of `cfg`; returns the detail
    /// recorded for it in `pgseal.job_runs`.
    pub async fn run(
        self,
        client: &mut Client,
        cfg: &Config,
        stop: &CancellationToken,
    ) -> Result<serde_json::Value, DaemonError> {
        match self {
            Job::Retention => {
                retention::scheduled(client, section(self, &cfg.retention)?, stop).await
            }
            Job::Rotation => rotation::scheduled(client, section(self, &cfg.rotation)?, stop).await,
            Job::Verification => {
                verification::scheduled(client, section(self, &cfg.verification)?, stop).await
            }
            Job::Offboarding => {
                offboarding::scheduled(client, section(self, &cfg.offboarding)?, stop).await
            }
        }
    }
}

/// The job's section of the configuration. The scheduler runs only the jobs that
/// have one, so a missing section is an error of the caller, reported, not a panic.
fn section<T>(job: Job, s: &Option<T>) -> Result<&T, DaemonError> {
    s.as_ref()
        .ok_or_else(|| DaemonError::Config(format!("[{job}] is not configured")))
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Job {
    type Err = DaemonError;

    fn from_str(s: &str) -> Result<Job, DaemonError> {
        Job::ALL
            .into_iter()
            .find(|j| j.name() == s)
            .ok_or_else(|| DaemonError::Config(format!("no job is named {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_job() {
        for j in Job::ALL {
            assert_eq!(j.name().parse::<Job>().unwrap(), j);
            assert_eq!(j.to_string(), j.name());
        }
    }

    #[test]
    fn an_unknown_name_is_an_error_not_a_default() {
        for s in ["", "verify", "Retention", "rotate.kek"] {
            assert!(s.parse::<Job>().is_err(), "{s:?}");
        }
    }

    #[test]
    fn the_documented_example_schedules_every_job() {
        let cfg: Config =
            toml::from_str(include_str!("../../../docs/pgseald.toml.example")).unwrap();
        let jobs: Vec<Job> = Job::scheduled(&cfg).into_iter().map(|(j, _)| j).collect();
        assert_eq!(jobs, Job::ALL);
    }

    #[test]
    fn the_names_are_those_job_runs_and_the_config_use() {
        let names: Vec<_> = Job::ALL.iter().map(|j| j.name()).collect();
        assert_eq!(
            names,
            ["retention", "rotation", "verification", "offboarding"]
        );
    }
}
