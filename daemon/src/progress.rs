//! Progress for long one-shot work: a bar on a terminal, plain log lines when piped.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    done: std::cell::Cell<u64>,
}

impl Progress {
    /// `total` 0 means unknown.
    pub fn new(what: &str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = if total > 0 {
                ProgressBar::new(total)
            } else {
                ProgressBar::new_spinner()
            };
            b.set_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({per_sec})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_message(what.to_owned());
            b
        });
        Progress {
            bar,
            what: what.to_owned(),
            done: std::cell::Cell::new(0),
        }
    }

    pub fn inc(&self, n: u64) {
        self.done.set(self.done.get() + n);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    pub fn finish(&self) {
        match &self.bar {
            Some(b) => b.finish_and_clear(),
            None => tracing::info!("{}: {} done", self.what, self.done.get()),
        }
    }
}
