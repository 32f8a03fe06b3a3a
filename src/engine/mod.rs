//! The engine: one per attached volume, on the attached node. It keeps the volume's member
//! replicas identical and exports the volume as an NBD server on a unix socket
//! ([`Engine::serve_unix`]); its I/O methods ([`Engine::read`], [`Engine::write`], …) serve
//! other front ends too.
//!
//! The rules, which every other part of Palisade relies on:
//!
//! - **Every member holds every acknowledged write.** A write (trim, write-zeroes) goes to
//!   every member in parallel and is acknowledged when each member that is still a member has
//!   it. A member that fails (any error but `Fenced`) is removed from the volume's membership
//!   through [`Membership::remove_member`] — persisted in the store — *before* the write is
//!   acknowledged. If the removal fails the write is not acknowledged (EIO) and the member
//!   stays; the next write that fails on it tries the removal again.
//! - **The last member is never removed.** Members are removed only to acknowledge a write
//!   that another member took; a write that no member took fails with EIO and changes
//!   nothing, so membership never empties and the volume never loses its only copy of an
//!   acknowledged write. (Removals are serialised, so two writes that failed on different
//!   members cannot remove one member each and leave none.)
//! - **Fenced means superseded.** A member that answers `Fenced` has seen a newer attachment:
//!   the engine stops for good — every later request fails with EPERM and nothing more is
//!   written anywhere.
//! - **No lease, no I/O.** The engine holds an attachment lease of [`EngineConfig::lease`],
//!   renewed through [`Membership::renew_lease`]. Once it lapses the engine stops for good,
//!   like a fenced one (a new attachment brings a new engine).
//! - **Overlapping mutations are serialised** in arrival order by byte-range locks, so every
//!   member applies them in the same order; reads take no lock.
//! - Reads go to a local member when there is one, else to the remote members in turn; a
//!   member that fails a read is removed (as above, never the last) and the next is tried.
//! - Flush reaches every member (each syncs its data to disk) and is acknowledged when all
//!   have; FUA writes are FUA on every member.

mod io;
mod members;

mod file_replica;
pub mod nbd;
mod range_lock;
mod rebuild;
mod server;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::replica::io::{ReplicaIo, ReplicaIoError};

pub use file_replica::{FileIo, FileReplica};
use range_lock::{RangeLock, RangeLocks};
pub use rebuild::{RebuildState, RebuildStatus, REBUILD_CHUNK};

/// One member replica, as the engine holds it.
pub type Member = Arc<dyn ReplicaIo>;

/// The engine's link to the attachment authority (the controller): it persists membership
/// changes and renews the engine's attachment lease.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    /// Removes `replica_id` from the volume's membership, durably (in the store, checked
    /// against this engine's attachment epoch), with `reason` kept for operators. Returns Ok
    /// only once the removal is persisted; removing a replica that is no longer a member is
    /// Ok. The engine acknowledges writes the replica missed only after this returned Ok.
    async fn remove_member(&self, replica_id: &str, reason: &str) -> Result<(), String>;

    /// Makes `replica_id`, rebuilt by this engine, a member of the volume, durably (checked
    /// against this engine's attachment epoch). The engine counts it as a member — reads
    /// from it, requires it for acknowledgements — only after this returned Ok.
    async fn promote_member(&self, replica_id: &str) -> Result<(), String> {
        Err(format!(
            "this engine's membership cannot promote a rebuilt replica ({replica_id})"
        ))
    }

    /// Renews this engine's attachment lease from the moment of the call, for the length
    /// returned (the engine keeps the shorter of it and [`EngineConfig::lease`]). Must fail
    /// once the attachment has moved on (a newer epoch exists).
    async fn renew_lease(&self) -> Result<Duration, String>;
}

