//! Whether this controller replica leads, and running work only while it does.
//!
//! Every controller replica serves CSI and the ControlPlane API (the store's optimistic
//! concurrency keeps two replicas' calls correct), but the background work — the start-up
//! `reconcile`, the periodic replica lifecycle pass, and the recovery controllers to come —
//! runs on one replica only, the leader, so that two replicas do not race each other through
//! the same steps. An elector (in Kubernetes, `k8s::election` with a Lease) says who
//! leads; without one the single controller always does.
//!
//! Leadership is not a lock on the store: a paused leader may still finish a step after its
//! successor started. The steps are idempotent and every write is a compare-and-swap, so that
//! costs a retry, never a torn state.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::watch;
use tracing::info;

/// Whether this replica leads, as an elector reports it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
    /// Keeps the channel open for [`Leadership::always`].
    _always: Option<Arc<watch::Sender<bool>>>,
}

impl Leadership {
    /// A replica that leads for good (no elector: the only controller).
    pub fn always() -> Leadership {
        let (tx, rx) = watch::channel(true);
        Leadership {
            leading: rx,
            _always: Some(Arc::new(tx)),
        }
    }

    /// Leadership as an elector reports it through `leading`. When the elector goes away
    /// (its sender is dropped), this replica no longer leads.
    pub fn from_channel(leading: watch::Receiver<bool>) -> Leadership {
        Leadership {
            leading,
            _always: None,
        }
    }

    /// The channel itself (true while this replica leads), for work that follows it on its
    /// own, such as `k8s::recovery::run`. Its sender goes away with the elector; for
    /// [`Leadership::always`], with the last clone of this.
    pub fn receiver(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// True while this replica leads.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow() && self.leading.has_changed().is_ok()
    }

    /// Returns once this replica leads (never, if its elector went away).
    pub async fn acquired(&mut self) {
        loop {
            if *self.leading.borrow_and_update() {
                return;
            }
            if self.leading.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Returns once this replica no longer leads (at once if it does not).
    pub async fn lost(&mut self) {
        loop {
            if !*self.leading.borrow_and_update() {
                return;
            }
            if self.leading.changed().await.is_err() {
                return;
            }
        }
    }

    /// Runs `work` once per term: every time this replica becomes the leader it starts a new
    /// `work()`, and drops it (at its next await) as soon as the term ends. Work that
    /// finishes early waits for the next term. Returns never; abort the task to stop it.
    pub async fn each_term<F, Fut>(mut self, what: &'static str, mut work: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            self.acquired().await;
            info!(work = what, "leading: starting");
            let mut finished = false;
            tokio::select! {
                _ = work() => finished = true,
                _ = self.lost() => info!(work = what, "no longer leading: stopped"),
            }
            if finished {
                self.lost().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn work_runs_only_while_leading_and_once_per_term() {
        let (tx, rx) = watch::channel(false);
        let starts = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(Leadership::from_channel(rx).each_term("test", {
            let (starts, running) = (starts.clone(), running.clone());
            move || {
                let (starts, running) = (starts.clone(), running.clone());
                async move {
                    starts.fetch_add(1, Ordering::SeqCst);
                    struct Running(Arc<AtomicUsize>);
                    impl Drop for Running {
                        fn drop(&mut self) {
                            self.0.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    running.fetch_add(1, Ordering::SeqCst);
                    let _running = Running(running);
                    std::future::pending::<()>().await;
                }
            }
        }));
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 0, "started while following");
        tx.send(true).unwrap();
        settle().await;
        assert_eq!(
            (
                starts.load(Ordering::SeqCst),
                running.load(Ordering::SeqCst)
            ),
            (1, 1)
        );
        tx.send(false).unwrap();
        settle().await;
        assert_eq!(
            running.load(Ordering::SeqCst),
            0,
            "still running as a follower"
        );
        tx.send(true).unwrap();
        settle().await;
        assert_eq!(starts.load(Ordering::SeqCst), 2, "a new term, a new start");
        // The elector goes away: the work stops.
        drop(tx);
        settle().await;
        assert_eq!(running.load(Ordering::SeqCst), 0);
        task.abort();
    }

    #[tokio::test]
    async fn always_leads_and_one_shot_work_waits_for_the_next_term() {
        let always = Leadership::always();
        assert!(always.is_leader());
        let (tx, rx) = watch::channel(true);
        let leadership = Leadership::from_channel(rx);
        assert!(leadership.is_leader());
        let runs = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(leadership.clone().each_term("once", {
            let runs = runs.clone();
            move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "ran again within one term");
        tx.send(false).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send(true).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        drop(tx);
        assert!(!leadership.is_leader(), "its elector is gone");
        task.abort();
    }
}
