//! The attachment authority's decisions, as pure functions: what ControllerPublish and
//! ControllerUnpublish do given the volume's current attachment, the requesting node and
//! the health of the node that holds the attachment. The caller persists the outcome with a
//! compare-and-swap, so two racing publishes cannot both win.

use crate::model::{Attachment, Capability};
use crate::params::RecoveryPolicy;

/// How the node that holds an attachment is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Up,
    /// Down (heartbeat expired) for this many milliseconds.
    Down {
        for_ms: u64,
    },
}

/// A publish request reduced to what the decision needs.
#[derive(Debug, Clone)]
pub struct PublishRequest<'a> {
    pub node_id: &'a str,
    pub capability: &'a Capability,
    pub readonly: bool,
    pub now_ms: u64,
}

/// What ControllerPublish must do.
#[derive(Debug, Clone, PartialEq)]
pub enum PublishDecision {
    /// The same publish is already in place: answer OK with it.
    AlreadyPublished(Attachment),
    /// Record this new attachment (epoch bumped), then answer OK.
    Attach(Attachment),
    /// Fence the attachment on the down node, then record this one.
    TakeOver { from: Attachment, to: Attachment },
    /// Published on this node with another capability or read-only flag.
    Incompatible(Attachment),
    /// Published on another node that is up.
    HeldByHealthyNode(Attachment),
    /// Published on a node that is down, and the recovery policy does not allow moving yet.
    HeldByDownNode {
        current: Attachment,
        policy: RecoveryPolicy,
        /// For `wait`: milliseconds until the take-over is allowed.
        retry_in_ms: Option<u64>,
    },
}

/// Decides ControllerPublish for a single-node volume.
pub fn decide_publish(
    current: Option<&Attachment>,
    volume_epoch: u64,
    req: &PublishRequest<'_>,
    holder_health: Health,
    policy: RecoveryPolicy,
    grace_ms: u64,
) -> PublishDecision {
    let fresh = || Attachment {
        node_id: req.node_id.to_string(),
        epoch: volume_epoch + 1,
        readonly: req.readonly,
        capability: req.capability.clone(),
        since_ms: req.now_ms,
    };
    let Some(current) = current else {
        return PublishDecision::Attach(fresh());
    };
    if current.node_id == req.node_id {
        return if current.readonly == req.readonly && current.capability == *req.capability {
            PublishDecision::AlreadyPublished(current.clone())
        } else {
            PublishDecision::Incompatible(current.clone())
        };
    }
    let down_for = match holder_health {
        Health::Up => return PublishDecision::HeldByHealthyNode(current.clone()),
        Health::Down { for_ms } => for_ms,
    };
    let allowed = match policy {
        RecoveryPolicy::Never => false,
        RecoveryPolicy::Immediate => true,
        RecoveryPolicy::Wait => down_for >= grace_ms,
    };
    if allowed {
        PublishDecision::TakeOver {
            from: current.clone(),
            to: fresh(),
        }
    } else {
        PublishDecision::HeldByDownNode {
            current: current.clone(),
            policy,
            retry_in_ms: (policy == RecoveryPolicy::Wait).then(|| grace_ms - down_for),
        }
    }
}