/// Tunables of an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a renewal keeps the lease; the engine stops serving when the lease lapses.
    pub lease: Duration,
    /// How often the lease is renewed (a few renewals fit in one lease).
    pub renew_interval: Duration,
    /// How long a call to [`Membership::remove_member`] may take before the I/O that
    /// needed it fails.
    pub membership_timeout: Duration,
    /// Requests in flight per NBD connection before the engine stops reading from it.
    pub max_in_flight_requests: usize,
    /// Payload bytes (reads and writes) in flight per NBD connection.
    pub max_in_flight_bytes: usize,
    /// How long a client may take to finish the NBD handshake.
    pub handshake_timeout: Duration,
    /// How long a shutdown waits for in-flight requests before it drops the connections.
    pub shutdown_grace: Duration,
    /// The bytes a rebuild copies under one range lock (writes to them wait meanwhile).
    pub rebuild_chunk: u32,
    /// The size the NBD export advertises, when larger than the volume (0: the volume's
    /// size). An export fixed at connection time can then outlive an online expansion:
    /// the node bounds the device to the volume's size, reads beyond the volume's end
    /// return zeroes, and writes there are refused.
    pub export_size: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            lease: Duration::from_secs(15),
            renew_interval: Duration::from_secs(5),
            membership_timeout: Duration::from_secs(10),
            max_in_flight_requests: 128,
            max_in_flight_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            rebuild_chunk: REBUILD_CHUNK,
            export_size: 0,
        }
    }
}

/// Whether the engine serves I/O. Once it stops, it never serves again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineState {
    /// Serving I/O.
    Serving,
    /// A member reported a newer attachment: this engine has been superseded.
    Fenced,
    /// The attachment lease lapsed without renewal.
    LeaseExpired,
}

const SERVING: u8 = 0;
const FENCED: u8 = 1;
const LEASE_EXPIRED: u8 = 2;

/// Counters since the engine started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Reads served.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes acknowledged.
    pub writes: u64,
    /// Bytes written (acknowledged).
    pub written_bytes: u64,
    /// Flushes acknowledged.
    pub flushes: u64,
    /// Trims acknowledged.
    pub trims: u64,
    /// Write-zeroes acknowledged.
    pub write_zeroes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Members removed from the volume.
    pub member_removals: u64,
    /// Successful lease renewals.
    pub lease_renewals: u64,
}

