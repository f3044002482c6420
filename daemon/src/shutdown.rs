//! SIGINT and SIGTERM as a cancellation token. The first signal cancels the token,
//! which every job checks between batches: the batch in hand is committed and the
//! job returns what it did. A second signal ends the process at once.

use std::sync::{Arc, OnceLock};

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::error::Exit;

/// The signals that stop pgseald.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Interrupt,
    Terminate,
}

impl Signal {
    /// The exit code of a one-shot command this signal stopped.
    pub fn exit(self) -> Exit {
        match self {
            Signal::Interrupt => Exit::Interrupted,
            Signal::Terminate => Exit::Terminated,
        }
    }
}

/// The token handed to the jobs, and the signal that cancelled it.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    signal: Arc<OnceLock<Signal>>,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// The token the jobs check; cancelled by the first signal.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// The signal that cancelled the token, if one did.
    pub fn signal(&self) -> Option<Signal> {
        self.signal.get().copied()
    }

    /// Cancels the token on the first SIGINT or SIGTERM, and exits on the second.
    /// Needs the runtime; until it is called the signals keep their default (the
    /// process ends).
    pub fn watch_signals(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut term = match signal(SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGTERM: {e}");
                    return;
                }
            };
            let mut int = match signal(SignalKind::interrupt()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("cannot watch SIGINT: {e}");
                    return;
                }
            };
            let next = async |term: &mut tokio::signal::unix::Signal,
                              int: &mut tokio::signal::unix::Signal| {
                tokio::select! {
                    _ = term.recv() => Signal::Terminate,
                    _ = int.recv() => Signal::Interrupt,
                }
            };
            let first = next(&mut term, &mut int).await;
            this.cancel(first);
            tracing::info!("stopping after the current batch");
            let second = next(&mut term, &mut int).await;
            tracing::warn!("stopping now; the batch in hand is rolled back");
            std::process::exit(second.exit() as i32);
        });
    }

    /// Cancels the token as `signal` does.
    fn cancel(&self, signal: Signal) {
        let _ = self.signal.set(signal);
        self.token.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_sees_the_cancel_and_the_first_signal_is_kept() {
        let s = Shutdown::new();
        let job = s.token().clone();
        assert!(!job.is_cancelled());
        assert_eq!(s.signal(), None);
        s.clone().cancel(Signal::Terminate);
        s.cancel(Signal::Interrupt);
        assert!(job.is_cancelled());
        assert_eq!(s.signal(), Some(Signal::Terminate));
        assert_eq!(s.signal().unwrap().exit() as u8, 143);
    }

    #[tokio::test]
    async fn a_waiting_job_wakes_on_cancel() {
        let s = Shutdown::new();
        let token = s.token().clone();
        let waiter = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => false,
                _ = token.cancelled() => true,
            }
        });
        s.cancel(Signal::Interrupt);
        assert!(waiter.await.unwrap());
    }
}