/// True when ControllerUnpublish(volume, node) has something to release. An empty node id
/// means every node.
pub fn unpublish_releases(current: Option<&Attachment>, node_id: &str) -> bool {
    current.is_some_and(|a| node_id.is_empty() || a.node_id == node_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessMode, AccessType};

    fn cap() -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: "ext4".into(),
                mount_flags: vec![],
            },
            access_mode: AccessMode::SingleNodeWriter,
        }
    }

    fn on(node: &str, epoch: u64) -> Attachment {
        Attachment {
            node_id: node.into(),
            epoch,
            readonly: false,
            capability: cap(),
            since_ms: 1,
        }
    }

    fn req<'a>(node: &'a str, c: &'a Capability, readonly: bool) -> PublishRequest<'a> {
        PublishRequest {
            node_id: node,
            capability: c,
            readonly,
            now_ms: 100,
        }
    }

    #[test]
    fn unattached_attaches_with_next_epoch() {
        let c = cap();
        let d = decide_publish(
            None,
            4,
            &req("b", &c, false),
            Health::Up,
            RecoveryPolicy::Wait,
            30_000,
        );
        match d {
            PublishDecision::Attach(a) => {
                assert_eq!((a.node_id.as_str(), a.epoch, a.readonly), ("b", 5, false))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn same_node_same_request_is_idempotent_and_different_is_incompatible() {
        let c = cap();
        let cur = on("b", 5);
        let d = decide_publish(
            Some(&cur),
            5,
            &req("b", &c, false),
            Health::Up,
            RecoveryPolicy::Wait,
            0,
        );
        assert_eq!(d, PublishDecision::AlreadyPublished(cur.clone()));
        let d = decide_publish(
            Some(&cur),
            5,
            &req("b", &c, true),
            Health::Up,
            RecoveryPolicy::Wait,
            0,
        );
        assert_eq!(d, PublishDecision::Incompatible(cur.clone()));
        let mut block = cap();
        block.access_type = AccessType::Block;
        let d = decide_publish(
            Some(&cur),
            5,
            &req("b", &block, false),
            Health::Up,
            RecoveryPolicy::Wait,
            0,
        );
        assert_eq!(d, PublishDecision::Incompatible(cur));
    }

    #[test]
    fn healthy_holder_refuses_under_every_policy() {
        let c = cap();
        let cur = on("a", 2);
        for p in [
            RecoveryPolicy::Never,
            RecoveryPolicy::Wait,
            RecoveryPolicy::Immediate,
        ] {
            let d = decide_publish(Some(&cur), 2, &req("b", &c, false), Health::Up, p, 0);
            assert_eq!(d, PublishDecision::HeldByHealthyNode(cur.clone()));
        }
    }

    #[test]
    fn down_holder_follows_the_policy() {
        let c = cap();
        let cur = on("a", 2);
        let r = req("b", &c, false);
        let never = decide_publish(
            Some(&cur),
            2,
            &r,
            Health::Down { for_ms: 1_000_000 },
            RecoveryPolicy::Never,
            30_000,
        );
        assert!(matches!(
            never,
            PublishDecision::HeldByDownNode {
                retry_in_ms: None,
                ..
            }
        ));
        let early = decide_publish(
            Some(&cur),
            2,
            &r,
            Health::Down { for_ms: 10_000 },
            RecoveryPolicy::Wait,
            30_000,
        );
        assert!(matches!(
            early,
            PublishDecision::HeldByDownNode {
                retry_in_ms: Some(20_000),
                ..
            }
        ));
        let late = decide_publish(
            Some(&cur),
            2,
            &r,
            Health::Down { for_ms: 30_000 },
            RecoveryPolicy::Wait,
            30_000,
        );
        match late {
            PublishDecision::TakeOver { from, to } => {
                assert_eq!(from, cur);
                assert_eq!((to.node_id.as_str(), to.epoch), ("b", 3));
            }
            other => panic!("{other:?}"),
        }
        let now = decide_publish(
            Some(&cur),
            7,
            &r,
            Health::Down { for_ms: 0 },
            RecoveryPolicy::Immediate,
            30_000,
        );
        assert!(matches!(now, PublishDecision::TakeOver { to, .. } if to.epoch == 8));
    }

    #[test]
    fn unpublish_matches_node_or_all() {
        let cur = on("a", 1);
        assert!(unpublish_releases(Some(&cur), "a"));
        assert!(unpublish_releases(Some(&cur), ""));
        assert!(!unpublish_releases(Some(&cur), "b"));
        assert!(!unpublish_releases(None, "a"));
    }
}
