//! Attachment leases as the controllers promise them: the arithmetic that lets a new
//! attachment of a volume start only once every lease granted to an older attachment's
//! engine has lapsed — whichever controller replica granted it, and across restarts —
//! without a store write at every renewal.
//!
//! An engine renews its lease every third of it, with whichever controller replica it
//! reaches. The volume carries an [`EngineLease`] record: "no lease granted to the engine of
//! epoch `e` lasts beyond `until_ms`; `granter` granted them". A controller grants a lease
//! without writing only when the record names it and already covers the new lease
//! (`now + lease ≤ until_ms`); otherwise it first rewrites the record (compare-and-swap on the
//! volume) with `until_ms = now + lease + `[`RECORD_AHEAD_LEASES`]` × lease` and itself as the
//! granter. So:
//!
//! - `until_ms` bounds every lease granted to that engine, and a controller that did not
//!   grant them (another replica, or this one before a restart) waits until then, plus
//!   [`LEASE_SLACK`] for clock rates and [`CLOCK_SKEW_MS`] for the two controllers' clocks;
//! - the granter the record names granted every lease since the record was written (any other
//!   controller would have rewritten it first), so its memory of its last grant is complete:
//!   it waits only for that grant plus the lease (and for the bound of a record it overwrote,
//!   which may cover leases its previous granter gave without writing);
//! - an engine that stops gives its lease back, recorded as `released`: nothing to wait for.
//!
//! The cost: one store write per attached volume at its engine's first grant, then one every
//! [`RECORD_AHEAD_LEASES`] leases (27 s with the default 9 s lease: 2.2 a minute, where
//! writing every renewal would be 20), plus one whenever the engine's renewals move to
//! another controller replica, and one when it gives its lease back. The price of the coarse
//! record is paid only by a controller that did not grant: it may wait up to
//! [`RECORD_AHEAD_LEASES`] leases longer than the lease itself (the bound reaches at most
//! 4 leases, 36 s, past the last renewal), which the `wait` recovery policy's default grace
//! (a take-over comes 10 s + 30 s after the last heartbeat) hides.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::model::EngineLease;

/// How many leases beyond the lease being granted a rewritten record reaches: how often, in
/// leases, the record is rewritten while one controller renews an engine's lease, and how
/// much longer than the lease a controller that did not grant it may wait.
pub const RECORD_AHEAD_LEASES: u64 = 3;

/// Slack added to a lease before a new attachment may start, for the clocks of the
/// controller and the engine's node running at slightly different rates.
pub(super) const LEASE_SLACK: Duration = Duration::from_millis(500);

/// How far apart the wall clocks of two controller replicas may be: added when waiting on a
/// bound that another controller wrote (the heartbeats' ages already rely on the same).
pub const CLOCK_SKEW_MS: u64 = 1_000;

/// What a grant must do to the volume's lease record first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GrantPlan {
    /// The record names this controller and covers the new lease: grant without writing.
    Covered,
    /// Write `record` (compare-and-swap), then grant. `floor_ms` is the bound of the record
    /// it replaces when another controller wrote that one for the same engine (0 otherwise):
    /// leases it granted without writing lapse by then, which this controller's memory must
    /// keep, since its own grants alone no longer bound the engine's leases.
    Write { record: EngineLease, floor_ms: u64 },
}

/// Decides how a lease of `lease_ms` for the engine of `epoch` is granted by controller `me`
/// at wall-clock `now_ms`, given the volume's record.
pub(super) fn plan_grant(
    record: Option<&EngineLease>,
    me: &str,
    epoch: u64,
    now_ms: u64,
    lease_ms: u64,
) -> GrantPlan {
    let same_engine = record.filter(|r| r.epoch == epoch && !r.released);
    if let Some(r) = same_engine {
        if r.granter == me && now_ms.saturating_add(lease_ms) <= r.until_ms {
            return GrantPlan::Covered;
        }
    }
    GrantPlan::Write {
        record: EngineLease {
            epoch,
            until_ms: now_ms.saturating_add(lease_ms.saturating_mul(1 + RECORD_AHEAD_LEASES)),
            granter: me.to_string(),
            released: false,
        },
        floor_ms: same_engine
            .filter(|r| r.granter != me)
            .map_or(0, |r| r.until_ms),
    }
}