#[derive(Default)]
struct Counters {
    reads: AtomicU64,
    read_bytes: AtomicU64,
    writes: AtomicU64,
    written_bytes: AtomicU64,
    flushes: AtomicU64,
    trims: AtomicU64,
    write_zeroes: AtomicU64,
    errors: AtomicU64,
    member_removals: AtomicU64,
    lease_renewals: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Why the engine could not serve a request (or start).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine cannot be built as asked.
    #[error("volume {volume}: {why}")]
    Config { volume: String, why: String },
    /// The request lies outside the volume or is empty.
    #[error("{len} bytes at offset {offset} are not within the volume's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A member reported a newer attachment: this engine no longer serves.
    #[error("volume {volume}: this engine has been fenced by a newer attachment")]
    Fenced { volume: String },
    /// The attachment lease lapsed: this engine no longer serves.
    #[error("volume {volume}: the attachment lease expired")]
    LeaseExpired { volume: String },
    /// No member could do the I/O, and so none was removed.
    #[error("volume {volume}: {what} failed on every member: {errors}")]
    Unavailable {
        volume: String,
        what: &'static str,
        errors: String,
    },
    /// A member failed and its removal could not be persisted, so the I/O it missed cannot
    /// be acknowledged.
    #[error("volume {volume}: could not remove failed member {replica}: {why}")]
    RemovalFailed {
        volume: String,
        replica: String,
        why: String,
    },
    /// The NBD socket could not be set up.
    #[error("volume {volume}: NBD socket {path}: {source}")]
    Socket {
        volume: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl EngineError {
    /// The NBD error code that reports this error to a client.
    pub fn errno(&self) -> nbd::Errno {
        match self {
            EngineError::OutOfRange { .. } | EngineError::Config { .. } => nbd::Errno::Inval,
            EngineError::Fenced { .. } | EngineError::LeaseExpired { .. } => nbd::Errno::Perm,
            EngineError::Unavailable { .. }
            | EngineError::RemovalFailed { .. }
            | EngineError::Socket { .. } => nbd::Errno::Io,
        }
    }
}

struct Inner {
    volume_id: String,
    /// The volume's size; it only grows ([`Engine::grow`]).
    size: AtomicU64,
    /// What the NBD export advertises: at least the size, fixed for the engine's life.
    exported: u64,
    config: EngineConfig,
    /// The current members; replaced whole (never edited in place) when one is removed.
    /// Members are only ever removed, so any member now was in every earlier snapshot.
    members: RwLock<Arc<Vec<Member>>>,
    /// Replicas being rebuilt: they receive every mutation and flush, and are not members.
    targets: RwLock<Arc<Vec<Arc<rebuild::Target>>>>,
    membership: Arc<dyn Membership>,
    /// Serialises membership changes.
    removal: tokio::sync::Mutex<()>,
    state: AtomicU8,
    /// Set when the members may no longer be identical: a mutation failed on members that
    /// could not be removed, or a shutdown dropped requests still in flight.
    unclean: AtomicBool,
    /// The origin of `lease_deadline`.
    clock: Instant,
    /// Nanoseconds after `clock` when the lease lapses.
    lease_deadline: AtomicU64,
    range_locks: Arc<RangeLocks>,
    /// Spreads reads over remote members when there is no local one.
    read_turn: AtomicUsize,
    counters: Counters,
}

/// The engine of one attached volume. Cloning gives another handle to the same engine.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl Engine {
    /// An engine for volume `volume_id` of `size` bytes over `members`, with the default
    /// [`EngineConfig`]. The lease starts now.
    pub fn new(
        volume_id: impl Into<String>,
        size: u64,
        members: Vec<Member>,
        membership: Arc<dyn Membership>,
    ) -> Result<Engine, EngineError> {
        Engine::with_config(
            volume_id,
            size,
            members,
            membership,
            EngineConfig::default(),
        )
    }

    /// An engine with explicit tunables.
    pub fn with_config(
        volume_id: impl Into<String>,
        size: u64,
        members: Vec<Member>,
        membership: Arc<dyn Membership>,
        config: EngineConfig,
    ) -> Result<Engine, EngineError> {
        let volume_id = volume_id.into();
        let refuse = |why: String| EngineError::Config {
            volume: volume_id.clone(),
            why,
        };
        if size == 0 {
            return Err(refuse("a volume of 0 bytes cannot be served".into()));
        }
        if members.is_empty() {
            return Err(refuse("an engine needs at least one member".into()));
        }
        for (i, m) in members.iter().enumerate() {
            if members[..i].iter().any(|other| other.id() == m.id()) {
                return Err(refuse(format!("member {} is listed twice", m.id())));
            }
        }
        if config.rebuild_chunk == 0
            || config.rebuild_chunk as usize > crate::replica::wire::MAX_IO_LEN
        {
            return Err(refuse(format!(
                "the rebuild chunk must be 1 to {} bytes",
                crate::replica::wire::MAX_IO_LEN
            )));
        }
        if config.max_in_flight_requests == 0
            || config.max_in_flight_bytes < nbd::MAX_PAYLOAD as usize
        {
            return Err(refuse(format!(
                "in-flight limits must allow one request of {} bytes",
                nbd::MAX_PAYLOAD
            )));
        }
        if config.export_size != 0 && config.export_size < size {
            return Err(refuse(format!(
                "the export size {} is below the volume's {size} bytes",
                config.export_size
            )));
        }
        let lease = nanos(config.lease);
        Ok(Engine {
            inner: Arc::new(Inner {
                volume_id,
                size: AtomicU64::new(size),
                exported: config.export_size.max(size),
                members: RwLock::new(Arc::new(members)),
                targets: RwLock::default(),
                membership,
                removal: tokio::sync::Mutex::new(()),
                state: AtomicU8::new(SERVING),
                unclean: AtomicBool::new(false),
                clock: Instant::now(),
                lease_deadline: AtomicU64::new(lease),
                range_locks: Arc::default(),
                read_turn: AtomicUsize::new(0),
                counters: Counters::default(),
                config,
            }),
        })
    }

    /// The volume's id (also the NBD export name).
    pub fn volume_id(&self) -> &str {
        &self.inner.volume_id
    }

    /// The volume's size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size.load(Ordering::Acquire)
    }

