//! Online rebuild: a new (or returning) replica joins the engine as a *rebuilding target*. It
//! receives every write, trim and flush at once, alongside the members, while a background
//! copy fills in the rest from a member, chunk by chunk:
//!
//! - each chunk is copied under the chunk's range lock, so no write to it is in flight while
//!   it is read and written, and every write queued after it reaches the target itself: the
//!   copy never overwrites data newer than what it copies;
//! - only the ranges the source holds data in are read and written; the source's holes are
//!   trimmed on the target (a returning replica may hold stale bytes there), never written as
//!   zeros;
//! - each chunk is verified where it lies: the target's XXH3-128 of each data range must
//!   equal the digest of what was read from the source, and the source's holes must be holes
//!   (or zeros) on the target;
//! - a few chunks are copied at once; while the volume serves other I/O, each chunk is
//!   followed by a pause, so that the copy goes on one chunk at a time about half of the time
//!   and leaves the workload most of the machine.
//!
//! Once the whole volume is copied the target is flushed and promoted to member — through
//! [`super::Membership::promote_member`], durably, under a lock of the whole volume so that
//! no write is in flight — and from then on it is a member like any other. A target that
//! fails anything is dropped from the engine and its rebuild reported failed; the write it
//! failed is acknowledged regardless (the target is not a member). Restarting a failed
//! rebuild copies everything again, so a rebuild interrupted at any point is harmless.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{Engine, EngineError, Member};
use crate::replica::io::ReplicaIoError;
use crate::replica::wire::MAX_EXTENTS;

/// The bytes copied under one range lock.
pub const REBUILD_CHUNK: u32 = 4 << 20;
/// Chunks copied at once.
const REBUILD_PARALLEL: usize = 4;
/// How often progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A replica being rebuilt, as the engine holds it.
pub(crate) struct Target {
    pub(crate) member: Member,
    /// Set when the target failed something: it receives nothing more, and its rebuild stops.
    failed: AtomicBool,
    why: Mutex<Option<String>>,
    /// Bytes of the volume covered so far, and bytes of data copied.
    done: AtomicU64,
    copied: AtomicU64,
    started: Instant,
    size: u64,
}

impl Target {
    pub(crate) fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Marks the target failed (the first reason stays); true if it was not already.
    pub(crate) fn fail(&self, why: String) -> bool {
        let first = !self.failed.swap(true, Ordering::AcqRel);
        if first {
            *self.why.lock().unwrap_or_else(PoisonError::into_inner) = Some(why);
        }
        first
    }