/// The record after the engine of `epoch` gave its lease back; None when it changes nothing
/// (the record is about another engine, or says so already).
pub(super) fn plan_release(record: Option<&EngineLease>, epoch: u64) -> Option<EngineLease> {
    let r = record.filter(|r| r.epoch == epoch && !r.released)?;
    Some(EngineLease {
        released: true,
        ..r.clone()
    })
}

/// This controller's memory of its latest grant on one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Grant {
    /// The epoch of the engine it was granted to.
    pub epoch: u64,
    /// When (the engine counts its lease from before it asked, so no later than the lease
    /// after this).
    pub at: Instant,
    /// Wall-clock bound of leases another controller granted that engine without writing
    /// (see [`GrantPlan::Write`]); 0 when none.
    pub floor_ms: u64,
}

/// Where a wait for older leases is computed from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Clock {
    /// Now, on the monotonic clock the grants in memory use.
    pub now: Instant,
    /// Now, on the wall clock the records use.
    pub now_ms: u64,
    /// When this controller started: the legacy bound (see [`wait_before_attach`]).
    pub started: Instant,
}

/// How long a new attachment of `epoch` must wait, from now, until no engine of an older
/// attachment can still hold a lease on the volume (zero: at once). `record` is the volume's
/// record as read before the attachment is written (the write names that version, so no
/// lease recorded after it can be missed), `memory` this controller's latest grant on it.
pub(super) fn wait_before_attach(
    record: Option<&EngineLease>,
    memory: Option<Grant>,
    me: &str,
    epoch: u64,
    lease_ms: u64,
    clock: Clock,
) -> Duration {
    let lease = Duration::from_millis(lease_ms) + LEASE_SLACK;
    let after_grant = |at: Instant| (at + lease).saturating_duration_since(clock.now);
    let until_wall = |bound_ms: u64| {
        let deadline = bound_ms
            .saturating_add(LEASE_SLACK.as_millis() as u64)
            .saturating_add(CLOCK_SKEW_MS);
        Duration::from_millis(deadline.saturating_sub(clock.now_ms))
    };
    match record {
        // The record is about this attachment's own engine or a newer one (whose own
        // attachment waited for the ones before), or that engine stopped and gave it back.
        Some(r) if r.epoch >= epoch || r.released => Duration::ZERO,
        Some(r) => match memory {
            Some(g) if r.granter == me && g.epoch == r.epoch => {
                let floor = if g.floor_ms == 0 {
                    Duration::ZERO
                } else {
                    until_wall(g.floor_ms)
                };
                after_grant(g.at).max(floor)
            }
            // Another controller (or this one before a restart) granted: trust its bound.
            _ => until_wall(r.until_ms),
        },
        // No record: no lease was granted since records exist, but a controller of an older
        // version may have granted one just before this one started (as that version
        // assumed after a restart).
        None => after_grant(clock.started),
    }
}

/// The grants this controller made, per volume, in memory.
pub(super) struct Leases {
    /// When this controller started.
    pub(super) started: Instant,
    /// This controller process as lease records name it: drawn at start, so that a restarted
    /// controller does not take a record its previous life wrote for its own.
    pub(super) me: String,
    latest: std::sync::Mutex<HashMap<String, Grant>>,
}

impl Default for Leases {
    fn default() -> Self {
        Leases {
            started: Instant::now(),
            me: incarnation(),
            latest: std::sync::Mutex::default(),
        }
    }
}

