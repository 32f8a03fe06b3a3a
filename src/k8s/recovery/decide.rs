//! The recovery decisions, as pure functions of what the controller sees (see `view`) and
//! the time: what to do with a VolumeAttachment on a down node ([`decide_attachment`]), with
//! a pod on a down node ([`decide_down_pod`]), and with a pod whose volume was detached
//! under it ([`decide_detached`]). The pass (`pass`) turns them into fencing, deletions and
//! Events; nothing here does I/O.

use crate::control::attached_current_on;
use crate::model::Volume;
use crate::params::RecoveryPolicy;
use crate::settings::NodeDownPodDeletionPolicy;

use super::view::{AttachmentView, Owner, Phase, PodView};

/// What to do with one of Palisade's VolumeAttachments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttachmentDecision {
    /// Leave it to Kubernetes.
    Keep(Keep),
    /// Fence the volume's attachment on the VolumeAttachment's node, then delete it.
    Recover(Recover),
}

/// Why a VolumeAttachment is left alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keep {
    /// Its node is up: it is not stale.
    NodeUp,
    /// It is being deleted already (the csi-attacher detaches it).
    Deleting,
    /// It is not attached (an attach in progress or failed): Kubernetes handles it.
    NotAttached,
    /// No pod is waiting for the volume on another node: nothing would start sooner.
    NoReplacementWaiting,
    /// Pods on the down node still use the volume, and the policy does not let it move
    /// (`never`: any such pod; `wait`: one that is not even being deleted).
    PodsOnNode {
        policy: RecoveryPolicy,
        pods: Vec<String>,
        waiting: Vec<String>,
    },
    /// `wait`: the pods on the down node are being deleted, and the last one's grace period
    /// ends at `until_ms`.
    GracePeriodRunning {
        pods: Vec<String>,
        until_ms: u64,
        waiting: Vec<String>,
    },
}

/// Why a VolumeAttachment's node is fenced and the VolumeAttachment deleted. `waiting` are
/// the pods pending on other nodes for the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recover {
    /// No pod on the down node uses the volume any more (it was force-deleted).
    NoPodOnNode { waiting: Vec<String> },
    /// `wait`: every pod on the down node that uses the volume has outlived its deletion
    /// grace period, which its dead kubelet cannot confirm.
    GracePeriodOver {
        pods: Vec<String>,
        waiting: Vec<String>,
    },
    /// `immediate`: a replacement is pending on another node.
    ReplacementPending {
        pods: Vec<String>,
        waiting: Vec<String>,
    },
}

impl Keep {
    /// True when an operator would want to hear about it: a pod waits for the volume and
    /// the policy holds it on the down node.
    pub fn is_notable(&self) -> bool {
        matches!(
            self,
            Keep::PodsOnNode { .. } | Keep::GracePeriodRunning { .. }
        )
    }

    /// One line for logs and Events, at `now_ms`.
    pub fn describe(&self, node: &str, now_ms: u64) -> String {
        match self {
            Keep::NodeUp => format!("node {node} is up"),
            Keep::Deleting => "the VolumeAttachment is being deleted".to_string(),
            Keep::NotAttached => "the VolumeAttachment is not attached".to_string(),
            Keep::NoReplacementWaiting => "no pod waits for the volume on another node".to_string(),
            Keep::PodsOnNode {
                policy: RecoveryPolicy::Never,
                pods,
                waiting,
            } => format!(
                "recovery policy \"never\": {} on down node {node} still use the volume; force-delete {} to let {} start",
                list(pods),
                if pods.len() == 1 { "it" } else { "them" },
                list(waiting)
            ),
            Keep::PodsOnNode { policy, pods, waiting } => format!(
                "recovery policy \"{policy}\": {} on down node {node} still use the volume and are not being deleted; {} waits",
                list(pods),
                list(waiting)
            ),
            Keep::GracePeriodRunning { pods, until_ms, waiting } => format!(
                "recovery policy \"wait\": {} on down node {node} are being deleted; their grace period ends in {} s, then {} can start",
                list(pods),
                until_ms.saturating_sub(now_ms).div_ceil(1000),
                list(waiting)
            ),
        }
    }
}

