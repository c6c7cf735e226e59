//! How long a build may run and how it is stopped from outside.
//!
//! A build has two clocks: each Dockerfile step must end within the step timeout, and the
//! whole build (context hashing, the builder's boot, every step, the app's start and the
//! snapshot) within the build timeout. Either running out, or the owner cancelling
//! ([`Control::cancel`]: the daemon does when the image or version is deleted), drops the
//! build where it stands: the builder VM is killed (its QEMU guard sends SIGKILL, its run
//! directory goes with it), the unrecorded layer file and the staging snapshot are removed.
//! A step's output is kept in memory only as a bounded tail ([`OutputTail`]): what the
//! error quotes, never the whole flood. The daemon's hook on each builder VM (its metadata
//! relay: [`super::attach`]) travels with the limits.

use super::attach::BuilderHook;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Default time one Dockerfile step (RUN, COPY, …) may take: 30 minutes, long enough for
/// a large `apt-get install` or a compile under TCG, short enough that `RUN sleep infinity`
/// gives its builder back the same half hour.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Default time a whole build may take: 60 minutes.
pub const DEFAULT_BUILD_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Shortest timeout a tenant may set, in seconds.
pub const MIN_TIMEOUT_SECS: u64 = 1;

/// Longest timeout a tenant may set, in seconds: 24 hours.
pub const MAX_TIMEOUT_SECS: u64 = 24 * 60 * 60;

/// Most bytes of a step's output kept in memory (the tail the error quotes).
pub const MAX_OUTPUT_TAIL: usize = 64 << 10;

/// The limits a build runs under, the signal that cancels it, and what is attached to
/// each of its builder VMs.
#[derive(Clone)]
pub struct Control {
    /// How long each Dockerfile step may take.
    pub step_timeout: Duration,
    /// How long the whole build may take.
    pub build_timeout: Duration,
    /// Cancels the build when it turns `true` (`None`: never cancelled).
    pub cancel: Option<watch::Receiver<bool>>,
    /// Called once each builder VM has booted (`None`: nothing attached).
    pub builder_hook: Option<Arc<dyn BuilderHook>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("step_timeout", &self.step_timeout)
            .field("build_timeout", &self.build_timeout)
            .field("cancel", &self.cancel)
            .field("builder_hook", &self.builder_hook.is_some())
            .finish()
    }
}

impl Default for Control {
    fn default() -> Self {
        Control { step_timeout: DEFAULT_STEP_TIMEOUT, build_timeout: DEFAULT_BUILD_TIMEOUT, cancel: None, builder_hook: None }
    }
}

impl Control {
    /// Resolves once the build is cancelled; never when it cannot be (no receiver, or its
    /// sender gone without cancelling).
    pub async fn cancelled(&self) {
        match self.cancel.clone() {
            Some(mut rx) => {
                if rx.wait_for(|c| *c).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// The last [`MAX_OUTPUT_TAIL`] bytes of a step's output.
#[derive(Debug, Default)]
pub(crate) struct OutputTail(Vec<u8>);

impl OutputTail {
    /// Appends `b`, dropping the oldest bytes past the bound.
    pub(crate) fn push(&mut self, b: &[u8]) {
        if b.len() >= MAX_OUTPUT_TAIL {
            self.0.clear();
            self.0.extend_from_slice(&b[b.len() - MAX_OUTPUT_TAIL..]);
            return;
        }
        let over = (self.0.len() + b.len()).saturating_sub(MAX_OUTPUT_TAIL);
        self.0.drain(..over);
        self.0.extend_from_slice(b);
    }

    /// The last `n` lines kept.
    pub(crate) fn lines(&self, n: usize) -> String {
        super::tail(&String::from_utf8_lossy(&self.0), n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_tail_is_bounded_with_or_without_newlines() {
        let mut t = OutputTail::default();
        for _ in 0..100_000 {
            t.push(b"yyyyyyyyyyyyyyyyyyyy");
        }
        assert_eq!(t.0.len(), MAX_OUTPUT_TAIL);
        t.push(&vec![b'x'; 3 * MAX_OUTPUT_TAIL]);
        assert_eq!(t.0.len(), MAX_OUTPUT_TAIL);
        t.push(b"\nlast line\n");
        assert_eq!(t.0.len(), MAX_OUTPUT_TAIL);
        assert_eq!(t.lines(1), "last line");
    }

    #[tokio::test]
    async fn cancelled_resolves_only_when_cancelled() {
        let (tx, rx) = watch::channel(false);
        let c = Control { cancel: Some(rx), ..Default::default() };
        let quick = Duration::from_millis(20);
        assert!(tokio::time::timeout(quick, c.cancelled()).await.is_err());
        tx.send(true).unwrap();
        assert!(tokio::time::timeout(quick, c.cancelled()).await.is_ok());
        let never = Control::default();
        assert!(tokio::time::timeout(quick, never.cancelled()).await.is_err());
        let (tx, rx) = watch::channel(false);
        drop(tx);
        let orphan = Control { cancel: Some(rx), ..Default::default() };
        assert!(tokio::time::timeout(quick, orphan.cancelled()).await.is_err());
    }
}