    fn status(&self, state: RebuildState) -> RebuildStatus {
        let elapsed = self.started.elapsed();
        let done = self.done.load(Ordering::Relaxed);
        let rate = if elapsed.as_secs_f64() > 0.0 {
            done as f64 / elapsed.as_secs_f64()
        } else {
            0.0
        };
        let left = self.size.saturating_sub(done);
        RebuildStatus {
            replica: self.member.id().to_string(),
            size: self.size,
            done,
            copied: self.copied.load(Ordering::Relaxed),
            bytes_per_second: rate,
            eta: (rate > 0.0 && state == RebuildState::Running)
                .then(|| Duration::from_secs_f64(left as f64 / rate)),
            elapsed,
            state,
            error: self
                .why
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// Where a rebuild is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RebuildState {
    Running,
    /// Copied, verified and promoted: the replica is a member.
    Done,
    Failed,
}

/// A rebuild's progress, for `palisade ctl` and the logs.
#[derive(Clone, Debug)]
pub struct RebuildStatus {
    pub replica: String,
    pub size: u64,
    /// Bytes of the volume gone through (copied or found to be holes).
    pub done: u64,
    /// Bytes of data copied.
    pub copied: u64,
    pub bytes_per_second: f64,
    /// The estimated time left, while running.
    pub eta: Option<Duration>,
    pub elapsed: Duration,
    pub state: RebuildState,
    pub error: Option<String>,
}

/// The data extents of `[offset, end)` on `replica`, all of them (asked again past
/// [`MAX_EXTENTS`]).
async fn extents_of(
    replica: &dyn crate::replica::io::ReplicaIo,
    offset: u64,
    end: u64,
) -> Result<Vec<(u64, u32)>, ReplicaIoError> {
    let mut extents = Vec::new();
    let mut at = offset;
    while at < end {
        // Within one chunk, so it fits.
        let found = replica.extents(at, (end - at) as u32).await?;
        let full = found.len() >= MAX_EXTENTS;
        let next = found
            .last()
            .map_or(end, |(o, l)| o.saturating_add(u64::from(*l)));
        extents.extend(found);
        if !full || next <= at {
            break;
        }
        at = next;
    }
    Ok(extents)
}

impl Engine {
    /// Adds `target` as a rebuilding replica and starts filling it from the members; it
    /// becomes a member once complete and verified. Returns the rebuild's task, which ends
    /// with the final status. Refused when a replica of that id is a member or being rebuilt.
    pub fn start_rebuild(
        &self,
        target: Member,
    ) -> Result<tokio::task::JoinHandle<RebuildStatus>, EngineError> {
        self.check_serving()?;
        let id = target.id().to_string();
        let refuse = |why: &str| EngineError::Config {
            volume: self.inner.volume_id.clone(),
            why: format!("cannot rebuild {id}: {why}"),
        };
        if self.snapshot().iter().any(|m| m.id() == id) {
            return Err(refuse("it is a member already"));
        }
        let target = Arc::new(Target {
            member: target,
            failed: AtomicBool::new(false),
            why: Mutex::new(None),
            done: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            started: Instant::now(),
            size: self.size(),
        });
        {
            let mut targets = self
                .inner
                .targets
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if targets.iter().any(|t| t.member.id() == id) {
                return Err(refuse("it is being rebuilt already"));
            }
            let mut next: Vec<Arc<Target>> = targets.iter().cloned().collect();
            next.push(Arc::clone(&target));
            *targets = Arc::new(next);
        }
        info!(volume = %self.inner.volume_id, replica = %id, size = target.size,
            "rebuild started: the replica receives every new write while the rest is copied");
        let engine = self.clone();
        Ok(tokio::spawn(async move {
            let outcome = engine.rebuild(&target).await;
            engine.drop_target(target.member.id());
            match outcome {
                Ok(()) => {
                    let status = target.status(RebuildState::Done);
                    info!(volume = %engine.inner.volume_id, replica = %status.replica,
                        copied = status.copied, seconds = status.elapsed.as_secs_f64(),
                        "rebuild complete: the replica is a member");
                    status
                }
                Err(why) => {
                    target.fail(why);
                    let status = target.status(RebuildState::Failed);
                    error!(volume = %engine.inner.volume_id, replica = %status.replica,
                        error = ?status.error, done = status.done,
                        "rebuild failed; it can be started again");
                    status
                }
            }
        }))
    }

    /// The rebuilds running now.
    pub fn rebuilds(&self) -> Vec<RebuildStatus> {
        self.targets()
            .iter()
            .map(|t| {
                t.status(match t.is_failed() {
                    true => RebuildState::Failed,
                    false => RebuildState::Running,
                })
            })
            .collect()
    }

    pub(crate) fn targets(&self) -> Arc<Vec<Arc<Target>>> {
        let targets = self
            .inner
            .targets
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&targets)
    }

    fn drop_target(&self, id: &str) {
        let mut targets = self
            .inner
            .targets
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let kept: Vec<Arc<Target>> = targets
            .iter()
            .filter(|t| t.member.id() != id)
            .cloned()
            .collect();
        *targets = Arc::new(kept);
    }

    /// Records that a target failed a mutation or flush that the members took.
    pub(crate) fn target_failed(&self, target: &Target, what: &str, cause: &ReplicaIoError) {
        if target.fail(format!("{what} failed: {cause}")) {
            warn!(volume = %self.inner.volume_id, replica = target.member.id(), %cause,
                "a rebuilding replica failed a {what}; its rebuild stops");
        }
    }

    async fn rebuild(&self, target: &Arc<Target>) -> Result<(), String> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let size = target.size;
        let chunk = u64::from(self.inner.config.rebuild_chunk);
        let logged = &Mutex::new(Instant::now());
        let chunks = (0..size.div_ceil(chunk)).map(|i| {
            let offset = i * chunk;
            // At most one chunk, so it fits.
            (offset, (size - offset).min(chunk) as u32)
        });
        // A few chunks at once, each under its own range lock; while the volume serves
        // other I/O, each chunk is followed by a pause, so the workload keeps most of the
        // machine.
        stream::iter(chunks)
            .map(|(offset, len)| async move {
                let before = self.foreground();
                let started = Instant::now();
                self.copy_chunk(target, offset, len).await?;
                target.done.fetch_add(u64::from(len), Ordering::Relaxed);
                if self.foreground() != before {
                    // Busy: together the lanes copy about a quarter of the time, one
                    // chunk at a time.
                    let pause = (4 * REBUILD_PARALLEL).saturating_sub(1).max(1) as u32;
                    tokio::time::sleep(started.elapsed() * pause).await;
                }
                let mut last = logged.lock().unwrap_or_else(PoisonError::into_inner);
                if last.elapsed() >= LOG_EVERY {
                    *last = Instant::now();
                    let s = target.status(RebuildState::Running);
                    info!(volume = %self.inner.volume_id, replica = %s.replica, done = s.done,
                        size = s.size, mib_per_second = s.bytes_per_second / 1048576.0,
                        eta_seconds = s.eta.map(|d| d.as_secs()), "rebuild progress");
                }
                Ok::<(), String>(())
            })
            .buffer_unordered(REBUILD_PARALLEL)
            .try_collect::<()>()
            .await?;
        let flushed = target.member.flush().await;
        flushed.map_err(|e| format!("flush failed: {e}"))?;
        self.promote(target).await
    }

