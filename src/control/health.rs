//! Node health: whether a Palisade node is up, from its agent's heartbeat and, where there is
//! one, a second source of evidence about the host it runs on ([`NodeEvidence`]; in
//! Kubernetes the kubelet's Node Ready condition and its Lease in `kube-node-lease`, watched
//! by `k8s::node_health`). The rule, as a pure function ([`node_health`]):
//!
//! 1. Heartbeat fresh (at most the heartbeat timeout old): **up**, whatever else is said. The
//!    Palisade node answers, so its engines renew their leases and serve; a dead kubelet
//!    (NotReady, Lease expired) stops none of them, and moving the volume would only disrupt
//!    a workload that still works.
//! 2. Heartbeat expired, and the host is not vouched for (its Node is NotReady or Unknown, its
//!    Lease was not renewed within its duration, no such Node, or no evidence at all, as in
//!    standalone): **down** from the moment the heartbeat expired — the heartbeat alone, as
//!    without Kubernetes.
//! 3. Heartbeat expired, but the host is vouched for (Node Ready, Lease renewed within its
//!    duration): **down** only once the heartbeat has been expired for a further
//!    confirmation period (`vouch_ms`), and counted from then. A live kubelet says the
//!    machine runs; the heartbeats are missing because the Palisade process died or
//!    restarts (the kubelet restarts it within seconds, and it registers again), or because
//!    of a gap on the controllers' side (a replica that just took over, a store write that
//!    failed). The wait avoids acting on those. If the heartbeats stay missing, the Palisade
//!    node is dead or cut off from every controller, and its engines with it: they died with
//!    the process, or stopped serving when their attachment leases (no longer than the
//!    heartbeat timeout) could not be renewed. So it is taken over, only later.
//!
//! Why this is safe: a wrong "down" cannot corrupt data, since a take-over fences the old
//! engine on every member it reaches and waits out its attachment lease. What the evidence
//! guards against is a needless take-over (and the member marked failed and rebuilt in full
//! that comes with it): it can only delay "down", by at most `vouch_ms`, never bring it
//! forward, and never overrule a fresh heartbeat. The price is on a host whose kubelet's
//! Lease is still fresh: a machine that dies outright looks vouched for until its Lease runs
//! out (40 s by default), so its take-over comes `vouch_ms` later than on the heartbeat alone.
//!
//! A Palisade node id is the name of the Kubernetes Node it runs on (the DaemonSet passes
//! `spec.nodeName` as `--node-id`); a node id that names no Node has no evidence (rule 2).

use crate::control::attach::Health;

/// What a second source says about the host a Palisade node runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostEvidence {
    /// Nothing known: no source, the source has not caught up yet, or the node id names no
    /// host it knows.
    Unknown,
    /// The host runs: in Kubernetes, its Node is Ready and its kubelet renewed its Lease
    /// within the Lease's duration.
    Alive,
    /// The host's Node is NotReady or Unknown.
    NotReady,
    /// The host's kubelet has not renewed its Lease within the Lease's duration (or it has
    /// none).
    LeaseExpired,
}

impl HostEvidence {
    /// True when the host is vouched for (rule 3 of the module's rule).
    pub fn vouches(self) -> bool {
        self == HostEvidence::Alive
    }
}

/// A source of evidence about the hosts Palisade nodes run on, beside their heartbeats.
pub trait NodeEvidence: Send + Sync {
    /// What is known about the host of Palisade node `node_id` at `now_ms` (milliseconds
    /// since the Unix epoch).
    fn host(&self, node_id: &str, now_ms: u64) -> HostEvidence;
}

/// The rule's tunables.
#[derive(Debug, Clone, Copy)]
pub struct HealthRule {
    /// A heartbeat older than this has expired.
    pub heartbeat_timeout_ms: u64,
    /// How much longer a node whose heartbeat expired stays up while its host is vouched for.
    pub vouch_ms: u64,
}

/// The health of a node whose last heartbeat was at `last_heartbeat_ms` (None: no such node)
/// at `now_ms`, given what is known of its host. See the module's comment for the rule.
pub fn node_health(
    last_heartbeat_ms: Option<u64>,
    host: HostEvidence,
    now_ms: u64,
    rule: HealthRule,
) -> Health {
    let Some(last) = last_heartbeat_ms else {
        return Health::Down {
            for_ms: u64::MAX / 2,
        };
    };
    let expired_at = last.saturating_add(rule.heartbeat_timeout_ms);
    let down_at = if host.vouches() {
        expired_at.saturating_add(rule.vouch_ms)
    } else {
        expired_at
    };
    if now_ms <= down_at {
        Health::Up
    } else {
        Health::Down {
            for_ms: now_ms - down_at,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: HealthRule = HealthRule {
        heartbeat_timeout_ms: 10_000,
        vouch_ms: 10_000,
    };

    fn health(age_ms: u64, host: HostEvidence) -> Health {
        let now = 1_000_000;
        node_health(Some(now - age_ms), host, now, RULE)
    }

    #[test]
    fn a_fresh_heartbeat_is_up_whatever_kubernetes_says() {
        for host in [
            HostEvidence::Unknown,
            HostEvidence::Alive,
            HostEvidence::NotReady,
            HostEvidence::LeaseExpired,
        ] {
            assert_eq!(health(0, host), Health::Up, "{host:?}");
            assert_eq!(health(10_000, host), Health::Up, "{host:?}");
        }
    }

    #[test]
    fn an_expired_heartbeat_is_down_at_once_unless_the_host_is_vouched_for() {
        // The kubelet is dead too, or nothing is known: the heartbeat alone decides.
        for host in [
            HostEvidence::Unknown,
            HostEvidence::NotReady,
            HostEvidence::LeaseExpired,
        ] {
            assert_eq!(health(10_001, host), Health::Down { for_ms: 1 }, "{host:?}");
            assert_eq!(
                health(25_000, host),
                Health::Down { for_ms: 15_000 },
                "{host:?}"
            );
        }
    }

    #[test]
    fn a_live_kubelet_delays_down_by_the_confirmation_period_only() {
        // The Palisade process died on a healthy kubelet: up for one more period (it may be
        // restarting), then down all the same, counted from the end of that period.
        assert_eq!(health(10_001, HostEvidence::Alive), Health::Up);
        assert_eq!(health(20_000, HostEvidence::Alive), Health::Up);
        assert_eq!(
            health(20_001, HostEvidence::Alive),
            Health::Down { for_ms: 1 }
        );
        assert_eq!(
            health(50_000, HostEvidence::Alive),
            Health::Down { for_ms: 30_000 }
        );
        // Without a confirmation period the heartbeat alone decides.
        let now = 1_000_000;
        let rule = HealthRule {
            vouch_ms: 0,
            ..RULE
        };
        assert_eq!(
            node_health(Some(now - 10_001), HostEvidence::Alive, now, rule),
            Health::Down { for_ms: 1 }
        );
    }

    #[test]
    fn an_unknown_node_is_down_long_since_and_future_heartbeats_are_fresh() {
        assert_eq!(
            node_health(None, HostEvidence::Alive, 5, RULE),
            Health::Down {
                for_ms: u64::MAX / 2
            }
        );
        assert_eq!(
            node_health(Some(2_000), HostEvidence::Unknown, 1_000, RULE),
            Health::Up
        );
    }
}