impl Leases {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Grant>> {
        self.latest
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a grant to the engine of `epoch` at `at`, keeping the highest floor known for
    /// that engine.
    pub(super) fn remember(&self, volume: &str, epoch: u64, at: Instant, floor_ms: u64) {
        let mut map = self.map();
        let floor_ms = match map.get(volume) {
            Some(g) if g.epoch == epoch => g.floor_ms.max(floor_ms),
            _ => floor_ms,
        };
        map.insert(
            volume.to_string(),
            Grant {
                epoch,
                at,
                floor_ms,
            },
        );
    }

    /// Forgets the grants to the engine of `epoch`, which gave its lease back.
    pub(super) fn forget(&self, volume: &str, epoch: u64) {
        let mut map = self.map();
        if map.get(volume).is_some_and(|g| g.epoch == epoch) {
            map.remove(volume);
        }
    }

    /// The latest grant on `volume`, if this controller made one.
    pub(super) fn latest(&self, volume: &str) -> Option<Grant> {
        self.map().get(volume).copied()
    }
}

/// A name for this controller process: the host name and 32 random bits.
fn incarnation() -> String {
    use std::hash::BuildHasher;
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "controller".to_string());
    let random = std::collections::hash_map::RandomState::new()
        .hash_one((std::process::id(), std::time::SystemTime::now()));
    format!("{host}-{:08x}", random as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: u64 = 9_000;
    const AHEAD: u64 = LEASE * RECORD_AHEAD_LEASES;

    fn record(epoch: u64, until_ms: u64, granter: &str) -> EngineLease {
        EngineLease {
            epoch,
            until_ms,
            granter: granter.to_string(),
            released: false,
        }
    }

    #[test]
    fn a_grant_writes_only_when_the_record_does_not_cover_it() {
        let now = 1_000_000;
        // No record, or one of another engine: write, reaching AHEAD beyond.
        let fresh = EngineLease {
            epoch: 3,
            until_ms: now + LEASE + AHEAD,
            granter: "a".into(),
            released: false,
        };
        assert_eq!(
            plan_grant(None, "a", 3, now, LEASE),
            GrantPlan::Write {
                record: fresh.clone(),
                floor_ms: 0
            }
        );
        assert_eq!(
            plan_grant(Some(&record(2, now + 50_000, "b")), "a", 3, now, LEASE),
            GrantPlan::Write {
                record: fresh.clone(),
                floor_ms: 0
            },
            "an older engine's bound is no floor: this attachment waited for it"
        );
        // Ours and covering: no write, until the lease would reach past the bound.
        let ours = record(3, now + LEASE + AHEAD, "a");
        assert_eq!(
            plan_grant(Some(&ours), "a", 3, now, LEASE),
            GrantPlan::Covered
        );
        assert_eq!(
            plan_grant(Some(&ours), "a", 3, now + AHEAD, LEASE),
            GrantPlan::Covered
        );
        assert!(matches!(
            plan_grant(Some(&ours), "a", 3, now + AHEAD + 1, LEASE),
            GrantPlan::Write { floor_ms: 0, .. }
        ));
        // Covering but another controller's: write, and keep its bound as the floor.
        assert_eq!(
            plan_grant(Some(&record(3, now + 20_000, "b")), "a", 3, now, LEASE),
            GrantPlan::Write {
                record: fresh.clone(),
                floor_ms: now + 20_000
            }
        );
        // Released (a new engine of the same attachment): write.
        let released = EngineLease {
            released: true,
            ..ours.clone()
        };
        assert!(matches!(
            plan_grant(Some(&released), "a", 3, now, LEASE),
            GrantPlan::Write { floor_ms: 0, .. }
        ));
        assert_eq!(plan_release(Some(&ours), 3), Some(released.clone()));
        assert_eq!(plan_release(Some(&released), 3), None);
        assert_eq!(plan_release(Some(&ours), 2), None, "another engine's");
        assert_eq!(plan_release(None, 3), None);
    }

    #[test]
    fn a_new_attachment_waits_for_the_bound_of_whoever_granted() {
        let started = Instant::now();
        let clock = Clock {
            now: started + Duration::from_secs(100),
            now_ms: 5_000_000,
            started,
        };
        let lease = Duration::from_millis(LEASE) + LEASE_SLACK;
        let skewed = |bound_ms: u64| {
            Duration::from_millis(
                bound_ms + LEASE_SLACK.as_millis() as u64 + CLOCK_SKEW_MS - clock.now_ms,
            )
        };
        let theirs = record(3, clock.now_ms + 25_000, "b");
        // Another controller granted: its bound, with slack and skew.
        assert_eq!(
            wait_before_attach(Some(&theirs), None, "a", 4, LEASE, clock),
            skewed(clock.now_ms + 25_000)
        );
        // A bound long past: at once.
        let old = record(3, clock.now_ms - 60_000, "b");
        assert_eq!(
            wait_before_attach(Some(&old), None, "a", 4, LEASE, clock),
            Duration::ZERO
        );
        // This controller granted (the record names it): its last grant plus the lease,
        // however far the record reaches.
        let ours = record(3, clock.now_ms + 38_000, "a");
        let granted = clock.now - Duration::from_secs(2);
        let memory = Grant {
            epoch: 3,
            at: granted,
            floor_ms: 0,
        };
        assert_eq!(
            wait_before_attach(Some(&ours), Some(memory), "a", 4, LEASE, clock),
            lease - Duration::from_secs(2)
        );
        // ...and the bound of a record it overwrote, when that is later.
        let floored = Grant {
            floor_ms: clock.now_ms + 20_000,
            ..memory
        };
        assert_eq!(
            wait_before_attach(Some(&ours), Some(floored), "a", 4, LEASE, clock),
            skewed(clock.now_ms + 20_000)
        );
        // A memory of another engine does not stand for this record's.
        let stale = Grant { epoch: 2, ..memory };
        assert_eq!(
            wait_before_attach(Some(&ours), Some(stale), "a", 4, LEASE, clock),
            skewed(clock.now_ms + 38_000)
        );
        // The record names us but we have no memory (cannot happen within one process;
        // a restarted one has another name): the bound.
        assert_eq!(
            wait_before_attach(Some(&ours), None, "a", 4, LEASE, clock),
            skewed(clock.now_ms + 38_000)
        );
        // Released, or the attachment's own engine or a newer one: nothing to wait for.
        let released = EngineLease {
            released: true,
            ..theirs.clone()
        };
        assert_eq!(
            wait_before_attach(Some(&released), None, "a", 4, LEASE, clock),
            Duration::ZERO
        );
        assert_eq!(
            wait_before_attach(Some(&theirs), None, "a", 3, LEASE, clock),
            Duration::ZERO
        );
        // No record at all: as if granted just before this controller started.
        assert_eq!(
            wait_before_attach(None, None, "a", 4, LEASE, clock),
            Duration::ZERO,
            "started 100 s ago"
        );
        let just_started = Clock {
            started: clock.now - Duration::from_secs(1),
            ..clock
        };
        assert_eq!(
            wait_before_attach(None, None, "a", 4, LEASE, just_started),
            lease - Duration::from_secs(1)
        );
    }

    #[test]
    fn memory_keeps_the_highest_floor_of_one_engine() {
        let leases = Leases::default();
        let at = Instant::now();
        leases.remember("v", 3, at, 500);
        leases.remember("v", 3, at, 0);
        assert_eq!(leases.latest("v").map(|g| g.floor_ms), Some(500));
        leases.remember("v", 4, at, 0);
        assert_eq!(
            leases.latest("v").map(|g| (g.epoch, g.floor_ms)),
            Some((4, 0))
        );
        leases.forget("v", 3);
        assert!(leases.latest("v").is_some(), "another engine's release");
        leases.forget("v", 4);
        assert!(leases.latest("v").is_none());
        assert_ne!(
            Leases::default().me,
            leases.me,
            "each controller its own name"
        );
    }
}
