//! The builds the daemon runs: at most `--max-concurrent-builds` at once, the others
//! waiting in the order they were asked for (a fair semaphore: first come, first built),
//! each one cancellable while it waits or runs.
//!
//! A build is registered ([`Builds::register`]) before its task starts, so a delete that
//! comes right after CreateMicrovmImage finds it. The task holds the [`Ticket`]; waiting for
//! a slot ([`Builds::admit`]) or running, it watches the ticket's cancel signal. A delete
//! cancels ([`Builds::cancel`]) and waits for the task to drop its ticket, which it does
//! only after the build's files are gone and its end is recorded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// A build: account, image name, version.
pub(crate) type BuildKey = (String, String, u32);

/// The default bound on builds at once: half the host's CPUs, at least 2 (each builder is
/// a VM with its own vCPU; two keep a small host busy without starving its microvms).
pub fn default_max_concurrent_builds() -> usize {
    (std::thread::available_parallelism().map_or(1, |n| n.get()) / 2).max(2)
}

/// One registered build.
struct Live {
    cancel: watch::Sender<bool>,
    /// Ends (its sender drops) when the build's task has finished.
    done: watch::Receiver<()>,
    /// Holds a slot (false: queued).
    started: bool,
}

/// The daemon's builds: the bound, the queue, and how to stop each.
pub struct Builds {
    slots: Arc<Semaphore>,
    max: usize,
    live: Arc<Mutex<HashMap<BuildKey, Live>>>,
}

impl Default for Builds {
    fn default() -> Self {
        Builds::new(default_max_concurrent_builds())
    }
}

/// A registered build, held by its task; dropping it unregisters the build and wakes
/// whoever waits for its end.
pub(crate) struct Ticket {
    key: BuildKey,
    live: Arc<Mutex<HashMap<BuildKey, Live>>>,
    /// Turns `true` when the build is cancelled.
    pub(crate) cancel: watch::Receiver<bool>,
    _done: watch::Sender<()>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.key);
        // `_done` drops after this: waiters wake once the entry is gone.
    }
}

impl Builds {
    /// At most `max` builds at once (at least 1).
    pub fn new(max: usize) -> Builds {
        let max = max.max(1);
        Builds { slots: Arc::new(Semaphore::new(max)), max, live: Default::default() }
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<BuildKey, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers build `key` (queued, not started).
    pub(crate) fn register(&self, key: BuildKey) -> Ticket {
        let (cancel_tx, cancel) = watch::channel(false);
        let (done_tx, done) = watch::channel(());
        self.lock().insert(key.clone(), Live { cancel: cancel_tx, done, started: false });
        Ticket { key, live: self.live.clone(), cancel, _done: done_tx }
    }

    /// Waits in the queue for a slot; `None` when the build was cancelled first (it has
    /// left the queue).
    pub(crate) async fn admit(&self, t: &Ticket) -> Option<OwnedSemaphorePermit> {
        let mut cancel = t.cancel.clone();
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok()?,
            _ = cancel.wait_for(|c| *c) => return None,
        };
        if *t.cancel.borrow() {
            return None;
        }
        if let Some(l) = self.lock().get_mut(&t.key) {
            l.started = true;
        }
        Some(permit)
    }

    /// Whether build `key` is registered and still waiting for a slot.
    pub(crate) fn is_queued(&self, key: &BuildKey) -> bool {
        self.lock().get(key).is_some_and(|l| !l.started)
    }

    /// Builds of `account` registered now, queued or running.
    #[cfg(test)]
    fn count(&self, account: &str) -> usize {
        self.lock().keys().filter(|(a, _, _)| a == account).count()
    }

    /// Cancels build `key` and waits until its task has ended (its files removed, its end
    /// recorded). False when no such build is registered.
    pub(crate) async fn cancel(&self, key: &BuildKey) -> bool {
        let done = {
            let live = self.lock();
            let Some(l) = live.get(key) else { return false };
            let _ = l.cancel.send(true);
            l.done.clone()
        };
        let mut done = done;
        while done.changed().await.is_ok() {}
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(v: u32) -> BuildKey {
        ("acct".into(), "img".into(), v)
    }

    #[tokio::test]
    async fn builds_past_the_bound_wait_in_order_and_a_cancelled_one_leaves_the_queue() {
        let b = Arc::new(Builds::new(1));
        let (t1, t2, t3) = (b.register(key(1)), b.register(key(2)), b.register(key(3)));
        let p1 = b.admit(&t1).await.expect("a free slot");
        assert!(!b.is_queued(&key(1)) && b.is_queued(&key(2)));
        let quick = Duration::from_millis(50);
        assert!(tokio::time::timeout(quick, b.admit(&t2)).await.is_err(), "past the bound");
        // The second waits; the third is cancelled while queued and leaves.
        let (b2, b3) = (b.clone(), b.clone());
        let second = tokio::spawn(async move { b2.admit(&t2).await.map(|p| (p, t2)) });
        tokio::time::sleep(quick).await;
        let third = tokio::spawn(async move {
            let r = b3.admit(&t3).await;
            assert!(r.is_none(), "a cancelled build got a slot");
            drop(t3);
        });
        tokio::time::sleep(quick).await;
        assert!(b.cancel(&key(3)).await);
        third.await.unwrap();
        assert_eq!(b.count("acct"), 2);
        drop(p1);
        drop(t1);
        let (p2, t2) = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().expect("the slot freed");
        assert!(!b.is_queued(&key(2)));
        drop((p2, t2));
        assert_eq!(b.count("acct"), 0);
        assert!(!b.cancel(&key(2)).await, "nothing left to cancel");
    }
}