impl Recover {
    /// One line for logs and Events.
    pub fn describe(&self, node: &str) -> String {
        match self {
            Recover::NoPodOnNode { waiting } => format!(
                "no pod on down node {node} uses the volume any more, and {} waits for it",
                list(waiting)
            ),
            Recover::GracePeriodOver { pods, waiting } => format!(
                "recovery policy \"wait\": {} on down node {node} outlived their grace period, and {} waits for the volume",
                list(pods),
                list(waiting)
            ),
            Recover::ReplacementPending { pods, waiting } if pods.is_empty() => format!(
                "recovery policy \"immediate\": {} waits for the volume",
                list(waiting)
            ),
            Recover::ReplacementPending { pods, waiting } => format!(
                "recovery policy \"immediate\": {} waits for the volume ({} on down node {node} cannot use it any more)",
                list(waiting),
                list(pods)
            ),
        }
    }
}

fn list(names: &[String]) -> String {
    match names {
        [] => "no pod".to_string(),
        [one] => format!("pod {one}"),
        many => format!("pods {}", many.join(", ")),
    }
}

/// Decides what to do with `va`, given the pods that use its volume, the volume's recovery
/// policy, when its node went down (None: it is up) and the time.
///
/// With its node down and a pod pending for the volume on another node, the policy
/// decides, with Longhorn's meaning: `never` recovers once no pod on the down node uses the
/// volume (someone force-deleted it); `wait` also once every pod on the down node that uses
/// it is being deleted and has outlived its grace period; `immediate` at once.
pub fn decide_attachment(
    va: &AttachmentView,
    pods: &[&PodView],
    policy: RecoveryPolicy,
    down_since: Option<u64>,
    now_ms: u64,
) -> AttachmentDecision {
    use AttachmentDecision::{Keep as K, Recover as R};
    if down_since.is_none() {
        return K(Keep::NodeUp);
    }
    if va.deleting {
        return K(Keep::Deleting);
    }
    if !va.attached {
        return K(Keep::NotAttached);
    }
    let on_node: Vec<&PodView> = pods
        .iter()
        .copied()
        .filter(|p| p.node.as_deref() == Some(va.node.as_str()) && p.phase != Phase::Terminated)
        .collect();
    let waiting: Vec<String> = pods
        .iter()
        .filter(|p| {
            p.phase == Phase::Pending
                && p.deletion.is_none()
                && p.node.as_deref().is_some_and(|n| n != va.node)
        })
        .map(|p| p.name.clone())
        .collect();
    if waiting.is_empty() {
        return K(Keep::NoReplacementWaiting);
    }
    let names = |pods: &[&PodView]| pods.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    if on_node.is_empty() {
        return R(Recover::NoPodOnNode { waiting });
    }
    match policy {
        RecoveryPolicy::Immediate => R(Recover::ReplacementPending {
            pods: names(&on_node),
            waiting,
        }),
        RecoveryPolicy::Never => K(Keep::PodsOnNode {
            policy,
            pods: names(&on_node),
            waiting,
        }),
        RecoveryPolicy::Wait => {
            let not_deleting: Vec<&PodView> = on_node
                .iter()
                .copied()
                .filter(|p| p.deletion.is_none())
                .collect();
            if !not_deleting.is_empty() {
                return K(Keep::PodsOnNode {
                    policy,
                    pods: names(&not_deleting),
                    waiting,
                });
            }
            let until_ms = on_node
                .iter()
                .filter_map(|p| p.deletion.map(|d| d.at_ms))
                .max()
                .unwrap_or(0);
            if now_ms >= until_ms {
                R(Recover::GracePeriodOver {
                    pods: names(&on_node),
                    waiting,
                })
            } else {
                K(Keep::GracePeriodRunning {
                    pods: names(&on_node),
                    until_ms,
                    waiting,
                })
            }
        }
    }
}

/// What to do with a pod on a node that is down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownPodDecision {
    /// Leave it.
    Keep,
    /// Fence its volumes on its node, delete their VolumeAttachments there, then delete it
    /// with a grace period of 0 (its kubelet cannot confirm anything).
    ForceDelete(ForceCause),
}

/// Why a pod on a down node is force-deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForceCause {
    /// node-down-pod-deletion-policy matches its owner, and its grace period is over.
    Policy(NodeDownPodDeletionPolicy),
    /// node-down-failover-seconds: its node has been down for `down_for_s` seconds, and it
    /// belongs to a StatefulSet or a Deployment. Only once every Palisade volume attached on
    /// the node is fenced.
    Failover { down_for_s: u64 },
}

impl ForceCause {
    /// One line for logs and Events.
    pub fn describe(&self, node: &str) -> String {
        match self {
            ForceCause::Policy(policy) => format!(
                "node-down-pod-deletion-policy \"{policy}\": node {node} is down and the pod outlived its grace period"
            ),
            ForceCause::Failover { down_for_s } => format!(
                "node-down-failover-seconds: node {node} has been down for {down_for_s} s and its Palisade volumes are fenced"
            ),
        }
    }
}