    /// Requests served so far (reads and writes), to tell whether the volume is busy.
    fn foreground(&self) -> u64 {
        let c = &self.inner.counters;
        c.reads.load(Ordering::Relaxed) + c.writes.load(Ordering::Relaxed)
    }

    /// Copies and verifies one chunk under its range lock: the source's data extents are
    /// read, written to the target and checked by XXH3-128 where they landed; the source's
    /// holes are trimmed on the target and checked to be holes there (by its extents, or by
    /// checksum where its file system stores trimmed ranges as zeros).
    async fn copy_chunk(&self, target: &Target, offset: u64, len: u32) -> Result<(), String> {
        let lock = self.lock_range(offset, u64::from(len));
        lock.wait().await;
        self.check_serving().map_err(|e| e.to_string())?;
        if target.is_failed() {
            return Err(target
                .status(RebuildState::Failed)
                .error
                .unwrap_or_default());
        }
        let members = self.snapshot();
        let source = self
            .read_order(&members)
            .first()
            .copied()
            .ok_or_else(|| "no member to copy from".to_string())?;
        let src = |e: ReplicaIoError| format!("source {}: {e}", source.id());
        let dst = |e: ReplicaIoError| match e {
            ReplicaIoError::Fenced { .. } => format!("target fenced: {e}"),
            e => format!("target: {e}"),
        };
        let end = offset + u64::from(len);
        let data = extents_of(&**source, offset, end).await.map_err(src)?;
        let mut holes = Vec::new();
        let mut at = offset;
        for &(data_at, data_len) in &data {
            let data_end = data_at.saturating_add(u64::from(data_len));
            if data_at < at || data_end > end || data_len == 0 {
                return Err(format!(
                    "source {}: extent {data_at}+{data_len} outside {at}..{end}",
                    source.id()
                ));
            }
            if data_at > at {
                holes.push((at, (data_at - at) as u32));
            }
            at = data_end;
        }
        if at < end {
            holes.push((at, (end - at) as u32));
        }
        for &(hole_at, hole_len) in &holes {
            target.member.trim(hole_at, hole_len).await.map_err(dst)?;
        }
        let mut digests = Vec::with_capacity(data.len());
        for &(data_at, data_len) in &data {
            let bytes = source.read(data_at, data_len).await.map_err(src)?;
            digests.push(crate::replica::extents::digest(&bytes));
            target
                .member
                .write(data_at, bytes, false)
                .await
                .map_err(dst)?;
            target
                .copied
                .fetch_add(u64::from(data_len), Ordering::Relaxed);
        }
        // Verification, where the bytes lie.
        let found = futures::future::try_join_all(
            data.iter()
                .map(|&(data_at, data_len)| target.member.checksum(data_at, data_len)),
        )
        .await
        .map_err(dst)?;
        if let Some(((at, n), _)) = data
            .iter()
            .zip(found.iter().zip(&digests))
            .find(|(_, (found, expected))| found != expected)
        {
            return Err(format!(
                "verification failed: the target's {n} bytes at {at} differ from the source's"
            ));
        }
        if !holes.is_empty() {
            let stored = extents_of(&*target.member, offset, end)
                .await
                .map_err(dst)?;
            for &(hole_at, hole_len) in &holes {
                let hole_end = hole_at + u64::from(hole_len);
                for &(s_at, s_len) in &stored {
                    let from = s_at.max(hole_at);
                    let to = s_at.saturating_add(u64::from(s_len)).min(hole_end);
                    if from >= to {
                        continue;
                    }
                    // Stored bytes where the source has a hole: they must be zeros.
                    let n = (to - from) as u32;
                    let sum = target.member.checksum(from, n).await.map_err(dst)?;
                    if sum != crate::replica::extents::digest(&vec![0u8; n as usize]) {
                        return Err(format!(
                            "verification failed: the target's {n} bytes at {from} are not zeros where the source has a hole"
                        ));
                    }
                }
            }
        }
        drop(lock);
        Ok(())
    }

    /// Makes the target a member: durably first, with no write in flight.
    async fn promote(&self, target: &Arc<Target>) -> Result<(), String> {
        // The export's whole range: writes beyond a size grown meanwhile are excluded too.
        let all = self.lock_range(0, self.exported_size());
        all.wait().await;
        self.check_serving().map_err(|e| e.to_string())?;
        if target.is_failed() {
            return Err(target
                .status(RebuildState::Failed)
                .error
                .unwrap_or_default());
        }
        let id = target.member.id().to_string();
        let promoted = tokio::time::timeout(
            self.inner.config.membership_timeout,
            self.inner.membership.promote_member(&id),
        )
        .await
        .map_err(|_| "the promotion got no answer".to_string())?;
        promoted.map_err(|why| format!("the promotion failed: {why}"))?;
        {
            let mut members = self
                .inner
                .members
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let mut next: Vec<Member> = members.iter().cloned().collect();
            next.push(Arc::clone(&target.member));
            *members = Arc::new(next);
        }
        self.drop_target(&id);
        drop(all);
        Ok(())
    }
}