    /// The size the NBD export advertises (at least [`Engine::size`]).
    pub fn exported_size(&self) -> u64 {
        self.inner.exported
    }

    /// Online expansion: serves `size` bytes from now on. Every member (and rebuild
    /// target) must hold them already, grown with zeroes. Growing to the current size or
    /// less changes nothing (a volume never shrinks) and returns the current size; a size
    /// beyond the export is refused, since a connected client could not see it.
    pub fn grow(&self, size: u64) -> Result<u64, EngineError> {
        if size > self.inner.exported {
            return Err(EngineError::Config {
                volume: self.inner.volume_id.clone(),
                why: format!(
                    "cannot grow to {size} bytes: the export advertises {} bytes",
                    self.inner.exported
                ),
            });
        }
        let before = self.inner.size.fetch_max(size, Ordering::AcqRel);
        if size > before {
            info!(volume = %self.inner.volume_id, from = before, to = size, "volume grown online");
        }
        Ok(before.max(size))
    }

    /// The engine's tunables.
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The ids of the current members.
    pub fn member_ids(&self) -> Vec<String> {
        self.snapshot().iter().map(|m| m.id().to_string()).collect()
    }

    /// Whether the engine serves I/O.
    pub fn state(&self) -> EngineState {
        match self.inner.state.load(Ordering::Acquire) {
            SERVING if self.now() >= self.inner.lease_deadline.load(Ordering::Acquire) => {
                self.expire();
                self.state()
            }
            SERVING => EngineState::Serving,
            FENCED => EngineState::Fenced,
            _ => EngineState::LeaseExpired,
        }
    }

    /// Whether the members are known to be identical: the engine still serves (neither
    /// fenced nor past its lease, either of which may have cut writes short), no mutation
    /// failed on a member it could not remove, and no shutdown dropped a request in flight.
    /// An engine that stops while this holds leaves nothing for the next one to repair.
    pub fn is_clean(&self) -> bool {
        self.state() == EngineState::Serving && !self.inner.unclean.load(Ordering::Acquire)
    }

    /// Shortens the lease to end at `until` at the latest (a lease granted before the engine
    /// was made is counted from when it was asked for, not from the engine's start).
    pub fn bound_lease(&self, until: Instant) {
        let until = nanos(until.saturating_duration_since(self.inner.clock));
        self.inner.lease_deadline.fetch_min(until, Ordering::AcqRel);
    }

