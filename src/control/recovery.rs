//! Recovery from a down node, for the Kubernetes recovery controller: fencing a volume's
//! attachment on a node that is down, so that the stale VolumeAttachment naming that node can
//! be removed and the volume attached elsewhere without waiting for Kubernetes' six minutes.
//!
//! Fencing here is a take-over's first half (see `publish`): the volume's epoch is raised in
//! the store with a compare-and-swap, then persisted on every reachable member, which refuses
//! the old engine's sessions from then on; unreachable members are marked failed. The
//! attachment itself stays on the down node: ControllerUnpublish for that node (which the
//! csi-attacher calls once the VolumeAttachment is deleted) releases it, and the next
//! ControllerPublish attaches with a higher epoch still. A volume whose epoch is already
//! ahead of its attachment's is fenced: fencing again re-persists that same epoch (a restart
//! in the middle converges) and never raises it twice. A volume none of whose members is on
//! a node that is up is refused before anything changes (a take-over would mark them all
//! failed): when the node comes back, the volume is as it was.

use super::*;

/// What fencing a volume's attachment on a down node found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryFence {
    /// The attachment on the node is fenced at `epoch`: `fenced` of the volume's `members`
    /// persisted it (the others are marked failed). `raised` is false when an earlier call
    /// had already raised the epoch in the store.
    Fenced {
        epoch: u64,
        fenced: usize,
        members: usize,
        raised: bool,
    },
    /// The volume is not attached on that node (not attached at all, or attached elsewhere,
    /// which took a higher epoch): nothing there holds a current attachment to fence.
    NotAttachedThere { attached_to: Option<String> },
    /// The store has no such volume.
    NoVolume,
}

impl RecoveryFence {
    /// One line for logs and Events.
    pub fn describe(&self) -> String {
        match self {
            RecoveryFence::Fenced {
                epoch,
                fenced,
                members,
                raised,
            } => format!(
                "fenced at epoch {epoch} ({fenced} of {members} members persisted it{})",
                if *raised {
                    ""
                } else {
                    "; the epoch was raised earlier"
                }
            ),
            RecoveryFence::NotAttachedThere { attached_to: None } => {
                "not attached; nothing to fence".to_string()
            }
            RecoveryFence::NotAttachedThere {
                attached_to: Some(node),
            } => format!("attached to {node:?} already; nothing to fence"),
            RecoveryFence::NoVolume => "no such volume; nothing to fence".to_string(),
        }
    }
}

