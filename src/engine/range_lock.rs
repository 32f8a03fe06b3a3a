//! Byte-range locks that serialise overlapping mutations in arrival order, so that every
//! member applies overlapping writes in the same order and the members never diverge.
//!
//! A lock is taken in two steps: [`RangeLocks::enqueue`] (synchronous, so the NBD reader
//! can take tickets in wire order) and [`RangeLock::wait`], which returns once every earlier
//! overlapping lock has been released. Dropping the lock releases it, whether or not it was
//! ever granted, so a cancelled waiter never blocks the ones behind it. Waiting only on
//! earlier tickets cannot deadlock.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    released: Arc<Notify>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    /// Every live lock, in ticket order.
    entries: VecDeque<Entry>,
}

/// The range locks of one volume.
#[derive(Default)]
pub(crate) struct RangeLocks {
    state: Mutex<State>,
}

impl RangeLocks {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is consistent between statements: a panic elsewhere cannot tear it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a lock on `[offset, offset + len)` behind every lock queued before it.
    pub(crate) fn enqueue(self: &Arc<Self>, offset: u64, len: u64) -> RangeLock {
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        let end = offset.saturating_add(len);
        state.entries.push_back(Entry {
            id,
            start: offset,
            end,
            released: Arc::new(Notify::new()),
        });
        RangeLock {
            locks: Arc::clone(self),
            id,
            start: offset,
            end,
        }
    }

    /// How many locks are queued or held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state().entries.len()
    }
}

/// A queued lock on a byte range; released when dropped.
pub(crate) struct RangeLock {
    locks: Arc<RangeLocks>,
    id: u64,
    start: u64,
    end: u64,
}

impl RangeLock {
    /// Waits until no earlier lock overlaps this one.
    pub(crate) async fn wait(&self) {
        loop {
            let released;
            let notified;
            {
                let state = self.locks.state();
                let blocker = state
                    .entries
                    .iter()
                    .take_while(|e| e.id < self.id)
                    .find(|e| e.start < self.end && self.start < e.end);
                match blocker {
                    None => return,
                    Some(e) => released = Arc::clone(&e.released),
                }
                // Created under the mutex: the release (which removes the entry under the
                // mutex, then notifies) cannot slip in between the check and the wait.
                notified = released.notified();
            }
            notified.await;
        }
    }
}

impl Drop for RangeLock {
    fn drop(&mut self) {
        let released = {
            let mut state = self.locks.state();
            let at = state.entries.binary_search_by_key(&self.id, |e| e.id);
            match at {
                Ok(at) => state.entries.remove(at).map(|e| e.released),
                Err(_) => None,
            }
        };
        if let Some(released) = released {
            released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn granted(lock: &RangeLock) -> bool {
        tokio::time::timeout(Duration::from_millis(20), lock.wait())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn overlapping_locks_wait_in_order_and_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.enqueue(0, 4096);
        let b = locks.enqueue(4000, 10);
        let c = locks.enqueue(4096, 4096);
        let d = locks.enqueue(4005, 1);
        assert!(granted(&a).await);
        assert!(!granted(&b).await, "b overlaps a");
        assert!(granted(&c).await, "c touches a but does not overlap it");
        assert!(!granted(&d).await, "d overlaps a and b");
        drop(a);
        assert!(granted(&b).await);
        assert!(!granted(&d).await, "d overlaps b, queued before it");
        drop(b);
        assert!(granted(&d).await);
        drop((c, d));
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn a_waiter_is_woken_by_a_release() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.enqueue(0, 10);
        let b = locks.enqueue(5, 10);
        let waiter = tokio::spawn(async move {
            b.wait().await;
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_dropped_waiter_does_not_block_later_ones() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.enqueue(0, 10);
        let b = locks.enqueue(0, 10);
        let c = locks.enqueue(0, 10);
        assert!(!granted(&b).await);
        drop(b);
        drop(a);
        assert!(granted(&c).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_overlapping_holders_are_exclusive() {
        let locks = Arc::new(RangeLocks::default());
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let lock = locks.enqueue(i % 7, 8);
            let inside = Arc::clone(&inside);
            tasks.push(tokio::spawn(async move {
                lock.wait().await;
                assert_eq!(inside.fetch_add(1, std::sync::atomic::Ordering::SeqCst), 0);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(locks.len(), 0);
    }
}