    /// The counters so far.
    pub fn stats(&self) -> EngineStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            reads: get(&c.reads),
            read_bytes: get(&c.read_bytes),
            writes: get(&c.writes),
            written_bytes: get(&c.written_bytes),
            flushes: get(&c.flushes),
            trims: get(&c.trims),
            write_zeroes: get(&c.write_zeroes),
            errors: get(&c.errors),
            member_removals: get(&c.member_removals),
            lease_renewals: get(&c.lease_renewals),
        }
    }

    /// Renews the lease every [`EngineConfig::renew_interval`] until `shutdown` completes or
    /// the engine stops serving. [`Engine::serve_unix`] runs it; another front end must.
    pub async fn keep_lease(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Renews at once, then every renew interval — more often if the controller grants a
        // lease shorter than three intervals. The shorter interval holds after a failed
        // renewal too: the next try must come while the granted lease still runs.
        // Before any renewal answers, the lease the engine started with sets the pace.
        let left = self
            .inner
            .lease_deadline
            .load(Ordering::Acquire)
            .saturating_sub(self.now());
        let mut every = self
            .inner
            .config
            .renew_interval
            .min(Duration::from_nanos(left) / 3)
            .max(Duration::from_millis(100));
        let mut interval = Duration::ZERO;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(interval) => {}
            }
            interval = every;
            if self.state() != EngineState::Serving {
                return;
            }
            let sent = self.now();
            let deadline = self.inner.lease_deadline.load(Ordering::Acquire);
            let left = Duration::from_nanos(deadline.saturating_sub(sent));
            match tokio::time::timeout(left, self.inner.membership.renew_lease()).await {
                Ok(Ok(granted)) => {
                    // A renewal that arrives after the lease lapsed does not revive it.
                    if self.state() != EngineState::Serving {
                        return;
                    }
                    let lease = granted.min(self.inner.config.lease);
                    every = self.inner.config.renew_interval.min(lease / 3);
                    interval = every;
                    let renewed = sent.saturating_add(nanos(lease));
                    self.inner
                        .lease_deadline
                        .fetch_max(renewed, Ordering::AcqRel);
                    bump(&self.inner.counters.lease_renewals, 1);
                }
                Ok(Err(why)) => {
                    warn!(volume = %self.inner.volume_id, %why, "attachment lease renewal failed")
                }
                Err(_) => warn!(
                    volume = %self.inner.volume_id,
                    "attachment lease renewal did not answer before the lease ran out"
                ),
            }
        }
    }

    // ---- internals ----

    fn snapshot(&self) -> Arc<Vec<Member>> {
        let members = self
            .inner
            .members
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&members)
    }

    fn now(&self) -> u64 {
        nanos(self.inner.clock.elapsed())
    }

    fn expire(&self) {
        let was = self.inner.state.compare_exchange(
            SERVING,
            LEASE_EXPIRED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if was.is_ok() {
            error!(
                volume = %self.inner.volume_id,
                "attachment lease expired without renewal: the engine stops serving I/O"
            );
        }
    }

    /// Records that a member fenced this engine, and returns the error to report.
    fn fenced(&self, cause: &ReplicaIoError) -> EngineError {
        let was =
            self.inner
                .state
                .compare_exchange(SERVING, FENCED, Ordering::AcqRel, Ordering::Acquire);
        if was.is_ok() {
            error!(
                volume = %self.inner.volume_id,
                %cause,
                "fenced by a newer attachment: the engine stops serving I/O"
            );
        }
        EngineError::Fenced {
            volume: self.inner.volume_id.clone(),
        }
    }

    fn check_serving(&self) -> Result<(), EngineError> {
        let volume = || self.inner.volume_id.clone();
        match self.state() {
            EngineState::Serving => Ok(()),
            EngineState::Fenced => Err(EngineError::Fenced { volume: volume() }),
            EngineState::LeaseExpired => Err(EngineError::LeaseExpired { volume: volume() }),
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), EngineError> {
        let size = self.size();
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= size => Ok(()),
            _ => Err(EngineError::OutOfRange { offset, len, size }),
        }
    }

    fn count<T>(&self, result: &Result<T, EngineError>, ok: impl FnOnce(&Counters)) {
        match result {
            Ok(_) => ok(&self.inner.counters),
            Err(_) => bump(&self.inner.counters.errors, 1),
        }
    }

    /// What the NBD server exports.
    fn export(&self) -> nbd::Export {
        nbd::Export {
            name: self.inner.volume_id.clone(),
            size: self.inner.exported,
            flags: nbd::FLAG_SEND_FLUSH
                | nbd::FLAG_SEND_FUA
                | nbd::FLAG_SEND_TRIM
                | nbd::FLAG_SEND_WRITE_ZEROES
                // A flush goes to every member and syncs each one's whole data file, so it
                // covers writes completed on any connection.
                | nbd::FLAG_CAN_MULTI_CONN,
            block_size: nbd::BlockSize::default(),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