/// Why a volume could not be fenced on a down node.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryFenceError {
    #[error(
        "volume {volume:?} cannot be fenced away from node {node:?}: {why}; its attachment stays"
    )]
    Unfenceable {
        volume: String,
        node: String,
        why: String,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The epoch that fences `attachment` of `volume`, and whether it must first be raised in
/// the store: the volume's epoch when it is already ahead of the attachment's (fenced
/// before, maybe by a call a crash interrupted), else the next one.
pub(super) fn fence_epoch(volume: &Volume, attachment: &Attachment) -> (u64, bool) {
    if volume.epoch > attachment.epoch {
        (volume.epoch, false)
    } else {
        (volume.epoch.max(attachment.epoch) + 1, true)
    }
}

/// True when `volume` is attached on `node` at its current epoch: an engine there may
/// serve it. False when it is not attached, attached elsewhere, or fenced on that node.
pub fn attached_current_on(volume: &Volume, node: &str) -> bool {
    volume
        .attachment
        .as_ref()
        .is_some_and(|a| a.node_id == node && a.epoch == volume.epoch)
}

impl Controller {
    /// Fences the attachment of `volume_id` on `node_id`, a node that is down, so that the
    /// engine there can never write again (see the module comment). Idempotent: a volume
    /// already fenced on that node is fenced again at the same epoch.
    pub async fn fence_for_recovery(
        &self,
        volume_id: &str,
        node_id: &str,
    ) -> Result<RecoveryFence, RecoveryFenceError> {
        let _guard = self.locks.lock(volume_id).await;
        for _ in 0..CAS_ATTEMPTS {
            let Some(current) = self.store.volumes().get(volume_id).await? else {
                return Ok(RecoveryFence::NoVolume);
            };
            let volume = &current.value;
            let Some(attachment) = volume.attachment.as_ref().filter(|a| a.node_id == node_id)
            else {
                return Ok(RecoveryFence::NotAttachedThere {
                    attached_to: volume.attachment.as_ref().map(|a| a.node_id.clone()),
                });
            };
            // Nothing changes, not even the epoch or the members' states, when no member
            // could be fenced: the volume stays as it is until a member's node is back.
            if self.fencing.is_some() {
                if let Some(why) = self.no_reachable_member(volume_id).await? {
                    return Err(RecoveryFenceError::Unfenceable {
                        volume: volume_id.to_string(),
                        node: node_id.to_string(),
                        why,
                    });
                }
            }
            let (epoch, raise) = fence_epoch(volume, attachment);
            if raise {
                // Epochs only grow, so raising it is harmless if fencing stops here; the
                // next call finds it raised and fences at the same epoch.
                let mut raised = (**volume).clone();
                raised.epoch = epoch;
                match self
                    .store
                    .volumes()
                    .put(volume_id, raised, Some(current.version))
                    .await
                {
                    Ok(_) => {}
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            let outcome = self.fence_members(volume_id, epoch).await?;
            if self.fencing.is_some() && outcome.fenced == 0 {
                return Err(RecoveryFenceError::Unfenceable {
                    volume: volume_id.to_string(),
                    node: node_id.to_string(),
                    why: outcome.describe(),
                });
            }
            warn!(volume = %volume_id, node = %node_id, epoch, fenced = outcome.fenced, of = outcome.members, raised = raise, "fenced the attachment of a down node for recovery");
            return Ok(RecoveryFence::Fenced {
                epoch,
                fenced: outcome.fenced,
                members: outcome.members,
                raised: raise,
            });
        }
        Err(RecoveryFenceError::Store(StoreError::Conflict {
            kind: "volume",
            key: volume_id.to_string(),
            expected: None,
        }))
    }

    /// Why none of the volume's members can be fenced, when none is on a node that is up
    /// and has a replica server address; None when one may be.
    async fn no_reachable_member(&self, volume_id: &str) -> Result<Option<String>, StoreError> {
        let nodes = self.list_nodes().await?;
        let now = now_ms();
        let members: Vec<Versioned<Replica>> = self
            .volume_replicas(volume_id)
            .await?
            .into_iter()
            .filter(|r| r.value.state == ReplicaState::Ready)
            .collect();
        let reachable = members.iter().any(|r| {
            let node = nodes.iter().find(|n| n.id == r.value.node_id);
            node.is_some_and(|n| !n.address.is_empty()) && self.health(node, now) == Health::Up
        });
        Ok(match (members.len(), reachable) {
            (_, true) => None,
            (0, false) => Some("the volume has no member replica left".to_string()),
            (n, false) => Some(format!(
                "none of its {n} members ({}) is on a node that is up",
                members
                    .iter()
                    .map(|r| format!("{} on {}", r.value.id, r.value.node_id))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        })
    }

    /// Every volume as stored (the recovery controller's view of attachments and epochs).
    /// Since when each registered node is down by the health rule (its heartbeat, weighed
    /// with the node evidence), in milliseconds since the Unix epoch, at `now_ms`; the nodes
    /// that are up are not listed.
    pub async fn nodes_down_since(
        &self,
        now_ms: u64,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        Ok(self
            .list_nodes()
            .await?
            .iter()
            .filter_map(|n| match self.health(Some(n), now_ms) {
                crate::control::attach::Health::Up => None,
                crate::control::attach::Health::Down { for_ms } => {
                    Some((n.id.clone(), now_ms.saturating_sub(for_ms)))
                }
            })
            .collect())
    }

    pub async fn stored_volumes(&self) -> Result<Vec<Arc<Volume>>, StoreError> {
        Ok(self
            .store
            .volumes()
            .list()
            .await?
            .into_iter()
            .map(|v| v.value)
            .collect())
    }
}
