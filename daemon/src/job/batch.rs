//! How many rows the next batch transaction of a job takes (retention's deletes,
//! reseals, `kek_rewrap`). A fixed size (an explicit `--batch` or `batch =`) never
//! changes. Without one the size adapts: each batch's time from BEGIN to COMMIT
//! gives a rate, and the next batch is sized to take about the target time, at
//! most twice the last size (so a lucky fast batch cannot overshoot) and at once
//! smaller when a batch ran long (a lock is held no longer than it must be).
//!
//! The target bounds how long a batch holds its locks and how much WAL it writes
//! at once, which is what concurrent writers wait behind; it is long enough that a
//! batch's fixed costs (round trips, the commit's flush) are a small part of it.

use std::time::Duration;

/// The target time of a batch transaction when none is configured.
pub const DEFAULT_TARGET_MS: u64 = 50;

/// Bounds of an adaptive size: the first batch, the smallest and the largest.
const FIRST: i64 = 1_000;
const MIN: i64 = 100;
const MAX: i64 = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// Always this many rows.
    Fixed(i64),
    /// Sized to take about `target`; `size` is the next batch's.
    Adaptive { size: i64, target: Duration },
}

impl Batch {
    /// `fixed` when given (an explicit size), else an adaptive size aiming at
    /// `target_ms` per batch.
    pub fn new(fixed: Option<i64>, target_ms: u64) -> Batch {
        match fixed {
            Some(n) => Batch::Fixed(n),
            None => Batch::Adaptive {
                size: FIRST,
                target: Duration::from_millis(target_ms.max(1)),
            },
        }
    }

    /// Rows the next batch takes.
    pub fn size(&self) -> i64 {
        match *self {
            Batch::Fixed(n) => n,
            Batch::Adaptive { size, .. } => size,
        }
    }

    /// Records a batch that asked for `self.size()` rows, did `rows`, and took
    /// `took` from BEGIN to COMMIT.
    pub fn observe(&mut self, rows: u64, took: Duration) {
        if let Batch::Adaptive { size, target } = self {
            *size = next_size(*size, rows, took, *target);
        }
    }
}

/// The adaptive rule: the size that would have taken `target` at the rate of the
/// last batch (`rows` in `took`), within [MIN, MAX], at most twice `size`, and
/// never larger than `size` after a batch that did fewer rows than it asked for
/// (a tenant's last batch says little about a full one) or ran over `target`.
pub fn next_size(size: i64, rows: u64, took: Duration, target: Duration) -> i64 {
    let size = size.clamp(MIN, MAX);
    let secs = took.as_secs_f64();
    if rows == 0 || secs <= 0.0 {
        return size;
    }
    let at_rate = (rows as f64 / secs * target.as_secs_f64()) as i64;
    let mut next = at_rate.min(size.saturating_mul(2));
    if (rows as i64) < size || took > target {
        next = next.min(size);
    }
    next.clamp(MIN, MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(50);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_fixed_size_never_changes() {
        let mut b = Batch::new(Some(5000), 50);
        b.observe(5000, ms(1000));
        b.observe(5000, ms(1));
        assert_eq!(b.size(), 5000);
    }

    #[test]
    fn a_fast_batch_at_most_doubles_the_size() {
        assert_eq!(next_size(1000, 1000, ms(5), T), 2000);
        // At a rate that fits 1,500 rows in the target, it grows to that.
        assert_eq!(next_size(1000, 1000, ms(33), T), 1515);
    }

    #[test]
    fn a_slow_batch_shrinks_to_the_target_at_once() {
        // 10,000 rows in 400 ms: 1,250 fit in 50 ms.
        assert_eq!(next_size(10_000, 10_000, ms(400), T), 1250);
        // Slower than MIN can follow: MIN.
        assert_eq!(next_size(1000, 1000, ms(60_000), T), MIN);
    }

    #[test]
    fn a_short_batch_never_grows_the_size() {
        // The tenant's last 300 rows, quickly: no evidence about a full batch.
        assert_eq!(next_size(4000, 300, ms(2), T), 4000);
        // ... but a slow short batch still shrinks it.
        assert_eq!(next_size(4000, 300, ms(100), T), 150);
        // No rows at all: unchanged.
        assert_eq!(next_size(4000, 0, ms(3), T), 4000);
    }

    #[test]
    fn the_size_stays_within_its_bounds() {
        assert_eq!(next_size(MAX, MAX as u64, ms(1), T), MAX);
        assert_eq!(next_size(0, 0, ms(0), T), MIN);
    }

    #[test]
    fn it_converges_on_the_target() {
        // A job whose batches cost 2 ms plus 4 µs a row: 12,000 rows in 50 ms.
        let mut b = Batch::new(None, 50);
        for _ in 0..12 {
            let n = b.size();
            b.observe(n as u64, Duration::from_micros(2000 + 4 * n as u64));
        }
        let n = b.size();
        assert!((11_000..=12_000).contains(&n), "{n}");
        let took = 2.0 + 0.004 * n as f64;
        assert!(took <= 50.0, "{took} ms");
    }
}