/// Whether node-down-pod-deletion-policy covers pods with this owner.
pub fn policy_covers(policy: NodeDownPodDeletionPolicy, owner: &Owner) -> bool {
    use NodeDownPodDeletionPolicy::*;
    match policy {
        DoNothing => false,
        DeleteStatefulSetPod => *owner == Owner::StatefulSet,
        DeleteDeploymentPod => *owner == Owner::Deployment,
        DeleteBothStatefulSetAndDeploymentPod => owner.is_workload(),
    }
}

/// Decides what to do with `pod` (which uses a Palisade volume) given when its node went
/// down (None: up), the pod deletion policy, node-down-failover-seconds (0: off) and the
/// time. The failover comes first: it does not wait for an eviction.
pub fn decide_down_pod(
    pod: &PodView,
    down_since: Option<u64>,
    policy: NodeDownPodDeletionPolicy,
    failover_seconds: u64,
    now_ms: u64,
) -> DownPodDecision {
    let Some(since) = down_since else {
        return DownPodDecision::Keep;
    };
    if pod.node.is_none() || pod.phase == Phase::Terminated {
        return DownPodDecision::Keep;
    }
    let down_for_ms = now_ms.saturating_sub(since);
    if failover_seconds > 0
        && pod.owner.is_workload()
        && down_for_ms >= failover_seconds.saturating_mul(1000)
    {
        return DownPodDecision::ForceDelete(ForceCause::Failover {
            down_for_s: down_for_ms / 1000,
        });
    }
    match pod.deletion {
        Some(d) if policy_covers(policy, &pod.owner) && now_ms >= d.at_ms => {
            DownPodDecision::ForceDelete(ForceCause::Policy(policy))
        }
        _ => DownPodDecision::Keep,
    }
}

/// What to do with a running pod whose node is up, per
/// auto-delete-pod-when-volume-detached-unexpectedly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachedDecision {
    Keep,
    /// Delete it (gracefully: its kubelet is alive) so that its controller recreates it and
    /// the volume is attached and mounted afresh.
    Delete {
        volume: String,
        why: Detachment,
    },
    /// Its volume was detached under it, but no controller owns it: never deleted.
    Bare {
        volume: String,
        why: Detachment,
    },
}

/// How a running pod's volume is no longer attached to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detachment {
    /// The volume is not attached at all (force-detached).
    NotAttached,
    /// The volume is attached on another node now.
    Elsewhere { node: String },
    /// The attachment on the pod's node was fenced (its epoch raised past it).
    Fenced { epoch: u64 },
}

impl Detachment {
    /// One line for logs and Events.
    pub fn describe(&self, volume: &str, node: &str) -> String {
        match self {
            Detachment::NotAttached => {
                format!("volume {volume} was detached from node {node} under the running pod")
            }
            Detachment::Elsewhere { node: other } => format!(
                "volume {volume} is attached on node {other} now, not on the pod's node {node}: the engine there was fenced"
            ),
            Detachment::Fenced { epoch } => format!(
                "volume {volume}'s attachment on node {node} was fenced (epoch {epoch}): the engine there can no longer write"
            ),
        }
    }
}

/// Decides whether `pod` lost its volume under it: it runs on a node that is up (`node_up`)
/// and one of its volumes, as stored (`stored`, None for a volume the store does not have),
/// is no longer attached there at its current epoch. `enabled`: the setting.
pub fn decide_detached(
    pod: &PodView,
    node_up: bool,
    stored: &[Option<&Volume>],
    enabled: bool,
) -> DetachedDecision {
    let Some(node) = pod.node.as_deref() else {
        return DetachedDecision::Keep;
    };
    if !enabled || !node_up || pod.phase != Phase::Running || pod.deletion.is_some() {
        return DetachedDecision::Keep;
    }
    let lost = stored.iter().flatten().find_map(|v| {
        if attached_current_on(v, node) {
            return None;
        }
        let why = match &v.attachment {
            None => Detachment::NotAttached,
            Some(a) if a.node_id != node => Detachment::Elsewhere {
                node: a.node_id.clone(),
            },
            Some(_) => Detachment::Fenced { epoch: v.epoch },
        };
        Some((v.id.clone(), why))
    });
    match lost {
        None => DetachedDecision::Keep,
        Some((volume, why)) if pod.owner == Owner::None => DetachedDecision::Bare { volume, why },
        Some((volume, why)) => DetachedDecision::Delete { volume, why },
    }
}

#[cfg(test)]
mod tests;
