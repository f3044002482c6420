//! `pgseald.toml`: the scheduler's configuration. Environment variables override the
//! file (`PGSEALD_DATABASE_URL`, `PGSEALD_CHECKPOINT_DIR`, `PGSEALD_LOG_FORMAT`), and
//! command-line flags override both. Every schedule is a cron expression (seconds
//! first, as the `cron` crate reads it) in the configured time zone.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Deserialize;

use crate::error::DaemonError;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub database_url: Option<String>,
    #[serde(default = "utc")]
    pub timezone: String,
    #[serde(default = "text")]
    pub log_format: String,
    /// Seconds within which a standby takes over after the leader dies.
    #[serde(default = "ten")]
    pub leader_takeover_seconds: u64,
    /// Address of the optional Prometheus `/metrics` page, e.g. "127.0.0.1:9187".
    pub metrics_addr: Option<String>,
    pub retention: Option<RetentionJob>,
    pub rotation: Option<RotationJob>,
    pub verification: Option<VerificationJob>,
    pub offboarding: Option<OffboardingJob>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionJob {
    pub schedule: String,
    /// Rows per delete transaction. Unset (the default): adaptive, each batch sized
    /// to take about `batch_ms`.
    pub batch: Option<i64>,
    #[serde(default = "batch_target_ms")]
    pub batch_ms: u64,
    #[serde(default = "ms_200")]
    pub lock_timeout_ms: u64,
    #[serde(default = "ms_10")]
    pub pause_ms: u64,
    /// When set, each run also prunes every tenant's ledger to this many days with
    /// `ledger_prune`, which keeps an anchor so the chain still verifies. A day
    /// count, fractions allowed (0.5 is 12 hours); never below
    /// `pgseal.ledger_min_retention`, which `ledger_prune` enforces.
    pub ledger_keep_days: Option<f64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotationJob {
    pub schedule: String,
    /// A tenant's data key older than this is rotated.
    #[serde(default = "days_90")]
    pub max_key_age_days: u32,
    /// Rows per reseal transaction. Unset (the default): adaptive, as in retention.
    pub batch: Option<i64>,
    #[serde(default = "batch_target_ms")]
    pub batch_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerificationJob {
    pub schedule: String,
    /// Directory of the append-only `checkpoints.jsonl`, outside the database.
    pub checkpoint_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OffboardingJob {
    pub schedule: String,
    /// Directory of the offboarded tenants' export files and final checkpoints.
    pub export_dir: PathBuf,
    /// Rows (and ledger entries) per transaction, fixed. Unset: adaptive.
    pub batch: Option<i64>,
    #[serde(default = "batch_target_ms")]
    pub batch_ms: u64,
}

fn utc() -> String {
    "UTC".into()
}
fn text() -> String {
    "text".into()
}
fn ten() -> u64 {
    10
}
fn batch_target_ms() -> u64 {
    crate::job::batch::DEFAULT_TARGET_MS
}
fn ms_200() -> u64 {
    200
}
fn ms_10() -> u64 {
    10
}
fn days_90() -> u32 {
    90
}

/// A TOML error as "line N: message", without the offending line (toml's own text
/// quotes it, and it may hold `database_url` with a password) and without quoted
/// values in the message.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let line = e
        .span()
        .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
    let mut msg = String::new();
    let mut quoted = false;
    for c in e.message().chars() {
        if c == '"' {
            quoted = !quoted;
            msg.push_str(if quoted { "\"…" } else { "\"" });
        } else if !quoted {
            msg.push(c);
        }
    }
    match line {
        Some(n) => format!("line {n}: {}", msg.trim()),
        None => msg.trim().to_owned(),
    }
}

impl Config {
    /// Reads and checks the file, then applies the environment overrides.
    pub fn load(path: &Path) -> Result<Config, DaemonError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| DaemonError::File(path.display().to_string(), e.to_string()))?;
        let mut c: Config = toml::from_str(&text).map_err(|e| {
            DaemonError::Config(format!("{}: {}", path.display(), toml_error(&text, &e)))
        })?;
        if let Ok(v) = std::env::var("PGSEALD_DATABASE_URL") {
            c.database_url = Some(v);
        }
        if let Ok(v) = std::env::var("PGSEALD_LOG_FORMAT") {
            c.log_format = v;
        }
        if let (Ok(v), Some(job)) = (
            std::env::var("PGSEALD_CHECKPOINT_DIR"),
            c.verification.as_mut(),
        ) {
            job.checkpoint_dir = v.into();
        }
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), DaemonError> {
        self.tz()?;
        for (name, s) in self.schedules() {
            cron::Schedule::from_str(s).map_err(|e| {
                DaemonError::Config(format!(
                    "[{name}] schedule {s:?} is not a valid cron expression: {e}"
                ))
            })?;
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(DaemonError::Config(format!(
                "log_format must be \"text\" or \"json\", not {:?}",
                self.log_format
            )));
        }
        if let Some(url) = &self.database_url {
            url.parse::<tokio_postgres::Config>()
                .map_err(|_| DaemonError::BadUrl)?;
        }
        if let Some(a) = &self.metrics_addr {
            a.parse::<std::net::SocketAddr>().map_err(|_| {
                DaemonError::Config(format!(
                    "metrics_addr {a:?} is not an address like 127.0.0.1:9187"
                ))
            })?;
        }
        if self.leader_takeover_seconds == 0 {
            return Err(DaemonError::Config(
                "leader_takeover_seconds must be at least 1".into(),
            ));
        }
        if let Some(days) = self.retention.as_ref().and_then(|j| j.ledger_keep_days) {
            // Up to about 2,700 years: `now()` less more than about 2.46 million
            // days is before PostgreSQL's earliest timestamp (4714 BC).
            if !days.is_finite() || !(0.0..=1e6).contains(&days) {
                return Err(DaemonError::Config(
                    "[retention] ledger_keep_days must be a number of days from 0 to 1000000"
                        .into(),
                ));
            }
        }
        let batches = [
            (
                "retention",
                self.retention.as_ref().map(|j| (j.batch, j.batch_ms)),
            ),
            (
                "rotation",
                self.rotation.as_ref().map(|j| (j.batch, j.batch_ms)),
            ),
        ];
        for (name, (batch, batch_ms)) in
            batches.into_iter().filter_map(|(name, b)| Some((name, b?)))
        {
            // A batch is a FETCH or LIMIT count, which PostgreSQL takes as a 32-bit int.
            if batch.is_some_and(|n| n <= 0 || n > i64::from(i32::MAX)) || batch_ms == 0 {
                return Err(DaemonError::Config(format!(
                    "[{name}] batch and batch_ms must be positive (batch at most 2147483647)"
                )));
            }
        }
        Ok(())
    }

    pub fn tz(&self) -> Result<chrono_tz::Tz, DaemonError> {
        self.timezone
            .parse()
            .map_err(|_| DaemonError::Config(format!("unknown timezone {:?}", self.timezone)))
    }

    /// Each configured section's name and cron expression.
    fn schedules(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            (
                "retention",
                self.retention.as_ref().map(|j| j.schedule.as_str()),
            ),
            (
                "rotation",
                self.rotation.as_ref().map(|j| j.schedule.as_str()),
            ),
            (
                "verification",
                self.verification.as_ref().map(|j| j.schedule.as_str()),
            ),
            (
                "offboarding",
                self.offboarding.as_ref().map(|j| j.schedule.as_str()),
            ),
        ]
        .into_iter()
        .filter_map(|(name, s)| Some((name, s?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, DaemonError> {
        let c: Config = toml::from_str(s).map_err(|e| DaemonError::Config(e.to_string()))?;
        c.check()?;
        Ok(c)
    }

    #[test]
    fn a_config_error_never_repeats_the_file() {
        for text in [
            "database_url = \"postgres://u:hunter2@db/app\"\ntimezone = 5\n",
            "database_url = \"postgres://u:hunter2@db/app\n",
            "database_url = 7\nx = \"hunter2\"\n",
        ] {
            let e = toml::from_str::<Config>(text).unwrap_err();
            let m = toml_error(text, &e);
            assert!(!m.contains("hunter2"), "{m}");
            assert!(m.starts_with("line "), "{m}");
        }
    }

    #[test]
    fn full_config_parses_with_defaults() {
        let c = parse(
            r#"
            database_url = "host=localhost user=pgseald"
            timezone = "Europe/Berlin"
            [retention]
            schedule = "0 */15 * * * *"
            [rotation]
            schedule = "0 0 3 * * *"
            [verification]
            schedule = "0 0 * * * *"
            checkpoint_dir = "/var/lib/pgseald"
            "#,
        )
        .unwrap();
        let retention = c.retention.unwrap();
        assert_eq!(retention.batch, None);
        assert_eq!(retention.batch_ms, crate::job::batch::DEFAULT_TARGET_MS);
        assert_eq!(c.rotation.unwrap().max_key_age_days, 90);
        assert_eq!(c.leader_takeover_seconds, 10);
    }

    #[test]
    fn the_documented_example_parses() {
        let c = parse(include_str!("../../docs/pgseald.toml.example")).unwrap();
        assert_eq!(c.timezone, "Europe/Berlin");
        let sections: Vec<&str> = c.schedules().map(|(name, _)| name).collect();
        // Every job has its section in the example, in Job::ALL's order.
        let jobs: Vec<&str> = crate::job::Job::ALL.iter().map(|j| j.name()).collect();
        assert_eq!(sections, jobs);
        assert_eq!(
            c.verification.unwrap().checkpoint_dir,
            PathBuf::from("/var/lib/pgseald")
        );
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let e = parse("[retention]\nschedule = \"every tuesday\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid cron expression"), "{e}");
        assert!(parse("timezone = \"Mars/Olympus\"")
            .unwrap_err()
            .to_string()
            .contains("unknown timezone"));
        assert!(parse("log_format = \"xml\"").is_err());
        for bad in ["batch = 0", "batch_ms = 0", "batch = 2147483648"] {
            let e = parse(&format!("[rotation]\nschedule = \"0 0 3 * * *\"\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("must be positive"), "{e}");
        }
        for bad in ["-1", "nan", "inf", "1000001"] {
            let e = parse(&format!(
                "[retention]\nschedule = \"0 0 3 * * *\"\nledger_keep_days = {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("ledger_keep_days must be"), "{bad}: {e}");
        }
        // Whole days (an integer in TOML) and fractions both read.
        for (good, want) in [("3653", 3653.0), ("0.5", 0.5)] {
            let c = parse(&format!(
                "[retention]\nschedule = \"0 0 3 * * *\"\nledger_keep_days = {good}\n"
            ))
            .unwrap();
            assert_eq!(c.retention.unwrap().ledger_keep_days, Some(want));
        }
        assert!(parse("nonsense = 1").is_err());
        assert!(matches!(
            parse("database_url = \"postgres://[::1\""),
            Err(DaemonError::BadUrl)
        ));
    }
}
